"""Trainable-parameter plan for SFT: exact counts from the recipe's model shape, no weights needed.

Counts are analytic (LLaMA layout), so a 13B plan costs nothing; the tiny-model test checks them
against a real peft model. 7B at 49,954 pieces: 429,211,648 of 6,905,483,264 = 6.22%.
"""
from __future__ import annotations

from zhllama.errors import UserError

_PROJ_SHAPES = {  # (in, out) as functions of (hidden, intermediate, kv_dim)
    "q_proj": lambda h, i, kv: (h, h), "k_proj": lambda h, i, kv: (h, kv), "v_proj": lambda h, i, kv: (h, kv),
    "o_proj": lambda h, i, kv: (h, h), "gate_proj": lambda h, i, kv: (h, i), "up_proj": lambda h, i, kv: (h, i),
    "down_proj": lambda h, i, kv: (i, h),
}


def count(shape, vocab: int, r: int, targets, modules_to_save) -> dict:
    h, i, L = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    per_layer_base = sum(a * b for a, b in (f(h, i, kv) for f in _PROJ_SHAPES.values())) + 2 * h
    embed = vocab * h
    head = 0 if shape.tie_word_embeddings else vocab * h
    base = L * per_layer_base + embed + head + h
    unknown = [t for t in targets if t not in _PROJ_SHAPES]
    if unknown:
        raise UserError(f"lora_targets {unknown} unknown; LLaMA projections are {', '.join(_PROJ_SHAPES)}")
    lora = L * sum(r * sum(_PROJ_SHAPES[t](h, i, kv)) for t in targets)
    saved = 0
    for m in modules_to_save:
        if m == "embed_tokens":
            saved += embed
        elif m == "lm_head":
            saved += head if head else 0
        else:
            raise UserError(f"modules_to_save {m!r}: plan knows embed_tokens and lm_head")
    trainable = lora + saved
    total = base + lora
    return {"vocab_size": vocab, "base_params": base, "lora_params": lora, "full_module_params": saved,
            "trainable": trainable, "total": total, "trainable_pct": 100 * trainable / total}


def plan(recipe, vocab_size: int | None = None, overrides: dict | None = None) -> dict:
    """recipe: a zhllama.recipe.Recipe, or a recipe name / .yaml path."""
    from sft.config import sft_config
    from zhllama.recipe import Recipe, load_recipe

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    cfg = sft_config(rec.sft, overrides, f"{rec.source} sft")
    if vocab_size is None:
        vocab_size = rec.model.base_vocab_size + rec.vocab.num_added + 1  # + [PAD]
    res = count(rec.model, vocab_size, cfg.lora_r, cfg.lora_targets, cfg.modules_to_save)
    accum = cfg.global_batch_size // cfg.per_device_batch_size
    res.update(recipe=rec.name, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
               modules_to_save=cfg.modules_to_save, learning_rate=cfg.learning_rate,
               global_batch_size=cfg.global_batch_size, per_device_batch_size=cfg.per_device_batch_size,
               grad_accum_single_device=accum, max_steps=cfg.max_steps, max_length=cfg.max_length,
               warmup_ratio=cfg.warmup_ratio, template=cfg.template,
               tokens_per_step=cfg.global_batch_size * cfg.max_length)
    return res


def format_plan(p: dict) -> str:
    return "\n".join([
        f"sft plan for recipe {p['recipe']} at vocabulary {p['vocab_size']:,}",
        f"  LoRA r={p['lora_r']} alpha={p['lora_alpha']} on {','.join(p['lora_targets'])}: {p['lora_params']:,} params",
        f"  full {','.join(p['modules_to_save'])}: {p['full_module_params']:,} params",
        f"  trainable {p['trainable']:,} of {p['total']:,} = {p['trainable_pct']:.2f}%",
        f"  lr {p['learning_rate']:g}, warmup {p['warmup_ratio']:g}, {p['max_steps']:,} steps, "
        f"batch {p['global_batch_size']} x {p['max_length']} tokens "
        f"(per-device {p['per_device_batch_size']}, accumulation {p['grad_accum_single_device']} on one device)",
        f"  template {p['template']}",
    ])
