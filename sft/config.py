"""SFT settings: the recipe's `sft:` section as a typed dataclass, overridable field by field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from zhllama.errors import UserError

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig:
    template: str = "chinese-alpaca"
    max_length: int = 512
    learning_rate: float = 1e-4
    global_batch_size: int = 512      # sequences per optimizer step, reached through gradient accumulation
    per_device_batch_size: int = 4
    max_steps: int = 6000
    num_epochs: float = 0.0           # > 0: train this many epochs instead of max_steps
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: list(ALL_PROJ))
    modules_to_save: list = field(default_factory=lambda: ["embed_tokens", "lm_head"])
    precision: str = "fp16"           # fp32 | fp16 | bf16 (CPU runs always use fp32)
    gradient_checkpointing: bool = True
    eval_ratio: float = 0.05          # records held out for eval loss when no --eval-data is given
    max_eval_examples: int = 500
    reference_tokenization: bool = False
    packing: bool = True              # padding-free batches, per-example attention, LM head only on trained tokens
    fast_lora_dropout: bool = True    # LoRA dropout masks from 16-bit uniforms (same Bernoulli, cheaper to draw)
    loss_chunk_tokens: int = 1024     # packed batches: LM head + CE this many trained rows at a time (0: whole batch)
    overlong: str = "truncate"        # truncate | drop | error
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 200
    save_steps: int = 200
    save_total_limit: int = 3


def sft_config(recipe_sft: dict | None, overrides: dict | None = None, where: str = "recipe sft") -> SFTConfig:
    from zhllama.recipe import apply_overrides

    cfg = SFTConfig()
    apply_overrides(cfg, recipe_sft or {}, where)
    apply_overrides(cfg, overrides or {}, "override")
    validate(cfg, where)
    return cfg


def validate(c: SFTConfig, where: str) -> None:
    from sft.template import get

    get(c.template)
    if c.precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"{where}: precision {c.precision!r} must be fp32, fp16 or bf16")
    if c.global_batch_size < 1 or c.per_device_batch_size < 1 or c.global_batch_size % c.per_device_batch_size:
        raise UserError(f"{where}: global_batch_size {c.global_batch_size} must be a positive multiple of "
                        f"per_device_batch_size {c.per_device_batch_size}")
    if c.max_length < 8:
        raise UserError(f"{where}: max_length {c.max_length} is too small")
    if c.overlong not in ("truncate", "drop", "error"):
        raise UserError(f"{where}: overlong {c.overlong!r} must be truncate, drop or error")
    if c.loss_chunk_tokens < 0:
        raise UserError(f"{where}: loss_chunk_tokens {c.loss_chunk_tokens} must be >= 0 (0: no chunking)")
    if not 0 <= c.eval_ratio < 1:
        raise UserError(f"{where}: eval_ratio must be in [0, 1)")


def parse_overrides(items) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"override {it!r} is not KEY=VALUE (e.g. learning_rate=2e-4)")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def to_dict(c: SFTConfig) -> dict:
    return dataclasses.asdict(c)
