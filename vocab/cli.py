"""python -m vocab {train,merge,build,report}: a thin layer over vocab.train/merge/build/report."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vocab.report import REPORT_MAX_CHARS
from vocab.spans import MAX_LINE_CHARS
from vocab.train import TrainConfig
from zhllama.cli import add_recipe_args
from zhllama.errors import UserError, cli_entry
from zhllama.executors import add_executor_args, executor_config_from_args
from zhllama.overlap import refuse_overlap
from zhllama.recipe import Recipe, VocabConfig

_EPILOG = """examples:
  python -m vocab build --base llama/tokenizer.model --corpus data/zh --out runs/x/vocab --num-proc 0
  python -m vocab merge --base llama/tokenizer.model --add chinese_sp.model --out tok --reference --pad
  python -m vocab report --tokenizer runs/x/vocab --base llama/tokenizer.model --text heldout/*.txt \\
      --compare reference=chinese_llama_tokenizer/
"""


def _add_train_args(p: argparse.ArgumentParser, default_type: str) -> None:
    """--corpus, --allow-fewer, and the vocab: section of a recipe (--recipe/--config/--set and one flag per field)."""
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders of .txt/.jsonl (field 'text')")
    p.add_argument("--allow-fewer", action="store_true",
                   help="extend: accept a vocabulary with far fewer pieces than --num-added (a corpus with little "
                        "Chinese is an error otherwise)")
    add_recipe_args(p, [("vocab", VocabConfig)],
                    recipe_help="recipe whose vocab: section to use (name under recipes/ or a .yaml path; default: "
                                f"the built-in defaults, which are the paper's, with --model-type {default_type})")
    # extend's span counting runs on these (one task per work unit by default); --num-proc is the local executor's
    # --workers unless --workers is given
    add_executor_args(p)


def _train_cfg(a, default_type: str = "extend") -> tuple[TrainConfig, VocabConfig]:
    """The recipe's vocab: section (the built-in one with model_type default_type unless --recipe) as a TrainConfig."""
    from zhllama.cli import resolve_recipe

    default = Recipe()
    default.vocab.model_type = default_type
    v = resolve_recipe(a, default=default).vocab
    cfg = TrainConfig(model_type=v.model_type, vocab_size=v.vocab_size, num_added=v.num_added,
                      character_coverage=v.character_coverage, max_chars=v.max_chars, word_aware=v.word_aware,
                      encoding=v.encoding, seed=v.seed, max_piece_chars=v.max_piece_chars,
                      max_piece_bytes=v.max_piece_bytes, max_spans=v.max_spans, num_proc=v.num_proc,
                      executor=executor_config_from_args(a))
    if 0 < cfg.max_piece_bytes < 4:
        raise UserError(f"--max-piece-bytes {cfg.max_piece_bytes} cannot hold one CJK character (3-4 bytes)")
    return cfg, v


def _parse_compare(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--compare takes NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        out[name] = path
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vocab", description=__doc__, epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="train the Chinese SentencePiece model (DIR/chinese_sp.model)")
    _add_train_args(p, "bpe")
    p.add_argument("--base", help="base tokenizer.model (required for --model-type extend)")
    p.add_argument("--out", required=True, help="output folder")

    p = sub.add_parser("merge", help="merge an added model into a LLaMA-layout base and write an HF tokenizer folder")
    p.add_argument("--base", required=True, help="base tokenizer.model (LLaMA layout: BPE, byte fallback)")
    p.add_argument("--add", required=True, help="the Chinese SentencePiece model to append")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--reference", action="store_true", help="byte-exact Chinese-LLaMA-Alpaca merge (every new piece scored 0)")
    p.add_argument("--pad", action="store_true", help="append the Alpaca [PAD] piece (49,954 in the reference)")
    p.add_argument("--check-text", nargs="*", metavar="PATH", help="also check HF/sentencepiece parity on these texts")
    add_recipe_args(p, [], recipe_help="recipe whose vocab.pad to use (name under recipes/ or a .yaml path; "
                                       "default: the built-in defaults); --pad or --set vocab.pad=true sets it")

    p = sub.add_parser("build", help="train + merge + report in one go (what `make vocab` runs)",
                       description="Train the Chinese pieces on --corpus, merge them into --base and write the tokenizer "
                                   "folder with its report. A line longer than MAX_LINE_CHARS "
                                   f"({MAX_LINE_CHARS:,} characters, vocab.spans) is cut at sentence ends into pieces of "
                                   "at most that size before sampling and counting (counted as split_lines in "
                                   "train_stats.json and warned about); the report measures at most 2,000 lines and "
                                   f"{REPORT_MAX_CHARS:,} characters per file.")
    p.add_argument("--base", required=True, help="base tokenizer.model (SentencePiece, LLaMA layout) or a byte-level "
                                                 "BPE tokenizer.json / its folder (Llama-3, Qwen-2.5)")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--report-text", nargs="*", metavar="PATH", help="texts for the report (default: the corpus)")
    p.add_argument("--compare", nargs="*", metavar="NAME=PATH", help="other tokenizers to put in the report")
    _add_train_args(p, "extend")

    p = sub.add_parser("report", help="compression and soundness report: table, JSON and bar chart")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or .model")
    p.add_argument("--base", required=True, help="base tokenizer.model or byte-level tokenizer.json")
    p.add_argument("--text", nargs="+", required=True, metavar="PATH", help="text files or folders")
    p.add_argument("--compare", nargs="*", metavar="NAME=PATH", help="more tokenizers side by side, e.g. reference=ref/tokenizer.model")
    p.add_argument("--json", help="write the report here (a .png chart is written beside it)")
    p.add_argument("--max-lines", type=int, default=None, help="use at most this many lines per file")
    return ap


@cli_entry
def main(argv=None) -> int:
    from zhllama.unit_pipeline import Submitted

    try:
        return _main(argv)
    except Submitted as e:  # --executor slurm: the counting runs later; the rerun reuses what it counted
        print(e, file=sys.stderr)
        return 0


def _main(argv=None) -> int:
    a = parser().parse_args(argv)
    compare = list(_parse_compare(getattr(a, "compare", None)).values())
    if a.cmd == "report":
        refuse_overlap({"--json": a.json}, {"--tokenizer": a.tokenizer, "--base": a.base, "--text": a.text,
                                            "--compare": compare})
    else:
        refuse_overlap({"--out": a.out}, {"--base": a.base, "--add": getattr(a, "add", None),
                                          "--corpus": getattr(a, "corpus", None),
                                          "--check-text": getattr(a, "check_text", None),
                                          "--report-text": getattr(a, "report_text", None), "--compare": compare})
    if a.cmd == "train":
        from vocab.train import train

        stats = train(a.corpus, a.out, _train_cfg(a, "bpe")[0], base_path=a.base, allow_fewer=a.allow_fewer)
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        print(f"wrote {Path(a.out) / 'chinese_sp.model'}")
    elif a.cmd == "merge":
        from corpora.reader import iter_corpus
        from vocab.build import merge_to_folder
        from zhllama.cli import resolve_recipe

        pad = a.pad or resolve_recipe(a, default=Recipe()).vocab.pad
        check = list(iter_corpus(a.check_text)) if a.check_text else None
        rep = merge_to_folder(a.base, a.add, a.out, reference=a.reference, pad=pad, check_lines=check)
        m = rep["merge"]
        print(f"{m['base_pieces']} base + {m['added_pieces']} added ({m['overlapping_pieces']} overlapping) = {m['total_pieces']} pieces")
        print(f"dead pieces: {rep['dead_pieces']['count']}")
        for name, p in rep["parity_hf_vs_sentencepiece"].items():
            print(f"HF vs sentencepiece on {name}: {p['disagreeing']} of {p['lines']} lines disagree")
        print(f"English lines changed: {rep['english_lines_changed']['changed']} of {rep['english_lines_changed']['lines']}")
        print(f"tokenizer.model sha256 {rep['tokenizer_model_sha256']}")
        print(f"wrote {a.out}")
    elif a.cmd == "build":
        from vocab.build import build
        from vocab.bytelevel import is_bytelevel

        cfg, v = _train_cfg(a, "extend")
        if is_bytelevel(a.base):  # a tokenizer.json base (Llama-3, Qwen-2.5): byte-level tokens and merges
            from vocab.bytelevel_build import build_bytelevel

            build_bytelevel(a.base, a.corpus, a.out, cfg, report_text=a.report_text,
                            compare=_parse_compare(a.compare), allow_fewer=a.allow_fewer)
            print(f"wrote {a.out}")
            return 0
        build(a.base, a.corpus, a.out, cfg, pad=v.pad, report_text=a.report_text, compare=_parse_compare(a.compare),
              allow_fewer=a.allow_fewer)
        print(f"wrote {a.out}")
    elif a.cmd == "report":
        from vocab.bytelevel import is_bytelevel
        from vocab.report import build_report, format_table, save_report

        if is_bytelevel(a.base):
            from vocab.bytelevel_report import build_report
        rep = build_report(a.tokenizer, a.base, a.text, compare=_parse_compare(a.compare), max_lines=a.max_lines)
        print(format_table(rep))
        if a.json:
            png = save_report(rep, a.json)
            print(f"wrote {a.json} and {png}")
    return 0
