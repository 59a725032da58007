"""Cross-entropy through the LM head without a [tokens, vocabulary] logits tensor: SFT's packed loss and evaluation's
bits per character both compute the head only for the positions they score, a chunk of rows at a time.

Public API:
    chunked_linear_cross_entropy(hidden, weight, targets, bias=None, dtype=None, chunk_tokens=1024, reduction="sum")
        CE(hidden @ weight.T + bias, targets) in fp32, chunk_tokens rows at a time; reduction "sum" (a scalar; with
        gradients each chunk is checkpointed) or "none" (one value per row); targets == IGNORE_INDEX count 0
    effective_linear(head) -> nn.Linear | None     the Linear an LM-head module applies (through peft's
                                                    ModulesToSaveWrapper), None when it is not that simple
"""
from __future__ import annotations

IGNORE_INDEX = -100
DEFAULT_CHUNK = 1024


def _chunk_ce(hidden, weight, bias, targets, dtype, reduction="sum"):
    import torch.nn.functional as F

    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return F.cross_entropy(logits.float(), targets, reduction=reduction, ignore_index=IGNORE_INDEX)


def chunked_linear_cross_entropy(hidden, weight, targets, bias=None, dtype=None, chunk_tokens: int = DEFAULT_CHUNK,
                                 reduction: str = "sum"):
    """CE(hidden[i] @ weight.T + bias, targets[i]) summed ("sum") or per row ("none"), `chunk_tokens` rows at a time
    (fp32 softmax); the matmul runs in `dtype` (default: hidden's).

    With gradients each chunk runs under non-reentrant activation checkpointing: its logits are freed right after the
    forward and recomputed in backward, so at most one chunk's logits (and their gradient) exist at a time. The price
    is one more head matmul over the rows.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction {reduction!r}: expected sum or none")
    dtype = dtype or hidden.dtype
    step = max(1, int(chunk_tokens))
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, hidden.shape[0], step):
        h, t = hidden[s:s + step], targets[s:s + step]
        parts.append(checkpoint(_chunk_ce, h, weight, bias, t, dtype, reduction, use_reentrant=False) if grad
                     else _chunk_ce(h, weight, bias, t, dtype, reduction))
    if reduction == "none":
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    total = None
    for p in parts:
        total = p if total is None else total + p
    return total if total is not None else hidden.sum() * 0.0


def effective_linear(head):
    """The nn.Linear an LM-head module applies (through peft's ModulesToSaveWrapper), or None if not that simple."""
    import torch

    if isinstance(head, torch.nn.Linear):
        return head
    mts = getattr(head, "modules_to_save", None)
    if mts is not None and hasattr(head, "active_adapters"):
        if getattr(head, "disable_adapters", False) or any(a not in mts for a in head.active_adapters):
            return effective_linear(head.original_module)
        if len(head.active_adapters) == 1:
            return effective_linear(mts[head.active_adapters[0]])
    return None
