"""What the GPU runs (bench/gpu/run.sh) rely on, checked on CPU: training precision, `pretrain init --dtype`, --eval-ratio 0."""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import torch

from conftest import ROOT
from zhllama.precision import base_dtype, upcast_trainable


def test_base_dtype_half_only_on_gpu():
    assert base_dtype("bf16", cuda=True) == torch.bfloat16
    assert base_dtype("fp16", cuda=True) == torch.float16
    assert base_dtype("fp32", cuda=True) == torch.float32
    # the CPU trains in fp32 whatever the recipe says (the Trainer never uses half precision there)
    assert base_dtype("bf16", cuda=False) == torch.float32


def test_upcast_trainable_leaves_the_frozen_base_in_half():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                      task_type="CAUSAL_LM"), autocast_adapter_dtype=False)
    n = upcast_trainable(model)
    trainable = {k: p.dtype for k, p in model.named_parameters() if p.requires_grad}
    frozen = {k: p.dtype for k, p in model.named_parameters() if not p.requires_grad}
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) and n > 0
    assert set(trainable.values()) == {torch.float32}
    assert set(frozen.values()) == {torch.bfloat16}
    assert any("lm_head.modules_to_save" in k for k in trainable)
    assert upcast_trainable(model) == 0


def test_init_stores_the_requested_dtype(tmp_path, tiny_base):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "pretrain", "init", "--recipe", "tiny", "--tokenizer", str(tiny_base),
                        "--out", str(out), "--set", "model.base_vocab_size=600", "--dtype", "bfloat16", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["dtype"] == "bfloat16" and man["config"]["device"] == "cpu"


def test_phase_data_without_held_out_blocks(tmp_path, zh_corpus, tiny_base):
    """--eval-ratio 0 (the GPU runs' setting: no held-out pass around a few timed steps) builds, caches and reloads."""
    from pretrain.data import build_datasets
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    tok = tmp_path / "tok"
    save_tokenizer_folder(load_model(tiny_base), tok)
    for _ in range(2):  # built, then read back from the cache
        train, held, info = build_datasets([zh_corpus], tok, 64, tmp_path / "cache", eval_ratio=0.0)
        assert held is None and len(train) > 10 and info["eval_blocks"] == 0
    assert info["reused_cache"]
