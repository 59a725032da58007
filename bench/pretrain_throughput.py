"""Pretraining throughput on CPU: phase 1 (all embedding rows / new rows only) and phase 2, tokens/s and peak RSS.

    python bench/pretrain_throughput.py [--tokenizer RUN/vocab] [--base-tokenizer BASE.model] [--corpus DIR] [--steps N]

Models: the tiny recipe's shape and a ~58M-parameter LLaMA shape (hidden 512, 8 layers at a 32k vocabulary),
both built from a config on the base tokenizer and resized to the extended one with subword-mean rows.
Every measurement runs the real CLI (`python -m pretrain phase1/phase2`) in a fresh process; tokens/s is
what the run's result.json reports (tokens seen / training seconds), peak RSS is the process's own.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenizers.py is named like the `tokenizers` package: keep this folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, SHAPES, print_table, run_measured, write_results  # noqa: E402


def _pretrain(log: Path, *args) -> int:
    return run_measured([sys.executable, "-m", "pretrain", *args], log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(ROOT / "runs" / "default" / "vocab"))
    ap.add_argument("--base-tokenizer", default=str(ROOT / ".cache" / "zhllama" / "base" / "tokenizer.model"))
    ap.add_argument("--corpus", default=str(ROOT / ".cache" / "zhllama" / "zh"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shapes", nargs="+", default=["tiny", "58M"], choices=list(SHAPES))
    ap.add_argument("--json", default=str(RESULTS / "pretrain_throughput.json"))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for shape in a.shapes:
            sets = [x for s in SHAPES[shape] for x in ("--set", s)]
            base, resized = tmp / shape / "base", tmp / shape / "resized"
            _pretrain(tmp / "init.log", "init", "--recipe", "tiny", "--tokenizer", a.base_tokenizer, "--out", base, *sets)
            _pretrain(tmp / "resize.log", "resize", "--model", base, "--tokenizer", a.tokenizer, "--out", resized)
            # the same shape overrides as `init`: the recipe must describe the model it trains
            common = ["--recipe", "tiny", *sets, "--corpus", a.corpus, "--max-steps", a.steps, "--save-steps", 10_000,
                      "--eval-steps", 10_000, "--cache-dir", tmp / "cache", "--no-resume"]
            for label, cmd in (("phase1", ["phase1"]), ("phase1 --new-rows-only", ["phase1", "--new-rows-only"]),
                               ("phase2", ["phase2"])):
                out = tmp / shape / label.replace(" ", "_")
                rss = _pretrain(tmp / "run.log", *cmd, "--model", resized, "--out", out, *common)
                res = json.loads((out / "result.json").read_text())
                params = res.get("trainable", {})
                rows.append({"model": shape, "run": label, "total_params": params.get("total"),
                             "trainable_params": params.get("trainable"), "steps": res["global_step"],
                             "tokens_per_s": round(res["tokens_seen"] / res["train_seconds"], 1),
                             "peak_rss_MiB": round(rss / 1024)})
                print(rows[-1], flush=True)
    print()
    print_table(rows, ["model", "run", "total_params", "trainable_params", "tokens_per_s", "peak_rss_MiB"],
                {"total_params": "params", "trainable_params": "trainable", "tokens_per_s": "tokens/s",
                 "peak_rss_MiB": "peak RSS MiB"})
    write_results(a.json, settings=vars(a), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
