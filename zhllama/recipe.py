"""Recipes: dataclass configs loaded from recipes/NAME.yaml (or a path), overridable field by field.

Public API (stable; every stage uses it):
    load_recipe(name_or_path) -> Recipe          name = file stem under recipes/, or a .yaml path
    recipe_path(name_or_path) -> Path
    apply_overrides(dataclass_obj, {field: value}) -> same object, type-checked and coerced
    Recipe.model: ModelShape, Recipe.pretrain: PretrainConfig (phase1/phase2: PhaseConfig),
    Recipe.vocab: dict and Recipe.sft: dict (raw sections, interpreted by their stages)
    Recipe.to_dict() -> plain dict for manifests
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


@dataclass
class ModelShape:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    base_vocab_size: int = 32000
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02


@dataclass
class PhaseConfig:
    enabled: bool = True
    learning_rate: float = 2e-4
    global_batch_size: int = 1024  # sequences per optimizer step, reached through gradient accumulation
    per_device_batch_size: int = 4
    max_steps: int = 3000
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    # phase 2 (LoRA); phase 1 ignores these
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list = field(default_factory=lambda: ["embed_tokens", "lm_head"])
    # phase 1 only: train only the appended rows of embed_tokens
    new_rows_only: bool = False
    save_steps: int = 500
    eval_steps: int = 500
    logging_steps: int = 10
    save_total_limit: int = 3


@dataclass
class PretrainConfig:
    block_size: int = 512
    precision: str = "fp16"  # fp32 | fp16 | bf16
    gradient_checkpointing: bool = True
    zero_stage: int = 2  # what `plan` assumes; the accelerate/DeepSpeed config file decides the real one
    init: str = "subword-mean"  # subword-mean | mean | normal
    eval_ratio: float = 0.01  # fraction of documents held out for eval loss
    max_eval_blocks: int = 1000
    seed: int = 42
    streaming: bool = False
    num_gpus: int = 8  # what `plan` assumes for per-GPU memory
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(learning_rate=1e-4, max_steps=6000))


@dataclass
class Recipe:
    name: str = "custom"
    model: ModelShape = field(default_factory=ModelShape)
    vocab: dict = field(default_factory=dict)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: dict = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"{p}: no such recipe file")
        return p
    cand = RECIPES_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        known = sorted(f.stem for f in RECIPES_DIR.glob("*.yaml"))
        raise UserError(f"unknown recipe {name_or_path!r}: no {cand}; known recipes: {', '.join(known)} (or pass a .yaml path)")
    return cand


def _coerce(cls_field, value, where: str):
    t = cls_field.type if isinstance(cls_field.type, str) else getattr(cls_field.type, "__name__", str(cls_field.type))
    try:
        if t == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if t == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t == "float":
            return float(value)
        if t == "str":
            return str(value)
        if t == "list":
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: {value!r} is not a valid {t}") from None
    return value


def apply_overrides(obj, values: dict, where: str = "recipe"):
    """Set dataclass fields from a mapping; nested dataclasses take nested mappings. Unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in (values or {}).items():
        key = str(k).replace("-", "_")
        if key not in fields:
            raise UserError(f"{where}: unknown setting {k!r}; known: {', '.join(sorted(fields))}")
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise UserError(f"{where}.{k}: expected a mapping")
            apply_overrides(cur, v, f"{where}.{k}")
        elif isinstance(cur, dict):
            if not isinstance(v, dict):
                raise UserError(f"{where}.{k}: expected a mapping")
            setattr(obj, key, dict(v))
        else:
            setattr(obj, key, _coerce(fields[key], v, f"{where}.{k}"))
    return obj


def load_recipe(name_or_path: str | Path) -> Recipe:
    import yaml

    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with sections model/vocab/pretrain/sft")
    r = Recipe(name=path.stem)
    apply_overrides(r, data, str(path))
    r.source = str(path)
    validate(r, str(path))
    return r


def validate(r: Recipe, where: str = "recipe") -> None:
    p = r.pretrain
    if p.precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"{where}: pretrain.precision {p.precision!r} must be fp32, fp16 or bf16")
    if p.init not in ("subword-mean", "mean", "normal"):
        raise UserError(f"{where}: pretrain.init {p.init!r} must be subword-mean, mean or normal")
    if p.block_size < 2:
        raise UserError(f"{where}: pretrain.block_size must be at least 2")
    for name in ("phase1", "phase2"):
        ph = getattr(p, name)
        if ph.global_batch_size < 1 or ph.per_device_batch_size < 1:
            raise UserError(f"{where}: pretrain.{name} batch sizes must be positive")
        if ph.global_batch_size % ph.per_device_batch_size:
            raise UserError(
                f"{where}: pretrain.{name}.global_batch_size {ph.global_batch_size} is not a multiple of "
                f"per_device_batch_size {ph.per_device_batch_size}"
            )
