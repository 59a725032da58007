"""Padding-free SFT batches and the cheaper LoRA dropout: same loss and gradients as the padded path."""
from __future__ import annotations

import pytest
import torch

from sft.config import ALL_PROJ
from sft.data import IGNORE_INDEX, Collator
from sft.lora_dropout import FastDropout, use_fast_dropout
from sft.packing import BACKEND_ENV, PackedCollator, choose_backend, packed_attention, selected_token_loss
from zhllama.losses import chunked_linear_cross_entropy

# three examples of different lengths; -100 over each prompt, like ExampleEncoder's output
EXAMPLES = [
    {"input_ids": [1, 5, 6, 7, 8, 9], "labels": [IGNORE_INDEX] * 3 + [7, 8, 9]},
    {"input_ids": [1, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13]},
    {"input_ids": [1, 20, 21, 22, 23, 24, 25, 26, 27], "labels": [IGNORE_INDEX] * 5 + [24, 25, 26, 27]},
]


def test_packed_collator_layout():
    b = PackedCollator()(EXAMPLES)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 1, 11, 12, 13, 1, 20, 21, 22, 23, 24, 25, 26, 27]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["cu_seq_lens_q"].tolist() == [0, 6, 10, 19] and b["max_length_q"] == 9
    # logits at position i predict token i + 1: only positions followed by a trained label are kept
    assert b["logits_to_keep"].tolist() == [2, 3, 4, 7, 8, 14, 15, 16, 17]
    # causal-LM convention (targets are labels[..., 1:]), so the Trainer's token count for the loss is exact
    assert b["labels"].tolist() == [[IGNORE_INDEX, 7, 8, 9, 12, 13, 24, 25, 26, 27]]
    assert "attention_mask" not in b


def _lora_model(gqa: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2 if gqa else 4, tie_word_embeddings=False, attn_implementation="sdpa")
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJ,
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    return m


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [0, 4])
@pytest.mark.parametrize("gqa", [False, True])
def test_packed_loss_and_gradients_equal_padded(gqa, chunk):
    """chunk 4: the 9 trained rows' head + loss in three chunks (chunked_linear_cross_entropy); 0: model logits."""
    model = _lora_model(gqa)
    model.train()  # dropout is 0: train mode only to take the training code paths
    padded = Collator(pad_id=0)(EXAMPLES)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    with packed_attention(model, loss_chunk_tokens=chunk) as packed:
        batch = PackedCollator()(EXAMPLES)
        labels = batch.pop("labels")
        loss, grads = _loss_and_grads(model, lambda: packed.loss(model(**batch), labels))
        # with gradient accumulation the Trainer passes the accumulated count: sum / count
        n = (labels[..., 1:] != IGNORE_INDEX).sum()
        acc_loss = packed.loss(model(**batch), labels, num_items_in_batch=n)
        assert packed.backend == "sdpa_loop" and packed.chunked == (chunk > 0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert model.get_base_model().config._attn_implementation == "sdpa"
    # the head is the model's own again: plain logits of the full vocabulary
    assert "forward" not in model.get_base_model().lm_head.__dict__


def test_packed_loss_with_trained_head_and_plain_selected_loss():
    """modules_to_save (the recipes' trained embed/head): gradients reach the trained head copy through the chunks."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=ALL_PROJ, init_lora_weights=False,
                                                             modules_to_save=["embed_tokens", "lm_head"],
                                                             task_type="CAUSAL_LM"))
    padded = Collator(pad_id=0)(EXAMPLES)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    assert any("lm_head.modules_to_save" in k for k in ref_grads)
    for chunk in (0, 2):
        with packed_attention(model, loss_chunk_tokens=chunk) as packed:
            batch = PackedCollator()(EXAMPLES)
            labels = batch.pop("labels")
            loss, grads = _loss_and_grads(model, lambda: packed.loss(model(**batch), labels))
            if chunk == 0:  # the plain loss on the model's own kept logits is the same function
                with torch.no_grad():
                    torch.testing.assert_close(selected_token_loss(model(**batch), labels), ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)


def test_chunked_linear_cross_entropy_equals_full_and_never_keeps_full_logits():
    torch.manual_seed(0)
    rows, hid, vocab, chunk = 37, 16, 50, 8
    h = torch.randn(rows, hid, requires_grad=True)
    w = torch.randn(vocab, hid, requires_grad=True)
    b = torch.randn(vocab, requires_grad=True)
    t = torch.randint(0, vocab, (rows,))
    t[::5] = IGNORE_INDEX

    def saved_shapes(fn):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: shapes.append(tuple(x.shape)) or x, lambda x: x):
            out = fn()
        return out, shapes

    ref, ref_saved = saved_shapes(lambda: torch.nn.functional.cross_entropy(
        torch.nn.functional.linear(h, w, b), t, reduction="sum", ignore_index=IGNORE_INDEX))
    ref_g = torch.autograd.grad(ref, (h, w, b))
    got, saved = saved_shapes(lambda: chunked_linear_cross_entropy(h, w, t, b, chunk_tokens=chunk))
    got_g = torch.autograd.grad(got, (h, w, b))
    torch.testing.assert_close(got, ref)
    for x, y in zip(got_g, ref_g):
        torch.testing.assert_close(x, y)
    # the unchunked graph keeps (rows, vocab) logits for backward; the chunked one keeps none larger than a chunk
    assert (rows, vocab) in ref_saved
    assert not [s for s in saved if s[-1:] == (vocab,) and len(s) == 2 and s[0] > chunk]
    # bf16 matmul (the GPU's compute dtype) against the same computation unchunked
    got16 = chunked_linear_cross_entropy(h, w, t, b, dtype=torch.bfloat16, chunk_tokens=chunk)
    ref16 = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h.bfloat16(), w.bfloat16(), b.bfloat16()).float(),
                                              t, reduction="sum", ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got16, ref16, atol=1e-3, rtol=1e-4)
    # reduction none (evaluation's per-token NLL): one fp32 value per row, 0 on ignored rows, chunks in order
    with torch.no_grad():
        rows_nll = chunked_linear_cross_entropy(h, w, t, b, chunk_tokens=chunk, reduction="none")
        ref_rows = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), t, reduction="none",
                                                     ignore_index=IGNORE_INDEX)
    assert rows_nll.shape == (rows,) and rows_nll.dtype == torch.float32
    torch.testing.assert_close(rows_nll, ref_rows)
    torch.testing.assert_close(rows_nll.sum(), got.detach())


def _dense_varlen(q, k, v, cu_q, max_q, scale=None):
    """Reference varlen attention from tensor ops only (no host reads): (T, H, D) with a document-causal mask."""
    n = q.shape[0]
    doc = torch.searchsorted(cu_q[1:].long(), torch.arange(n), right=True)
    pos = torch.arange(n)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
    qh, kh, vh = (x.transpose(0, 1) for x in (q, k, v))
    if kh.shape[0] != qh.shape[0]:
        kh, vh = (x.repeat_interleave(qh.shape[0] // x.shape[0], dim=0) for x in (kh, vh))
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).transpose(0, 1)


def _same_dtype(*ts):
    # the real varlen kernels take one half-precision dtype for q, k and v (checked here for the autocast test)
    assert len({t.dtype for t in ts}) == 1, [t.dtype for t in ts]


def _flash_ref(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    assert causal and dropout_p == 0.0 and isinstance(max_q, int)
    _same_dtype(q, k, v)
    return _dense_varlen(q, k, v, cu_q, max_q, softmax_scale)


def _torch_varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and isinstance(max_q, int)
    _same_dtype(query, key, value)
    return _dense_varlen(query, key, value, cu_seq_q, max_q)


def _torch_varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size == (-1, 0) and isinstance(max_q, int)
    assert enable_gqa == (key.shape[1] != query.shape[1])
    _same_dtype(query, key, value)
    return _dense_varlen(query, key, value, cu_seq_q, max_q, scale)


class _HostReads:
    """Counts reads of tensor values back to the host (.item, .tolist, bool()): each is a sync on CUDA."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("item", "tolist", "__bool__"):
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, **kw):
                self.n += 1
                return _orig(t, *a, **kw)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("kernel", ["flash_attn", "varlen-2.11", "varlen-2.13"])
def test_device_varlen_paths_equal_padded_without_host_reads(kernel, monkeypatch):
    """The CUDA kernels' calling code (layout, boundaries, causal flag, GQA) run on CPU against reference kernels
    with the same signatures: same loss and gradients as the padded batch, and not one host read in the forward
    and backward of the packed batch (with 2 layers or 4), so nothing synchronises per layer on the GPU."""
    import sft.packing as packing

    if kernel == "flash_attn":
        monkeypatch.setattr(packing, "_flash_varlen", lambda: _flash_ref)
    else:
        monkeypatch.setattr(packing, "_torch_varlen",
                            lambda: _torch_varlen_211 if kernel == "varlen-2.11" else _torch_varlen_213)
    monkeypatch.setenv(BACKEND_ENV, kernel.split("-")[0])
    model = _lora_model(gqa=True)
    model.train()
    padded = Collator(pad_id=0)(EXAMPLES)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    batch = PackedCollator()(EXAMPLES)
    labels = batch.pop("labels")
    n = (labels[..., 1:] != IGNORE_INDEX).sum()
    with packed_attention(model, loss_chunk_tokens=4) as packed:
        reads = _HostReads(monkeypatch)
        loss, grads = _loss_and_grads(model, lambda: packed.loss(model(**batch), labels, num_items_in_batch=n))
        assert reads.n == 0
        monkeypatch.undo()
        assert packed.backend == kernel.split("-")[0]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)


def test_varlen_path_under_bf16_autocast_with_fp32_trained_embeddings(monkeypatch):
    """The GPU setting on CPU: bf16 autocast, frozen weights in bf16, trained embed/head copies in fp32 (so RoPE hands
    the kernel fp32 q/k beside bf16 v): the kernel gets one dtype, and loss and gradients match the padded batch."""
    import sft.packing as packing
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.precision import upcast_trainable

    monkeypatch.setattr(packing, "_torch_varlen", lambda: _torch_varlen_213)
    monkeypatch.setenv(BACKEND_ENV, "varlen")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False, attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16),
                           LoraConfig(r=4, target_modules=ALL_PROJ, init_lora_weights=False, task_type="CAUSAL_LM",
                                      modules_to_save=["embed_tokens", "lm_head"]))
    upcast_trainable(model)
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    padded = Collator(pad_id=0)(EXAMPLES)
    with amp:
        ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    with packed_attention(model, loss_chunk_tokens=4) as packed:
        batch = PackedCollator()(EXAMPLES)
        labels = batch.pop("labels")
        model.zero_grad(set_to_none=True)
        with amp:
            out = model(**batch)
        loss = packed.loss(out, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in grads.values()} == {torch.float32}
    torch.testing.assert_close(loss.detach(), ref_loss.float(), atol=2e-2, rtol=2e-2)
    for k in grads:
        rel = (grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()
        assert rel < 5e-2, (k, float(rel))


def _forward_padded_and_packed(model):
    """No-grad forward of EXAMPLES padded and packed (loss chunks of 4 tokens): (padded loss, packed loss, the packed
    forward's output, the packed attention backend)."""
    with torch.no_grad():
        ref = model(**Collator(pad_id=0)(EXAMPLES)).loss
        with packed_attention(model, loss_chunk_tokens=4) as packed:
            batch = PackedCollator()(EXAMPLES)
            labels = batch.pop("labels")
            out = model(**batch)
            return ref, packed.loss(out, labels), out, packed.backend


def test_flex_attention_forward_equals_padded(monkeypatch):
    """FlexAttention with the per-batch document BlockMask. CPU has its forward only (no backward in torch 2.13):
    forward loss here; the GPU script checks its gradients."""
    monkeypatch.setenv(BACKEND_ENV, "flex")
    ref_loss, loss, _, backend = _forward_padded_and_packed(_lora_model(gqa=True).eval())
    assert backend == "flex"
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_sharded_head_keeps_the_models_own_logits(monkeypatch):
    """Under FSDP / ZeRO-3 the head's full weight exists only inside its forward: no deferred chunked loss then."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    ref, loss, out, _ = _forward_padded_and_packed(_lora_model(gqa=False))
    assert out.logits.shape == (1, 9, 40)  # the 9 kept positions' full-vocabulary logits
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_choose_backend(monkeypatch):
    import sft.packing as packing

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert choose_backend("cpu", half=False) == "sdpa_loop"
    monkeypatch.setattr(packing, "_flash_varlen", lambda: None)
    assert choose_backend("cuda", half=True) == ("varlen" if packing._torch_varlen() else "flex")
    assert choose_backend("cuda", half=False) == "flex"
    monkeypatch.setattr(packing, "_flash_varlen", lambda: _flash_ref)
    assert choose_backend("cuda", half=True) == "flash_attn"
    monkeypatch.setenv(BACKEND_ENV, "nope")
    with pytest.raises(ValueError):
        choose_backend("cuda", half=True)


def test_varlen_attention_keeps_padded_batches_exact():
    model = _lora_model(gqa=True).eval()
    padded = Collator(pad_id=0)(EXAMPLES)
    with torch.no_grad():
        ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        with packed_attention(model):
            got = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    mask = padded["attention_mask"].bool()
    torch.testing.assert_close(got[mask], ref[mask], atol=1e-5, rtol=1e-5)


def test_fast_dropout_rate_scale_and_seed():
    d = FastDropout(0.05)
    x = torch.ones(400, 1000)
    d.eval()
    assert d(x) is x
    d.train()
    torch.manual_seed(1)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002                       # 400k draws: sd of the rate is 0.00034
    assert torch.allclose(y[y != 0], torch.tensor(65536 / (65536 - 3277)))
    assert abs(y.mean().item() - 1.0) < 0.005                # expectation kept
    torch.manual_seed(1)
    assert torch.equal(d(x), y)                              # reproducible from the global seed
    with pytest.raises(ValueError):
        FastDropout(1.0)


def test_use_fast_dropout_swaps_every_lora_dropout():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.1, target_modules=ALL_PROJ,
                                                          task_type="CAUSAL_LM"))
    assert use_fast_dropout(m) == 2 * len(ALL_PROJ)
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in m.modules())


def test_packed_batches_with_gradient_checkpointing():
    """The recipes for 7B/13B checkpoint activations: the packed kwargs must survive the recomputation."""
    model = _lora_model(gqa=False)
    model.train()
    padded = Collator(pad_id=0)(EXAMPLES)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    with packed_attention(model, loss_chunk_tokens=4) as packed:
        batch = PackedCollator()(EXAMPLES)
        labels = batch.pop("labels")
        loss, grads = _loss_and_grads(model, lambda: packed.loss(model(**batch), labels))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
