"""python -m pretrain {resize,cache,phase1,phase2,plan,convert-llama2c,init}: a thin argparse layer over the pretrain modules."""
from __future__ import annotations

import argparse
import json
import sys
from zhllama.cli import add_recipe_args
from zhllama.errors import UserError, cli_entry
from zhllama.overlap import refuse_overlap
from zhllama.recipe import PhaseConfig, PretrainConfig

_EPILOG = """examples:
  python -m pretrain convert-llama2c --checkpoint stories260K.bin --tokenizer tok512.model --out runs/x/base
  python -m pretrain resize --model runs/x/base --tokenizer runs/x/vocab --out runs/x/pretrain/resized
  python -m pretrain cache --recipe tiny --tokenizer runs/x/vocab --corpus data/zh --cache-dir runs/x/pretrain/data_cache
  python -m pretrain phase1 --recipe tiny --model runs/x/pretrain/resized --corpus data/zh --out runs/x/pretrain/phase1
  python -m pretrain phase2 --recipe tiny --model runs/x/pretrain/phase1 --corpus data/zh --out runs/x/pretrain/phase2
  python -m pretrain plan --recipe llama-7b --vocab-size 49953
  accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml -m pretrain phase2 --recipe llama-7b ...
"""

def _train_args(p: argparse.ArgumentParser, phase: str) -> None:
    p.add_argument("--model", required=True, help="HF model folder (resized for phase 1; phase 1's output for phase 2)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders (.txt lines, .jsonl 'text')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the one inside --model)")
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
        p.add_argument("--base-vocab-size", type=int, help="first appended row (default: recorded by `resize`)")
    add_recipe_args(p, [(f"pretrain.{phase}", PhaseConfig), ("pretrain", PretrainConfig)])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__, epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resize", help="resize embeddings + LM head to the tokenizer and initialise new rows")
    r.add_argument("--model", required=True)
    r.add_argument("--tokenizer", required=True, help="extended tokenizer folder (from `python -m vocab build`)")
    r.add_argument("--out", required=True)
    r.add_argument("--init", choices=["subword-mean", "mean", "normal"],
                   help="how new rows start (default: the recipe's pretrain.init with --recipe/--set, else subword-mean)")
    r.add_argument("--seed", type=int, help="for --init normal (default: the recipe's pretrain.seed with --recipe/--set, else 0)")
    add_recipe_args(r, [], recipe_help="optional: recipe whose pretrain.init and pretrain.seed apply and whose model: "
                                       "shape --model must have (without it: --init/--seed or their defaults)")
    for ph in ("phase1", "phase2"):
        _train_args(sub.add_parser(ph, help="phase 1: input embeddings only" if ph == "phase1"
                                   else "phase 2: LoRA + full embed_tokens and lm_head"), ph)
    ca = sub.add_parser("cache", help="only tokenize and pack the corpus into the phase 1/2 data cache (all cores, "
                        "resumable; what phase1/phase2 then reuse)")
    ca.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders (.txt lines, .jsonl 'text')")
    ca.add_argument("--tokenizer", required=True, help="the extended tokenizer folder phase 1/2 will train with")
    ca.add_argument("--cache-dir", required=True, help="cache folder (phase1/phase2's default: OUT/../data_cache)")
    ca.add_argument("--encoding", default="auto", choices=("auto", "utf-8", "gb18030", "big5"),
                    help="corpus encoding (default: %(default)s)")
    add_recipe_args(ca, [("pretrain", PretrainConfig)], recipe_help="recipe name under recipes/ or a .yaml path "
                    "(block_size, eval_ratio, max_eval_blocks shape the cache) (required)")
    from zhllama.executors import add_executor_args

    # --num-proc (the recipe's pretrain.num_proc) is the local executor's --workers unless --workers is given
    add_executor_args(ca)
    pl = sub.add_parser("plan", help="trainable parameters, memory per GPU and tokens per step of a recipe")
    pl.add_argument("--vocab-size", type=int)
    pl.add_argument("--num-gpus", type=int)
    pl.add_argument("--json", action="store_true")
    add_recipe_args(pl, [], recipe_help="recipe name under recipes/ or a .yaml path (required)")
    c = sub.add_parser("convert-llama2c", help="import a llama2.c checkpoint as a HF LlamaForCausalLM folder")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--tokenizer", required=True, help="its SentencePiece tokenizer.model")
    c.add_argument("--out", required=True)
    i = sub.add_parser("init", help="a randomly initialised model shaped by a recipe (the tiny embedded default)")
    i.add_argument("--tokenizer", required=True, help="BASE tokenizer.model (or byte-level tokenizer.json) the model is built on")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the random weights are drawn (auto: cuda when visible; a 7B init takes seconds there)")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="stored weight dtype (bfloat16: a 7B folder is 13.5 GB instead of 27)")
    add_recipe_args(i, [], recipe_help="recipe name under recipes/ or a .yaml path whose model: section shapes the model (required)")
    return ap


def _recipe_only(a):
    """plan / init: the recipe (required) with --config/--set applied and validated; no model to compare with."""
    from zhllama.cli import resolve_recipe

    if not a.recipe:
        raise UserError("--recipe NAME|PATH is required")
    return resolve_recipe(a)


def resolve_training(a, phase: str):
    """Recipe (given, or matched to --model's shape) <- --config YAML <- --set <- flags, all checked before any
    weights load (ranges, shape agreement, LoRA module names, block size against the model's context); returns
    (recipe, TrainSettings) where the settings hold the recipe's phase section itself."""
    from zhllama.cli import model_config, resolve_recipe
    from zhllama.recipe import context_problem
    from zhllama.trainer import TrainSettings

    def context(recipe):
        cfg = model_config(a.model)
        bad = cfg and context_problem(recipe.pretrain.block_size, cfg, f"--block-size {recipe.pretrain.block_size}")
        return [f"{bad} (--model {a.model})"] if bad else []

    recipe = resolve_recipe(a, a.model, lora_sections=("pretrain.phase2",) if phase == "phase2" else (), extra=context)
    settings = TrainSettings.for_pretrain(recipe.pretrain, phase, deepspeed=a.deepspeed,
                                          full_determinism=bool(a.full_determinism))
    return recipe, settings


def resize_settings(a) -> tuple[str, int]:
    """(init, seed) of `resize`: flags, over the recipe's pretrain section when --recipe/--config/--set is given (checked
    against --model's shape before any weight loads), else the defaults resize always had."""
    if not (a.recipe or a.config or a.sets):
        return a.init or "subword-mean", 0 if a.seed is None else a.seed
    from zhllama.cli import resolve_recipe

    p = resolve_recipe(a, a.model).pretrain
    return a.init or p.init, p.seed if a.seed is None else a.seed


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    # before anything is locked or created: a lock file is already a write into the input
    refuse_overlap({"--out": getattr(a, "out", None), "--cache-dir": getattr(a, "cache_dir", None)},
                   {"--model": getattr(a, "model", None), "--tokenizer": getattr(a, "tokenizer", None),
                    "--corpus": getattr(a, "corpus", None), "--checkpoint": getattr(a, "checkpoint", None),
                    "--deepspeed": getattr(a, "deepspeed", None)})
    if a.cmd == "resize":
        init, seed = resize_settings(a)
        from pretrain.embeddings import resize_folder

        s = resize_folder(a.model, a.tokenizer, a.out, init=init, seed=seed)
        print(f"resized {a.model}: {s.get('old_rows', s['old_vocab']):,} -> {s['new_vocab']:,} rows ({s['added']:,} new, init {s['init']}"
              f"{', tied' if s['tied'] else ''}) -> {a.out}")
    elif a.cmd in ("phase1", "phase2"):
        from zhllama.runfolder import lock

        with lock(a.out):  # first: a second run into a busy folder fails at once
            recipe, settings = resolve_training(a, a.cmd)  # before torch is imported: bad input is refused in < 1 s
            from pretrain.phases import run_phase1, run_phase2

            if a.cmd == "phase1":
                res = run_phase1(a.model, a.corpus, a.out, recipe, settings, resume=a.resume, cache_dir=a.cache_dir,
                                 new_rows_only=recipe.pretrain.phase1.new_rows_only, tokenizer_dir=a.tokenizer,
                                 base_vocab=a.base_vocab_size, encoding=a.encoding,
                                 min_han_share=a.min_chinese_share)
            else:
                res = run_phase2(a.model, a.corpus, a.out, recipe, settings, resume=a.resume, cache_dir=a.cache_dir,
                                 tokenizer_dir=a.tokenizer, encoding=a.encoding, min_han_share=a.min_chinese_share)
        if res and "eval_loss_after" in res:
            print(f"{a.cmd}: held-out loss {res.get('eval_loss_before', float('nan')):.4f} -> {res['eval_loss_after']:.4f} "
                  f"after {res['global_step']} steps -> {a.out}")
    elif a.cmd == "cache":
        from pretrain.data import build_cache
        from zhllama.executors import executor_config_from_args

        pre = _recipe_only(a).pretrain
        info = build_cache(a.corpus, a.tokenizer, pre.block_size, a.cache_dir, eval_ratio=pre.eval_ratio,
                           max_eval_blocks=pre.max_eval_blocks, encoding=a.encoding, num_proc=pre.num_proc,
                           executor=executor_config_from_args(a))
        if info.get("submitted"):
            print(info["message"], file=sys.stderr)
        print(json.dumps({k: info.get(k) for k in ("cache_dir", "reused_cache", "units", "built_units", "num_proc",
                                                     "executor", "build_seconds", "submitted")}))
    elif a.cmd == "plan":
        from pretrain.plan import format_plan, plan

        p = plan(_recipe_only(a), a.vocab_size, a.num_gpus)
        print(json.dumps(p, indent=2) if a.json else format_plan(p))
    elif a.cmd == "convert-llama2c":
        from pretrain.llama2c import convert

        out = convert(a.checkpoint, a.tokenizer, a.out)
        print(f"converted {a.checkpoint} -> {out}")
    elif a.cmd == "init":
        from pretrain.phases import init_model

        import torch

        device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        out = init_model(_recipe_only(a), a.tokenizer, a.out, seed=a.seed, device=device, dtype=a.dtype)
        print(f"initialised a {a.recipe} model on {a.tokenizer} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
