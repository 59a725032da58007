"""SFT stage, hermetic: templates, masking, data validation, preview, plan, train -> merge -> generate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_llama

from sft.data import IGNORE_INDEX, Collator, ExampleEncoder, encode_records, load_records
from zhllama.chat import REGISTRY, get
from zhllama.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
H = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
HI = ("Below is an instruction that describes a task, paired with an input that provides further context. "
      "Write a response that appropriately completes the request.\n\n")


# ---------------------------------------------------------------- templates (byte-exact)
def test_chinese_alpaca_template_bytes():
    t = get("chinese-alpaca")
    assert t.render("写诗") == H + "### Instruction:\n写诗\n\n### Response: "
    # input joined to the instruction with one newline; no "### Input:" block
    assert t.render("翻译", "你好") == H + "### Instruction:\n翻译\n你好\n\n### Response: "
    assert get(None).name == "chinese-alpaca"


def test_stanford_alpaca_template_bytes():
    t = get("stanford-alpaca")
    assert t.render("Do it") == H + "### Instruction:\nDo it\n\n### Response:"
    assert t.render("Do it", "x") == HI + "### Instruction:\nDo it\n\n### Input:\nx\n\n### Response:"


def test_alpaca_lora_template_bytes():
    t = get("alpaca-lora")
    assert t.render("Do it") == H + "### Instruction:\nDo it\n\n### Response:\n"
    assert t.render("Do it", "x") == HI + "### Instruction:\nDo it\n\n### Input:\nx\n\n### Response:\n"


def test_unknown_template_is_user_error():
    with pytest.raises(UserError, match="unknown template 'vicuna'.*chinese-alpaca"):
        get("vicuna")


def test_conversation_one_turn_equals_render_and_concatenates():
    for t in REGISTRY.values():
        assert t.render_conversation([], "q") == t.render("q")
    t = get("chinese-alpaca")
    two = t.render_conversation([("q1", "a1")], "q2")
    # a past answer ends in EOS, as every trained answer does
    assert two == H + "### Instruction:\nq1\n\n### Response: a1</s>\n\n### Instruction:\nq2\n\n### Response: "


# ---------------------------------------------------------------- tokenizer / model fixtures
@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


# ---------------------------------------------------------------- masking
# templates with their own end-of-turn token (llama3) need a tokenizer that has it (tests/test_chat_template.py)
@pytest.mark.parametrize("name", sorted(n for n, t in REGISTRY.items() if not t.eos))
@pytest.mark.parametrize("inp", ["", "the input"])
def test_labels_mask_exactly_the_prompt_and_train_eos(tok, name, inp):
    enc = ExampleEncoder(tok, get(name), max_length=512)
    rec = {"instruction": "Say the words", "input": inp, "output": "the water was new"}
    e = enc.encode(rec)
    prompt_ids = tok(get(name).render(rec["instruction"], inp))["input_ids"]
    # the prompt tokens are exactly what serving feeds the model (BOS included)
    assert e.input_ids[: len(prompt_ids)] == prompt_ids and prompt_ids[0] == tok.bos_token_id
    assert e.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    tail = e.labels[len(prompt_ids):]
    assert IGNORE_INDEX not in tail and tail == e.input_ids[len(prompt_ids):]
    assert e.input_ids[-1] == tok.eos_token_id and e.labels[-1] == tok.eos_token_id
    # the target decodes back to the output (no extra leading space in serving-consistent mode)
    assert tok.decode(tail[:-1]) == rec["output"]


def test_reference_tokenization_adds_boundary_space(tok):
    rec = {"instruction": "Say", "input": "", "output": "the end"}
    ours = ExampleEncoder(tok, get("chinese-alpaca"), 512).encode(rec)
    ref = ExampleEncoder(tok, get("chinese-alpaca"), 512, reference=True).encode(rec)
    assert ours.n_prompt == ref.n_prompt
    t_ours = tok.convert_ids_to_tokens(ours.input_ids[ours.n_prompt:])
    t_ref = tok.convert_ids_to_tokens(ref.input_ids[ref.n_prompt:])
    assert t_ref[0].startswith("▁") and not t_ours[0].startswith("▁")
    assert ref.input_ids[ref.n_prompt:] == tok("the end", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_fitting_example_keeps_eos_and_overlong_is_reported(tok):
    t = get("chinese-alpaca")
    rec = {"instruction": "Say", "input": "", "output": "the end"}
    n = len(ExampleEncoder(tok, t, 10_000).encode(rec).input_ids)
    exact = ExampleEncoder(tok, t, n).encode(rec)
    assert not exact.truncated and exact.input_ids[-1] == tok.eos_token_id
    logs = []
    recs = [load_records_from(rec)]
    s = encode_records(recs, ExampleEncoder(tok, t, n - 1), "truncate", log=logs.append)
    assert s.overlong == ["mem#0"] and "longer than max_length" in logs[0] and "mem#0" in logs[0]
    assert s.examples[0]["input_ids"][-1] != tok.eos_token_id
    assert encode_records(recs + [load_records_from({"instruction": "x", "output": "y"}, 1)],
                          ExampleEncoder(tok, t, n - 1), "drop", log=logs.append).overlong == ["mem#0"]
    with pytest.raises(UserError, match="longer than max_length"):
        encode_records(recs, ExampleEncoder(tok, t, n - 1), "error")


def load_records_from(d, i=0):
    from sft.data import Record

    return Record(d["instruction"], d.get("input", ""), d["output"], f"mem#{i}")


def test_collator_pads_with_pad_and_ignore():
    c = Collator(pad_id=9)
    b = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [1], "labels": [1]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [1, 9, 9]]
    assert b["labels"].tolist() == [[-100, 2, 3], [1, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


# ---------------------------------------------------------------- data validation
def test_json_and_jsonl_mixed(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([{"instruction": "i1", "input": "", "output": "o1"}]), encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text('{"instruction": "i2", "output": "o2"}\n\n{"instruction": "i3", "input": "x", "output": "o3"}\n',
                 encoding="utf-8")
    recs = load_records([a, b])
    assert [(r.instruction, r.input, r.output) for r in recs] == [("i1", "", "o1"), ("i2", "", "o2"), ("i3", "x", "o3")]


def test_invalid_records_named_by_file_and_index(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"instruction": "ok", "output": "ok"}, {"instruction": "no output"},
                             {"instruction": "empty", "output": "  "}]), encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_records([p])
    msg = str(e.value)
    assert "2 invalid" in msg and f"{p} record 1: missing field(s) output" in msg and f"{p} record 2: empty output" in msg
    logs = []
    assert len(load_records([p], drop_invalid=True, log=logs.append)) == 1 and "dropped 2" in logs[0]


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.json: line 3, column \d+: malformed JSON"):
        load_records([p])
    q = tmp_path / "broken.jsonl"
    q.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"broken.jsonl: line 2, column \d+: malformed JSON"):
        load_records([q])


def test_cli_error_is_one_line_exit_2(tmp_path, tok_dir):
    p = tmp_path / "broken.json"
    p.write_text('[{"instruction": "a" "output": "b"}]', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "sft", "preview", "--data", str(p), "--tokenizer", str(tok_dir)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "broken.json: line 1, column" in r.stderr
    r = subprocess.run([sys.executable, "-m", "sft", "preview", "--data", str(ROOT / "corpora/instructions_zh.json"),
                        "--tokenizer", str(tok_dir), "--template", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown template 'nope'" in r.stderr


def test_shipped_sample_is_valid_and_heldout_unseen():
    from corpora.instructions import HELDOUT, generate, sample_path

    recs = load_records([sample_path()])
    assert 100 <= len(recs) <= 300
    assert [r.__dict__["output"] for r in recs] == [g["output"] for g in generate()]  # file == generator
    seen = {r.instruction for r in recs}
    assert not seen & set(HELDOUT)


# ---------------------------------------------------------------- preview
def test_preview_json_matches_encoder(tmp_path, tok_dir, tok, capsys):
    from sft.preview import preview

    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "Say", "input": "x", "output": "the end"}] * 2), encoding="utf-8")
    preview([p], tok_dir, "alpaca-lora", n=1, as_json=True)
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and set(rows[0]) == {"prompt", "target", "input_ids", "labels"}
    e = ExampleEncoder(tok, get("alpaca-lora")).encode({"instruction": "Say", "input": "x", "output": "the end"})
    assert rows[0]["input_ids"] == e.input_ids and rows[0]["labels"] == e.labels
    assert rows[0]["prompt"].endswith("### Response:\n") and rows[0]["target"] == "the end</s>"
    preview([p], tok_dir, None, n=1)
    text = capsys.readouterr().out
    assert "[1 <s>]" in text and f"<{tok.eos_token_id} </s>>" in text


# ---------------------------------------------------------------- plan
def test_plan_7b_is_6_22_percent():
    from sft.plan import plan

    p = plan("llama-7b", 49954)
    assert f"{p['trainable_pct']:.2f}" == "6.22"
    r = subprocess.run([sys.executable, "-m", "sft", "plan", "--recipe", "llama-7b", "--vocab-size", "49954"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "= 6.22%" in r.stdout


def test_plan_counts_match_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.recipe import ModelShape
    from sft.config import ALL_PROJ
    from sft.plan import count

    shape = ModelShape(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, base_vocab_size=100)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=32, target_modules=ALL_PROJ,
                                     modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # peft keeps the original embed/head as frozen copies: count each once for the total
    total = sum(p.numel() for n, p in m.named_parameters() if "original_module" not in n)
    c = count(shape, 101, 8, ALL_PROJ, ["embed_tokens", "lm_head"])
    assert (c["trainable"], c["total"]) == (trainable, total)
    del torch


# ---------------------------------------------------------------- train -> merge -> generate
@pytest.fixture(scope="module")
def tiny_model(tok_dir, tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("sft_base"), tok_dir, hidden=48)


@pytest.fixture(scope="module")
def sft_recipe(tmp_path_factory):
    p = tmp_path_factory.mktemp("recipe") / "t.yaml"
    p.write_text(
        "name: t\nmodel: {hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4,"
        " num_key_value_heads: 2, base_vocab_size: 600}\n"
        "sft: {max_length: 160, learning_rate: 3.0e-3, global_batch_size: 8, per_device_batch_size: 8, max_steps: 12,"
        " precision: fp32, gradient_checkpointing: false, eval_ratio: 0.0, logging_steps: 2, eval_steps: 6,"
        " save_steps: 6, warmup_ratio: 0.03}\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, english_lines):
    import random

    rng = random.Random(0)
    d = tmp_path_factory.mktemp("sftdata")
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": w} for w in (l.split()[0] for l in english_lines[:80])]
    rows += [{"instruction": "Count", "input": str(n), "output": " ".join(str(k) for k in range(n, n + 3))}
             for n in range(40)]
    rng.shuffle(rows)
    (d / "train.json").write_text(json.dumps(rows[:100]), encoding="utf-8")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[100:]), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def trained(tiny_model, sft_data, sft_recipe, tmp_path_factory):
    from sft.train import train

    out = tmp_path_factory.mktemp("sft_run") / "adapter"
    res = train(tiny_model, [sft_data / "train.json"], out, recipe=str(sft_recipe),
                eval_data=[sft_data / "eval.jsonl"], log=lambda *_: None)
    return out, res


def test_train_lowers_heldout_loss_and_writes_adapter(trained, tok):
    out, res = trained
    assert res["eval_loss_after"] < res["eval_loss_before"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "sft_template.json", "chat_template.jinja",
              "manifest.json", "resolved_config.json", "loss.png", "result.json"):
        assert (out / f).is_file(), f
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(out))
    # [PAD] appended: one more piece, every other id unchanged
    assert len(t) == len(tok) + 1 and t.pad_token == "[PAD]" and t.pad_token_id == len(tok)
    assert t("the water")["input_ids"] == tok("the water")["input_ids"]
    assert json.loads((out / "sft_template.json").read_text())["template"] == "chinese-alpaca"
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))


def test_resume_gives_identical_adapter(trained, tiny_model, sft_data, sft_recipe, tmp_path):
    """Interrupted at the step-6 checkpoint and resumed: same weights as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    from sft.train import train

    out, full = trained
    run = tmp_path / "adapter"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("checkpoint-12"))
    (run / "adapter_model.safetensors").unlink()
    assert (run / "checkpoints" / "checkpoint-6").is_dir()
    res = train(tiny_model, [sft_data / "train.json"], run, recipe=str(sft_recipe),
                eval_data=[sft_data / "eval.jsonl"], log=lambda *_: None)
    assert res["resumed_from"].endswith("checkpoint-6")
    # train_loss and tokens seen cover all 12 steps, not only the 6 after the resume
    assert res["train_loss"] == pytest.approx(full["train_loss"], rel=1e-5)
    assert res["train_loss_this_call"] != pytest.approx(full["train_loss"], rel=1e-3)
    assert res["tokens_seen"] == full["tokens_seen"]
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


def test_model_tokenizer_mismatch_fails_before_training(tiny_model, sft_data, sft_recipe, tmp_path, tok_dir):
    import shutil

    from sft.train import train

    bad = tmp_path / "bad_model"
    shutil.copytree(tiny_model, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] += 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="embedding rows but tokenizer"):
        train(bad, [sft_data / "train.json"], tmp_path / "o", recipe=str(sft_recipe), log=lambda *_: None)


@pytest.fixture(scope="module")
def merged(trained, tiny_model, tmp_path_factory):
    from sft.merge import merge

    out = tmp_path_factory.mktemp("merged") / "m"
    res = merge(tiny_model, [trained[0]], out, dtype="float32", log=lambda *_: None)
    return out, res


def test_failed_merge_leaves_no_folder_that_looks_finished(trained, tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "sft", "merge", "--base", str(tiny_model), "--adapter", str(trained[0]),
                        "--out", str(tmp_path / "m"), "--template", "nope", "--no-verify"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown template 'nope'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m" / "config.json").exists() and not (tmp_path / "m" / "model.safetensors").exists()


def test_merge_reproduces_peft_logits(merged):
    out, res = merged
    v = res["verify"]
    assert v["ok"] and v["max_abs_diff"] < 1e-4 and v["top1_agreement"] == 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == res["vocab_size"] == res["base_vocab_size"] + 1
    # the chat template travels: apply_chat_template on the merged folder gives the training prompt's ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "Repeat: water"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ids == ExampleEncoder(tok, get("chinese-alpaca"), 512).encode(
        {"instruction": "Repeat: water", "output": "water"}).input_ids[: len(ids)]
    assert ids == tok(get("chinese-alpaca").render("Repeat: water"))["input_ids"]


def test_merged_loads_plainly_and_greedy_is_deterministic(merged):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.generate import answer, load

    out, res = merged
    m = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(str(out))
    assert m.get_input_embeddings().weight.shape[0] == len(t) == res["vocab_size"]
    model, tok, tname = load(out)
    a = answer(model, tok, tname, "Repeat: water", preset="greedy", max_new_tokens=12)
    b = answer(model, tok, tname, "Repeat: water", preset="greedy", max_new_tokens=12)
    assert a == b
    # the generate path renders with the same template as training
    r = subprocess.run([sys.executable, "-m", "sft", "generate", "--model", str(out), "--prompt", "Repeat: water",
                        "--preset", "greedy", "--max-new-tokens", "12", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)[0]["answer"] == a


def test_merge_chain_of_two_adapters(trained, merged, tiny_model, tmp_path):
    """LLaMA-Plus then Alpaca-Plus order: the second adapter was made on base + first adapter."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.config import ALL_PROJ
    from sft.merge import merge

    torch.manual_seed(1)
    m = AutoModelForCausalLM.from_pretrained(str(merged[0]), dtype=torch.float32)
    p = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ[:4],
                                     modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, w in p.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                w.add_(torch.randn_like(w) * 0.02)
    second = tmp_path / "second"
    p.save_pretrained(str(second))
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(trained[0] / f, second / f)
    res = merge(tiny_model, [trained[0], second], tmp_path / "chain", dtype="float32", log=lambda *_: None)
    assert res["verify"]["ok"] and res["verify"]["max_abs_diff"] < 1e-4 and res["verify"]["top1_agreement"] == 1.0
    res = merge(tiny_model, [trained[0]], tmp_path / "bf16", dtype="bfloat16", log=lambda *_: None)
    assert res["verify"]["ok"] and res["verify"]["top1_agreement"] >= 0.95


def test_merge_rejects_tokenizer_mismatch(trained, tiny_model, tmp_path):
    import shutil

    from sft.merge import merge

    ad = tmp_path / "ad"
    shutil.copytree(trained[0], ad, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tiny_model / f, ad / f)
    with pytest.raises(UserError, match="49,953 and 49,954"):
        merge(tiny_model, [ad], tmp_path / "m", dtype="float32", log=lambda *_: None)


def test_chat_multiturn_uses_template(merged):
    from sft.generate import chat, load

    model, tok, tname = load(merged[0])
    inputs = iter(["Repeat: water", "Count", "/quit"])
    outs = []
    hist = chat(model, tok, tname, preset="greedy", max_new_tokens=5, read=lambda _: next(inputs),
                write=lambda *a, **k: outs.append(a))
    assert [q for q, _ in hist] == ["Repeat: water", "Count"]


def test_checkpoints_from_other_data_are_never_continued(trained, tiny_model, sft_data, sft_recipe, tmp_path):
    import shutil

    from sft.train import train
    from zhllama.errors import UserError

    out, _ = trained
    run = tmp_path / "adapter"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("checkpoint-12"))
    other = tmp_path / "other.json"
    recs = json.loads((sft_data / "train.json").read_text(encoding="utf-8"))
    other.write_text(json.dumps(recs[::-1][:-1], ensure_ascii=False), encoding="utf-8")
    kw = dict(recipe=str(sft_recipe), eval_data=[sft_data / "eval.jsonl"], log=lambda *_: None)
    with pytest.raises(UserError, match="holds checkpoints from a run with different data; resuming would mix them"):
        train(tiny_model, [other], run, **kw)
    res = train(tiny_model, [other], run, resume="auto", **kw)
    assert res["resumed_from"] is None and res["global_step"] == 12


def test_packed_and_padded_training_log_the_same_losses(tiny_model, sft_data, sft_recipe, tmp_path):
    """The Trainer sees the same loss with padding-free batches: same count of trained tokens, same updates."""
    from sft.train import train

    losses = {}
    for packing in (True, False):
        out = tmp_path / f"packing-{packing}"
        train(tiny_model, [sft_data / "train.json"], out, recipe=str(sft_recipe), max_steps=3, log=lambda *_: None,
              overrides={"packing": packing, "lora_dropout": 0.0, "logging_steps": 1, "eval_ratio": 0.0})
        losses[packing] = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=2e-4)
