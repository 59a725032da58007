"""Time and memory of pretraining tokenization + packing (the phase 1/2 data cache) on one corpus.

    PYTHONPATH=. python bench/pretrain_pack.py --corpus C --tokenizer TOK --cache-dir D [--num-proc N] [--block-size 512]

    PYTHONPATH=. python bench/pretrain_pack.py --corpus C --tokenizer TOK --pack-only 4000 [--max-mb 5]

Prints one JSON line: seconds, MB of corpus, s/MB, blocks. --pack-only N times packing alone (documents of N
characters made by joining corpus lines, tokenized once) with the old per-block slicing and with
pretrain.data's packer, in s per MB of text. Run it under `/usr/bin/time -v` for the peak RSS
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
ap.add_argument("--cache-dir", help="where the cache is built (required unless --pack-only)")
ap.add_argument("--num-proc", type=int, default=1)
ap.add_argument("--block-size", type=int, default=512)
ap.add_argument("--pack-only", type=int, metavar="DOC_CHARS")
ap.add_argument("--max-mb", type=float, default=5.0, help="--pack-only: MB of text to pack")
a = ap.parse_args()


def _slicing(seqs, eos, bs):  # the pre-issue-15 loop: a batch of 1000 documents, then buf = buf[bs:] per block
    buf, n = [], 0
    for i in range(0, len(seqs), 1000):
        for ids in seqs[i:i + 1000]:
            buf.extend(ids)
            buf.append(eos)
        while len(buf) >= bs:
            _ = buf[:bs]
            buf = buf[bs:]
            n += 1
    return n


if a.pack_only:
    from corpora.reader import iter_corpus
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    docs, cur, size = [], "", 0
    for line in iter_corpus(a.corpus):
        cur += line
        if len(cur) >= a.pack_only:
            docs.append(cur)
            size += len(cur.encode())
            cur = ""
            if size >= a.max_mb * 1e6:
                break
    seqs = tok(docs)["input_ids"]
    out = {"doc_chars": a.pack_only, "mb": round(size / 1e6, 2), "tokens": sum(map(len, seqs))}
    for name in ("slicing", "packer"):
        t0 = time.time()
        if name == "slicing":
            blocks = _slicing(seqs, tok.eos_token_id, a.block_size)
        else:
            from pretrain.data import _Packer

            p = _Packer(a.block_size)
            blocks = sum(len(p.add(seqs[i:i + 1000], tok.eos_token_id)) for i in range(0, len(seqs), 1000))
        out[f"{name}_s_per_mb"] = round((time.time() - t0) / (size / 1e6), 4)
        out[f"{name}_blocks"] = blocks
    print(json.dumps(out))
    sys.exit(0)
mb = sum(f.stat().st_size for c in a.corpus for f in ([Path(c)] if Path(c).is_file() else Path(c).rglob("*"))
         if f.is_file()) / 1e6
kw = {"num_proc": a.num_proc, "progress": False} if "num_proc" in inspect.signature(build_datasets).parameters else {}
t0 = time.time()
tr, ev, info = build_datasets(a.corpus, a.tokenizer, a.block_size, a.cache_dir, **kw)
s = time.time() - t0
print(json.dumps({"mb": round(mb, 1), "seconds": round(s, 1), "s_per_mb": round(s / mb, 3), "num_proc": a.num_proc,
                  "train_blocks": len(tr), "reused_cache": info.get("reused_cache")}))
