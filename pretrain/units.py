"""Work units of pretraining tokenization: a corpus file, or a line-aligned byte range of a large plain one.

Public API:
    UNIT_BYTES, unit_bytes()                   size of the byte ranges a large .txt/.jsonl is cut into
    Unit                                       one unit: file, encoding, byte range (end None = the whole file)
    plan_units(files, encodings, hashes, size=unit_bytes()) -> [Unit]
    unit_documents(unit) -> Iterator[str]      the documents of a unit, with the corpus reader's rules

Units depend on the corpus alone (never on the number of processes), so the packed blocks do too. A range
[start, end) owns every line whose first byte lies in it; .gz and .json files cannot be split and are one
unit each. Decoding is strict like corpora.reader: a bad byte is a one-line error naming file and byte offset.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from zhllama.errors import UserError

# 32 MiB: about 7 M tokens (28 MB of int32) per unit at Chinese rates, so a worker's memory stays small and a
# kill -9 loses at most a few seconds of work per process. ZHLLAMA_PRETRAIN_UNIT_BYTES overrides it (tests cut
# small corpora into many units with it); it is part of the cache key.
UNIT_BYTES = 32 << 20


def unit_bytes() -> int:
    return int(os.environ.get("ZHLLAMA_PRETRAIN_UNIT_BYTES", UNIT_BYTES))
_SPLITTABLE = (".txt", ".jsonl")


@dataclass(frozen=True)
class Unit:
    file: str
    encoding: str
    sha256: str
    start: int = 0
    end: int | None = None  # None: the whole file through corpora.reader

    @property
    def uid(self) -> str:
        """Names the unit's shard files: content and range, so a moved or renamed corpus reuses them."""
        return f"{self.sha256[:20]}-{self.start:013d}"


def plan_units(files, encodings: dict, hashes: dict, size: int | None = None) -> list[Unit]:
    size_limit = size or unit_bytes()
    units = []
    for f in files:
        p = Path(f)
        size = p.stat().st_size
        if p.name.lower().endswith(_SPLITTABLE) and size > size_limit:
            units += [Unit(str(p), encodings[f], hashes[f], a, min(a + size_limit, size))
                      for a in range(0, size, size_limit)]
        else:
            units.append(Unit(str(p), encodings[f], hashes[f]))
    return units


def unit_documents(unit: Unit) -> Iterator[str]:
    if unit.end is None:
        from corpora.reader import iter_documents

        yield from iter_documents(unit.file, encoding=unit.encoding)
        return
    jsonl = unit.file.lower().endswith(".jsonl")
    for pos, line in _range_lines(Path(unit.file), unit.encoding, unit.start, unit.end):
        if not jsonl:
            if line.strip():
                yield line
            continue
        if not line.strip():
            continue
        text = _record_text(unit.file, pos, line)
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


def _range_lines(path: Path, encoding: str, start: int, end: int) -> Iterator[tuple[int, str]]:
    """(byte offset, decoded line) of every line that starts in [start, end)."""
    with open(path, "rb") as f:
        if start > 0:
            # the line that began before `start` belongs to the previous unit (if byte start-1 is a newline,
            # this reads just that newline and the line at `start` is ours)
            f.seek(start - 1)
            f.readline()
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: byte offset {pos + e.start}: not valid {encoding}. Clean it with "
                                "`python -m corpora prepare` or pass the right --encoding.") from None
            yield pos, line.rstrip("\r\n")
            pos += len(raw)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> str | None:
    """The kernel's start time of a process (so a reused pid is not taken for the claim's owner)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None
