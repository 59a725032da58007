"""Work units of pretraining tokenization: a corpus file, or a line-aligned byte range of a large plain one.

Public API:
    UNIT_BYTES, unit_bytes()                   size of the byte ranges a large .txt/.jsonl is cut into
    Unit                                       a zhllama.units.Unit with the file's encoding and sha256
    plan_units(files, encodings, hashes, size=unit_bytes()) -> [Unit]
    unit_documents(unit) -> Iterator[str]      the documents of a unit, with the corpus reader's rules

Units (zhllama.units, fixed cuts) depend on the corpus alone (never on the number of processes), so the packed
blocks do too. A range [start, end) owns every line whose first byte lies in it; .gz and .json files cannot be
split and are one unit each. Decoding is corpora.reader's: strict (a bad byte is a one-line error naming file and
byte offset) for a UTF-8 file or a given --encoding; line by line for a file whose start is not pure UTF-8 (the unit's
encoding is then "auto" and each unit sniffs the file again: the same answer for every unit).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator

from zhllama import units
from zhllama.errors import UserError

# 32 MiB: about 7 M tokens (28 MB of int32) per unit at Chinese rates, so a worker's memory stays small and a
# kill -9 loses at most a few seconds of work per process. ZHLLAMA_PRETRAIN_UNIT_BYTES overrides it (tests cut
# small corpora into many units with it); it is part of the cache key.
UNIT_BYTES = 32 << 20


def unit_bytes() -> int:
    return int(os.environ.get("ZHLLAMA_PRETRAIN_UNIT_BYTES", UNIT_BYTES))


@dataclass(frozen=True)
class Unit(units.Unit):
    encoding: str = "utf-8"
    sha256: str = ""

    @property
    def uid(self) -> str:
        """Names the unit's shard files: content and range, so a moved or renamed corpus reuses them."""
        return f"{self.sha256[:20]}-{self.start:013d}"


def plan_units(files, encodings: dict, hashes: dict, size: int | None = None) -> list[Unit]:
    # fixed cuts (zhllama.units): a unit's nominal start names it (uid), so two units of a file never share one
    files = list(files)
    return [Unit(**asdict(u), encoding=encodings[files[u.file_index]], sha256=hashes[files[u.file_index]])
            for u in units.plan_units(files, size or unit_bytes())]


def unit_documents(unit: Unit) -> Iterator[str]:
    if unit.end is None:
        from corpora.reader import iter_documents

        yield from iter_documents(unit.path, encoding=unit.encoding)
        return
    from corpora.reader import iter_range_lines

    jsonl = unit.path.lower().endswith(".jsonl")
    for pos, line in iter_range_lines(unit.path, unit.encoding, unit.start, unit.end):
        if not jsonl:
            if line.strip():
                yield line
            continue
        if not line.strip():
            continue
        text = _record_text(unit.path, pos, line)
        if text.strip():
            yield text


def _record_text(path, pos: int, line: str) -> str:
    from corpora.reader import has_lone_surrogate

    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: byte offset {pos}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
        raise UserError(f"{path}: byte offset {pos}: expected an object with a string field 'text'")
    if has_lone_surrogate(rec["text"]):
        raise UserError(f"{path}: byte offset {pos}: field 'text' holds a lone surrogate escape (\\ud800-\\udfff), "
                        "which is not Unicode text")
    return rec["text"]
