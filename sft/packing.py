"""Padding-free SFT batches: a batch's examples in one row, attention kept inside each example, logits only where trained.

Why (measured in bench/RESULTS.md, "SFT throughput"): with right-padding to the longest example a batch of
4 Alpaca examples at max length 256 spends ~20-30% of its compute on pad tokens, and the LM head plus
softmax are evaluated on every prompt position although only the response is trained. Here:

* `PackedCollator` concatenates the batch's examples into a single row (no pad token anywhere), with
  position ids restarting at 0 for each example and the cumulative lengths (`cu_seq_lens_q/k`, the
  names transformers passes down to attention kernels) so attention never crosses examples;
* `varlen_sdpa` (registered as the attention implementation "zhllama_varlen") runs PyTorch SDPA with
  `is_causal=True` on each example's own span: causal masking without building a mask, and without the
  quadratic cost of one long row (SDPA with a block-diagonal mask over the whole row computes every block);
* the collator also gives `logits_to_keep` = the positions whose next token is trained, so the LM head
  runs only there, and `selected_token_loss` is the cross-entropy over exactly those targets.

The same examples make the same optimizer steps as the padded path: the loss is the mean over the batch's
trained tokens either way (summed and divided by the accumulated count, like transformers' own loss), so
only float rounding differs (tests/test_sft_core.py checks loss and gradients against the padded batch).
"""
from __future__ import annotations

from contextlib import contextmanager

ATTN_NAME = "zhllama_varlen"
IGNORE_INDEX = -100


class PackedCollator:
    """list of {"input_ids", "labels"} -> one padding-free row for `varlen_sdpa` and `selected_token_loss`."""

    def __call__(self, batch):
        import torch

        # labels follow the causal-LM convention the Trainer counts by (targets are labels[..., 1:]): a leading
        # -100, then the target of each kept logit, so the accumulated token count is exact
        ids, pos, targets, keep, cu = [], [], [IGNORE_INDEX], [], [0]
        for b in batch:
            x, y = b["input_ids"], b["labels"]
            start = len(ids)
            ids.extend(x)
            pos.extend(range(len(x)))
            # logits at position i predict labels[i + 1]; the last position of an example predicts nothing
            for i in range(len(x) - 1):
                if y[i + 1] != IGNORE_INDEX:
                    keep.append(start + i)
                    targets.append(y[i + 1])
            cu.append(len(ids))
        lengths = [cu[i + 1] - cu[i] for i in range(len(batch))]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "logits_to_keep": torch.tensor(keep, dtype=torch.long),
            "labels": torch.tensor([targets], dtype=torch.long),
            "cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t,
            "max_length_q": max(lengths), "max_length_k": max(lengths),
            "use_cache": False,
        }


def selected_token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy of the kept logits against labels[..., 1:]: summed, divided by the accumulated count."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels[..., 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    loss = F.cross_entropy(logits, labels, reduction="sum")
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA per packed example (causal inside each); plain transformers SDPA for ordinary batches."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    bounds = cu.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling,
            is_causal=e - s > 1, enable_gqa=groups > 1,
        ))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, varlen_sdpa)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        # ordinary padded batches (evaluation, generation) get transformers' own SDPA mask
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


@contextmanager
def packed_attention(model):
    """Train `model` with varlen attention; afterwards its config names its own attention again, so nothing saved names ours."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = inner.config._attn_implementation
    if str(before).startswith("flash_attention"):
        # FlashAttention's own varlen kernels already read cu_seq_lens from packed batches (GPU)
        yield model
        return
    inner.set_attn_implementation(register())
    try:
        yield model
    finally:
        inner.set_attn_implementation(before or "sdpa")
