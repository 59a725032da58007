"""Training precision on a GPU: the frozen base in half precision, whatever trains in fp32.

Loading a 7B base in fp32 takes 27 GB before the first step; in bf16 it takes 13.5 GB, which is what lets
phase 2 of LLaMA-7B (LoRA + full embeddings and head) fit a 24 GB card. The trained parameters (LoRA
matrices, the trained copies of embed_tokens / lm_head) stay fp32: AdamW on bf16 weights loses small
updates, and fp16 AMP's GradScaler refuses half-precision gradients. Autocast does the matmuls in half
either way. On CPU nothing changes (fp32 throughout; the Trainer never uses half precision there).
"""
from __future__ import annotations

_HALF = {"bf16": "bfloat16", "fp16": "float16"}


def base_dtype(precision: str, cuda: bool | None = None):
    """dtype to load a model in for training at `precision` ("fp32" | "fp16" | "bf16")."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    return getattr(torch, _HALF[precision]) if cuda and precision in _HALF else torch.float32


def upcast_trainable(model) -> int:
    """Trainable parameters that are not fp32 become fp32; returns how many values were upcast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += p.numel()
    return n
