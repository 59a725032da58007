"""Padding-free SFT batches: a batch's examples in one row, attention kept inside each example, logits only where trained.

Why (measured in bench/RESULTS.md, "SFT throughput"): with right-padding to the longest example a batch of
4 Alpaca examples at max length 256 spends ~20-30% of its compute on pad tokens, and the LM head plus
softmax are evaluated on every prompt position although only the response is trained. Here:

* `PackedCollator` concatenates the batch's examples into a single row (no pad token anywhere), with
  position ids restarting at 0 for each example and the cumulative lengths (`cu_seq_lens_q/k`, the
  names transformers passes down to attention kernels) so attention never crosses examples;
* `packed_attention(model)` registers the attention implementation "zhllama_varlen" and, once per forward
  (a pre-hook on the decoder), picks the kernel for the packed row (`choose_backend`):
    - CUDA, half precision: FlashAttention's `flash_attn_varlen_func` when `flash_attn` is importable, else
      PyTorch's own varlen kernel (`torch.nn.attention.varlen.varlen_attn`); both read the boundaries
      from `cu_seq_lens` on the device, causal inside each example, nothing read back to the host;
    - CUDA otherwise (fp32, or neither varlen kernel): FlexAttention (compiled) with a document mask whose
      `BlockMask` is built once per batch in the pre-hook and handed to every layer;
    - CPU: PyTorch SDPA with `is_causal=True` on each example's own span (the boundaries are read to the
      host once per forward, not per layer). FlexAttention also runs forward-only on CPU; it has no CPU
      backward, so it is never chosen there.
  The pre-hook also hands transformers a ready 4D mask (the BlockMask, or the boundaries as a 4D view), so
  transformers neither builds its T x T packed-sequence mask nor reads `.all()` back to the host;
* the collator gives `logits_to_keep` = the positions whose next token is trained, so the LM head runs
  only there; with `loss_chunk_tokens` > 0 the head is not even run there inside the model: the hidden
  states of those positions go to `chunked_linear_cross_entropy`, which computes head + cross-entropy a
  chunk of rows at a time and recomputes each chunk's logits in backward, so full-vocabulary fp32 logits
  for the whole micro-batch never exist at once (49,954 x 4 bytes = 195 KiB per trained token).

The same examples make the same optimizer steps as the padded path: the loss is the mean over the batch's
trained tokens either way (summed and divided by the accumulated count, like transformers' own loss), so
only float rounding differs (tests/test_sft_packing.py checks loss and gradients against the padded batch
for every kernel that runs on CPU, and bench/gpu/run.sh checks the CUDA kernels once on the GPU).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from zhllama.losses import IGNORE_INDEX, chunked_linear_cross_entropy, effective_linear

ATTN_NAME = "zhllama_varlen"
BACKENDS = ("flash_attn", "varlen", "flex", "sdpa_loop")
BACKEND_ENV = "ZHLLAMA_PACKED_ATTENTION"  # force one of BACKENDS (tests, the GPU check); unset = choose_backend


class PackedCollator:
    """list of {"input_ids", "labels"} -> one padding-free row for packed attention and the selected-token loss."""

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
            # python ints: the varlen kernels need them on the host, and the collator already knows them
            "max_length_q": max(lengths), "max_length_k": max(lengths),
            "use_cache": False,
        }


def _per_item(total, num_items_in_batch):
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def selected_token_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy of the kept logits against labels[..., 1:]: summed, divided by the accumulated count."""
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels[..., 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels)
    return _per_item(F.cross_entropy(logits, labels, reduction="sum"), num_items_in_batch)


# ---------------------------------------------------------------------------------------------- kernels


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return None
    return flash_attn_varlen_func


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernels_available(device_type: str) -> list[str]:
    """The packed-attention kernels that can train (forward and backward) on `device_type`, fastest first."""
    if device_type != "cuda":
        return ["sdpa_loop"]  # FlexAttention has no CPU backward
    return ([k for k, ok in (("flash_attn", _flash_varlen() is not None), ("varlen", _torch_varlen() is not None)) if ok]
            + ["flex", "sdpa_loop"])


def choose_backend(device_type: str, half: bool) -> str:
    """The packed-attention kernel for a batch on `device_type` computed in half precision or not."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: choose one of {', '.join(BACKENDS)}")
        return forced
    if device_type == "cuda":
        if half and _flash_varlen() is not None:
            return "flash_attn"
        if half and _torch_varlen() is not None:
            return "varlen"
        return "flex"
    return "sdpa_loop"


@dataclass
class PackedBatch:
    """What the decoder's pre-hook hands to every layer's attention for one packed row."""
    backend: str
    cu: object                  # int32 boundaries on the batch's device
    max_len: int
    bounds: list | None = None  # sdpa_loop: the boundaries on the host, read once per forward
    block_mask: object = None   # flex: the document BlockMask, built once per forward


def document_block_mask(cu, length: int, device):
    """FlexAttention BlockMask: causal inside each example of the packed row, nothing across examples."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.searchsorted(cu[1:].long(), torch.arange(length, device=device), right=True)

    def same_doc_causal(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    return create_block_mask(same_doc_causal, None, None, length, length, device=device)


def _common_dtype(q, k, v):
    """q, k, v in one dtype: the autocast dtype when autocast is on, else their promoted type.

    Under autocast the projections come out in half precision but RoPE multiplies q and k by cos/sin in the
    residual stream's dtype (fp32 when the trained embeddings are fp32), so q and k arrive in fp32 and v in
    bf16; SDPA casts for itself under autocast, the varlen and Flex kernels do not.
    """
    import torch

    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
    else:
        dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dt), k.to(dt), v.to(dt)


def _varlen_layout(t):
    # (1, heads, T, dim) -> (T, heads, dim), the layout of every varlen kernel
    return t[0].transpose(0, 1).contiguous()


def _run_flash(module, q, k, v, info, dropout, scaling):
    out = _flash_varlen()(_varlen_layout(q), _varlen_layout(k), _varlen_layout(v), info.cu, info.cu,
                          info.max_len, info.max_len, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out.unsqueeze(0)


def _run_torch_varlen(module, q, k, v, info, dropout, scaling):
    import inspect

    fn = _torch_varlen()
    params = inspect.signature(fn).parameters
    qv, kv_, vv = _varlen_layout(q), _varlen_layout(k), _varlen_layout(v)
    kw = {}
    if "window_size" in params:      # torch >= 2.12: (-1, 0) is causal
        kw["window_size"] = (-1, 0)
    else:                            # torch 2.9-2.11: is_causal
        kw["is_causal"] = True
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
        raise RuntimeError("this torch's varlen_attn has no scale argument and the model uses a non-default scale")
    if kv_.shape[1] != qv.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = qv.shape[1] // kv_.shape[1]
            kv_, vv = kv_.repeat_interleave(rep, dim=1), vv.repeat_interleave(rep, dim=1)
    if dropout:
        raise RuntimeError("varlen_attn has no attention dropout; LLaMA trains with attention_dropout 0")
    out = fn(qv, kv_, vv, info.cu, info.cu, info.max_len, info.max_len, **kw)
    return out.unsqueeze(0)


_COMPILED_FLEX = None


def _flex_fn(device_type: str):
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention  # eager reference (CPU: forward only)
    if _COMPILED_FLEX is None:
        import torch

        # uncompiled FlexAttention on CUDA materialises the full score matrix; compiled it is one fused kernel
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def _run_flex(module, q, k, v, info, dropout, scaling):
    if dropout:
        raise RuntimeError("FlexAttention has no attention dropout; LLaMA trains with attention_dropout 0")
    gqa = k.shape[1] != q.shape[1]
    out = _flex_fn(q.device.type)(q, k, v, block_mask=info.block_mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _run_sdpa_loop(module, q, k, v, info, dropout, scaling):
    import torch

    gqa = k.shape[1] != q.shape[1]
    outs = []
    for s, e in zip(info.bounds[:-1], info.bounds[1:]):
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=e - s > 1,
            enable_gqa=gqa,
        ))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


_KERNELS = {"flash_attn": _run_flash, "varlen": _run_torch_varlen, "flex": _run_flex, "sdpa_loop": _run_sdpa_loop}


def varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """Attention of "zhllama_varlen": the packed kernel for packed rows, plain transformers SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    info = kwargs.get("zhllama_packed")
    if info is None:
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1 or query.shape[2] == 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        # a packed row that did not come through packed_attention's pre-hook: the host loop, correct anywhere
        info = PackedBatch("sdpa_loop", cu, query.shape[2], bounds=cu.tolist())
    query, key, value = _common_dtype(query, key, value)
    return _KERNELS[info.backend](module, query, key, value, info, dropout, scaling), None


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, varlen_sdpa)
    if ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        # ordinary padded batches (evaluation, generation) get transformers' own SDPA mask; packed rows bring
        # their own 4D mask from the pre-hook, which transformers passes through untouched
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


# ------------------------------------------------------------------------------------- the training context

_HALF = ("float16", "bfloat16")


def _computes_in_half(decoder, device_type: str) -> bool:
    import torch

    if torch.is_autocast_enabled(device_type):
        return str(torch.get_autocast_dtype(device_type)).split(".")[-1] in _HALF
    layers = getattr(decoder, "layers", None)
    p = next(layers.parameters(), None) if layers is not None else None
    return p is not None and str(p.dtype).split(".")[-1] in _HALF


def _sharded(weight) -> bool:
    """ZeRO-3 / FSDP hold a module's full weight only inside its own forward: the loss cannot use it later."""
    return (weight.numel() == 0 or hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor"
            or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"))


class PackedTraining:
    """State of one `packed_attention` context: the Trainer's loss function, and what the last batch used."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = int(chunk_tokens or 0)
        self.backend = None          # kernel of the last packed batch
        self.chunked = False         # whether a packed batch's head + loss ran chunked (set by the first one)
        self._packed_forward = False
        self._pending = None         # (linear, compute dtype) when the head was deferred in this forward

    def pre_hook(self, decoder, args, kwargs):
        self._packed_forward = False
        self._pending = None
        cu = kwargs.get("cu_seq_lens_q")
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if (cu is None or ref is None or ref.shape[0] != 1 or kwargs.get("attention_mask") is not None
                or kwargs.get("past_key_values") is not None):
            return None
        device = ref.device
        length = ref.shape[1]
        backend = choose_backend(device.type, _computes_in_half(decoder, device.type))
        max_len = kwargs.get("max_length_q") or length  # an upper bound is valid for the varlen kernels
        info = PackedBatch(backend, cu, int(max_len))
        # a 4D mask makes transformers skip its own packed-mask construction (a T x T mask and a host read)
        mask = cu.view(1, 1, 1, -1)
        if backend == "sdpa_loop":
            info.bounds = cu.tolist()  # the one host read of this forward (CPU, or a forced fallback)
        elif backend == "flex":
            info.block_mask = mask = document_block_mask(cu, length, device)
        kwargs = dict(kwargs, attention_mask=mask, zhllama_packed=info)
        self.backend = backend
        self._packed_forward = True
        return args, kwargs

    def head_forward(self, head, original):
        def forward(hidden, *a, **kw):
            if not self._packed_forward:
                return original(hidden, *a, **kw)
            import torch

            lin = effective_linear(head)
            if lin is None or _sharded(lin.weight):
                return original(hidden, *a, **kw)
            dev = hidden.device.type
            dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
            self._pending = (lin, dtype)
            self.chunked = True
            return hidden  # the "logits" of this forward are the hidden states of the kept positions
        return forward

    def loss(self, outputs, labels, num_items_in_batch=None):
        """The Trainer's compute_loss_func for packed batches: summed CE over trained targets / accumulated count."""
        pending, self._pending = self._pending, None
        if pending is None:
            return selected_token_loss(outputs, labels, num_items_in_batch)
        lin, dtype = pending
        hidden = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = labels[..., 1:].reshape(-1).to(hidden.device)
        total = chunked_linear_cross_entropy(hidden, lin.weight, targets, lin.bias, dtype, self.chunk_tokens)
        if num_items_in_batch is None:
            return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return _per_item(total, num_items_in_batch)


@contextmanager
def packed_attention(model, loss_chunk_tokens: int = 0):
    """Train `model` on packed rows; yields the PackedTraining whose `.loss` the Trainer should use.

    loss_chunk_tokens > 0: the LM head of packed batches runs inside the loss, that many rows at a time
    (`chunked_linear_cross_entropy`); 0: the model computes the kept positions' logits itself.
    Afterwards the model's config names its own attention again, so nothing saved names ours.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = PackedTraining(loss_chunk_tokens)
    before = inner.config._attn_implementation
    flash = str(before).startswith("flash_attention")
    if not flash:
        # FlashAttention-2 models keep their own implementation: it reads cu_seq_lens from packed batches itself
        inner.set_attn_implementation(register())
    handle = inner.get_decoder().register_forward_pre_hook(state.pre_hook, with_kwargs=True) if not flash else None
    head = inner.get_output_embeddings()
    patched = False
    if state.chunk_tokens > 0 and not flash and head is not None and effective_linear(head) is not None:
        previous = head.__dict__.get("forward")
        head.forward = state.head_forward(head, head.forward)
        patched = True
    try:
        yield state
    finally:
        if patched:
            if previous is None:
                del head.forward
            else:
                head.forward = previous
        if handle is not None:
            handle.remove()
        if not flash:
            inner.set_attn_implementation(before or "sdpa")

