"""`plan`: parameter counts, per-GPU memory and tokens per step of a recipe, from a model built on the meta device.

Public API:
    plan(recipe, vocab_size=None, num_gpus=None) -> dict     {"phases": [...], ...}
    format_plan(dict) -> str

Percentages are trainable / (base model + LoRA) parameters, the convention behind the paper's 2.97% / 6.06%;
PEFT's modules_to_save copies are counted once (they replace the originals in the trained model).
Memory is an estimate (weights + gradients + AdamW states under the recipe's precision and ZeRO stage, plus
activations with or without checkpointing), meant for choosing a setup, not a guarantee.
"""
from __future__ import annotations

GiB = 1024 ** 3


def _meta_model(recipe, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    m = recipe.model
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def _count(model):
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _lora_params(model, phase) -> int:
    import torch.nn as nn

    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in phase.lora_targets:
            total += phase.lora_r * (mod.in_features + mod.out_features)
    return total


def _module_params(model, names) -> int:
    seen, n = set(), 0
    for name, mod in model.named_modules():
        if name.split(".")[-1] in names:
            for p in mod.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
    return n


# the engines `plan` compares: (ZeRO stage, optimizer states on CPU, parameters on CPU). FSDP full sharding
# shards weights, gradients and optimizer states like ZeRO-3.
ENGINES = {"ddp": (0, False, False), "zero2": (2, False, False), "zero3": (3, False, False),
           "zero3-offload": (3, True, True), "fsdp": (3, False, False)}


def _memory(recipe, phase, total: int, trainable: int, num_gpus: int, vocab: int, engine: str | None = None) -> dict:
    """Per-GPU bytes after the ZeRO paper (Rajbhandari et al. 2020, section 5): with mixed precision, 2 bytes of
    weights per parameter, 2 of gradient and K = 12 of optimizer state (fp32 master + Adam's two moments) per
    trainable one; ZeRO-1 divides the states by the GPU count, ZeRO-2 the gradients too, ZeRO-3 and FSDP full
    sharding the weights too; offload moves states (and parameters) to CPU memory."""
    pre, m = recipe.pretrain, recipe.model
    half = pre.precision in ("fp16", "bf16")
    wbytes = 2 if half else 4
    zero, offload_states, offload_params = ENGINES[engine] if engine else (pre.zero_stage, False, False)
    frozen = total - trainable
    # trainable params: fp32 master copy (if mixed precision) + gradient + AdamW's two fp32 moments
    master = 4 if half else 0
    grad = wbytes
    optim = 8
    weights = (frozen + trainable) * wbytes
    states = trainable * (master + optim)
    grads = trainable * grad
    if zero >= 1:
        states /= num_gpus
    if zero >= 2:
        grads /= num_gpus
    if zero >= 3:
        weights /= num_gpus
    if offload_states:
        states = 0
    if offload_params:
        # only the layer being computed is gathered onto the GPU
        weights = (frozen + trainable) * wbytes / max(1, m.num_hidden_layers)
    b, s, h, L = phase.per_device_batch_size, pre.block_size, m.hidden_size, m.num_hidden_layers
    a = m.num_attention_heads
    if pre.gradient_checkpointing:
        # one saved hidden state per layer + one layer's activations while it is recomputed
        act = L * b * s * h * wbytes + b * s * (34 * h + 5 * a * s)
    else:
        act = L * b * s * (34 * h + 5 * a * s)
    logits = b * s * vocab * 4 * 2  # fp32 logits and their gradient
    total_b = weights + states + grads + act + logits
    return {"weights_gib": weights / GiB, "optimizer_gib": states / GiB, "gradients_gib": grads / GiB,
            "activations_gib": (act + logits) / GiB, "total_gib": total_b / GiB}


def plan(recipe, vocab_size: int | None = None, num_gpus: int | None = None) -> dict:
    if vocab_size is None:
        vocab_size = recipe.model.base_vocab_size + recipe.vocab.num_added
    num_gpus = num_gpus or recipe.pretrain.num_gpus
    model = _meta_model(recipe, vocab_size)
    base_total = _count(model)
    embed = _module_params(model, ["embed_tokens"])
    pre = recipe.pretrain
    phases = []
    for name in ("phase1", "phase2"):
        ph = getattr(pre, name)
        if not ph.enabled:
            phases.append({"phase": name, "enabled": False})
            continue
        if name == "phase1":
            if ph.new_rows_only:
                trainable = (vocab_size - recipe.model.base_vocab_size) * recipe.model.hidden_size
                what = "new rows of embed_tokens"
            else:
                trainable = embed
                what = "embed_tokens" + (" (tied with lm_head)" if recipe.model.tie_word_embeddings else "")
            total = base_total
        else:
            lora = _lora_params(model, ph)
            full = _module_params(model, ph.modules_to_save)
            trainable = lora + full
            total = base_total + lora
            what = f"LoRA r={ph.lora_r} on {','.join(ph.lora_targets)} + full {','.join(ph.modules_to_save)}"
        per_step_tokens = ph.global_batch_size * pre.block_size
        phases.append({
            "phase": name, "enabled": True, "trains": what, "trainable": trainable, "total": total,
            "percent": 100 * trainable / total, "global_batch_size": ph.global_batch_size,
            "per_device_batch_size": ph.per_device_batch_size,
            "gradient_accumulation": max(1, ph.global_batch_size // (ph.per_device_batch_size * num_gpus)),
            "tokens_per_step": per_step_tokens, "max_steps": ph.max_steps,
            "total_tokens": per_step_tokens * ph.max_steps, "learning_rate": ph.learning_rate,
            "memory_per_gpu": _memory(recipe, ph, total, trainable, num_gpus, vocab_size),
            "memory_per_gpu_by_engine": {e: round(_memory(recipe, ph, total, trainable, num_gpus, vocab_size, e)
                                                  ["total_gib"], 1) for e in ENGINES},
        })
    return {"recipe": recipe.name, "vocab_size": vocab_size, "base_parameters": base_total,
            "precision": pre.precision, "zero_stage": pre.zero_stage, "num_gpus": num_gpus,
            "block_size": pre.block_size, "gradient_checkpointing": pre.gradient_checkpointing, "phases": phases}


def format_plan(p: dict) -> str:
    lines = [
        f"recipe {p['recipe']}: vocab {p['vocab_size']:,}, {p['base_parameters']:,} parameters, {p['precision']}, "
        f"ZeRO-{p['zero_stage']} on {p['num_gpus']} GPUs, block {p['block_size']}, "
        f"gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}",
    ]
    for ph in p["phases"]:
        if not ph["enabled"]:
            lines.append(f"  {ph['phase']}: skipped by this recipe")
            continue
        mem = ph["memory_per_gpu"]
        lines.append(
            f"  {ph['phase']}: {ph['trains']}\n"
            f"    trainable {ph['trainable']:,} of {ph['total']:,} = {ph['percent']:.2f}%\n"
            f"    batch {ph['global_batch_size']} = {ph['per_device_batch_size']} per GPU x {p['num_gpus']} GPUs x "
            f"{ph['gradient_accumulation']} accumulation; {ph['tokens_per_step']:,} tokens/step; "
            f"{ph['max_steps']:,} steps = {ph['total_tokens'] / 1e9:.2f}B tokens; lr {ph['learning_rate']:g}\n"
            f"    memory per GPU ~{mem['total_gib']:.1f} GiB (weights {mem['weights_gib']:.1f}, optimizer {mem['optimizer_gib']:.1f}, "
            f"gradients {mem['gradients_gib']:.1f}, activations+logits {mem['activations_gib']:.1f})\n"
            "    by engine (GiB per GPU): " + ", ".join(f"{e} {v:.1f}" for e, v in ph["memory_per_gpu_by_engine"].items())
        )
    return "\n".join(lines)
