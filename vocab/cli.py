"""python -m vocab {train,merge,build,report}: a thin layer over vocab.train/merge/build/report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vocab.train import MODEL_TYPES, TrainConfig
from zhllama.cli import add_recipe_args
from zhllama.errors import UserError, cli_entry
from zhllama.recipe import Recipe, VocabConfig

_EPILOG = """examples:
  python -m vocab build --base llama/tokenizer.model --corpus data/zh --out runs/x/vocab
  python -m vocab merge --base llama/tokenizer.model --add chinese_sp.model --out tok --reference --pad
  python -m vocab report --tokenizer runs/x/vocab --base llama/tokenizer.model --text heldout/*.txt \\
      --compare reference=chinese_llama_tokenizer/
"""


def _add_train_args(p: argparse.ArgumentParser, default_type: str) -> None:
    d = TrainConfig()
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders of .txt/.jsonl (field 'text')")
    p.add_argument("--model-type", default=default_type, choices=MODEL_TYPES,
                   help="extend: continued BPE over the base's own segmentation (no dead pieces, needs --base); "
                        "bpe/unigram: a standalone SentencePiece model like the reference (default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="bpe/unigram: Chinese model size (default: %(default)s)")
    p.add_argument("--num-added", type=int, default=d.num_added,
                   help="extend: pieces to append to the base; 32,000 + 17,953 = 49,953 like the reference (default: %(default)s)")
    p.add_argument("--character-coverage", type=float, default=d.character_coverage, help="default: %(default)s")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="sample larger corpora down to about this many characters")
    p.add_argument("--word-aware", action="store_true", help="use jieba word boundaries: no piece spans two words")
    p.add_argument("--max-piece-chars", type=int, default=d.max_piece_chars,
                   help="extend: longest appended piece in characters, a leading '▁' not counted; 0 = no cap "
                        "(default: %(default)s, chosen on held-out text, see README)")
    p.add_argument("--max-piece-bytes", type=int, default=d.max_piece_bytes,
                   help="extend: longest appended piece in UTF-8 bytes; 32 keeps every piece decodable by "
                        "llama-cpp-python, whose detokenizer drops longer ones; 0 = no cap (default: %(default)s)")
    p.add_argument("--encoding", default="auto", choices=("auto", "utf-8", "gb18030", "big5"),
                   help="corpus encoding; auto: UTF-8, else GB18030/Big5 detected per file like `corpora prepare` "
                        "(binary files are dropped and reported) (default: %(default)s)")
    p.add_argument("--allow-fewer", action="store_true",
                   help="extend: accept a vocabulary with far fewer pieces than --num-added (a corpus with little "
                        "Chinese is an error otherwise)")


def _train_cfg(a) -> TrainConfig:
    if a.vocab_size < 100:
        raise UserError(f"--vocab-size {a.vocab_size} is too small; the Chinese model needs thousands of pieces")
    if not 0 < a.character_coverage <= 1:
        raise UserError("--character-coverage must be in (0, 1]")
    return TrainConfig(
        model_type=a.model_type, vocab_size=a.vocab_size, num_added=a.num_added, character_coverage=a.character_coverage,
        max_chars=a.max_chars, word_aware=a.word_aware, encoding=a.encoding,
        max_piece_chars=a.max_piece_chars, max_piece_bytes=a.max_piece_bytes,
    )


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

    p = sub.add_parser("build", help="train + merge + report in one go (what `make vocab` runs)")
    p.add_argument("--corpus", nargs="+", required=True, metavar="PATH", help="text files or folders of .txt/.jsonl (field 'text')")
    p.add_argument("--base", required=True, help="base tokenizer.model")
    p.add_argument("--out", required=True, help="output tokenizer folder")
    p.add_argument("--report-text", nargs="*", metavar="PATH", help="texts for the report (default: the corpus)")
    p.add_argument("--compare", nargs="*", metavar="NAME=PATH", help="other tokenizers to put in the report")
    p.add_argument("--allow-fewer", action="store_true",
                   help="extend: accept a vocabulary with far fewer pieces than --num-added (a corpus with little "
                        "Chinese is an error otherwise)")
    add_recipe_args(p, [("vocab", VocabConfig)],
                    recipe_help="recipe whose vocab: section to use (name under recipes/ or a .yaml path; default: "
                                "the built-in defaults, which are the paper's)")

    p = sub.add_parser("report", help="compression and soundness report: table, JSON and bar chart")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or .model")
    p.add_argument("--base", required=True, help="base tokenizer.model")
    p.add_argument("--text", nargs="+", required=True, metavar="PATH", help="text files or folders")
    p.add_argument("--compare", nargs="*", metavar="NAME=PATH", help="more tokenizers side by side, e.g. reference=ref/tokenizer.model")
    p.add_argument("--json", help="write the report here (a .png chart is written beside it)")
    p.add_argument("--max-lines", type=int, default=None, help="use at most this many lines per file")
    return ap


@cli_entry
def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "train":
        from vocab.train import train

        stats = train(a.corpus, a.out, _train_cfg(a), base_path=a.base, allow_fewer=a.allow_fewer)
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        print(f"wrote {Path(a.out) / 'chinese_sp.model'}")
    elif a.cmd == "merge":
        from corpora.reader import iter_corpus
        from vocab.build import merge_to_folder

        check = list(iter_corpus(a.check_text)) if a.check_text else None
        rep = merge_to_folder(a.base, a.add, a.out, reference=a.reference, pad=a.pad, check_lines=check)
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
        from zhllama.cli import resolve_recipe

        v = resolve_recipe(a, default=Recipe()).vocab
        cfg = TrainConfig(model_type=v.model_type, vocab_size=v.vocab_size, num_added=v.num_added,
                          character_coverage=v.character_coverage, max_chars=v.max_chars, word_aware=v.word_aware,
                          encoding=v.encoding, seed=v.seed, max_piece_chars=v.max_piece_chars,
                          max_piece_bytes=v.max_piece_bytes)
        if 0 < cfg.max_piece_bytes < 4:
            raise UserError(f"--max-piece-bytes {cfg.max_piece_bytes} cannot hold one CJK character (3-4 bytes)")
        build(a.base, a.corpus, a.out, cfg, pad=v.pad, report_text=a.report_text, compare=_parse_compare(a.compare),
              allow_fewer=a.allow_fewer)
        print(f"wrote {a.out}")
    elif a.cmd == "report":
        from vocab.report import build_report, format_table, save_report

        rep = build_report(a.tokenizer, a.base, a.text, compare=_parse_compare(a.compare), max_lines=a.max_lines)
        print(format_table(rep))
        if a.json:
            png = save_report(rep, a.json)
            print(f"wrote {a.json} and {png}")
    return 0
