"""Command line for the SFT stage: train, preview, merge, generate, chat, plan."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from zhllama.cli import add_recipe_args
from zhllama.errors import UserError, cli_entry, emit
from zhllama.overlap import refuse_overlap
from zhllama.recipe import SFTConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    from sft.generate import PRESETS
    from zhllama.chat import REGISTRY

    templates = ", ".join(REGISTRY)
    p = argparse.ArgumentParser(prog="python -m sft", description="Instruction tuning: LoRA SFT, merge, chat")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="LoRA SFT on Alpaca records or conversations (JSON/JSONL); writes a PEFT adapter folder")
    t.add_argument("--model", required=True, help="base model folder (the pretrain stage's model)")
    t.add_argument("--adapter", help="pretrain phase-2 adapter to merge into --model first")
    t.add_argument("--data", nargs="+", required=True,
                   help="Alpaca or conversation ({messages}|{conversations}: loss on every assistant turn) JSON arrays or JSONL files, mixed in order")
    t.add_argument("--eval-data", nargs="+", help="held-out records (default: a content-hash split of --data)")
    t.add_argument("--out", required=True, help="adapter/run folder")
    t.add_argument("--drop-invalid", action="store_true", help="skip (and report) invalid records instead of failing")
    t.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    t.add_argument("--restart-if-changed", action="store_true",
                   help="resume if the checkpoints come from the same data and settings, else start over (what make uses)")
    add_recipe_args(t, [("sft", SFTConfig)])
    for a in t._actions:
        if a.dest == "recipe:sft.template":
            a.help += f" (one of {templates})"
    v = sub.add_parser("preview", help="show rendered examples, tokens and the label mask")
    v.add_argument("--data", required=True, nargs="+")
    v.add_argument("--tokenizer", required=True, help="tokenizer folder (the adapter or model folder works)")
    v.add_argument("--template")
    v.add_argument("--n", type=int, default=3)
    v.add_argument("--max-length", type=int, default=512)
    v.add_argument("--reference-tokenization", action="store_true")
    v.add_argument("--json", action="store_true", help='print [{"prompt","target","input_ids","labels"}]')

    m = sub.add_parser("merge", help="merge adapters into the base, shard by shard, and verify by logits",
                       description="Merge LoRA adapters into their base model and verify the result by logits. "
                       "Every zhllama adapter records the weights it was trained on (lineage.json), so "
                       "`--adapter RUN/sft/adapter` alone derives the whole chain (base -> phase 2 -> SFT). "
                       "Explicit --adapter lists and --base are checked against those records: wrong order, "
                       "gaps, duplicates and a base with other weights are refused, naming the expected chain.")
    m.add_argument("--base", help="base model folder (default: the one recorded in the adapters' lineage)")
    m.add_argument("--adapter", action="append", required=True,
                   help="the last adapter of the chain (its parents are derived), or the whole chain in order (repeat)")
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    m.add_argument("--template", help="record this template instead of the adapter's")
    m.add_argument("--atol", type=float, help="max abs logit difference allowed (default depends on --dtype)")
    m.add_argument("--no-verify", action="store_true", help="skip the logits check (it loads the model twice, one at a time)")

    g = sub.add_parser("generate", help="answer one instruction with the model's template")
    g.add_argument("--model", required=True)
    g.add_argument("--base", help="base model when --model is an adapter folder (default: from its lineage record; "
                                  "checked against it)")
    g.add_argument("--prompt", action="append", default=[], help="instruction (repeatable)")
    g.add_argument("--prompts-file", help="more instructions, one per line")
    g.add_argument("--input", default="", help="optional input joined as the template does")
    g.add_argument("--preset", default="paper", choices=list(PRESETS))
    g.add_argument("--max-new-tokens", type=int, default=400)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--raw", action="store_true", help="use --prompt as the full prompt text, no template")
    g.add_argument("--json", action="store_true")

    from sft.generate import CHAT_HELP

    c = sub.add_parser("chat", help="interactive multi-turn chat, streaming tokens",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Talk to a merged model (or an adapter on its base) with the template it was "
                                   "trained with; warns when the folder has no SFT template record (a model that "
                                   "was never instruction-tuned).\n\n" + CHAT_HELP)
    c.add_argument("--model", required=True, help="merged model folder, or an SFT adapter folder")
    c.add_argument("--base", help="base model for an adapter folder (default: from its lineage record)")
    c.add_argument("--preset", default="paper", choices=list(PRESETS))
    c.add_argument("--max-new-tokens", type=int, default=512, help="longest answer (default: %(default)s)")
    c.add_argument("--context", type=int,
                   help="tokens of conversation + answer: an answer gets what the conversation leaves (at most "
                        "--max-new-tokens), the oldest turns are dropped only when too little is left, a single "
                        "message that cannot fit is refused (default: the model's max_position_embeddings)")

    pl = sub.add_parser("plan", help="trainable parameters and batch arithmetic of a recipe's SFT")
    pl.add_argument("--vocab-size", type=int, help="default: base + added + [PAD] from the recipe")
    pl.add_argument("--json", action="store_true")
    add_recipe_args(pl, [], recipe_help="recipe name under recipes/ or a .yaml path (required)")
    return p


@cli_entry
def main(argv=None):
    args = _parser().parse_args(argv)
    # before anything is locked or created: a lock file is already a write into the input
    refuse_overlap({"--out": getattr(args, "out", None)},
                   {"--model": getattr(args, "model", None), "--base": getattr(args, "base", None),
                    "--adapter": getattr(args, "adapter", None), "--data": getattr(args, "data", None),
                    "--eval-data": getattr(args, "eval_data", None)})
    if args.cmd == "train":
        from sft.config import template_problems
        from sft.train import train
        from zhllama.cli import resolve_recipe

        from zhllama.runfolder import lock

        with lock(args.out):  # first: a second run into a busy folder fails at once
            recipe = resolve_recipe(args, args.model, lora_sections=("sft",), extra=lambda r: template_problems(r.sft))
            train(args.model, args.data, args.out, adapter=args.adapter, recipe=recipe, eval_data=args.eval_data,
                  drop_invalid=args.drop_invalid,
                  resume=False if args.no_resume else ("auto" if args.restart_if_changed else True))
    elif args.cmd == "preview":
        from sft.preview import preview

        preview(args.data, args.tokenizer, args.template, args.n, args.json, args.max_length, args.reference_tokenization)
    elif args.cmd == "merge":
        from sft.merge import merge

        merge(args.base, args.adapter, args.out, dtype=args.dtype, verify=not args.no_verify, atol=args.atol,
              template=args.template)
    elif args.cmd == "generate":
        from sft.generate import answer, generate, load

        prompts = list(args.prompt)
        if args.prompts_file:
            pf = Path(args.prompts_file)
            if not pf.is_file():
                raise UserError(f"{pf}: no such prompts file")
            prompts += [ln.strip() for ln in pf.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise UserError("give --prompt TEXT (repeatable) or --prompts-file FILE")
        from zhllama.progress import progress

        model, tok, tname = load(args.model, args.base)
        rows = []
        # on a terminal without --json the answers printed one by one are the progress
        bar = progress(len(prompts), f"answers {Path(args.model).name}", unit="answer",
                       enabled=args.json or not sys.stdout.isatty())
        for q in prompts:
            got: dict = {}
            if args.raw:
                a = generate(model, tok, q, preset=args.preset, max_new_tokens=args.max_new_tokens, seed=args.seed,
                             details=got)
            else:
                a = answer(model, tok, tname, q, args.input, preset=args.preset, max_new_tokens=args.max_new_tokens,
                           seed=args.seed, details=got)
            # raw: the answer with special tokens kept, so an answer that looks empty can be told apart (a model
            # before SFT ends the template with spaces and <s>, which the answer drops)
            rows.append({"instruction": q, "answer": a, "raw": got["raw"], "tokens": len(got["token_ids"])})
            bar.update()
            if not args.json:
                emit(f"### {q}\n{a}\n")
        bar.close()
        if args.json:
            emit(json.dumps(rows, ensure_ascii=False, indent=1))
    elif args.cmd == "chat":
        from sft.generate import chat, load, terminal_input
        from zhllama.chat import TEMPLATE_FILE
        from zhllama.errors import UserError

        import signal

        # A process started in the background of a script (CI under nohup, `cmd &`) inherits SIGINT as ignored, and
        # Python then installs no KeyboardInterrupt handler: the chat is interactive, so Ctrl-C always ends it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Ctrl-C at the prompt must reach the main thread, which waits in readline: a SIGINT delivered to another
        # thread does not wake it. Threads inherit the creating thread's signal mask, so every thread made while
        # loading and in a first forward pass (weight loaders, the intra-op pool) is made with SIGINT blocked.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            model, tok, tname = load(args.model, args.base)
            import torch

            with torch.no_grad():
                model(input_ids=torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else 0] * 2]))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        if not (Path(args.model) / TEMPLATE_FILE).is_file():
            print(f"warning: {args.model} has no {TEMPLATE_FILE}: it was not instruction-tuned (or merged without "
                  f"its SFT adapter); answers in the {tname} template will not follow instructions", file=sys.stderr)
        limit = getattr(model.config, "max_position_embeddings", None)
        context = args.context or limit or 2048
        if limit and context > limit:
            raise UserError(f"--context {context} is longer than the model's max_position_embeddings {limit}")
        if args.max_new_tokens < 1 or context < 2:
            raise UserError("--max-new-tokens and --context must be positive")
        chat(model, tok, tname, preset=args.preset, max_new_tokens=args.max_new_tokens, context=context,
             read=terminal_input if sys.stdin.isatty() else input)
    elif args.cmd == "plan":
        from sft.plan import format_plan, plan

        from sft.config import template_problems
        from zhllama.cli import resolve_recipe

        if not args.recipe:
            raise UserError("--recipe NAME|PATH is required")
        p = plan(resolve_recipe(args, extra=lambda r: template_problems(r.sft)), args.vocab_size)
        print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
