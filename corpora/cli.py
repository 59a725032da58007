"""`python -m corpora`: prepare raw Chinese text for pretraining, convert instruction data to Alpaca."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from zhllama.errors import cli_entry


def _prepare_parser(sub) -> None:
    from zhllama.cli import add_recipe_args
    from zhllama.recipe import CorporaConfig

    p = sub.add_parser(
        "prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="clean, filter, deduplicate and shard raw text into OUT/{train,heldout}/shard-*.jsonl.gz",
        description=(
            "Read .txt (one document per line), .jsonl/.json (field --field), .parquet (column --field), plain or\n"
            ".gz; detect GB18030/GBK/Big5 and convert; remove control characters and undecodable bytes; filter by\n"
            "length and share of Han characters; drop exact (and with --dedup near, MinHash-LSH near) duplicates;\n"
            "split a held-out set by content hash; write gzip JSONL shards with field \"text\" and OUT/stats.json\n"
            "(documents and characters in/kept/dropped by reason, per file and in total, encoding per file).\n"
            "A datatrove pipeline: local processes by default (--num-proc), or --executor slurm / ray for a cluster.\n"
            "Rerunning the same command resumes: finished tasks are skipped, and the output is byte-identical to\n"
            "an uninterrupted run and the same for any number of tasks. Memory does not grow with the corpus\n"
            "(dedup keys go to disk and are compared one key range at a time). Progress: one line per stage and\n"
            "task on stderr; the engine's logs are in OUT/.work/logs (kept after a failure)."),
        epilog=("load with: datasets.load_dataset('json', data_files={'train': 'OUT/train/*.jsonl.gz', "
                "'heldout': 'OUT/heldout/*.jsonl.gz'}, streaming=True)"))
    p.add_argument("inputs", nargs="*", metavar="PATH", help="files or folders (searched recursively); or --input")
    p.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_recipe_args(p, [("corpora", CorporaConfig)], recipe_help=(
        "recipe name under recipes/ or a .yaml path; its corpora: section sets these options (default: the "
        "built-in defaults of zhllama.recipe.CorporaConfig)"))
    p.add_argument("--no-progress", action="store_true", help="no per-stage and per-task progress lines")
    from zhllama.executors import add_executor_args

    add_executor_args(p)


def _instructions_parser(sub) -> None:
    p = sub.add_parser(
        "instructions", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="convert instruction data (Alpaca, BELLE, pCLUE, ShareGPT) into validated Alpaca records",
        description=(
            "Convert instruction data into Alpaca records {instruction, input, output}: a JSON array, or JSONL if\n"
            "--out ends in .jsonl. Formats (per record with --format auto):\n"
            "  alpaca    {instruction, input?, output}\n"
            "  belle     {question, std_answer} (BELLE eval), {instruction, instances: [{input, output}]} (seed tasks)\n"
            "  pclue     {input, target}\n"
            "  sharegpt  {conversations: [{from: human|gpt|system, value}]} or {messages: [{role, content}]};\n"
            "            one record per conversation, earlier turns folded into the instruction\n"
            "Invalid records are dropped and reported (file, index, reason) on stderr and in OUT.report.json."))
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".json (array) or .jsonl files")
    p.add_argument("--out", required=True, metavar="FILE", help="output .json (array) or .jsonl")
    p.add_argument("--format", choices=("auto", "alpaca", "belle", "pclue", "sharegpt"), default="auto",
                   help="input format; auto decides per record from its fields (default %(default)s)")
    p.add_argument("--strict", action="store_true", help="fail (exit 2) if any record is dropped")


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corpora", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _prepare_parser(sub)
    _instructions_parser(sub)
    a = ap.parse_args(argv)
    from zhllama.overlap import refuse_overlap

    refuse_overlap({"--out": a.out}, {"--input": (getattr(a, "inputs", None) or []) + (a.input or [])})
    if a.cmd == "prepare":
        from corpora.prepare import PrepareConfig, prepare
        from zhllama.cli import resolve_recipe
        from zhllama.recipe import Recipe

        cfg = PrepareConfig(**dataclasses.asdict(resolve_recipe(a, default=Recipe()).corpora))
        inputs = a.inputs + a.input
        if not inputs:
            ap.error("prepare: give the input files or folders (PATH... or --input PATH...)")
        from zhllama.executors import executor_config_from_args

        ex = executor_config_from_args(a)
        ex.workers = ex.workers or cfg.num_proc  # --num-proc (or the recipe's corpora.num_proc): local workers
        prepare(inputs, a.out, cfg, progress=not a.no_progress, log=lambda m: print(m, file=sys.stderr), executor=ex)
        return 0
    from corpora.instruct import convert_files

    convert_files(a.input, a.out, fmt=a.format, strict=a.strict, log=lambda m: print(m, file=sys.stderr))
    return 0
