"""Appended-piece length caps: held-out compression of `vocab build` with caps of 4, 6, 8, 10 characters vs none.

    python bench/vocab_caps.py [--data ../shared/data] [--caps none 4 6 8 10] [--json bench/results/vocab_caps.json]

Each configuration is a full `python -m vocab build` (real LLaMA base tokenizer, default options otherwise) on 21
of the 24 files of the shared corpus; three whole sources of different genres are held out and never trained on
(academic abstracts, CLUECorpusSmall web text, idiom-story passages: the README's held-out set). "none" is the
previous default (16 characters, no byte limit); every cap also keeps pieces at most 32 UTF-8 bytes.
Held-out text is encoded with sentencepiece, every line; the table reports tokens relative to LLaMA per source
and overall, the longest piece, pieces over 32 bytes and the build's own audit (dead pieces, HF parity).
A finished build is reused when its folder is complete (`vocab build` skips up-to-date work itself); the
builds are independent, so several invocations with one --caps each may run side by side.

    python bench/vocab_caps.py --check-default [--json bench/results/vocab_default.json]

builds the default `vocab build` on all 24 files and checks what every build must hold: no appended piece
over 32 UTF-8 bytes, no dead appended piece (all 17,953 audited), HF tokenizer.json == sentencepiece ids on every
line of the corpus and 3,000 English Alpaca outputs, and those English lines' ids unchanged from LLaMA's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenizers.py would shadow the `tokenizers` package: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import (HELD_OUT, RESULTS, bench_env, print_table, text_lines, vocab_split,  # noqa: E402
                          write_results)

def _flags(cap: str) -> list[str]:
    if cap == "none":
        return ["--max-piece-chars", "16", "--max-piece-bytes", "0"]
    return ["--max-piece-chars", cap, "--max-piece-bytes", "32"]


def check_default(data: Path, out: Path, json_path: str) -> None:
    import sentencepiece as spm

    from vocab.audit import dead_pieces
    from vocab.parity import disagreements, hf_tokenizer
    from vocab.spmodel import load_model

    base = data / "tokenizers" / "llama_tokenizer.model"
    corpus = data / "zh_corpus" / "train"
    t0 = time.time()
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:  # default options: exactly what `make vocab` runs
        r = subprocess.run([sys.executable, "-m", "vocab", "build", "--base", str(base), "--corpus", str(corpus),
                            "--out", str(out)], cwd=ROOT, env=bench_env(), stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"default vocab build failed, see {log}")
    seconds = round(time.time() - t0, 1)
    m = load_model(out / "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    added = [p.piece for p in m.pieces[32000:]]
    zh = [l for f in sorted(corpus.glob("*.txt")) for l in text_lines(f)]
    recs = json.loads((data / "instructions" / "alpaca_en_52k_original.part01.json").read_text(encoding="utf-8"))
    en = [x["output"] for x in recs[:3000] if x["output"].strip()]
    tok = hf_tokenizer(out)
    bad_zh, ex_zh = disagreements(m, tok, zh)
    bad_en, ex_en = disagreements(m, tok, en)
    base_sp = spm.SentencePieceProcessor(model_file=str(base))
    en_changed = sum(a != b for a, b in zip(base_sp.encode(en), sp.encode(en)))
    res = {
        "pieces": len(m.pieces), "appended": len(added),
        "longest_piece_bytes": max(len(p.encode()) for p in added),
        "longest_piece_chars": max(len(p.lstrip("▁")) for p in added),
        "pieces_over_32_bytes": sum(len(p.encode()) > 32 for p in added),
        "dead_pieces": len(dead_pieces(m, start=32000)),
        "hf_vs_sentencepiece_disagreeing": {"chinese_lines": [bad_zh, len(zh)], "english_lines": [bad_en, len(en)]},
        "english_lines_changed_vs_llama": [en_changed, len(en)],
        "examples": ex_zh[:2] + ex_en[:2], "build_seconds": seconds,
    }
    print(json.dumps(res, ensure_ascii=False, indent=1))
    write_results(json_path, default_build=str(out), **res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--caps", nargs="+", default=["none", "4", "6", "8", "10"])
    ap.add_argument("--work", default=str(RESULTS / "vocab_caps"), help="build folders")
    ap.add_argument("--json", default=None, help="default: bench/results/vocab_caps.json (vocab_default.json)")
    ap.add_argument("--no-build", action="store_true", help="measure finished builds in --work only (builds run "
                    "as separate invocations, e.g. one --caps each in parallel)")
    ap.add_argument("--check-default", action="store_true", help="build and check the default on all 24 files")
    a = ap.parse_args()
    import sentencepiece as spm

    data = Path(a.data)
    if a.check_default:
        check_default(data, RESULTS / "vocab_default", a.json or str(RESULTS / "vocab_default.json"))
        return
    a.json = a.json or str(RESULTS / "vocab_caps.json")
    base, train_dir, train_files, held, base_tokens = vocab_split(data)
    chars = {n: sum(map(len, ls)) for n, ls in held.items()}
    print(f"held out: {sum(map(len, held.values())):,} lines, {sum(chars.values()):,} characters; "
          f"training on {len(train_files)} files", flush=True)
    rows = []
    for cap in a.caps:
        out = Path(a.work) / f"cap-{cap}"
        t0 = time.time()
        cmd = [sys.executable, "-m", "vocab", "build", "--base", str(base), "--corpus", *map(str, train_files),
               "--out", str(out), "--report-text", *[str(train_dir / f) for f in HELD_OUT.values()], *_flags(cap)]
        log = Path(a.work) / f"cap-{cap}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        if not a.no_build:
            with open(log, "w", encoding="utf-8") as f:
                r = subprocess.run(cmd, cwd=ROOT, env=bench_env(), stdout=f, stderr=subprocess.STDOUT)
            if r.returncode:
                raise SystemExit(f"cap {cap}: vocab build failed, see {log}")
        elif not (out / "tokenizer.model").is_file():
            raise SystemExit(f"--no-build: {out} has no finished build")
        seconds = round(time.time() - t0, 1)
        if a.no_build:  # training time as the build recorded it
            seconds = json.loads((out / "train_stats.json").read_text(encoding="utf-8")).get("seconds")
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        added = [sp.id_to_piece(i) for i in range(32000, sp.get_piece_size())]
        tokens = {n: sum(map(len, sp.encode(ls))) for n, ls in held.items()}
        merge = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
        parity = merge["parity_hf_vs_sentencepiece"]
        row = {
            "cap": cap if cap == "none" else f"{cap} chars",
            "pieces": sp.get_piece_size(),
            "longest piece (chars)": max(len(p.lstrip("▁")) for p in added),
            "pieces > 32 bytes": sum(len(p.encode()) > 32 for p in added),
            "tokens": sum(tokens.values()),
            "vs LLaMA": sum(tokens.values()) / sum(base_tokens.values()),
            **{f"{n} vs LLaMA": tokens[n] / base_tokens[n] for n in held},
            "tokens / 1k chars": 1000 * sum(tokens.values()) / sum(chars.values()),
            "dead pieces": merge["dead_pieces"]["count"],
            "HF/sp disagreeing lines": sum(p["disagreeing"] for p in parity.values()),
            "English lines changed": merge["english_lines_changed"]["changed"],
            "training seconds" if a.no_build else "build seconds": seconds,
        }
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    none = next((r for r in rows if r["cap"] == "none"), None)
    for r in rows:
        r["vs none"] = r["tokens"] / none["tokens"] if none else float("nan")
    cols = ["cap", "longest piece (chars)", "pieces > 32 bytes", "tokens", "tokens / 1k chars", "vs LLaMA", "vs none",
            *[f"{n} vs LLaMA" for n in held], "dead pieces", "HF/sp disagreeing lines",
            "training seconds" if a.no_build else "build seconds"]
    print_table(rows, cols)
    write_results(a.json, held_out=HELD_OUT, base_tokens=base_tokens, characters=chars,
                  train_files=[f.name for f in train_files], rows=rows)


if __name__ == "__main__":
    main()
