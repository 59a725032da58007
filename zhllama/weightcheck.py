"""A saved adapter or model is checked before a stage reports success: every tensor non-empty, with the shape the
base model's config implies. A save over partitioned parameters (ZeRO-3, FSDP) writes zero-size tensors and
would otherwise pass as a finished run.

Public API:
    expected_shapes(config) -> {module name: (out_features, in_features)}    LLaMA's projections, embed and head
    check_weights(path, config, vocab_rows=None) -> dict    UserError naming the file and tensor on a bad one
"""
from __future__ import annotations

from pathlib import Path

from zhllama.errors import UserError


def expected_shapes(config, vocab_rows: int | None = None) -> dict:
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or h // heads
    v = vocab_rows or config.vocab_size
    return {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i), "embed_tokens": (v, h), "lm_head": (v, h)}


def _module(key: str, shapes: dict) -> str | None:
    parts = key.split(".")
    return next((p for p in reversed(parts) if p in shapes), None)


def check_weights(path, config, vocab_rows: int | None = None) -> dict:
    """Every tensor of a safetensors file (adapter or full model) non-empty and shaped like the base."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: was not written")
    shapes = expected_shapes(config, vocab_rows)
    n = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            shape = tuple(f.get_slice(key).get_shape())
            n += 1
            if not shape or 0 in shape:
                raise UserError(f"{path}: tensor {key} is empty {list(shape)} (a save over partitioned ZeRO-3/FSDP "
                                "parameters?); the run is not finished, rerun it")
            mod = _module(key, shapes)
            if mod is None:
                continue
            out_f, in_f = shapes[mod]
            if "lora_A" in key:
                bad = shape[-1] != in_f
            elif "lora_B" in key:
                bad = shape[0] != out_f
            elif key.endswith("weight") and len(shape) == 2:
                bad = shape != (out_f, in_f)
            else:
                bad = False
            if bad:
                raise UserError(f"{path}: tensor {key} has shape {list(shape)}, the base model's {mod} is "
                                f"{[out_f, in_f]}; the run is not finished, rerun it")
    if not n:
        raise UserError(f"{path}: holds no tensors; the run is not finished, rerun it")
    return {"tensors": n}
