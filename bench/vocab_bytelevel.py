"""Llama-3 extended with N Chinese byte-level tokens (issue 23): characters per token on held-out Chinese text.

    python bench/vocab_bytelevel.py [--data ../shared/data] [--base llama3|qwen2.5] [--added 5000 10000 20000] [--caps 4 0]

Training: the whole shared corpus (zh_corpus/train, ~18M characters), as `vocab build --base
llama3/tokenizer.json --num-added N` does it. The trainer's merges are greedy, so the first candidates of one
training are those of a training for fewer tokens: one training (for the largest N) gives every N.
Held out: text from other sources than the corpus, the Chinese Alpaca data (outputs and instructions of the
hikariming translation, the LLaMA-Factory demo set, BELLE's seed tasks). Each line is encoded on its own, without
BOS/dummy-prefix specials where the tokenizer allows it; characters per token counts every character of the text.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, print_table, write_results  # noqa: E402


def held_out(data: Path) -> dict[str, list[str]]:
    ins = data / "instructions"

    def recs(*names):
        out = []
        for n in names:
            out.extend(json.loads((ins / n).read_text(encoding="utf-8")))
        return out

    tr = recs("alpaca_zh_hikariming_translated.part01.json")[:4000]
    demo = recs("alpaca_zh_llamafactory_demo_1k.json")
    belle = recs("belle_zh_seed_tasks_175.json")
    belle_lines = []
    for r in belle:
        belle_lines.append(r.get("instruction", ""))
        for inst in r.get("instances", []):
            belle_lines.extend([inst.get("input", ""), inst.get("output", "")])
    clean = lambda xs: [s for s in xs if s and s.strip()]  # noqa: E731
    return {"alpaca_zh_translated": clean([r["output"] for r in tr] + [r["instruction"] for r in tr]),
            "alpaca_zh_demo_1k": clean([r["output"] for r in demo] + [r["instruction"] for r in demo]),
            "belle_seed_tasks": clean(belle_lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--added", nargs="+", type=int, default=[5000, 10000, 20000])
    ap.add_argument("--caps", nargs="+", type=int, default=[4], help="max characters per new token (0 = none)")
    ap.add_argument("--max-bytes", type=int, default=32)
    ap.add_argument("--base", default="llama3", choices=["llama3", "qwen2.5"], help="the base to extend")
    ap.add_argument("--json", help="default: bench/results/vocab_bytelevel[_BASE].json")
    a = ap.parse_args()
    from corpora.reader import iter_corpus
    from vocab.bytelevel import (CANDIDATE_EXTRA, CANDIDATE_FACTOR, ByteLevelBase, _train_candidates, count_words,
                                 resolve, write_checked)
    from vocab.bytelevel_report import load_encoder
    from vocab.merge import reference_merge
    from vocab.spmodel import load_model

    data = Path(a.data)
    toks = data / "tokenizers"
    base = ByteLevelBase(toks / a.base)
    json_path = a.json or str(RESULTS / ("vocab_bytelevel.json" if a.base == "llama3" else f"vocab_bytelevel_{a.base}.json"))
    held = held_out(data)
    work = Path(tempfile.mkdtemp(prefix="vocab_bytelevel_"))
    ref = work / "chinese-llama-49953.model"
    ref.write_bytes(reference_merge(load_model(toks / "llama_tokenizer.model"),
                                    load_model(toks / "chinese_sp.model")).model.SerializeToString())
    t0 = time.time()
    words = count_words(base, iter_corpus([data / "zh_corpus" / "train"]))
    t_count = time.time() - t0
    t0 = time.time()
    cands, _ = _train_candidates(base, words, int(CANDIDATE_FACTOR * max(a.added)) + CANDIDATE_EXTRA)
    t_train = time.time() - t0
    print(f"{len(words):,} distinct CJK pre-tokens counted in {t_count:.0f} s; {len(cands):,} candidates in {t_train:.0f} s")
    encoders = {"llama3-128256": toks / "llama3", "qwen2.5-151665": toks / "qwen2.5",
                "deepseek-v3-128815": toks / "deepseek-v3", "chinese-llama-49953": ref,
                "chinese-llama2-55296": toks / "chinese_llama2_tokenizer.model"}
    built = {}
    for cap in a.caps:
        for n in a.added:
            res = resolve(base, cands, n, cap, a.max_bytes)
            res, dropped = write_checked(base, res, work / f"{a.base}+{n}-cap{cap}")
            name = f"{a.base}+{len(res.tokens)}" + (f" (cap {cap})" if len(a.caps) > 1 else "")
            encoders[name] = work / f"{a.base}+{n}-cap{cap}"
            built[name] = {"added": len(res.tokens), "dropped_unreachable": dropped, "cap_chars": cap, **res.stats}
    rows = []
    for name, path in encoders.items():
        e = load_encoder(path)
        row = {"tokenizer": name, "vocab": e.vocab_size}
        tot_c = tot_t = 0
        for src, lines in held.items():
            t = sum(map(len, e.encode(lines)))
            c = sum(map(len, lines))
            row[src] = round(c / t, 3)
            tot_c, tot_t = tot_c + c, tot_t + t
        row["all"] = round(tot_c / tot_t, 3)
        row["tokens"] = tot_t
        rows.append(row)
    base_tokens = rows[0]["tokens"]
    for r in rows:
        r["vs llama3"] = round(r["tokens"] / base_tokens, 3)
    cols = ["tokenizer", "vocab", *held, "all", "tokens", "vs llama3"]
    print_table(rows, cols)
    write_results(json_path, held_out={k: {"lines": len(v), "characters": sum(map(len, v))} for k, v in held.items()},
                  train={"distinct_words": len(words), "candidates": len(cands), "count_s": round(t_count),
                         "train_s": round(t_train)}, built=built, rows=rows)


if __name__ == "__main__":
    main()
