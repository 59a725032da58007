"""Time and memory of pretraining tokenization + packing (the phase 1/2 data cache) on one corpus.

    PYTHONPATH=. python bench/pretrain_pack.py --corpus C --tokenizer TOK --cache-dir D [--num-proc N] [--block-size 512]

Prints one JSON line: seconds, MB of corpus, s/MB, blocks. Run it under `/usr/bin/time -v` for the peak RSS
(Linux folds reaped workers into it: `Maximum resident set size` is that of the largest single process).
Works against the pre-issue-15 pretrain.data too (no num_proc there), for before/after figures.
"""
import argparse
import inspect
import json
import sys
import time
from pathlib import Path

# bench/tokenizers.py would shadow the tokenizers package when this runs as a script from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pretrain.data import build_datasets  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--corpus", required=True, nargs="+")
ap.add_argument("--tokenizer", required=True)
ap.add_argument("--cache-dir", required=True)
ap.add_argument("--num-proc", type=int, default=1)
ap.add_argument("--block-size", type=int, default=512)
a = ap.parse_args()
mb = sum(f.stat().st_size for c in a.corpus for f in ([Path(c)] if Path(c).is_file() else Path(c).rglob("*"))
         if f.is_file()) / 1e6
kw = {"num_proc": a.num_proc, "progress": False} if "num_proc" in inspect.signature(build_datasets).parameters else {}
t0 = time.time()
tr, ev, info = build_datasets(a.corpus, a.tokenizer, a.block_size, a.cache_dir, **kw)
s = time.time() - t0
print(json.dumps({"mb": round(mb, 1), "seconds": round(s, 1), "s_per_mb": round(s / mb, 3), "num_proc": a.num_proc,
                  "train_blocks": len(tr), "reused_cache": info.get("reused_cache")}))
