"""Padding-free SFT batches and the cheaper LoRA dropout: same loss and gradients as the padded path."""
from __future__ import annotations

import pytest
import torch

from sft.config import ALL_PROJ
from sft.data import IGNORE_INDEX, Collator
from sft.lora_dropout import FastDropout, use_fast_dropout
from sft.packing import PackedCollator, packed_attention, selected_token_loss

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


@pytest.mark.parametrize("gqa", [False, True])
def test_packed_loss_and_gradients_equal_padded(gqa):
    model = _lora_model(gqa)
    model.train()  # dropout is 0: train mode only to take the training code paths
    padded = Collator(pad_id=0)(EXAMPLES)
    ref_loss, ref_grads = _loss_and_grads(model, lambda: model(**padded).loss)
    with packed_attention(model):
        batch = PackedCollator()(EXAMPLES)
        labels = batch.pop("labels")
        loss, grads = _loss_and_grads(model, lambda: selected_token_loss(model(**batch), labels))
        # with gradient accumulation the Trainer passes the accumulated count: sum / count
        n = (labels[..., 1:] != IGNORE_INDEX).sum()
        acc_loss = selected_token_loss(model(**batch), labels, num_items_in_batch=n)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acc_loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    assert model.get_base_model().config._attn_implementation == "sdpa"


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
    with packed_attention(model):
        batch = PackedCollator()(EXAMPLES)
        labels = batch.pop("labels")
        loss, grads = _loss_and_grads(model, lambda: selected_token_loss(model(**batch), labels))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
