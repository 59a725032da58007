"""Near-duplicate removal of `corpora prepare --dedup near`: recall and precision on real Chinese text with injected
near-copies, and how many near duplicates it finds in the shared corpus.

    python bench/near_dedup.py [--data ../shared/data] [--seeds 1 2 3] [--docs 4000] [--min-chars 100]
                               [--threshold T] [--ngram 5] [--full] [--json bench/results/near_dedup.json]

Per seed: --docs documents (lines of at least --min-chars characters) drawn from the shared corpus (every file of
zh_corpus/train; the draw depends on the seed), and a near-copy of 5% of them inserted at a random later position,
each copy made one of three ways (equally often):
    edit       1-3 characters substituted, inserted or deleted at random places
    repunct    every Chinese punctuation mark replaced by its ASCII look-alike or removed, spaces after some
    truncate   the last 5-15% of the characters cut
The corpus is then prepared by the real pipeline (corpora.prepare.prepare, dedup near, every other filter off) and
the dropped documents compared with the copies: recall = copies dropped / copies; precision = right drops /
documents dropped, where a drop is right when it is a copy, or when the sample already held a near duplicate of it
(exact Jaccard similarity of the 5-gram sets >= 0.5 with an earlier document, computed pair by pair, not by MinHash);
every other drop is a false positive and printed with its best Jaccard. --full also prepares the whole
zh_corpus/train with dedup near (default filters) and reports its near_duplicate count.
"""
from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

PUNCT = {"，": ",", "。": ".", "！": "!", "？": "?", "：": ":", "；": ";", "（": "(", "）": ")", "“": '"', "”": '"',
         "、": ",", "《": "<", "》": ">"}


def _lines(data: Path, min_chars: int) -> list[str]:
    from corpora import clean

    out = []
    for f in sorted((data / "zh_corpus" / "train").glob("*.txt")):
        for line in f.read_text(encoding="utf-8").splitlines():
            t = clean.normalize(line)
            if len(t) >= min_chars:
                out.append(t)
    return out


def _edit(t: str, rng: random.Random) -> str:
    chars = list(t)
    pool = [c for c in t if "\u4e00" <= c <= "\u9fff"] or ["的"]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(chars))
        op = rng.choice(("sub", "ins", "del"))
        if op == "sub":
            chars[i] = rng.choice(pool)
        elif op == "ins":
            chars.insert(i, rng.choice(pool))
        elif len(chars) > 1:
            del chars[i]
    return "".join(chars)


def _repunct(t: str, rng: random.Random) -> str:
    out = []
    for c in t:
        if c in PUNCT:
            r = rng.random()
            out.append("" if r < 0.2 else PUNCT[c] + (" " if r > 0.6 else ""))
        else:
            out.append(c)
    return "".join(out)


def _truncate(t: str, rng: random.Random) -> str:
    return t[:max(1, round(len(t) * (1 - rng.uniform(0.05, 0.15))))]


MAKERS = {"edit": _edit, "repunct": _repunct, "truncate": _truncate}


def _prepare(docs: list[str], work: Path, threshold: float) -> set[str]:
    """The texts the real pipeline keeps out of docs (one .txt, dedup near, no other filter)."""
    from corpora.prepare import PrepareConfig, prepare
    from zhllama.executors import ExecutorConfig

    work.mkdir(parents=True, exist_ok=True)
    (work / "in.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = PrepareConfig(dedup="near", near_threshold=threshold, min_chars=1, min_cjk_ratio=0.0, heldout_fraction=0.0,
                        max_chars=10**7)
    prepare([work / "in.txt"], work / "out", cfg, progress=False, log=lambda m: None,
            executor=ExecutorConfig(workers=2))
    kept = set()
    for shard in sorted((work / "out" / "train").glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            kept.update(json.loads(line)["text"] for line in f)
    return kept


def _jaccard(a: str, b: str) -> float:
    from corpora.minhash import shingles

    x, y = set(shingles(a)), set(shingles(b))
    return len(x & y) / len(x | y)


TRUE_NEAR = 0.5  # a dropped document that is no injected copy is still right when it shares this much with an earlier one


def one_seed(lines: list[str], seed: int, n_docs: int, threshold: float, tmp: Path) -> dict:
    from corpora import clean
    from corpora.minhash import shingles

    rng = random.Random(seed)
    base = rng.sample(sorted(set(lines)), n_docs)
    n_copies = round(0.05 * len(base))
    originals = rng.sample(range(len(base)), n_copies)
    docs = list(base)
    copies: dict[str, tuple[str, str]] = {}
    taken = set(base)
    for k, i in enumerate(originals):
        how = list(MAKERS)[k % 3]
        for attempt in range(40):  # a copy must differ from every document (repunct of a text without Chinese
            if attempt == 20:      # punctuation changes nothing: then an edit)
                how = "edit"
            c = clean.normalize(MAKERS[how](base[i], rng))  # as the pipeline will read it
            if c not in taken:
                break
        assert c not in taken
        taken.add(c)
        copies[c] = (how, base[i])
    # each copy at a random position after its original: the first occurrence is the one kept
    for c, (how, orig) in copies.items():
        docs.insert(rng.randint(docs.index(orig) + 1, len(docs)), c)
    kept = _prepare(docs, tmp / f"inj-{seed}", threshold)
    dropped = [i for i, d in enumerate(docs) if d not in kept]
    tp = [docs[i] for i in dropped if docs[i] in copies]
    # the other drops: compared with every earlier document by the exact Jaccard similarity of their 5-gram sets
    # (punctuation and spaces left out): at least TRUE_NEAR is a near duplicate the corpus already held
    sets = [set(shingles(d, 5)) for d in docs]
    natural, fp = [], []
    for i in dropped:
        if docs[i] in copies:
            continue
        best = max((len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for j in range(i)), default=0.0)
        (natural if best >= TRUE_NEAR else fp).append(round(best, 3))
    by_how = {h: {"copies": sum(1 for c in copies.values() if c[0] == h),
                  "found": sum(1 for d in tp if copies[d][0] == h)} for h in MAKERS}
    missed = [(copies[c][0], round(len(set(shingles(c, 5)) & set(shingles(copies[c][1], 5)))
                                   / len(set(shingles(c, 5)) | set(shingles(copies[c][1], 5))), 3))
              for c in copies if c in kept]
    return {"seed": seed, "docs": len(docs), "copies": len(copies), "dropped": len(dropped),
            "recall": len(tp) / len(copies),
            "precision": (len(tp) + len(natural)) / len(dropped) if dropped else 1.0,
            "natural_near_dups": len(natural), "natural_min_jaccard": min(natural, default=None),
            "false_positive_jaccard": fp, "by_kind": by_how, "missed_kind_jaccard": missed,
            "mean_chars": round(sum(map(len, base)) / len(base), 1)}


def full_corpus(data: Path, threshold: float, tmp: Path) -> dict:
    from corpora.prepare import PrepareConfig, prepare
    from zhllama.executors import ExecutorConfig

    t0 = time.time()
    stats = prepare([data / "zh_corpus" / "train"], tmp / "full", PrepareConfig(dedup="near", near_threshold=threshold),
                    progress=False, log=lambda m: None, executor=ExecutorConfig(workers=2))
    t = stats["total"]
    return {"docs_in": t["docs_in"], "near_duplicate": t["dropped"]["near_duplicate"]["docs"],
            "exact_duplicate": t["dropped"]["exact_duplicate"]["docs"], "docs_kept": t["docs_kept"],
            "seconds": round(time.time() - t0, 1),
            "examples": [(name.rsplit("/", 1)[-1], st["dropped"]["near_duplicate"]["docs"])
                         for name, st in stats["files"].items() if st["dropped"]["near_duplicate"]["docs"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--docs", type=int, default=4000)
    ap.add_argument("--min-chars", type=int, default=100)
    ap.add_argument("--threshold", type=float, default=None, help="default: the recipe default (corpora.near_threshold)")
    ap.add_argument("--ngram", type=int, default=0, help="character n-gram size (default: corpora.minhash.NGRAM)")
    ap.add_argument("--full", action="store_true", help="also count near duplicates in the whole zh_corpus/train")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from corpora import minhash
    from zhllama.recipe import CorporaConfig

    a.threshold = a.threshold or CorporaConfig().near_threshold
    if a.ngram:
        minhash.NGRAM = a.ngram
    lines = _lines(a.data, a.min_chars)
    res = {"threshold": a.threshold, "ngram": minhash.NGRAM, "num_perm": minhash.NUM_PERM, "bands_rows": minhash.bands(a.threshold),
           "min_chars": a.min_chars, "pool": len(lines), "seeds": []}
    with tempfile.TemporaryDirectory() as tmp:
        for s in a.seeds:
            r = one_seed(lines, s, a.docs, a.threshold, Path(tmp))
            res["seeds"].append(r)
            kinds = ", ".join(f"{k} {v['found']}/{v['copies']}" for k, v in r["by_kind"].items())
            print(f"seed {s}: {r['docs']} documents with {r['copies']} copies: recall {r['recall']:.3f} ({kinds}); "
                  f"precision {r['precision']:.3f}: {r['dropped']} dropped = {round(r['recall'] * r['copies'])} copies + "
                  f"{r['natural_near_dups']} near duplicates already in the sample (Jaccard >= "
                  f"{r['natural_min_jaccard']}) + {len(r['false_positive_jaccard'])} false "
                  f"{r['false_positive_jaccard']}; missed copies (kind, Jaccard): {r['missed_kind_jaccard']}", flush=True)
        if a.full:
            res["full"] = full_corpus(a.data, a.threshold, Path(tmp))
            f = res["full"]
            print(f"zh_corpus/train: {f['docs_in']:,} documents, {f['near_duplicate']:,} near duplicates dropped "
                  f"({f['exact_duplicate']:,} exact), {f['seconds']} s; per file: {f['examples']}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
