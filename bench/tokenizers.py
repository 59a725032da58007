"""Tokenizer benchmark: compression, soundness and encode speed of LLaMA, the references and zhllama's builds.

    python bench/tokenizers.py [--data ../shared/data] [--tokenizer NAME=PATH ...] [--json bench/results/tokenizers.json]

Prints one table and writes JSON. Tokenizers default to the ones in ../shared/data plus any
zhllama build found under runs/*/vocab.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the `tokenizers` package: keep its folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, print_table, write_results  # noqa: E402

from corpora.probes import TABLE1  # noqa: E402
from vocab.audit import dead_pieces  # noqa: E402
from vocab.hf_export import save_tokenizer_folder  # noqa: E402
from vocab.merge import reference_merge  # noqa: E402
from vocab.parity import disagreements, english_changed, hf_tokenizer  # noqa: E402
from vocab.spmodel import load_model, processor  # noqa: E402
from zhllama.hashing import sha256_file  # noqa: E402


def _texts(data: Path, max_lines: int):
    zh_files = sorted((data / "zh_corpus" / "train").glob("*.txt"))
    per = max(1, max_lines // max(1, len(zh_files)))
    zh = []
    for f in zh_files:
        zh += [l for l in f.read_text(encoding="utf-8").splitlines() if l.strip()][:per]
    recs = json.loads((data / "instructions" / "alpaca_en_52k_original.part01.json").read_text(encoding="utf-8"))
    en = [r["output"] for r in recs[:max_lines] if r["output"].strip()]
    zrecs = json.loads((data / "instructions" / "alpaca_zh_hikariming_translated.part01.json").read_text(encoding="utf-8"))
    mixed = [r["instruction"] + "\n" + r["output"] for r in zrecs[:max_lines] if any(c.isascii() and c.isalpha() for c in r["output"])]
    return {"chinese": zh, "english": en, "mixed": mixed}


def _throughput(fn, lines, repeat=2) -> float:
    mb = sum(len(s.encode("utf-8")) for s in lines) / 1e6
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(lines)
        best = min(best, time.perf_counter() - t)
    return round(mb / best, 2)


def bench(tokenizers: dict[str, Path], base_path: Path, texts: dict, work: Path) -> dict:
    base = load_model(base_path)
    out = {}
    speed_lines = texts["chinese"] * 3
    for name, path in tokenizers.items():
        m = load_model(path)
        folder = path if path.is_dir() else None
        if folder is None or not (folder / "tokenizer.json").is_file():
            folder = work / name
            save_tokenizer_folder(m, folder)
        sp = processor(m)
        tok = hf_tokenizer(folder)
        row = {"pieces": len(m.pieces)}
        for kind, lines in texts.items():
            chars = sum(len(s) for s in lines)
            toks = sum(len(e) for e in sp.encode(lines, num_threads=0))
            base_toks = sum(len(e) for e in processor(base).encode(lines, num_threads=0))
            row[f"{kind}_tok_per_1k"] = round(1000 * toks / chars, 1)
            row[f"{kind}_vs_llama"] = round(toks / base_toks, 4)
        row["dead"] = len(dead_pieces(m, start=len(base.pieces))) if len(m.pieces) > len(base.pieces) else 0
        row["hf_disagree"] = disagreements(m, tok, texts["chinese"] + texts["english"] + texts["mixed"])[0]
        row["english_changed"] = english_changed(base, m, texts["english"])
        row["table1"] = len(sp.encode(TABLE1))
        row["sp_MBps"] = _throughput(lambda ls: sp.encode(ls, num_threads=2), speed_lines)
        row["hf_batch_MBps"] = _throughput(lambda ls: tok.encode_batch(ls, add_special_tokens=False), speed_lines)
        # ids only, no offsets: what a datasets.map tokenizing for training needs
        row["hf_fast_MBps"] = _throughput(lambda ls: tok.encode_batch_fast(ls, add_special_tokens=False), speed_lines)
        out[name] = row
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ZHLLAMA_DATA", str(ROOT.parent / "shared" / "data")))
    ap.add_argument("--tokenizer", nargs="*", default=[], metavar="NAME=PATH", help="more tokenizers (folder or .model)")
    ap.add_argument("--max-lines", type=int, default=3000)
    ap.add_argument("--json", default=str(RESULTS / "tokenizers.json"))
    a = ap.parse_args()
    data = Path(a.data)
    if not data.is_dir():
        print(f"reference data not found at {data}: pass --data", file=sys.stderr)
        return 2
    work = Path(a.json).parent / "tokenizers_work"
    work.mkdir(parents=True, exist_ok=True)
    llama = data / "tokenizers" / "llama_tokenizer.model"
    ref = work / "reference-49953.model"
    ref.write_bytes(reference_merge(load_model(llama), load_model(data / "tokenizers" / "chinese_sp.model")).model.SerializeToString())
    toks = {"llama-32000": llama, "reference-49953": ref, "chinese-llama2-55296": data / "tokenizers" / "chinese_llama2_tokenizer.model"}
    for d in sorted(ROOT.glob("runs/*/vocab")):
        # only builds over the same base are comparable
        rep = d / "merge_report.json"
        if rep.is_file() and json.loads(rep.read_text(encoding="utf-8")).get("base_sha256") == sha256_file(llama):
            toks[f"zhllama:{d.parent.name}"] = d
    for item in a.tokenizer:
        name, p = item.split("=", 1)
        toks[name] = Path(p)
    texts = _texts(data, a.max_lines)
    res = bench(toks, llama, texts, work)
    cols = ["pieces", "chinese_tok_per_1k", "chinese_vs_llama", "english_vs_llama", "mixed_vs_llama", "dead",
            "hf_disagree", "english_changed", "table1", "sp_MBps", "hf_batch_MBps", "hf_fast_MBps"]
    print_table([{"tokenizer": name, **row} for name, row in res.items()], ["tokenizer"] + cols)
    write_results(a.json, results=res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
