"""Work units: input files cut into line-aligned byte ranges that depend on the corpus alone, never on the number
of processes, so every stage that works on them in parallel (corpora prepare, vocab span counting, pretrain
tokenization) gives the same result for any --num-proc and can resume from its finished units.

A range [start, end) owns every line whose first byte lies in it, so the ranges of a file hold each of its lines
exactly once wherever the cuts fall; end None: the whole file, read by the stage's own reader (compressed and
unsplittable formats, and files no larger than one unit).

Public API:
    Unit(path, file_index, part, start, end)         one unit; size() its bytes on disk
    plan_units(files, unit_bytes, splittable=(".txt", ".jsonl"), cut="fixed") -> [Unit]
        cut "fixed": at multiples of unit_bytes (nothing read at plan time; a range may hold no line);
        "line_end": each cut moved to the end of the line it falls in, the next unit_bytes counted from there
    range_lines(f, start, end) -> Iterator[(offset, raw line bytes)]   over an open binary file
    decode_lines(path, encoding, start, end) -> Iterator[(offset, line)]
        strict decode (a bad byte: UserError naming file and byte offset), line ending removed
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from zhllama.errors import UserError


@dataclass(frozen=True)
class Unit:
    path: str
    file_index: int  # the file's position in the planned list
    part: int  # the unit's position within its file
    start: int = 0
    end: int | None = None  # None: the whole file

    def size(self) -> int:
        return (self.end if self.end is not None else Path(self.path).stat().st_size) - self.start


def plan_units(files, unit_bytes: int, splittable: tuple[str, ...] | Callable[[Path], bool] = (".txt", ".jsonl"),
               cut: str = "fixed") -> list[Unit]:
    """The units of files in order: a splittable file (a name ending in one of the suffixes, any case, or for which
    the predicate holds) larger than unit_bytes is cut into ranges of about unit_bytes; any other file is one unit."""
    if cut not in ("fixed", "line_end"):
        raise ValueError(f"cut must be 'fixed' or 'line_end', not {cut!r}")
    can_split = splittable if callable(splittable) else (lambda p: p.name.lower().endswith(tuple(splittable)))
    units: list[Unit] = []
    for i, f in enumerate(files):
        p = Path(f)
        size = p.stat().st_size
        if size <= unit_bytes or not can_split(p):
            units.append(Unit(str(f), i, 0))
        elif cut == "fixed":
            units += [Unit(str(f), i, part, a, min(a + unit_bytes, size))
                      for part, a in enumerate(range(0, size, unit_bytes))]
        else:
            units += [Unit(str(f), i, part, a, b) for part, (a, b) in enumerate(_line_end_ranges(p, size, unit_bytes))]
    return units


def _line_end_ranges(path: Path, size: int, unit_bytes: int) -> Iterator[tuple[int, int]]:
    with open(path, "rb") as fh:
        pos = 0
        while pos < size:
            if pos + unit_bytes >= size:
                end = size
            else:
                fh.seek(pos + unit_bytes)
                fh.readline()  # to the end of the line the cut falls in
                end = min(size, fh.tell())
            yield pos, end
            pos = end


def range_lines(f, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw line with its ending) of every line of the open binary file f that starts in [start, end)
    (to the end of the file if end is None)."""
    if start > 0:
        # the line that began before `start` belongs to the previous range (if byte start-1 is a newline, this
        # reads just that newline and the line at `start` is ours)
        f.seek(start - 1)
        f.readline()
        pos = f.tell()
    else:
        pos = 0  # f is at its start (a .gz reader is not sought)
    while end is None or pos < end:
        raw = f.readline()
        if not raw:
            break
        yield pos, raw
        pos += len(raw)


def decode_lines(path, encoding: str, start: int, end: int | None) -> Iterator[tuple[int, str]]:
    """(byte offset, line without its ending) of the lines of path that start in [start, end), decoded strictly
    like corpora.reader."""
    with open(path, "rb") as f:
        for pos, raw in range_lines(f, start, end):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: byte offset {pos + e.start}: not valid {encoding}. Clean it with "
                                "`python -m corpora prepare` or pass the right --encoding.") from None
            yield pos, line.rstrip("\r\n")
