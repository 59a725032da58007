"""GGUF export: the file read back with the gguf library (core), then run in llama.cpp (integration tier)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ggufs(chat_model, tmp_path_factory):
    from deploy.gguf_export import export

    d = tmp_path_factory.mktemp("gguf")
    return {t: export(chat_model, d / f"m-{t}.gguf", t, log=lambda *_: None)["gguf"] for t in ("f32", "f16", "q8_0", "q4_0")}


def _field(r, key):
    return r.fields[key].contents()


def test_gguf_carries_vocab_template_and_exact_weights(ggufs, chat_model):
    import torch
    from gguf import GGUFReader
    from safetensors.torch import load_file
    from sentencepiece import sentencepiece_model_pb2

    from deploy.gguf_export import permute_qk

    r = GGUFReader(ggufs["f32"])
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString((chat_model / "tokenizer.model").read_bytes())
    cfg = json.loads((chat_model / "config.json").read_text())
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == chat_model.name
    assert _field(r, "tokenizer.ggml.tokens") == [p.piece for p in m.pieces]
    assert np.allclose(_field(r, "tokenizer.ggml.scores"), [p.score for p in m.pieces])
    assert _field(r, "tokenizer.ggml.token_type") == [int(p.type) for p in m.pieces]
    assert len(m.pieces) == cfg["vocab_size"] and m.pieces[-1].piece == "[PAD]" and m.pieces[-1].type == 3  # CONTROL
    assert _field(r, "tokenizer.chat_template") == (chat_model / "chat_template.jinja").read_text(encoding="utf-8")
    assert (_field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.eos_token_id")) == (1, 2)
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    hf = load_file(str(chat_model / "model.safetensors"))
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 + 2 * 9 + 1   # embed, norm, head + 9 per layer
    q = np.asarray(t["blk.1.attn_q.weight"].data).reshape(64, 64)
    assert np.array_equal(q, permute_qk(hf["model.layers.1.self_attn.q_proj.weight"].numpy(), 4))
    k = np.asarray(t["blk.0.attn_k.weight"].data).reshape(32, 64)
    assert np.array_equal(k, permute_qk(hf["model.layers.0.self_attn.k_proj.weight"].numpy(), 2))
    emb = np.asarray(t["token_embd.weight"].data).reshape(cfg["vocab_size"], 64)
    assert np.array_equal(emb, hf["model.embed_tokens.weight"].numpy())
    # the permutation is llama.cpp's rotary layout: applying it to HF's half-split rows interleaves the pairs
    w = torch.arange(8.0).reshape(8, 1).numpy()
    assert permute_qk(w, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_quantized_files_dequantize_close_to_the_weights(ggufs, chat_model):
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    hf = load_file(str(chat_model / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].numpy()
    for ftype, tol in (("f16", 1e-3), ("q8_0", 0.01), ("q4_0", 0.15)):
        r = GGUFReader(ggufs[ftype])
        t = next(x for x in r.tensors if x.name == "blk.0.ffn_up.weight")
        assert t.tensor_type.name == ftype.upper()
        w = dequantize(t.data, t.tensor_type).reshape(hf.shape)
        rel = np.abs(w - hf).max() / np.abs(hf).max()
        assert rel < tol, (ftype, rel)
        norm = next(x for x in r.tensors if x.name == "output_norm.weight")
        assert norm.tensor_type.name == "F32"
    head = next(x for x in GGUFReader(ggufs["q4_0"]).tensors if x.name == "output.weight")
    assert head.tensor_type.name == "Q8_0"
    sizes = [Path(ggufs[t]).stat().st_size for t in ("f32", "f16", "q8_0", "q4_0")]
    assert sizes == sorted(sizes, reverse=True)


def test_export_errors_are_one_line(chat_model, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(chat_model, d)
    (d / "tokenizer.model").unlink()
    r = subprocess.run([sys.executable, "-m", "deploy", "gguf", "--model", str(d), "--out", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "no tokenizer.model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.tmp").exists()
    r = subprocess.run([sys.executable, "-m", "deploy", "gguf", "--model", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "x.gguf")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "no config.json" in r.stderr


# ------------------------------------------------------------------------------ llama.cpp (integration)
@pytest.mark.integration("llama_cpp")
@pytest.mark.parametrize("ftype", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpp_matches_sentencepiece_and_transformers(ggufs, chat_model, ftype):
    from deploy.gguf_verify import MIN_ARGMAX, verify

    res = verify(ggufs[ftype], chat_model, ftype, log=lambda *_: None)
    assert res["ok"]
    assert all(v["differ"] == 0 for v in res["tokenization"]["by_kind"].values())
    assert sum(v["lines"] for v in res["tokenization"]["by_kind"].values()) > 200
    assert res["logits"]["argmax_rate"] >= MIN_ARGMAX[ftype]
    if ftype == "f32":
        assert res["logits"]["max_abs_diff"] < 1e-3
    assert res["metadata"]["eog_tokens"] == [2] and res["metadata"]["chat_template_equal"]
    assert json.loads(Path(ggufs[ftype]).with_suffix(".verify.json").read_text())["ok"]


@pytest.mark.integration("llama_cpp")
def test_k_quants_through_llama_cpp_quantize_keep_vocab_template_and_eog(chat_model, tmp_path):
    from gguf import GGUFReader

    from deploy.gguf_export import export
    from deploy.gguf_verify import verify

    out = tmp_path / "m-q4_k_m.gguf"
    export(chat_model, out, "q4_k_m", log=lambda *_: None)
    assert not list(tmp_path.glob("*.tmp"))
    r = GGUFReader(str(out))
    assert _field(r, "tokenizer.chat_template") == (chat_model / "chat_template.jinja").read_text(encoding="utf-8")
    res = verify(out, chat_model, "q4_k_m", log=lambda *_: None)
    assert res["ok"] and res["metadata"]["eog_tokens"] == [2]


@pytest.mark.integration("llama_cpp")
def test_llama_cpp_greedy_generation_and_server_equal_transformers(ggufs, chat_model):
    """The GGUF backend renders the chat template from the file and generates the folder's greedy tokens."""
    import torch

    from deploy.backends import LlamaCppBackend, Outcome, Sampling, TransformersBackend

    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "请介绍一下北京。"}]
    hf = TransformersBackend(chat_model, device="cpu")
    ll = LlamaCppBackend(ggufs["f32"], n_ctx=512, n_threads=2, kv_f32=True)
    ids = hf.chat_ids(msgs)
    assert ll.chat_ids(msgs) == ids
    with torch.no_grad():
        want = hf.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=30, do_sample=False)[0, len(ids):].tolist()
    ll.llm.reset()
    got = []
    for t in ll.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == len(want) or t == 2:
            break
    assert got == want
    # the random model emits stray byte pieces; the two libraries render invalid UTF-8 differently, so the
    # streamed text is compared where it is valid: up to the first byte piece
    out = Outcome()
    text = "".join(ll.stream(ids, Sampling(max_tokens=30, do_sample=False), lambda: False, out))
    pieces = hf.tok.convert_ids_to_tokens(want)
    k = next((i for i, p in enumerate(pieces) if p.startswith("<0x")), len(pieces))
    assert text.startswith(hf.tok.decode(want[:k])) and out.finish_reason in ("stop", "length")


@pytest.mark.integration("llama_src")
def test_llama_cpp_own_converter_writes_the_same_model(ggufs, chat_model, tmp_path):
    """convert_hf_to_gguf.py (from the llama-cpp-python sdist) still converts the merged layout, and its
    tensors, vocabulary and chat template are the ones `deploy gguf` writes."""
    import os

    from gguf import GGUFReader

    from conftest import LLAMA_SRC

    out = tmp_path / "conv-f32.gguf"
    env = dict(os.environ, PYTHONPATH=f"{LLAMA_SRC / 'gguf-py'}{os.pathsep}{LLAMA_SRC}", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, str(LLAMA_SRC / "convert_hf_to_gguf.py"), str(chat_model), "--outfile", str(out),
                        "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs, ours = GGUFReader(str(out)), GGUFReader(ggufs["f32"])
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "llama.block_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count"):
        assert _field(theirs, key) == _field(ours, key), key
    assert np.allclose(_field(theirs, "tokenizer.ggml.scores"), _field(ours, "tokenizer.ggml.scores"))
    a = {t.name: np.asarray(t.data) for t in theirs.tensors}
    b = {t.name: np.asarray(t.data) for t in ours.tensors}
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
