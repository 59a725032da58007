"""The span budget (vocab.max_spans): held-out compression when it binds.

    python bench/vocab_budget.py [--data ../shared/data] [--fractions 1 0.5 0.25] [--json bench/results/vocab_budget.json]

Same split as bench/vocab_caps.py (21 training files of the shared corpus, three whole sources held out). The
first build uses the default options (its budget, 2,000,000, is above the 21 files' distinct spans: nothing is
pruned); each further build sets --max-spans to a fraction of the distinct spans that build counted, so the
budget binds. Held-out text is encoded with sentencepiece, every line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import HELD_OUT, RESULTS, bench_env, print_table, vocab_split, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    ap.add_argument("--work", default=str(RESULTS / "vocab_budget"), help="build folders")
    ap.add_argument("--json", default=str(RESULTS / "vocab_budget.json"))
    a = ap.parse_args()
    import sentencepiece as spm

    data = Path(a.data)
    base, _, train_files, held, base_tokens = vocab_split(data)
    rows, distinct = [], None
    for frac in a.fractions:
        flags = [] if frac == 1.0 else ["--max-spans", str(int(frac * distinct))]
        out = Path(a.work) / f"budget-{frac}"
        log = out.with_suffix(".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(log, "w", encoding="utf-8") as f:
            r = subprocess.run([sys.executable, "-m", "vocab", "build", "--base", str(base), "--corpus",
                                *map(str, train_files), "--out", str(out), "--num-proc", "1", *flags],
                               cwd=ROOT, env=bench_env(), stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise SystemExit(f"budget {frac}: vocab build failed, see {log}")
        stats = json.loads((out / "train_stats.json").read_text(encoding="utf-8"))
        if distinct is None:
            distinct = stats["distinct_spans"]
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        tokens = {n: sum(map(len, sp.encode(ls))) for n, ls in held.items()}
        row = {"max_spans": flags[1] if flags else "default", "spans kept": stats["distinct_spans"],
               "share of distinct": stats["distinct_spans"] / distinct, "held-out tokens": sum(tokens.values()),
               "vs LLaMA": sum(tokens.values()) / sum(base_tokens.values()),
               **{f"{n} vs LLaMA": tokens[n] / base_tokens[n] for n in held},
               "build seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for r in rows:
        r["vs default"] = r["held-out tokens"] / rows[0]["held-out tokens"]
    print_table(rows, ["max_spans", "spans kept", "share of distinct", "held-out tokens", "vs LLaMA", "vs default",
                       *[f"{n} vs LLaMA" for n in held], "build seconds"])
    write_results(a.json, held_out=HELD_OUT, base_tokens=base_tokens, train_files=[f.name for f in train_files],
                  rows=rows)


if __name__ == "__main__":
    main()
