"""Adapter lineage: merges and loaders apply exactly the chain the adapters were trained as, or exit 2 naming it."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import save_tiny_llama

from zhllama.errors import UserError


@pytest.fixture(scope="module")
def run(tiny_base, tmp_path_factory, english_lines):
    """base (phase-1 stand-in) -> phase2 (LoRA + embed/head, recorded like pretrain does) -> sft (trained for real)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft.train import train
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model
    from zhllama.lineage import record_lineage

    root = tmp_path_factory.mktemp("run")
    tok_dir = root / "tok"
    save_tokenizer_folder(load_model(tiny_base), tok_dir)
    base = save_tiny_llama(root / "phase1", tok_dir, seed=0, layers=1)
    foreign = save_tiny_llama(root / "other", tok_dir, seed=1, layers=1)  # same shapes, other weights
    torch.manual_seed(2)
    p = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, w in p.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                w.add_(torch.randn_like(w) * 0.05)
    phase2 = root / "pretrain" / "phase2"
    p.save_pretrained(str(phase2))
    for f in tok_dir.iterdir():
        shutil.copy2(f, phase2 / f.name)
    record_lineage(phase2, base)
    data = root / "sft.json"
    data.write_text(json.dumps([{"instruction": f"Repeat: {w}", "input": "", "output": w}
                                for w in (l.split()[0] for l in english_lines[:40])]), encoding="utf-8")
    recipe = root / "r.yaml"
    recipe.write_text("name: t\nmodel: {base_vocab_size: 600}\nsft: {max_length: 200, learning_rate: 3.0e-3, "
                      "global_batch_size: 8, per_device_batch_size: 8, max_steps: 3, precision: fp32, "
                      "gradient_checkpointing: false, eval_ratio: 0.0, logging_steps: 1, save_steps: 100}\n")
    sft = root / "sft" / "adapter"
    train(base, [data], sft, adapter=phase2, recipe=str(recipe), log=lambda *_: None)
    return {"base": base, "foreign": foreign, "phase2": phase2, "sft": sft, "root": root, "data": data, "recipe": recipe}


def _merge_cli(capsys, *args):
    from sft.cli import main

    rc = main(["merge", *map(str, args), "--dtype", "float32"])
    return rc, capsys.readouterr().err


def test_adapters_record_what_they_were_trained_on(run):
    from zhllama.lineage import adapter_sha256, weights_sha256

    rec = json.loads((run["sft"] / "lineage.json").read_text())
    assert rec["base"]["weights_sha256"] == weights_sha256(run["base"])
    assert rec["parent_adapter"]["sha256"] == adapter_sha256(run["phase2"])
    assert rec["parent_adapter"]["relpath"] == "../../pretrain/phase2"
    assert weights_sha256(run["base"]) != weights_sha256(run["foreign"])


def test_one_adapter_alone_derives_the_chain_and_equals_the_explicit_merge(run, tmp_path):
    from safetensors.torch import load_file

    from sft.merge import merge

    derived = merge(None, [run["sft"]], tmp_path / "derived", dtype="float32", log=lambda *_: None)
    explicit = merge(run["base"], [run["phase2"], run["sft"]], tmp_path / "explicit", dtype="float32",
                     log=lambda *_: None)
    assert derived["adapters"] == [str(run["phase2"].resolve()), str(run["sft"].resolve())]
    a = load_file(str(tmp_path / "derived" / "model.safetensors"))
    b = load_file(str(tmp_path / "explicit" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    mv = json.loads((tmp_path / "derived" / "merge_verify.json").read_text())
    assert mv["ok"] and mv["chain"]["verified"] is True
    assert [x["path"] for x in mv["chain"]["adapters"]] == derived["adapters"]
    assert mv["chain"]["base"]["path"] == str(run["base"].resolve())
    # the [PAD] row of SFT is kept: phase 2's 600-row matrices do not replace SFT's 601
    assert derived["vocab_size"] == 601


@pytest.mark.parametrize("case", ["wrong-order", "duplicate", "sft-then-itself"])
def test_bad_explicit_chains_exit_2_naming_the_expected_chain(run, tmp_path, capsys, case):
    adapters = {"wrong-order": [run["sft"], run["phase2"]], "duplicate": [run["phase2"], run["phase2"]],
                "sft-then-itself": [run["phase2"], run["sft"], run["sft"]]}[case]
    args = ["--base", run["base"]] + [x for a in adapters for x in ("--adapter", a)] + ["--out", tmp_path / "m"]
    rc, err = _merge_cli(capsys, *args)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1
    expected = f"{run['base'].resolve()} -> {run['phase2'].resolve()} -> {run['sft'].resolve()}"
    if case == "duplicate":
        expected = f"{run['base'].resolve()} -> {run['phase2'].resolve()}"
    assert f"expected chain: {expected}" in err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_foreign_base_of_the_same_shape_exits_2(run, tmp_path, capsys):
    rc, err = _merge_cli(capsys, "--base", run["foreign"], "--adapter", run["sft"], "--out", tmp_path / "m")
    assert rc == 2 and "are not the ones the adapters were trained on" in err
    assert f"expected chain: {run['base'].resolve()} -> {run['phase2'].resolve()} -> {run['sft'].resolve()}" in err


def test_missing_or_changed_parent_exits_2(run, tmp_path, capsys):
    # the run folder copied without its phase-2 adapter: the SFT adapter cannot be merged alone
    copy = tmp_path / "copy"
    shutil.copytree(run["sft"], copy / "sft" / "adapter", ignore=shutil.ignore_patterns("checkpoints"))
    phase2_copy = copy / "pretrain" / "phase2"
    shutil.copytree(run["phase2"], phase2_copy)
    # relpath wins over the absolute path: the copied run is self-contained
    from zhllama.lineage import derive_chain

    assert derive_chain(copy / "sft" / "adapter").adapters[0] == phase2_copy.resolve()
    shutil.rmtree(phase2_copy)
    moved = run["phase2"].with_name("phase2-moved")
    run["phase2"].rename(moved)
    try:
        rc, err = _merge_cli(capsys, "--adapter", copy / "sft" / "adapter", "--out", tmp_path / "m")
    finally:
        moved.rename(run["phase2"])
    assert rc == 2 and "missing or changed" in err and f"expected chain: base -> {run['phase2'].resolve()}" in err


def test_generate_and_sft_train_check_the_chain(run, tmp_path):
    import torch

    from sft.generate import load
    from zhllama.models import load_peft_chain
    from sft.train import train

    model, tok, _ = load(run["sft"])  # no --base: the recorded base, the recorded parent
    ref = load_peft_chain(run["base"], [run["phase2"], run["sft"]])
    ids = torch.tensor([tok("Repeat: water")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    with pytest.raises(UserError, match="expected chain"):
        load(run["sft"], base=run["foreign"])
    with pytest.raises(UserError, match="are not the ones the adapters were trained on"):
        train(run["foreign"], [run["data"]], tmp_path / "o", adapter=run["phase2"], recipe=str(run["recipe"]),
              log=lambda *_: None)


def test_adapter_without_record_merges_unverified(run, tmp_path):
    from sft.merge import merge

    bare = tmp_path / "bare"
    shutil.copytree(run["phase2"], bare)
    (bare / "lineage.json").unlink()
    with pytest.raises(UserError, match="pass --base"):
        merge(None, [bare], tmp_path / "x", dtype="float32", log=lambda *_: None)
    notes = []
    res = merge(run["base"], [bare], tmp_path / "m", dtype="float32", log=notes.append)
    assert res["chain"]["verified"] is False and any("no lineage.json" in n for n in notes)
    assert json.loads((tmp_path / "m" / "merge_verify.json").read_text())["chain"]["verified"] is False
