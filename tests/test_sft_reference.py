"""SFT on real data: stories260K (converted by the pretrain stage) + a phase-2 adapter, then SFT on the
LLaMA-Factory Chinese demo set, merge of both adapters verified by logits, plain loading, greedy decoding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.reference
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                       timeout=timeout)
    assert r.returncode == 0, f"{args[:2]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def pipeline(data_dir, tmp_path_factory):
    pytest.importorskip("pretrain.llama2c")
    from pretrain.llama2c import convert

    d = tmp_path_factory.mktemp("sft_ref")
    tiny = data_dir / "tiny_models"
    convert(tiny / "stories260K.bin", tiny / "tok512.model", d / "stories")
    corpus = d / "corpus.txt"
    corpus.write_text("".join(f"Once upon a time, there was a little girl named Lily. She had {i} red balls and "
                              f"liked to play outside with her dog number {i * 7 % 13}.\n" for i in range(300)),
                      encoding="utf-8")
    # stories260K is not the tiny recipe's shape and speaks English: the tiny settings are meant on this text, so
    # the shape check and the Chinese-share check are off
    _run("pretrain", "phase2", "--recipe", "tiny", "--set", "model.check=false", "--min-chinese-share", "0",
         "--model", d / "stories", "--corpus", corpus, "--out", d / "phase2",
         "--max-steps", "3", "--batch-size", "4", "--per-device-batch-size", "4", "--eval-steps", "3",
         "--save-steps", "3", "--block-size", "64", "--eval-ratio", "0.1")
    data = data_dir / "instructions" / "alpaca_zh_llamafactory_demo_1k.json"
    _run("sft", "train", "--recipe", "tiny", "--set", "model.check=false", "--model", d / "stories", "--adapter", d / "phase2", "--data", data,
         "--out", d / "sft", "--max-steps", "25", "--set", "sft.max_length=192", "--set", "sft.global_batch_size=8",
         "--set", "sft.per_device_batch_size=8", "--set", "sft.learning_rate=3e-3", "--set", "sft.eval_ratio=0.03",
         "--set", "sft.eval_steps=25", "--set", "sft.save_steps=25")
    merge = _run("sft", "merge", "--base", d / "stories", "--adapter", d / "phase2", "--adapter", d / "sft",
                 "--out", d / "merged", "--dtype", "float32")
    return d, merge


def test_sft_lowers_heldout_loss(pipeline):
    d, _ = pipeline
    res = json.loads((d / "sft" / "result.json").read_text())
    assert res["eval_examples"] > 10
    assert res["eval_loss_after"] < res["eval_loss_before"]
    assert res["vocab_size"] == 513  # tok512 + [PAD]


def test_merge_of_phase2_and_sft_reproduces_peft_logits(pipeline):
    d, merge = pipeline
    v = json.loads((d / "merged" / "merge_verify.json").read_text())
    assert v["ok"] and v["max_abs_diff"] < 1e-4 and v["top1_agreement"] == 1.0
    assert "top-1 agreement" in merge.stdout + merge.stderr


def test_merged_plain_load_and_greedy_deterministic(pipeline):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, _ = pipeline
    m = AutoModelForCausalLM.from_pretrained(str(d / "merged"), dtype=torch.float32)
    t = AutoTokenizer.from_pretrained(str(d / "merged"))
    assert m.config.vocab_size == len(t) == m.get_input_embeddings().weight.shape[0] == 513
    outs = [_run("sft", "generate", "--model", d / "merged", "--prompt", "讲一个关于小猫的故事。", "--preset", "greedy",
                 "--max-new-tokens", "24", "--json").stdout for _ in range(2)]
    assert outs[0] == outs[1] and json.loads(outs[0])[0]["answer"]
