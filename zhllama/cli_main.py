"""`zhllama`: the one command. `zhllama run` runs the pipeline, `zhllama status RUN` says what is done, and
`zhllama vocab|pretrain|sft|eval|deploy|corpora ...` are the stage commands (the same as `python -m vocab ...`)."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from zhllama.errors import cli_entry

# zhllama SUBCOMMAND -> the stage package it runs as `python -m PACKAGE`
FORWARD = {
    "corpora": ("corpora", "prepare raw text, convert instruction data"),
    "vocab": ("vocab", "build the extended tokenizer (train, merge, report)"),
    "pretrain": ("pretrain", "init, resize, phase 1 / phase 2 continued pretraining, plan"),
    "sft": ("sft", "LoRA instruction tuning, merge, generate, chat"),
    "eval": ("evaluation", "bits per character, multiple choice (C-Eval), judged answers"),
    "deploy": ("deploy", "GGUF export, OpenAI-compatible server, browser chat"),
}

# option -> help; each is the Makefile variable of the upper-case name
_OPTION_HELP = {
    "run": "run folder every stage writes under (RUN)",
    "recipe": "recipes/NAME.yaml (tiny, llama-7b, llama-13b, ...) or a .yaml path (RECIPE)",
    "base_tokenizer": "the base tokenizer.model (SentencePiece) or tokenizer.json (byte-level) (BASE_TOKENIZER)",
    "corpus": "Chinese text, files or folders, space-separated; prepared into RUN/corpus first (CORPUS)",
    "base_model": "HF base model folder; empty: the recipe's random model, built by `pretrain init` (BASE_MODEL)",
    "sft_data": "instructions: Alpaca, BELLE, pCLUE or ShareGPT (SFT_DATA)",
    "sft_prompts": "held-out instructions answered before and after SFT (SFT_PROMPTS)",
    "sft_preset": "decoding preset of the answers printed after SFT (SFT_PRESET)",
    "sft_dtype": "dtype of the merged model; empty: float32 for the tiny recipes, else float16 (SFT_DTYPE)",
    "eval_text": "held-out text of the eval stage; empty: RUN/corpus/heldout (EVAL_TEXT)",
    "prepare_args": "extra flags of `corpora prepare` (PREPARE_ARGS)",
    "vocab_args": "extra flags of `vocab build` (VOCAB_ARGS)",
    "pretrain_args": "extra flags of `pretrain phase1` and `phase2`, e.g. "
                     "--pretrain-args=\"--set pretrain.phase1.max_steps=10\" (PRETRAIN_ARGS)",
    "sft_args": "extra flags of `sft train` (SFT_ARGS)",
    "eval_args": "extra flags of `eval bpc` (EVAL_ARGS)",
}


def _add_options(p: argparse.ArgumentParser, defaults: bool, skip=()) -> None:
    from zhllama.stages import Options

    base = Options()
    for f in dataclasses.fields(Options):
        if f.name in skip:
            continue
        if f.name == "sets":
            p.add_argument("--set", dest="sets", action="append", default=None, metavar="SECTION.KEY=VALUE",
                           help="override a recipe field for every stage, e.g. --set pretrain.phase1.learning_rate=5e-3 "
                                "(repeatable)" + ("" if defaults else "; added to the recorded ones: what would a rerun with this "
                                                                 "change redo?"))
            continue
        flag = "--" + f.name.replace("_", "-")
        d = getattr(base, f.name)
        shown = f" (default: {d})" if defaults and d else ""
        p.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=_OPTION_HELP[f.name] + shown)


def _options(args, recorded: dict | None = None):
    from zhllama.stages import Options

    given = {k: v for k, v in vars(args).items() if v is not None and k in Options.__dataclass_fields__}
    return Options.from_dict({**(recorded or {}), **given})


def _parser() -> argparse.ArgumentParser:
    from zhllama.stages import STAGE_NAMES

    ap = argparse.ArgumentParser(
        prog="zhllama", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make a LLaMA-family model fluent in Chinese: extend the tokenizer, continue pretraining, "
                    "instruction-tune, evaluate, deploy.",
        epilog="examples:\n"
               "  zhllama run                          the whole pipeline on the sample inputs (CPU, minutes)\n"
               "  zhllama run --run runs/x --recipe llama-7b --base-model /models/llama-7b \\\n"
               "      --base-tokenizer /models/llama-7b/tokenizer.model --corpus /data/zh\n"
               "  zhllama status runs/default          what is done, stale or missing, and why\n"
               "  zhllama vocab build --help           a stage command (the same as python -m vocab build --help)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="run the pipeline: " + " -> ".join(STAGE_NAMES) + "; skips what is up to date",
                       description="Run the stages (default: all) and every stage before them that is not up to "
                                   "date. Each step runs as its stage command, which resumes or redoes its own work; "
                                   "a rerun with nothing to do says so in one line and changes nothing. Per-stage "
                                   "wall seconds go to RUN/report/timings.json when a stage ran.")
    r.add_argument("stages", nargs="*", metavar="STAGE", help=f"stop after these stages ({', '.join(STAGE_NAMES)})")
    _add_options(r, defaults=True)
    s = sub.add_parser("status", help="which stages of a run folder are done, stale or missing, and why",
                       description="Read-only: compares what each stage wrote (result.json, its published files) "
                                   "and what `zhllama run` recorded in RUN/stages.json with the options and the "
                                   "recipe file as they are now. Every option defaults to what the last `zhllama run` "
                                   "into RUN was given; one given here asks what a rerun with it would redo.")
    s.add_argument("run_dir", metavar="RUN", help="the run folder")
    _add_options(s, defaults=False, skip=("run",))
    for name, (_, what) in FORWARD.items():
        sub.add_parser(name, help=f"{what} (python -m {FORWARD[name][0]}; zhllama {name} --help)", add_help=False)
    return ap


def _forward(name: str, argv: list):
    """Become `python -m STAGE ARGS...` (same process id, terminal, signals and exit status): the core imports no
    stage (tests/test_import_rules.py), and `zhllama vocab ...` is exactly `python -m vocab ...`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", FORWARD[name][0], *argv])


@cli_entry
def _main(argv) -> int:
    from zhllama import pipeline
    from zhllama.runstate import load_state

    a = _parser().parse_args(argv)
    if a.cmd == "run":
        return pipeline.run(_options(a), only=a.stages)
    recorded = load_state(a.run_dir).get("options") or {}
    extra, a.sets = a.sets or [], None
    o = _options(a, recorded)
    o.sets = list(o.sets) + extra
    o.run = a.run_dir
    rows = pipeline.status(o)
    sets = f", {len(o.sets)} --set override{'s' if len(o.sets) > 1 else ''}" if o.sets else ""
    print(f"{o.run} (recipe {o.recipe}{sets})"
          + ("" if recorded else "; not made by zhllama run, default options assumed"))
    width = max(len(r[0]) for r in rows)
    for name, st, why in rows:
        print(f"  {name:<{width}}  {st}{': ' + why if why else ''}")
    redo = [name for name, st, _ in rows if st != "done"]
    print(f"to redo: {', '.join(redo)} (zhllama run)" if redo else "all stages done")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # a stage command takes the rest of the line as it is (its own flags, its own --help)
    if argv and argv[0] in FORWARD:
        return _forward(argv[0], argv[1:])
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
