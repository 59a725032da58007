"""Which distributed engine a run was launched under, and the rule that the recipe, not the engine config,
owns precision and batch settings.

An accelerate engine YAML (recipes/accelerate/*.yaml) or a DeepSpeed JSON describes only the engine: ZeRO
stage, offload, sharding. Precision, gradient accumulation (derived from the recipe's global batch), clipping
and micro-batch come from the typed recipe. Whatever a user wrote into the engine config that contradicts
the recipe is refused here, in one line, before any weights load; values left out or "auto" are filled in
from the recipe (transformers fills DeepSpeed's "auto" entries from the TrainingArguments zhllama builds).

Public API:
    Engine                                    kind ("single" | "ddp" | "deepspeed" | "fsdp"), zero_stage, ...
    detect(deepspeed_json=None) -> Engine     from the launcher's environment (accelerate launch / torchrun)
    check(engine, precision, accumulation, max_grad_norm, micro_batch, where) -> None   UserError on a contradiction
    effective_precision(precision) -> str     the recipe's precision as this machine runs it (CPU: fp32)
    sync_launcher_precision(precision)        tell accelerate's engine plugins the recipe's precision
    allow_fsdp_on_cpu()                       FSDP2 for real on CPU (gloo) where accelerate would fall back to DDP
    untie_frozen_copies(model) -> int         FSDP2: frozen tied copies (PEFT modules_to_save) get their own tensor
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

_ACCELERATE_PRECISION = {"no": None, "fp16": "fp16", "bf16": "bf16", "fp8": "fp8"}


@dataclass(frozen=True)
class Engine:
    kind: str  # single | ddp | deepspeed | fsdp
    world_size: int = 1
    zero_stage: int | None = None
    mixed_precision: str | None = None  # what the engine config asks for (None: not set / "no")
    accumulation: int | None = None  # an explicit gradient_accumulation_steps in the engine config
    clipping: float | None = None  # an explicit gradient_clipping in the engine config
    micro_batch: int | None = None  # an explicit train_micro_batch_size_per_gpu (DeepSpeed JSON)
    gather_on_save: bool = True  # ZeRO-3: stage3_gather_16bit_weights_on_model_save
    source: str = "launcher environment"

    @property
    def shards_parameters(self) -> bool:
        """Parameters live partitioned across ranks: saving and evaluating need them gathered."""
        return (self.kind == "deepspeed" and self.zero_stage == 3) or self.kind == "fsdp"


def _number(value):
    if value in (None, "", "auto", "none"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _json_precision(cfg: dict) -> str | None:
    for key in ("bf16", "fp16"):
        enabled = (cfg.get(key) or {}).get("enabled") if isinstance(cfg.get(key), dict) else None
        if enabled is True or enabled == "true":
            return key
    return None


def _read_ds_json(path: str) -> dict:
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: DeepSpeed config cannot be read ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"{path}: DeepSpeed config is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: DeepSpeed config must be a JSON object")
    return cfg


def detect(deepspeed_json: str | None = None) -> Engine:
    """The engine of this process, read from what `accelerate launch` / torchrun put into the environment, or
    from --deepspeed JSON."""
    env = os.environ
    ws = int(env.get("WORLD_SIZE", "1"))
    launcher_mp = _ACCELERATE_PRECISION.get(env.get("ACCELERATE_MIXED_PRECISION", "no").lower())
    ds_file = deepspeed_json or env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    if ds_file and ds_file.lower() == "none":
        ds_file = None
    if deepspeed_json or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        cfg = _read_ds_json(ds_file) if ds_file else {}
        zero = cfg.get("zero_optimization") or {}
        stage = zero.get("stage", env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
        gather = zero.get("stage3_gather_16bit_weights_on_model_save",
                          zero.get("gather_16bit_weights_on_model_save"))
        if gather is None and not ds_file:
            gather = env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true"
        accum = _number(cfg.get("gradient_accumulation_steps", env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")))
        clip = _number(cfg.get("gradient_clipping", env.get("ACCELERATE_GRADIENT_CLIPPING")))
        return Engine("deepspeed", ws, int(stage) if stage not in (None, "") else None,
                      _json_precision(cfg) or launcher_mp, int(accum) if accum else None, clip,
                      int(_number(cfg.get("train_micro_batch_size_per_gpu")) or 0) or None,
                      bool(gather) if gather is not None else False,
                      source=ds_file or "the accelerate DeepSpeed config")
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return Engine("fsdp", ws, mixed_precision=launcher_mp, source="the accelerate FSDP config")
    return Engine("ddp" if ws > 1 else "single", ws, mixed_precision=launcher_mp)


def effective_precision(precision: str) -> str:
    """fp16/bf16 need a GPU here; on CPU every stage trains in fp32 (the recipes say so)."""
    import torch

    return precision if torch.cuda.is_available() else "fp32"


def check(engine: Engine, precision: str, accumulation: int, max_grad_norm: float, micro_batch: int,
          where: str) -> None:
    """Refuse an engine config that contradicts the recipe (where: the recipe section, e.g. 'sft')."""
    used = effective_precision(precision)
    fix = f"remove it from {engine.source} (zhllama takes it from the recipe)"
    if engine.mixed_precision and engine.mixed_precision != used:
        why = "" if used == precision else f" ({precision} in the recipe runs as fp32 on CPU)"
        raise UserError(f"{engine.source}: mixed_precision {engine.mixed_precision} contradicts the recipe's "
                        f"{where}.precision {used}{why}; {fix}, or set --set {where}.precision="
                        f"{engine.mixed_precision}")
    if engine.accumulation and engine.accumulation != accumulation:
        raise UserError(f"{engine.source}: gradient_accumulation_steps {engine.accumulation} contradicts the "
                        f"recipe's {accumulation} (its global batch / (micro-batch x {engine.world_size} processes)); "
                        f"{fix}, or change --batch-size")
    if engine.clipping is not None and abs(engine.clipping - max_grad_norm) > 1e-12:
        raise UserError(f"{engine.source}: gradient_clipping {engine.clipping:g} contradicts the trainer's "
                        f"max_grad_norm {max_grad_norm:g}; {fix}")
    if engine.micro_batch and engine.micro_batch != micro_batch:
        raise UserError(f"{engine.source}: train_micro_batch_size_per_gpu {engine.micro_batch} contradicts the "
                        f"recipe's {where}.per_device_batch_size {micro_batch}; {fix}")
    if engine.kind == "deepspeed" and engine.zero_stage == 3 and not engine.gather_on_save:
        raise UserError(f"{engine.source}: ZeRO-3 without gathering the weights on save would write partitioned "
                        "(empty) tensors; set zero3_save_16bit_model: true (accelerate YAML) or "
                        "stage3_gather_16bit_weights_on_model_save: true (DeepSpeed JSON)")
    if engine.kind == "fsdp" and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() == "true":
        raise UserError(f"{engine.source}: fsdp_cpu_ram_efficient_loading: true has no use here (zhllama loads "
                        "the weights before the engine starts) and breaks tied embeddings with modules_to_save "
                        "(KeyError in tie_weights); set it to false")
    if engine.kind == "fsdp" and engine.world_size > 1 and not cpu_fsdp_possible():
        raise UserError(f"{engine.source}: FSDP cannot shard on this machine (no GPU, and torch's gloo backend "
                        "is missing); launch with recipes/accelerate/deepspeed_zero3.yaml or ddp.yaml instead")


def cpu_fsdp_possible() -> bool:
    import torch
    import torch.distributed as dist

    return torch.cuda.is_available() or (dist.is_available() and dist.is_gloo_available())


def allow_fsdp_on_cpu() -> None:
    """accelerate takes its FSDP branch only for accelerator devices and on CPU silently runs DDP instead;
    torch's FSDP2 (fully_shard) itself shards over gloo on CPU. After TrainingArguments has set up the CPU
    process group, present it to accelerate as a multi-device one, so the FSDP plugin is applied for real
    (CPU FSDP serves tests of the sharded code paths; it is never faster than DDP)."""
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    state = PartialState()
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def sync_launcher_precision(precision: str) -> None:
    """accelerate builds its DeepSpeed/FSDP plugins from ACCELERATE_MIXED_PRECISION; after check() it may
    only agree with the recipe, so set it to the recipe's (or 'no' for fp32)."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        used = effective_precision(precision)
        os.environ["ACCELERATE_MIXED_PRECISION"] = used if used in ("fp16", "bf16") else "no"


def untie_frozen_copies(model) -> int:
    """FSDP2 refuses a parameter visible to two of its groups. A tied model under PEFT's modules_to_save keeps
    its frozen original embedding and head tied to each other, while the trained copies live in different
    groups; the frozen originals are never used in the forward then, so the head's gets a copy of its own.
    A trainable tied parameter is left alone (accelerate groups a plain tied embedding and head together)."""
    import torch

    seen, untied = {}, 0
    for name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) in seen and not param.requires_grad:
                setattr(module, pname, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                untied += 1
            else:
                seen[id(param)] = f"{name}.{pname}"
    return untied
