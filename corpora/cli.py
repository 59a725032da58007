"""`python -m corpora`: prepare raw Chinese text for pretraining, convert instruction data to Alpaca."""
from __future__ import annotations

import argparse
import sys

from zhllama.errors import cli_entry


def _prepare_parser(sub) -> None:
    from corpora.prepare import PrepareConfig

    d = PrepareConfig()
    p = sub.add_parser(
        "prepare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="clean, filter, deduplicate and shard raw text into OUT/{train,heldout}/shard-*.jsonl.gz",
        description=(
            "Read .txt (one document per line), .jsonl/.json (field --field), .parquet (column --field), plain or\n"
            ".gz; detect GB18030/GBK/Big5 and convert; remove control characters and undecodable bytes; filter by\n"
            "length and share of Han characters; drop exact (and with --dedup near, MinHash-LSH near) duplicates;\n"
            "split a held-out set by content hash; write gzip JSONL shards with field \"text\" and OUT/stats.json\n"
            "(documents and characters in/kept/dropped by reason, per file and in total, encoding per file).\n"
            "Rerunning the same command resumes: finished inputs and shards are not redone, and the output is\n"
            "byte-identical to an uninterrupted run. Memory does not grow with the corpus (dedup keys go to disk\n"
            "and are compared one key range at a time); --num-proc processes share the work, same output for any N."),
        epilog=("load with: datasets.load_dataset('json', data_files={'train': 'OUT/train/*.jsonl.gz', "
                "'heldout': 'OUT/heldout/*.jsonl.gz'}, streaming=True)"))
    p.add_argument("inputs", nargs="*", metavar="PATH", help="files or folders (searched recursively); or --input")
    p.add_argument("--input", nargs="+", default=[], metavar="PATH", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction, metavar="F",
                   help="share of documents held out, chosen by content hash (default %(default)s)")
    p.add_argument("--min-chars", type=int, default=d.min_chars, metavar="N",
                   help="drop documents shorter than N characters after cleaning (default %(default)s)")
    p.add_argument("--min-cjk-ratio", type=float, default=d.min_cjk_ratio, metavar="R",
                   help="drop documents whose non-space characters are less than this share Han (default %(default)s)")
    p.add_argument("--dedup", choices=("exact", "near"), default=d.dedup,
                   help="exact: identical documents; near: also MinHash LSH near duplicates (datasketch) (default %(default)s)")
    p.add_argument("--near-threshold", type=float, default=d.near_threshold, metavar="J",
                   help="Jaccard similarity of character 5-grams above which --dedup near drops (default %(default)s)")
    p.add_argument("--encoding", choices=("auto", "utf-8", "gb18030", "big5"), default=d.encoding,
                   help="auto: UTF-8 if the file decodes as UTF-8, else the best of GB18030 (covers GBK) and Big5; "
                        "stats.json reports what was used per file (default %(default)s)")
    p.add_argument("--field", default=d.field, help="record field / parquet column holding the text (default %(default)s)")
    p.add_argument("--fullwidth-ascii", action="store_true",
                   help="turn full-width letters, digits and symbols (ＡＢＣ１２３) into ASCII; Chinese punctuation "
                        "（，。：；！？）stays")
    p.add_argument("--max-chars", type=int, default=d.max_chars, metavar="N",
                   help="split longer documents at sentence ends into pieces of at most N characters (default %(default)s)")
    p.add_argument("--shard-docs", type=int, default=d.shard_docs, metavar="N", help="documents per shard (default %(default)s)")
    p.add_argument("--num-proc", type=int, default=d.num_proc, metavar="N",
                   help="worker processes for cleaning, dedup and writing shards; 0: all CPU cores (default %(default)s). "
                        "The output is the same for every N")
    p.add_argument("--workers", dest="num_proc", type=int, help=argparse.SUPPRESS)  # the old name
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


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
    if a.cmd == "prepare":
        from corpora.prepare import PrepareConfig, prepare

        cfg = PrepareConfig(heldout_fraction=a.heldout_fraction, min_chars=a.min_chars, min_cjk_ratio=a.min_cjk_ratio,
                            dedup=a.dedup, near_threshold=a.near_threshold, encoding=a.encoding, field=a.field,
                            fullwidth_ascii=a.fullwidth_ascii, max_chars=a.max_chars, shard_docs=a.shard_docs,
                            num_proc=a.num_proc)
        inputs = a.inputs + a.input
        if not inputs:
            ap.error("prepare: give the input files or folders (PATH... or --input PATH...)")
        prepare(inputs, a.out, cfg, progress=not a.no_progress, log=lambda m: print(m, file=sys.stderr))
        return 0
    from corpora.instruct import convert_files

    convert_files(a.input, a.out, fmt=a.format, strict=a.strict, log=lambda m: print(m, file=sys.stderr))
    return 0
