"""The records of one input file (or one line-aligned byte range of it) as `corpora prepare` reads them.

Formats: .txt (one document per line), .jsonl/.json (field), .parquet (column), plain or .gz. Text files are
checked and decoded like every other stage's reader (corpora.reader: encoding detection, per-line codec for
files mixing UTF-8 and GBK, binary files dropped). Unusable records are yielded with their reason so the
caller can count them.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from zhllama.errors import UserError
from zhllama.units import range_lines

from .reader import list_corpus_files

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
SAMPLE_BYTES = 1 << 20


def kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for k in ("jsonl", "json", "parquet"):
        if name.endswith("." + k):
            return k
    return "txt"  # explicitly named files of any other suffix are read as one document per line


def list_inputs(paths) -> list[Path]:
    """Files and folders (recursively, known suffixes only) -> unique files in a stable order."""
    return list_corpus_files(paths, SUFFIXES, "input")


def open_raw(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def sample(path: Path) -> tuple[bytes, bool]:
    with open_raw(path) as f:
        data = f.read(SAMPLE_BYTES + 1)
    return data[:SAMPLE_BYTES], len(data) <= SAMPLE_BYTES


class RepairingDecoder:
    """Lines of a .txt/.jsonl: with --encoding auto, each line in UTF-8 or the legacy codec like corpora.reader's
    LineDecoder (a file mixing UTF-8 and GBK lines keeps both readable); a line neither decodes, or any line under
    a given --encoding, is decoded in the file's codec with its bad bytes replaced, which `normalize` removes and
    counts (invalid_bytes). `codecs` counts the lines taken in each codec, `repaired` the lines with bad bytes."""

    def __init__(self, check, auto: bool):
        self.check = check
        self.inner = None
        if auto and check is not None:
            from .reader import FileCheck, LineDecoder

            legacy = check.legacy or "gb18030"
            self.inner = LineDecoder(FileCheck(check.path, check.encoding, "scored", None, legacy))
        self.codecs: dict[str, int] = {}
        self.repaired = 0

    def __call__(self, raw: bytes, enc: str) -> str:
        if self.inner is not None:
            if raw.isascii():
                return raw.decode("ascii")
            line = self.inner.decode(raw, None, 0)
            if line is not None:
                self.codecs[self.inner.last] = self.codecs.get(self.inner.last, 0) + 1
                return line + raw[len(raw.rstrip(b"\r\n")):].decode("ascii")  # keep the ending as the caller expects
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            self.repaired += 1
            return raw.decode(enc, errors="replace")  # bad bytes become U+FFFD, removed and counted by normalize


def raw_docs(path: Path, kind: str, enc: str, fld: str, start: int = 0, end: int | None = None,
              count: list | None = None, decode=None) -> Iterator[tuple[str | None, str | None, str]]:
    """(text, None, where) for each document, or (raw, reason, where) for a record that is unusable.
    For .txt/.jsonl only the lines that start in the byte range [start, end); line numbers count from start.
    decode(raw, enc): how a line's bytes become text (default: enc with bad bytes replaced)."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if fld not in pf.schema_arrow.names:
            raise UserError(f"{path}: parquet file has no column {fld!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                            "pass --field")
        row = 0
        for batch in pf.iter_batches(columns=[fld], batch_size=2048):
            for v in batch.column(0).to_pylist():
                row += 1
                if isinstance(v, str):
                    if v.strip():
                        yield v, None, f"row {row}"
                else:
                    yield "", "missing_field", f"row {row}"
        return
    if kind == "json":
        with open_raw(path) as f:
            text = f.read().decode(enc, errors="replace")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records with a {fld!r} field (or of strings)")
        for i, rec in enumerate(data):
            v = rec if isinstance(rec, str) else rec.get(fld) if isinstance(rec, dict) else None
            if isinstance(v, str):
                if v.strip():
                    yield v, None, f"record {i}"
            else:
                yield "", "missing_field", f"record {i}"
        return
    count = [0] if count is None else count
    with open_raw(path) as f:
        for lineno, (_, raw) in enumerate(range_lines(f, start, end), 1):
            count[0] += 1
            # bad bytes become U+FFFD, removed and counted by normalize
            line = decode(raw, enc) if decode is not None else raw.decode(enc, errors="replace")
            if kind == "txt":
                line = line.rstrip("\n")
                if line.endswith("\r"):
                    line = line[:-1]
                if line.strip():
                    yield line, None, f"line {lineno}"
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield line.rstrip("\r\n"), "malformed_json", f"line {lineno}"
                continue
            v = rec.get(fld) if isinstance(rec, dict) else None
            if isinstance(v, str):
                if v.strip():
                    yield v, None, f"line {lineno}"
            else:
                yield "", "missing_field", f"line {lineno}"
