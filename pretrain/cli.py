"""python -m pretrain {resize,phase1,phase2,plan,convert-llama2c,init}: a thin argparse layer over the pretrain modules."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zhllama.errors import UserError, cli_entry

_EPILOG = """examples:
  python -m pretrain convert-llama2c --checkpoint stories260K.bin --tokenizer tok512.model --out runs/x/base
  python -m pretrain resize --model runs/x/base --tokenizer runs/x/vocab --out runs/x/pretrain/resized
  python -m pretrain phase1 --recipe tiny --model runs/x/pretrain/resized --corpus data/zh --out runs/x/pretrain/phase1
  python -m pretrain phase2 --recipe tiny --model runs/x/pretrain/phase1 --corpus data/zh --out runs/x/pretrain/phase2
  python -m pretrain plan --recipe llama-7b --vocab-size 49953
  accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml -m pretrain phase2 --recipe llama-7b ...
"""

# CLI flag -> field of the phase (p) or of the pretrain section (pre)
_PHASE_FLAGS = {
    "learning_rate": "learning_rate", "batch_size": "global_batch_size", "per_device_batch_size": "per_device_batch_size",
    "max_steps": "max_steps", "warmup_ratio": "warmup_ratio", "weight_decay": "weight_decay", "lr_scheduler": "lr_scheduler",
    "save_steps": "save_steps", "eval_steps": "eval_steps", "logging_steps": "logging_steps",
    "lora_r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "lora_targets": "lora_targets",
    "modules_to_save": "modules_to_save",
}
_PRE_FLAGS = {"block_size": "block_size", "seed": "seed", "precision": "precision", "eval_ratio": "eval_ratio",
              "gradient_checkpointing": "gradient_checkpointing", "streaming": "streaming"}


def _train_args(p: argparse.ArgumentParser, phase: str) -> None:
    p.add_argument("--model", required=True, help="HF model folder (resized for phase 1; phase 1's output for phase 2)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders (.txt lines, .jsonl 'text')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--recipe", default="tiny", help="recipe name under recipes/ or a .yaml path (default: %(default)s)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one inside --model)")
    p.add_argument("--config", metavar="YAML", help="YAML file of overrides in the recipe's format")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe field, e.g. --set pretrain.phase2.warmup_ratio=0.1")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--batch-size", type=int, help="global batch in sequences (reached by gradient accumulation)")
    p.add_argument("--per-device-batch-size", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--warmup-ratio", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-scheduler")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--eval-ratio", type=float)
    p.add_argument("--save-steps", type=int)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="tokenize on the fly instead of caching (corpora larger than the disk cache should hold)")
    p.add_argument("--cache-dir", help="tokenized-data cache (default: OUT/../data_cache)")
    p.add_argument("--encoding", default="auto", choices=("auto", "utf-8", "gb18030", "big5"),
                   help="corpus encoding; auto: UTF-8, else GB18030/Big5 detected per file like `corpora prepare`; "
                        "binary files are dropped and reported (default: %(default)s)")
    p.add_argument("--min-chinese-share", type=float, default=0.01,
                   help="refuse a corpus whose sampled text is less than this share Chinese characters "
                        "(warning below 0.3; 0 disables) (default: %(default)s)")
    p.add_argument("--deepspeed", metavar="JSON", help="DeepSpeed config, when not launched with an accelerate config")
    p.add_argument("--full-determinism", action="store_true", help="torch deterministic algorithms (slower on GPU)")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue from the last complete checkpoint in OUT (the default: rerunning a command resumes)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="discard OUT's checkpoints and start over")
    p.add_argument("--restart-if-changed", dest="resume", action="store_const", const="auto",
                   help="resume if OUT's checkpoints come from the same inputs and settings, else start over (what make uses)")
    if phase == "phase1":
        p.add_argument("--new-rows-only", action="store_true", default=None, help="train only the appended embedding rows")
        p.add_argument("--base-vocab-size", type=int, help="first appended row (default: recorded by `resize`)")
    else:
        p.add_argument("--lora-r", type=int)
        p.add_argument("--lora-alpha", type=int)
        p.add_argument("--lora-dropout", type=float)
        p.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,k_proj,v_proj,o_proj")
        p.add_argument("--modules-to-save", help="comma-separated, e.g. embed_tokens,lm_head")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resize", help="resize embeddings + LM head to the tokenizer and initialise new rows")
    r.add_argument("--model", required=True)
    r.add_argument("--tokenizer", required=True, help="extended tokenizer folder (from `python -m vocab build`)")
    r.add_argument("--out", required=True)
    r.add_argument("--init", default="subword-mean", choices=["subword-mean", "mean", "normal"])
    r.add_argument("--seed", type=int, default=0, help="for --init normal")
    for ph in ("phase1", "phase2"):
        _train_args(sub.add_parser(ph, help="phase 1: input embeddings only" if ph == "phase1"
                                   else "phase 2: LoRA + full embed_tokens and lm_head"), ph)
    pl = sub.add_parser("plan", help="trainable parameters, memory per GPU and tokens per step of a recipe")
    pl.add_argument("--recipe", required=True)
    pl.add_argument("--vocab-size", type=int)
    pl.add_argument("--num-gpus", type=int)
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c = sub.add_parser("convert-llama2c", help="import a llama2.c checkpoint as a HF LlamaForCausalLM folder")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--tokenizer", required=True, help="its SentencePiece tokenizer.model")
    c.add_argument("--out", required=True)
    i = sub.add_parser("init", help="a randomly initialised model shaped by a recipe (the tiny embedded default)")
    i.add_argument("--recipe", default="tiny")
    i.add_argument("--tokenizer", required=True, help="BASE tokenizer.model the model is built on")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the random weights are drawn (auto: cuda when visible; a 7B init takes seconds there)")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="stored weight dtype (bfloat16: a 7B folder is 13.5 GB instead of 27)")
    i.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return ap


def _apply_sets(recipe, sets, config_yaml=None):
    from zhllama.recipe import apply_overrides, validate

    if config_yaml:
        import yaml

        path = Path(config_yaml)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        apply_overrides(recipe, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        nested: dict = {}
        cur = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        apply_overrides(recipe, nested, "--set")
    validate(recipe, "recipe after overrides")
    return recipe


def resolve_training(a, phase: str):
    """Recipe <- --config YAML <- --set <- explicit flags; returns (recipe, TrainSettings)."""
    from zhllama.recipe import apply_overrides, load_recipe, validate
    from zhllama.trainer import settings_from

    recipe = _apply_sets(load_recipe(a.recipe), a.set, a.config)
    ph = getattr(recipe.pretrain, phase)
    phase_vals = {f: getattr(a, k) for k, f in _PHASE_FLAGS.items() if getattr(a, k, None) is not None}
    pre_vals = {f: getattr(a, k) for k, f in _PRE_FLAGS.items() if getattr(a, k, None) is not None}
    if getattr(a, "new_rows_only", None):
        phase_vals["new_rows_only"] = True
    apply_overrides(ph, phase_vals, f"pretrain.{phase}")
    apply_overrides(recipe.pretrain, pre_vals, "pretrain")
    validate(recipe, "recipe after command-line flags")
    settings = settings_from(ph, recipe.pretrain, deepspeed=a.deepspeed,
                                   full_determinism=True if a.full_determinism else None)
    return recipe, settings


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "resize":
        from pretrain.embeddings import resize_folder

        s = resize_folder(a.model, a.tokenizer, a.out, init=a.init, seed=a.seed)
        print(f"resized {a.model}: {s['old_vocab']:,} -> {s['new_vocab']:,} rows ({s['added']:,} new, init {s['init']}"
              f"{', tied' if s['tied'] else ''}) -> {a.out}")
    elif a.cmd in ("phase1", "phase2"):
        from pretrain.phases import run_phase1, run_phase2

        recipe, settings = resolve_training(a, a.cmd)
        if a.cmd == "phase1":
            res = run_phase1(a.model, a.corpus, a.out, recipe, settings, new_rows_only=recipe.pretrain.phase1.new_rows_only,
                             resume=a.resume, cache_dir=a.cache_dir, tokenizer_dir=a.tokenizer, base_vocab=a.base_vocab_size,
                             encoding=a.encoding, min_han_share=a.min_chinese_share)
        else:
            res = run_phase2(a.model, a.corpus, a.out, recipe, settings, resume=a.resume, cache_dir=a.cache_dir,
                             tokenizer_dir=a.tokenizer, encoding=a.encoding, min_han_share=a.min_chinese_share)
        if res and "eval_loss_after" in res:
            print(f"{a.cmd}: held-out loss {res.get('eval_loss_before', float('nan')):.4f} -> {res['eval_loss_after']:.4f} "
                  f"after {res['global_step']} steps -> {a.out}")
    elif a.cmd == "plan":
        from pretrain.plan import format_plan, plan
        from zhllama.recipe import load_recipe

        p = plan(_apply_sets(load_recipe(a.recipe), a.set), a.vocab_size, a.num_gpus)
        print(json.dumps(p, indent=2) if a.json else format_plan(p))
    elif a.cmd == "convert-llama2c":
        from pretrain.llama2c import convert

        out = convert(a.checkpoint, a.tokenizer, a.out)
        print(f"converted {a.checkpoint} -> {out}")
    elif a.cmd == "init":
        from pretrain.phases import init_model
        from zhllama.recipe import load_recipe

        import torch

        device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        out = init_model(_apply_sets(load_recipe(a.recipe), a.set), a.tokenizer, a.out, seed=a.seed, device=device,
                         dtype=a.dtype)
        print(f"initialised a {a.recipe} model on {a.tokenizer} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
