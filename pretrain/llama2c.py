"""Import a llama2.c checkpoint (legacy format) as a Hugging Face LlamaForCausalLM folder with its tokenizer.

Public API:
    read_checkpoint(path) -> (header: dict, tensors: dict[str, torch.Tensor])
    convert(checkpoint, tokenizer_model, out_dir) -> Path
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from zhllama.errors import UserError

_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def read_checkpoint(path: str | Path):
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file (expected a llama2.c .bin, e.g. stories260K.bin)")
    raw = path.read_bytes()
    if len(raw) < 28:
        raise UserError(f"{path}: too short for a llama2.c checkpoint header (7 int32)")
    vals = struct.unpack("<7i", raw[:28])
    h = dict(zip(_HEADER, vals))
    # llama2.c signals an unshared classifier with a negative vocab_size
    h["shared_classifier"] = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    if min(h[k] for k in _HEADER) <= 0 or h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"]:
        raise UserError(f"{path}: header {vals} is not a legacy llama2.c checkpoint (version 1/2 files with a magic number are not supported)")
    dim, hid, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    head = dim // h["n_heads"]
    kv_dim = head * h["n_kv_heads"]
    shapes = [
        ("tok_embeddings", (V, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv_dim, dim)),
        ("wv", (L, kv_dim, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hid, dim)),
        ("w2", (L, dim, hid)), ("w3", (L, hid, dim)), ("rms_final", (dim,)),
        ("freq_cis_real", (h["seq_len"], head // 2)), ("freq_cis_imag", (h["seq_len"], head // 2)),
    ]
    if not h["shared_classifier"]:
        shapes.append(("wcls", (V, dim)))
    need = sum(int(np.prod(s)) for _, s in shapes) * 4
    if len(raw) - 28 != need:
        raise UserError(f"{path}: {len(raw) - 28} bytes of weights, header {vals} implies {need}; file truncated or not llama2.c legacy format")
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    out, pos = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(data[pos:pos + n].copy().reshape(shape))
        pos += n
    return h, out


def _permute(w, n_heads: int):
    """llama2.c rotates interleaved (x0,x1),(x2,x3)... pairs; HF's rotate_half pairs x_i with x_{i+d/2}.
    Reordering each head's output rows turns one convention into the other."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def to_hf_model(h: dict, t: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=h["vocab_size"], hidden_size=h["dim"], intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"], num_attention_heads=h["n_heads"], num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"], rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=h["shared_classifier"], bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": t["tok_embeddings"], "model.norm.weight": t["rms_final"]}
    for i in range(h["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = _permute(t["wq"][i], h["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _permute(t["wk"][i], h["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = t["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = t["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = t["w1"][i]
        sd[p + "mlp.down_proj.weight"] = t["w2"][i]
        sd[p + "mlp.up_proj.weight"] = t["w3"][i]
        sd[p + "input_layernorm.weight"] = t["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = t["rms_ffn"][i]
    sd["lm_head.weight"] = t["tok_embeddings"] if h["shared_classifier"] else t["wcls"]
    sd = {k: v.contiguous().clone() for k, v in sd.items()}
    if h["shared_classifier"]:
        del sd["lm_head.weight"]
    res = model.load_state_dict(sd, strict=False)
    unexpected = [k for k in res.missing_keys if not (h["shared_classifier"] and k == "lm_head.weight")]
    if unexpected or res.unexpected_keys:
        raise RuntimeError(f"llama2.c import mismatch: missing {unexpected[:5]}, unexpected {res.unexpected_keys[:5]}")
    if h["shared_classifier"]:
        model.tie_weights()
    return model.eval()


def convert(checkpoint: str | Path, tokenizer_model: str | Path, out_dir: str | Path) -> Path:
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model
    from zhllama.hashing import sha256_file
    from zhllama.manifest import write_manifest

    h, t = read_checkpoint(checkpoint)
    sp = load_model(tokenizer_model, what="--tokenizer")
    if len(sp.pieces) != h["vocab_size"]:
        raise UserError(
            f"{tokenizer_model} has {len(sp.pieces)} pieces but {checkpoint} has vocab_size {h['vocab_size']}: "
            "pass the tokenizer the checkpoint was trained with (tok512.model for stories260K)"
        )
    normalized = False
    if sp.normalizer_spec.remove_extra_whitespaces:
        # tok512.model asks for it, but llama2.c's own encoder (run.c) never collapses spaces, and the
        # HF export cannot express it: keeping whitespace as is matches what the checkpoint saw.
        sp.normalizer_spec.remove_extra_whitespaces = False
        normalized = True
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = to_hf_model(h, t)
    model.save_pretrained(out)
    save_tokenizer_folder(sp, out)
    write_manifest(out, "pretrain.convert-llama2c", {"header": h, "tokenizer_remove_extra_whitespaces_cleared": normalized},
                   {"checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
                    "tokenizer": {"path": str(tokenizer_model), "sha256": sha256_file(tokenizer_model)}})
    return out
