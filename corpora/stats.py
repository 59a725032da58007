"""The statistics `corpora prepare` writes to OUT/stats.json: per work unit (FileStats), merged per input file
in unit order (merge_file), and the totals (totals)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

REASONS = ("empty", "malformed_json", "missing_field", "too_short", "low_cjk_ratio", "exact_duplicate",
           "near_duplicate")


def counts() -> dict:
    return {"docs": 0, "chars": 0}


@dataclass
class FileStats:
    encoding: str = ""
    encoding_detected_by: str = ""
    encoding_scores: dict = field(default_factory=dict)
    empty_file: bool = False
    dropped_file: dict | None = None  # {"reason": "binary", "why": ...}: the whole file was not read
    docs_in: int = 0
    chars_in: int = 0
    dropped: dict = field(default_factory=lambda: {r: counts() for r in REASONS})
    examples: dict = field(default_factory=dict)  # reason -> first few locations ("line 12")
    split: dict = field(default_factory=lambda: {"docs": 0, "pieces": 0})
    normalisation: dict = field(default_factory=dict)
    pieces_out: int = 0      # pieces written by pass 1 (before dedup)
    docs_kept: int = 0
    chars_kept: int = 0
    train: dict = field(default_factory=counts)
    heldout: dict = field(default_factory=counts)
    # written only when not empty (clean inputs keep the stats they always had): lines per codec of a file whose
    # lines are not all in its own codec, and lines that neither codec decodes (their bad bytes removed)
    line_encodings: dict = field(default_factory=dict)
    lines_with_bad_bytes: int = 0

    def drop(self, reason: str, chars: int, where: str) -> None:
        self.dropped[reason]["docs"] += 1
        self.dropped[reason]["chars"] += chars
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)


def add(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, bool) or not isinstance(v, (int, dict)):
            continue
        if isinstance(v, dict):
            add(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def merge_file(res1: list[dict], res3: list[dict]) -> dict:
    """Stats of one input from its units' pass-1 and pass-3 results (examples renumbered to the whole file)."""
    st = json.loads(json.dumps(res1[0]["stats"]))
    examples = {r: list(v) for r, v in st["examples"].items()}
    line_offset = res1[0]["lines"]
    for r1 in res1[1:]:
        part = {k: v for k, v in r1["stats"].items() if k not in ("encoding_scores", "dropped_file", "examples")}
        add(st, part)
        for reason, where in r1["stats"]["examples"].items():
            ex = examples.setdefault(reason, [])
            for w in where:
                if len(ex) < 3:
                    kind, _, num = w.partition(" ")
                    ex.append(f"{kind} {int(num) + line_offset}")
        line_offset += r1["lines"]
    for r3 in res3:
        add(st, r3["stats"])
        for reason, where in r3["stats"]["examples"].items():
            ex = examples.setdefault(reason, [])
            ex.extend(where[:3 - len(ex)])
    st["empty_file"] = st["docs_in"] == 0
    st["examples"] = {r: examples[r] for r in REASONS if r in examples}
    return st


def totals(per_file: dict) -> dict:
    total: dict = {}
    for st in per_file.values():
        add(total, st)
    total.pop("encoding_scores", None)
    total.pop("examples", None)
    total["files"] = len(per_file)
    total["empty_files"] = sum(1 for st in per_file.values() if st["empty_file"] and not st.get("dropped_file"))
    total["dropped_files"] = {}
    for name, st in per_file.items():
        if st.get("dropped_file"):
            total["dropped_files"].setdefault(st["dropped_file"]["reason"], []).append(name)
    total["encodings"] = {}
    for st in per_file.values():
        total["encodings"][st["encoding"]] = total["encodings"].get(st["encoding"], 0) + 1
    return total


def log_summary(total: dict, per_file: dict, names: dict, out: Path, log) -> None:
    dropped = {r: v["docs"] for r, v in total["dropped"].items() if v["docs"]}
    log(f"{total['docs_in']:,} documents in, {total['docs_kept']:,} kept ({total['train']['docs']:,} train, "
        f"{total['heldout']['docs']:,} held out), dropped: {dropped or 'none'}; "
        f"{len(names['train'])} + {len(names['heldout'])} shards in {out}")
    for name, st in per_file.items():
        if st.get("dropped_file"):
            log(f"  {name}: dropped as {st['dropped_file']['reason']} ({st['dropped_file']['why']}); none of its text is used")
        elif st["encoding"] != "utf-8" or st["normalisation"].get("invalid_bytes") or len(st.get("line_encodings", {})) > 1:
            mixed = st.get("line_encodings", {})
            codecs = (", lines by codec: " + ", ".join(f"{k} {v:,}" for k, v in sorted(mixed.items()))
                      if len(mixed) > 1 else "")
            bad = st.get("lines_with_bad_bytes", 0)
            log(f"  {name}: {st['encoding']} ({st['encoding_detected_by']}){codecs}, "
                f"{st['normalisation'].get('invalid_bytes', 0)} undecodable bytes removed"
                + (f" from {bad:,} line(s)" if bad else ""))
