"""Hermetic tests of the pretrain stage: a tiny random LLaMA on the tiny_base tokenizer extended with Chinese pieces."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, kill9_then_rerun_matches, make_english_lines

TINY_RECIPE = """
name: core-test
model: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2,
        max_position_embeddings: 64, base_vocab_size: 600, tie_word_embeddings: false}
vocab: {num_added: 400}
pretrain:
  block_size: 32
  precision: fp32
  gradient_checkpointing: false
  zero_stage: 0
  eval_ratio: 0.02
  max_eval_blocks: 16
  seed: 7
  num_gpus: 1
  phase1: {learning_rate: 1.0e-2, global_batch_size: 4, per_device_batch_size: 2, max_steps: 4, weight_decay: 0.01,
           save_steps: 2, eval_steps: 100, logging_steps: 1}
  phase2: {learning_rate: 5.0e-3, global_batch_size: 4, per_device_batch_size: 2, max_steps: 4, weight_decay: 0.01,
           lora_r: 8, lora_alpha: 32, lora_dropout: 0.05, lora_targets: [q_proj, k_proj, v_proj, o_proj],
           modules_to_save: [embed_tokens, lm_head], save_steps: 2, eval_steps: 100, logging_steps: 1}
"""


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args):
    from pretrain.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="session")
def setup(tmp_path_factory, tiny_base, zh_corpus):
    """base model folder (600 rows) + extended tokenizer (750) + resized model + recipe file."""
    from conftest import resized_tiny_model

    return resized_tiny_model(tmp_path_factory.mktemp("pt"), TINY_RECIPE, tiny_base, zh_corpus)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_resize_keeps_old_logits_bit_exact_and_sizes_agree(setup):
    from transformers import AutoTokenizer

    a, b = _load(setup["base"]), _load(setup["resized"])
    tok = AutoTokenizer.from_pretrained(str(setup["resized"]))
    assert b.config.vocab_size == len(tok) == setup["n_new"] == b.get_input_embeddings().weight.shape[0] == b.lm_head.weight.shape[0]
    assert (setup["resized"] / "tokenizer.model").is_file()
    text = " ".join(make_english_lines(8, 11))
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(setup["base"]))(text)["input_ids"]])
    assert int(ids.max()) < setup["n_old"]
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    assert torch.equal(la, lb[..., : setup["n_old"]])
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight[: setup["n_old"]])
    assert torch.equal(a.lm_head.weight, b.lm_head.weight[: setup["n_old"]])


def test_subword_mean_rows_are_means_of_base_pieces(setup):
    from vocab.spmodel import load_model

    a, b = _load(setup["base"]), _load(setup["resized"])
    base = load_model(setup["base"] / "tokenizer.model")
    pieces = [p.piece for p in base.pieces]
    src = json.loads((setup["resized"] / "init_sources.json").read_text())
    ext_pieces = [p.piece for p in setup["ext"].pieces]
    assert len(src) == setup["n_new"] - setup["n_old"]
    for k, piece in enumerate(ext_pieces[setup["n_old"]:]):
        ids = src[piece]
        assert ids and all(0 <= i < setup["n_old"] for i in ids)
        # the base pieces spell the new piece exactly (byte pieces reassembled into UTF-8)
        raw = b"".join(bytes([int(pieces[i][3:5], 16)]) if pieces[i].startswith("<0x") else pieces[i].encode() for i in ids)
        assert raw.decode("utf-8") == piece
        row = setup["n_old"] + k
        for old, new in ((a.model.embed_tokens.weight, b.model.embed_tokens.weight), (a.lm_head.weight, b.lm_head.weight)):
            assert torch.equal(new[row], old[ids].mean(0))


def test_resize_inits_mean_and_normal(setup, tmp_path):
    assert _cli("resize", "--model", setup["base"], "--tokenizer", setup["tok"], "--out", tmp_path / "m", "--init", "mean") == 0
    assert _cli("resize", "--model", setup["base"], "--tokenizer", setup["tok"], "--out", tmp_path / "n", "--init", "normal") == 0
    a, m, n = _load(setup["base"]), _load(tmp_path / "m"), _load(tmp_path / "n")
    o = setup["n_old"]
    assert torch.equal(m.model.embed_tokens.weight[o:], a.model.embed_tokens.weight.mean(0).expand_as(m.model.embed_tokens.weight[o:]))
    new = n.model.embed_tokens.weight[o:]
    assert abs(new.std().item() - a.config.initializer_range) < 0.005
    assert torch.equal(n.model.embed_tokens.weight[:o], a.model.embed_tokens.weight)


def test_resize_takes_init_and_seed_from_the_recipe(setup, tmp_path, capsys):
    common = ("--model", setup["base"], "--tokenizer", setup["tok"])
    assert _cli("resize", *common, "--out", tmp_path / "r", "--recipe", "tiny", "--set", "model.check=false",
                "--set", "pretrain.init=normal", "--set", "pretrain.seed=7") == 0
    assert _cli("resize", *common, "--out", tmp_path / "f", "--init", "normal", "--seed", "7") == 0
    assert _cli("resize", *common, "--out", tmp_path / "d", "--init", "normal") == 0  # seed 0 without a recipe
    r, f, d = (_load(tmp_path / x).model.embed_tokens.weight for x in "rfd")
    assert torch.equal(r, f) and not torch.equal(r, d)
    err = _err(capsys, "resize", *common, "--out", tmp_path / "x", "--recipe", "tiny", "--set", "model.check=false",
               "--set", "pretrain.init=zeros")
    assert err == "error: pretrain.init: 'zeros' is not one of subword-mean, mean, normal"
    assert not (tmp_path / "x").exists()


def _err(capsys, *args) -> str:
    capsys.readouterr()
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_bad_inputs_fail_before_training(setup, tmp_path, capsys, tiny_base):
    import shutil

    from vocab.hf_export import save_tokenizer_folder
    from vocab.merge import build_extended
    from vocab.spmodel import load_model

    rc = str(setup["recipe"])
    # tokenizer one piece longer than the model (49,953 vs 49,954 situation)
    ext1 = build_extended(setup["ext"], ["仮仮"])
    save_tokenizer_folder(ext1, tmp_path / "tok1")
    e = _err(capsys, "phase1", "--recipe", rc, "--model", setup["resized"], "--tokenizer", tmp_path / "tok1",
             "--corpus", setup["corpus"], "--out", tmp_path / "o1")
    assert f"{setup['n_new']:,}" in e and f"{setup['n_new'] + 1:,}" in e and "tok1" in e
    # config.json left at the base size
    bad = tmp_path / "badcfg"
    shutil.copytree(setup["resized"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = setup["n_old"]
    (bad / "config.json").write_text(json.dumps(cfg))
    e = _err(capsys, "phase2", "--recipe", rc, "--model", bad, "--corpus", setup["corpus"], "--out", tmp_path / "o2")
    assert "badcfg" in e and "vocab_size" in e
    # a tokenizer that is not a superset of the model's vocabulary
    other = load_model(tiny_base)
    other.pieces[300].piece, other.pieces[301].piece = other.pieces[301].piece, other.pieces[300].piece
    save_tokenizer_folder(build_extended(other, ["仮仮"]), tmp_path / "tok2")
    e = _err(capsys, "resize", "--model", setup["base"], "--tokenizer", tmp_path / "tok2", "--out", tmp_path / "o3")
    assert "not an extension" in e and "vocab build" in e
    # empty corpus
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    e = _err(capsys, "phase1", "--recipe", rc, "--model", setup["resized"], "--corpus", tmp_path / "empty", "--out", tmp_path / "o4")
    assert "empty" in e and "a.txt" in e
    # block size beyond the model's context
    e = _err(capsys, "phase1", "--recipe", rc, "--model", setup["resized"], "--corpus", setup["corpus"], "--out", tmp_path / "o5",
             "--block-size", "4096")
    assert "max_position_embeddings 64" in e
    # unwritable output folder
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: permissions do not bind, use a path under a file instead
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "out"
    else:
        target = ro / "out"
    e = _err(capsys, "phase1", "--recipe", rc, "--model", setup["resized"], "--corpus", setup["corpus"], "--out", target)
    assert "not writable" in e


def test_phase1_trains_only_embeddings_and_new_rows_only(setup, tmp_path):
    rc = str(setup["recipe"])
    cache = setup["dir"] / "cache"
    assert _cli("phase1", "--recipe", rc, "--model", setup["resized"], "--corpus", setup["corpus"], "--out", tmp_path / "p1",
                "--cache-dir", cache) == 0
    assert _cli("phase1", "--recipe", rc, "--model", setup["resized"], "--corpus", setup["corpus"], "--out", tmp_path / "p1n",
                "--cache-dir", cache, "--new-rows-only") == 0
    r = _load(setup["resized"]).state_dict()
    o = setup["n_old"]
    for name, new_rows_only in (("p1", False), ("p1n", True)):
        p = _load(tmp_path / name).state_dict()
        assert p.keys() == r.keys()
        for k in r:
            if k == "model.embed_tokens.weight":
                if new_rows_only:
                    assert torch.equal(p[k][:o], r[k][:o]), "old rows moved"
                    assert not torch.equal(p[k][o:], r[k][o:])
                else:
                    assert not torch.equal(p[k][:o], r[k][:o])
            else:
                assert torch.equal(p[k], r[k]), f"{name}: {k} changed"
        out = tmp_path / name
        for f in ("manifest.json", "resolved_config.json", "metrics.jsonl", "loss.png", "tokenizer.model", "config.json"):
            assert (out / f).is_file(), f
        assert any((out / "tensorboard").iterdir())
        man = json.loads((out / "manifest.json").read_text())
        assert man["inputs"]["tokenizer"]["sha256"] and man["inputs"]["data"]["files"] and man["config"]["seed"] == 7


def test_phase2_adapter_loads_in_vanilla_peft_and_merge_matches(setup, tmp_path):
    from peft import PeftModel

    assert _cli("phase2", "--recipe", str(setup["recipe"]), "--model", setup["resized"], "--corpus", setup["corpus"],
                "--out", tmp_path / "p2", "--cache-dir", setup["dir"] / "cache") == 0
    out = tmp_path / "p2"
    assert (out / "adapter_model.safetensors").stat().st_size > 10_000
    assert (out / "tokenizer.model").is_file()
    res = json.loads((out / "result.json").read_text())
    assert set(res["adapter"]["full_modules"]) == {"embed_tokens", "lm_head"}
    model = PeftModel.from_pretrained(_load(setup["resized"]), str(out)).eval()
    ids = torch.randint(0, setup["n_new"], (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = model(ids).logits
        merged = model.merge_and_unload()
        lb = merged(ids).logits
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lr = _load(setup["resized"])(ids).logits
    assert not torch.allclose(la, lr, atol=1e-4)


def test_plan_paper_percentages():
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert _cli("plan", "--recipe", "llama-7b", "--vocab-size", "49953") == 0
    text = buf.getvalue()
    assert "= 2.97%" in text and "= 6.06%" in text
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert _cli("plan", "--recipe", "llama-13b", "--vocab-size", "49953", "--json") == 0
    p = json.loads(buf.getvalue())
    assert p["phases"][0]["enabled"] is False
    assert round(p["phases"][1]["percent"], 2) == 4.10


def test_recipe_overrides_and_errors(setup):
    from pretrain.cli import parser, resolve_training
    from zhllama.recipe import load_recipe
    from zhllama.errors import UserError

    r = load_recipe("llama-7b")
    assert r.pretrain.phase1.learning_rate == 2e-4 and r.pretrain.phase2.learning_rate == 1e-4 and r.pretrain.block_size == 512
    a = parser().parse_args(["phase2", "--recipe", "llama-7b", "--model", "m", "--corpus", "c", "--out", "o",
                             "--learning-rate", "3e-4", "--batch-size", "64", "--block-size", "256", "--seed", "5",
                             "--set", "pretrain.phase2.warmup_ratio=0.1"])
    recipe, s = resolve_training(a, "phase2")
    assert (s.section.learning_rate, s.section.global_batch_size, s.seed, s.section.warmup_ratio) == (3e-4, 64, 5, 0.1)
    assert s.section is recipe.pretrain.phase2  # the recipe's own section object, not a copy with its own defaults
    assert recipe.pretrain.block_size == 256
    with pytest.raises(UserError, match="unknown setting"):
        resolve_training(parser().parse_args(["phase1", "--recipe", "tiny", "--model", "m", "--corpus", "c", "--out", "o",
                                              "--set", "pretrain.phase1.learnin_rate=1"]), "phase1")
    with pytest.raises(UserError, match="unknown recipe"):
        load_recipe("llama-70b")


def test_data_cache_keyed_on_tokenizer_files_and_block_size(setup, tmp_path):
    from pretrain.data import build_datasets

    c = tmp_path / "c"
    tr, ev, info = build_datasets([setup["corpus"]], setup["tok"], 32, c, eval_ratio=0.02)
    assert not info["reused_cache"] and len(tr) > 10 and ev is not None and len(ev) > 0
    assert all(len(x) == 32 for x in tr[:5]["input_ids"])
    _, _, again = build_datasets([setup["corpus"]], setup["tok"], 32, c, eval_ratio=0.02)
    assert again["reused_cache"] and again["cache_key"] == info["cache_key"]
    _, _, other_block = build_datasets([setup["corpus"]], setup["tok"], 16, c, eval_ratio=0.02)
    _, _, other_tok = build_datasets([setup["corpus"]], setup["base"], 32, c, eval_ratio=0.02)
    assert len({info["cache_key"], other_block["cache_key"], other_tok["cache_key"]}) == 3
    assert not other_block["reused_cache"] and not other_tok["reused_cache"]
    # EOS separates documents
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(str(setup["tok"])).eos_token_id
    assert any(eos in x for x in tr[:20]["input_ids"])


def _phase2_cmd(setup, out, *extra):
    return [sys.executable, "-m", "pretrain", "phase2", "--recipe", str(setup["recipe"]), "--model", str(setup["resized"]),
            "--corpus", str(setup["corpus"]), "--out", str(out), "--cache-dir", str(setup["dir"] / "cache"), *extra]


def test_kill9_then_rerun_gives_identical_adapter(setup, tmp_path):
    run = tmp_path / "run"
    kill9_then_rerun_matches(_phase2_cmd(setup, run, "--max-steps", "8", "--save-steps", "2"), run, tmp_path, _env())


def test_two_process_torchrun_matches_single_process(setup, tmp_path):
    args = ("--max-steps", "4", "--lora-dropout", "0", "--save-steps", "100")
    single = subprocess.run(_phase2_cmd(setup, tmp_path / "one", *args), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "pretrain"] + \
        _phase2_cmd(setup, tmp_path / "two", *args)[3:]
    two = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    assert r2["world_size"] == 2 and r2["gradient_accumulation_steps"] == 1 and r1["gradient_accumulation_steps"] == 2
    l1 = [h["loss"] for h in json.loads((tmp_path / "one" / "log_history.json").read_text()) if "loss" in h]
    l2 = [h["loss"] for h in json.loads((tmp_path / "two" / "log_history.json").read_text()) if "loss" in h]
    assert len(l1) == len(l2) == 4
    for x, y in zip(l1, l2):
        assert abs(x - y) < 1e-3 * max(1.0, abs(x)), (l1, l2)
    assert abs(r1["eval_loss_after"] - r2["eval_loss_after"]) < 1e-3


def test_changed_corpus_never_continues_old_checkpoints(setup, tmp_path, capsys):
    from conftest import make_chinese_lines

    out = tmp_path / "p2"
    common = ["phase2", "--recipe", setup["recipe"], "--model", setup["resized"], "--out", out,
              "--cache-dir", setup["dir"] / "cache", "--max-steps", "2", "--save-steps", "1"]
    assert _cli(*common, "--corpus", setup["corpus"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("\n".join(make_chinese_lines(400, 77)) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert _cli(*common, "--corpus", other) == 2
    assert "holds checkpoints from a run with different inputs" in capsys.readouterr().err
    assert _cli(*common, "--corpus", other, "--restart-if-changed") == 0
    res = json.loads((out / "result.json").read_text())
    assert res["resumed_from"] is None and res["global_step"] == 2
    # same inputs again: the finished run is up to date, nothing is redone
    before = (out / "result.json").read_bytes()
    capsys.readouterr()
    assert _cli(*common, "--corpus", other, "--restart-if-changed") == 0
    assert "up to date" in capsys.readouterr().out and (out / "result.json").read_bytes() == before
