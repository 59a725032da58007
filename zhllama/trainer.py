"""One Trainer setup for every training stage (pretrain phase 1/2, sft, and later stages): resumable, seeded,
self-describing.

Public API (stable; every training stage uses it):
    TrainSettings                      what a run is given, no defaults: the recipe's section object + named values
    TrainSettings.for_pretrain(pretrain_section, "phase1" | "phase2", deepspeed=None, full_determinism=False)
    TrainSettings.for_sft(sft_section, deepspeed=None, full_determinism=False)
    run_training(model, train_dataset, eval_dataset, settings, out_dir, data_collator, resume=True,
                 processing_class=None, callbacks=(), compute_loss_func=None, eval_collator=None)
                 -> (trainer, result: dict)
        data_collator is required: each stage batches its own examples (pretrain.data.collate_blocks,
        sft.data.Collator, sft.packing.PackedCollator, ...).
        compute_loss_func goes to the Trainer (loss from the model's outputs and the batch's "labels");
        eval_collator batches the held-out loss measured before and after training (default: data_collator).
        result["train_loss"], ["tokens_seen"] and ["train_seconds"] cover the whole run across resumes.
        Checkpoints go to OUT/checkpoints/checkpoint-N (a `zhllama_complete` marker is written when one is
        whole); with resume=True the newest complete one is continued. TensorBoard logs go to OUT/tensorboard,
        every log line to OUT/metrics.jsonl, a loss curve to OUT/loss.png; stdout gets one formatted line per
        log record (log_line: step, loss, lr, tokens/s, ETA) instead of the Trainer's dicts. The final model is NOT saved here:
        the caller saves what its stage produces (full model, adapter, ...). result holds eval_loss_before,
        eval_loss_after, train_loss, global_step, resumed_from, tokens_seen, the settings, and
        training_arguments: what the Trainer's TrainingArguments hold (GIVEN).
    last_complete_checkpoint(out_dir) -> Path | None
    log_line(logs, step, max_steps, eta_s=None) -> str   the printed form of one Trainer log record
    plain_eval_loss(model, dataset, collate, batch_size, precision="fp32") -> float   mean loss per predicted token, no Trainer
    eval_loss(model, dataset, collate, batch_size, precision="fp32") -> float   the same over every rank of a
        distributed run (each rank evaluates its share, the sums are all-reduced): any process count gives the
        same figure, and under ZeRO-3 the forward gathers the partitioned weights
    check_engine(settings, where) -> Engine    the launcher's engine config against the recipe, before weights load
    training_arguments(settings, out_dir, has_eval) -> (TrainingArguments, derived)   what the Trainer receives
    end_of_run()                               every rank, after the main process saved: barrier, then tear down
    world_size() -> int, is_main_process() -> bool

Distributed runs come from the launcher (torchrun / accelerate launch with a DDP, DeepSpeed or FSDP config):
the Trainer reads them from the environment. What depends on the engine: the engine config may not contradict
the recipe (zhllama.engine), and the final weights are gathered from every rank (`trainer.full_state`, None
when every rank holds them whole) before the main process saves them.
Any process count trains the same model for one global batch: transformers normalises the loss by the trained
tokens of the whole global batch (average_tokens_across_devices), accelerate hands micro-batch k of a step to
rank k mod N, and the random state of each micro-batch (dropout) is seeded by its index in the global batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError
from zhllama.recipe import Optimisation, PhaseConfig, PretrainConfig, SFTConfig

PHASES = ("phase1", "phase2")  # the pretraining phases, in order
COMPLETE = "zhllama_complete"
# per checkpoint: the summed training loss and seconds of every step up to it, so a resumed run reports the
# whole run's mean loss (the Trainer's own training_loss covers only the steps of the last train() call)
TOTALS = "zhllama_totals.json"


@dataclass(frozen=True)
class TrainSettings:
    """What one training run is given. No field has a default: the optimisation and the cadence are the recipe's
    section object itself (PhaseConfig or SFTConfig, never copied field by field), the rest is named by the stage
    (for_pretrain, for_sft), so no value that is not the recipe's can slip in between the recipe and the Trainer."""

    section: Optimisation  # lr, batches, steps, schedule, warm-up, decay, clipping, logging/eval/save cadence
    precision: str  # fp32 | fp16 | bf16; fp16/bf16 fall back to fp32 on CPU
    gradient_checkpointing: bool
    seed: int  # initialisation and dropout
    data_seed: int  # the order the training examples are drawn in
    count_tokens: str  # tokens_seen counts "all" input ids or only "non_padding" ones (SFT)
    deepspeed: str | None  # DeepSpeed JSON, when not launched through an accelerate DeepSpeed config
    full_determinism: bool  # torch.use_deterministic_algorithms; can fail on GPU kernels without one

    @classmethod
    def for_pretrain(cls, pretrain: PretrainConfig, phase: str, deepspeed: str | None = None,
                     full_determinism: bool = False) -> TrainSettings:
        """Pretraining phase `phase` ("phase1" | "phase2"): that phase's section, precision/checkpointing/seed of
        the pretrain section. Each phase draws the blocks in its own order (seed + phase index): with one order,
        phase 2 replayed phase 1's blocks step for step, and its training loss rose as it moved from the blocks
        phase 1 had fitted at a high learning rate to those it had barely trained on (7.6 -> 8.3 on the tiny
        default), while measuring nothing about phase 2 itself."""
        index = PHASES.index(phase)
        return cls(section=getattr(pretrain, phase), precision=pretrain.precision,
                   gradient_checkpointing=pretrain.gradient_checkpointing, seed=pretrain.seed,
                   data_seed=pretrain.seed + index, count_tokens="all", deepspeed=deepspeed,
                   full_determinism=full_determinism)

    @classmethod
    def for_sft(cls, sft: SFTConfig, deepspeed: str | None = None, full_determinism: bool = False) -> TrainSettings:
        """SFT: every value from the sft section; tokens_seen counts the non-padding tokens."""
        return cls(section=sft, precision=sft.precision, gradient_checkpointing=sft.gradient_checkpointing,
                   seed=sft.seed, data_seed=sft.seed, count_tokens="non_padding", deepspeed=deepspeed,
                   full_determinism=full_determinism)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def last_complete_checkpoint(out_dir, below: int | None = None) -> Path | None:
    """The newest checkpoint marked whole (with `below`: only those before that step)."""
    d = Path(out_dir) / "checkpoints"
    best = None
    for c in d.glob("checkpoint-*") if d.is_dir() else []:
        try:
            step = int(c.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if below is not None and step >= below:
            continue
        if (c / COMPLETE).is_file() and (best is None or step > best[0]):
            best = (step, c)
    return best[1] if best else None


def _callbacks(out_dir: Path):
    from transformers import TrainerCallback

    class Bookkeeping(TrainerCallback):
        """Marks whole checkpoints, adds tokens/s to the logs, appends every log line to metrics.jsonl."""

        def __init__(self):
            self.t0 = None
            self.tokens0 = 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()
            self.tokens0 = state.num_input_tokens_seen or 0

        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            # every rank has written its part (ZeRO/FSDP shards) before the checkpoint is called whole
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                ck = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ck.is_dir():
                    (ck / COMPLETE).write_text(json.dumps({"step": state.global_step}))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs is None:
                return
            tokens = state.num_input_tokens_seen or 0
            dt = time.time() - (self.t0 or time.time())
            if dt > 0 and tokens > self.tokens0:
                logs["tokens_per_s"] = round((tokens - self.tokens0) / dt, 1)
            if state.is_world_process_zero:
                # elapsed_s: seconds since training began, so steady-state speed can be read between two lines
                with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "tokens": tokens, "elapsed_s": round(dt, 3),
                                        **logs}) + "\n")

    return [Bookkeeping()]


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_line(logs: dict, step: int, max_steps: int, eta_s: float | None = None) -> str:
    """One readable line for a Trainer log record: a training step (loss, lr, tokens/s, ETA), a held-out loss, or
    the end-of-training summary; values the line does not name are left to metrics.jsonl."""
    width = len(str(max_steps))
    head = f"step {step:>{width}}/{max_steps}"
    if "loss" in logs:
        parts = [head, f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if "grad_norm" in logs:
            parts.append(f"grad norm {logs['grad_norm']:.3g}")
        if "tokens_per_s" in logs:
            parts.append(f"{logs['tokens_per_s']:,.0f} tokens/s")
        if eta_s is not None:
            parts.append(f"ETA {_duration(eta_s)}")
        return "  ".join(parts)
    if "eval_loss" in logs:
        return f"{head}  held-out loss {logs['eval_loss']:.4f}"
    if "train_runtime" in logs:
        tail = f", {logs['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in logs else ""
        return (f"trained {step} steps in {_duration(logs['train_runtime'])}: mean loss "
                f"{logs.get('train_loss', float('nan')):.4f}{tail}")
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in logs.items())
    return f"{head}  {shown}"


def _log_lines():
    """The Trainer's printer (raw dicts) replaced by one formatted line per log record, with the time left
    estimated from the steps of this call (a resumed run's earlier steps took no time here)."""
    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        def __init__(self):
            self.t0, self.step0 = None, 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.step0 = time.time(), state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or not state.is_world_process_zero:
                return
            done = state.global_step - self.step0
            eta = None
            if self.t0 is not None and done > 0 and "loss" in logs:
                eta = (time.time() - self.t0) / done * max(state.max_steps - state.global_step, 0)
            print(log_line(logs, state.global_step, state.max_steps, eta), flush=True)

    return LogLines()


def _trainer_class():
    from transformers import Trainer

    class TotalsTrainer(Trainer):
        """Writes the running loss sum and seconds into every checkpoint (read back on resume)."""

        prior = {"loss_sum": 0.0, "seconds": 0.0}
        started = 0.0
        full_state = None
        _seed_at = (-1, 0)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # Micro-batch i of a step on rank r is batch i*N + r of the global batch (accelerate's sharding),
            # so seeding its random state (dropout) by that index gives every process count the same masks.
            import torch

            step, i = self._seed_at
            i = i + 1 if step == self.state.global_step else 0
            self._seed_at = (self.state.global_step, i)
            index = i * self.args.world_size + self.args.process_index
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(_micro_batch_seed(self.args.seed, self.state.global_step, index))
                return super().training_step(model, inputs, num_items_in_batch)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if not self.is_world_process_zero():
                return
            ck = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if ck.is_dir():
                # _total_loss_scalar holds the logged part of this call, _tr_loss what is not logged yet
                here = self._total_loss_scalar + float(self._tr_loss.item())
                (ck / TOTALS).write_text(json.dumps({
                    "step": self.state.global_step, "loss_sum": self.prior["loss_sum"] + here,
                    "seconds": round(self.prior["seconds"] + time.time() - self.started, 2)}))

    return TotalsTrainer


def _eval_before(measure, result, path, is_main):
    """A callback measuring the held-out loss before the first step, once the engine has prepared the model."""
    from transformers import TrainerCallback

    from zhllama.manifest import write_json

    class EvalBefore(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            result["eval_loss_before"] = measure()
            if is_main():
                write_json(path, {"eval_loss": result["eval_loss_before"]})

    return EvalBefore()


def _micro_batch_seed(seed: int, step: int, index: int) -> int:
    return ((seed * 1_000_003 + step) * 65_537 + index) % (2**63)


def _read_totals(ckpt) -> dict:
    if ckpt is not None and (Path(ckpt) / TOTALS).is_file():
        t = json.loads((Path(ckpt) / TOTALS).read_text())
        return {"loss_sum": float(t["loss_sum"]), "seconds": float(t["seconds"])}
    return {"loss_sum": 0.0, "seconds": 0.0}


def _trim_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed (a killed run logged steps that are redone now)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def plot_loss(log_history: list, path: Path, title: str | None = None) -> None:
    """Training (and held-out) loss per optimizer step; the title names the run folder (e.g. pretrain/phase2)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tr = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    ev = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not tr and not ev:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    path = Path(path)
    ax.set_title(title or f"Loss of {path.parent.parent.name}/{path.parent.name} during training")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _accumulation(settings: TrainSettings) -> int:
    ws = world_size()
    sec = settings.section
    per = sec.per_device_batch_size * ws
    if sec.global_batch_size % per:
        raise UserError(
            f"global batch {sec.global_batch_size} is not a multiple of per-device batch "
            f"{sec.per_device_batch_size} x {ws} processes; change --batch-size or --per-device-batch-size"
        )
    return sec.global_batch_size // per


def check_engine(settings: TrainSettings, where: str):
    """Everything about the launch that can be wrong, checked before any weights load."""
    from zhllama import engine

    eng = engine.detect(settings.deepspeed)
    engine.check(eng, settings.precision, _accumulation(settings), settings.section.max_grad_norm,
                 settings.section.per_device_batch_size, where)
    return eng


def training_arguments(settings: TrainSettings, out_dir: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    from zhllama.engine import effective_precision, sync_launcher_precision

    ws = world_size()
    accum = _accumulation(settings)
    cuda = torch.cuda.is_available()
    precision = effective_precision(settings.precision)  # CPU: fp16 AMP is GPU-only, bf16 autocast is slow
    sync_launcher_precision(settings.precision)
    sec = settings.section
    kw = dict(
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=sec.per_device_batch_size,
        per_device_eval_batch_size=sec.per_device_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=sec.learning_rate,
        max_steps=sec.max_steps,
        lr_scheduler_type=sec.lr_scheduler,
        warmup_steps=math.ceil(sec.warmup_ratio * sec.max_steps),
        weight_decay=sec.weight_decay,
        max_grad_norm=sec.max_grad_norm,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        seed=settings.seed,
        data_seed=settings.data_seed,
        full_determinism=settings.full_determinism,
        save_strategy="steps",
        save_steps=sec.save_steps,
        save_total_limit=sec.save_total_limit,
        logging_steps=sec.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=sec.eval_steps if has_eval else None,
        report_to=["tensorboard"],
        include_num_input_tokens_seen=settings.count_tokens,
        prediction_loss_only=True,  # only the loss is used; gathering logits of a 50k vocabulary costs memory
        dataloader_num_workers=0,  # the blocks are in memory (or streamed by datasets' own workers)
        # the loss of a step is normalised by the trained tokens of the whole global batch, on every rank
        average_tokens_across_devices=True,
        use_cpu=not cuda,
        ddp_backend=None if cuda else ("gloo" if ws > 1 else None),
        ddp_find_unused_parameters=False if ws > 1 else None,
        remove_unused_columns=False,
        disable_tqdm=True,  # the training log lines (step, loss, lr, tokens/s, ETA) are the progress
    )
    if settings.gradient_checkpointing:
        kw.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.deepspeed:
        kw["deepspeed"] = settings.deepspeed
    args = TrainingArguments(**kw)
    from zhllama.engine import allow_fsdp_on_cpu

    allow_fsdp_on_cpu()
    return args, dict(gradient_accumulation_steps=accum, world_size=ws, precision_used=precision)


# what result.json records of the Trainer's own arguments: the recipe's values as the Trainer holds them
GIVEN = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "lr_scheduler_type",
         "warmup_steps", "weight_decay", "max_grad_norm", "seed", "data_seed", "full_determinism",
         "gradient_checkpointing", "fp16", "bf16", "save_steps", "save_total_limit", "logging_steps", "eval_steps",
         "include_num_input_tokens_seen", "deepspeed")


def _given(args) -> dict:
    out = {}
    for k in GIVEN:
        v = getattr(args, k, None)
        out[k] = v.value if hasattr(v, "value") else v  # enums (the scheduler) as their names
    return out


def plain_eval_loss(model, dataset, collate, batch_size: int, precision: str = "fp32") -> float:
    """Mean loss per predicted token over `dataset`, with the model as it is (no Trainer, no wrapping).

    precision fp16/bf16 on a GPU: under autocast, like training (a half-precision frozen base beside fp32
    trained layers cannot run without it)."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    rows = list(dataset)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=half) if half is not None and device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), amp:
        for i in range(0, len(rows), max(1, batch_size)):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                total += float(model(**batch).loss) * n
                count += n
    model.train(was_training)
    return total / max(1, count)


def eval_loss(model, dataset, collate, batch_size: int, precision: str = "fp32") -> float:
    """Mean loss per predicted token over `dataset`, over every rank of a distributed run.

    Rank r evaluates rows r, r+N, ...; every rank runs the same number of forwards (a rank out of rows repeats
    one with weight 0), because under ZeRO-3 and FSDP each forward is a collective that gathers weights."""
    import contextlib

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return plain_eval_loss(model, dataset, collate, batch_size, precision)
    ws, rank = dist.get_world_size(), dist.get_rank()
    rows = list(dataset)
    mine = rows[rank::ws]
    bs = max(1, batch_size)
    n_batches = -(-len(rows[0::ws]) // bs)  # rank 0 has the most rows
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=half) if half is not None and device.type == "cuda" else contextlib.nullcontext()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad(), amp:
        for b in range(n_batches):
            chunk = mine[b * bs:(b + 1) * bs]
            weight = 1.0 if chunk else 0.0
            batch = {k: v.to(device) for k, v in collate(chunk or rows[:1]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n:
                sums[0] += float(model(**batch).loss) * n * weight
                sums[1] += n * weight
    model.train(was_training)
    if dist.get_backend() == "nccl" and device.type != "cuda":
        sums = sums.cuda()
    dist.all_reduce(sums)
    return float(sums[0] / max(1.0, float(sums[1])))


def end_of_run() -> None:
    """Every rank waits here until the main process has written the results, then the process group is taken
    down: a rank that leaves while another still talks to it can abort in gloo ('terminate called ...')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _check_engine_applied(eng, trainer) -> None:
    """Never train on another engine than the one launched without a word (accelerate falls back to DDP)."""
    want = {"deepspeed": trainer.is_deepspeed_enabled, "fsdp": trainer.is_fsdp_enabled}.get(eng.kind, True)
    if not want:
        raise UserError(f"{eng.source} asks for {eng.kind}, but the Trainer set up "
                        f"{trainer.accelerator.distributed_type.value}; nothing was trained")


def _gathered_state(trainer, shards: bool):
    """The full state dict on the main process (None elsewhere), gathered from every rank under ZeRO-3/FSDP;
    None everywhere when each rank holds the whole model (the model's own state_dict is right then)."""
    if not shards:
        return None
    sd = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    # a tied parameter is saved once, under its first name, as save_pretrained does with the live model; except a
    # tied pair of PEFT modules_to_save copies (lora_tying): PEFT picks each module's copy by its own name
    seen = set()
    for name, param in trainer.model.named_parameters(remove_duplicate=False):
        if id(param) in seen and ".modules_to_save." not in name:
            sd.pop(name, None)
        seen.add(id(param))
    return sd


def run_training(model, train_dataset, eval_dataset, settings: TrainSettings, out_dir, data_collator, resume=True,
                 processing_class=None, callbacks=(), compute_loss_func=None, eval_collator=None):
    from transformers import set_seed

    from zhllama.manifest import write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # per run, not setdefault: several runs in one process must each log into their own folder
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "tensorboard")
    set_seed(settings.seed)
    args, derived = training_arguments(settings, out_dir, eval_dataset is not None)
    # transformers resumed from a checkpoint at max_steps trains one step more (its stop check comes after a
    # step): continue from the last one before it instead; the seeded steps in between come out the same
    ckpt = last_complete_checkpoint(out_dir, below=settings.section.max_steps) if resume else None
    if is_main_process():
        if ckpt is None:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            _trim_metrics(out_dir / "metrics.jsonl", int(ckpt.name.split("-")[1]))
    from zhllama.engine import detect, untie_frozen_copies

    eng = detect(settings.deepspeed)
    if eng.kind == "fsdp":
        untie_frozen_copies(model)
    trainer = _trainer_class()(
        model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=data_collator, processing_class=processing_class,
        callbacks=_callbacks(out_dir) + list(callbacks), compute_loss_func=compute_loss_func,
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in [c for c in trainer.callback_handler.callbacks if isinstance(c, (PrinterCallback, ProgressCallback))]:
        trainer.remove_callback(cb)
    trainer.add_callback(_log_lines())
    result = {"settings": settings.to_dict(), "training_arguments": _given(trainer.args), **derived,
              "resumed_from": str(ckpt) if ckpt else None}
    result["engine"] = {"kind": eng.kind, "zero_stage": eng.zero_stage}
    before_path = out_dir / "eval_before.json"
    # Trainer.evaluate() before train() prepares the model for evaluation; under DDP the training wrapper then
    # never all-reduces gradients (each process silently trains on its own shard). So the held-out loss is
    # measured by zhllama's own forward loop over every rank, before (once the engine has wrapped the model,
    # so ZeRO-3 gathers its partitioned weights) and after training, the same way under every engine.
    collate = eval_collator or data_collator

    def measure():
        return eval_loss(trainer.model, eval_dataset, collate, settings.section.per_device_batch_size,
                         derived["precision_used"])

    if eval_dataset is not None:
        if ckpt is not None and before_path.is_file():
            result["eval_loss_before"] = json.loads(before_path.read_text())["eval_loss"]
        else:
            trainer.add_callback(_eval_before(measure, result, before_path, trainer.is_world_process_zero))
    _check_engine_applied(eng, trainer)
    result["engine"]["applied"] = str(trainer.accelerator.distributed_type.value)
    t0 = time.time()
    trainer.prior, trainer.started = _read_totals(ckpt), t0
    first = int(ckpt.name.split("-")[1]) if ckpt else 0
    out = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    steps = trainer.state.global_step
    loss_sum = trainer.prior["loss_sum"] + out.training_loss * max(steps - first, 0)
    # tokens_seen: the Trainer restores num_input_tokens_seen from the checkpoint, so it already counts every step
    result.update(train_loss=loss_sum / max(steps, 1), train_loss_this_call=out.training_loss, global_step=steps,
                  train_seconds=round(trainer.prior["seconds"] + time.time() - t0, 2),
                  tokens_seen=trainer.state.num_input_tokens_seen)
    if eval_dataset is not None:
        result["eval_loss_after"] = measure()
    for key in ("eval_loss_before", "eval_loss_after"):
        if key in result and not math.isfinite(result[key]):
            raise RuntimeError(f"held-out loss {key.split('_')[-1]} training is {result[key]}: the model or the "
                               "data is broken (with ZeRO-3/FSDP: were the weights gathered?)")
    trainer.full_state = _gathered_state(trainer, eng.shards_parameters)
    if trainer.is_world_process_zero():
        plot_loss(trainer.state.log_history, out_dir / "loss.png")
        write_json(out_dir / "log_history.json", trainer.state.log_history)
    return trainer, result
