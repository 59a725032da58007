"""Stream documents out of text corpora (.txt lines, .jsonl/.json records) with errors that name file and byte."""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from zhllama.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz")
_ENCODINGS = ("utf-8", "gb18030", "big5")
_CJK = re.compile(r"[\u4e00-\u9fff]")


def list_corpus_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] = TEXT_SUFFIXES, what: str = "corpus") -> list[Path]:
    """Expand files and folders (recursively, known suffixes only) into unique files in a stable order."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes))
            if not found:
                raise UserError(f"{p}: folder holds no {', '.join(suffixes)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    if not files:
        raise UserError(f"no {what} files given")
    seen: set[Path] = set()
    unique = []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def parse_jsonl(path: Path, text: str, expected: str) -> list:
    """One JSON value per non-empty line; a bad line is named by file, line and column."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno}, column {e.colno}: malformed JSON ({e.msg}); expected {expected}") from None
    return rows


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _guess_encoding(raw: bytes) -> str | None:
    for enc in _ENCODINGS[1:]:
        try:
            text = raw.decode(enc)
        except UnicodeDecodeError:
            continue
        if len(_CJK.findall(text)) >= max(1, len(text) // 10):
            return enc
    return None


def _decode_lines(path: Path, encoding: str) -> Iterator[str]:
    """Yield decoded lines; on bad bytes raise a UserError naming the byte offset and a fix."""
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as e:
                where = offset + e.start
                guess = _guess_encoding(raw) if encoding == "utf-8" else None
                hint = (
                    f" It looks like {guess.upper()}: convert it with `iconv -f {guess.upper()} -t UTF-8 {path} > out.txt` "
                    f"or pass --encoding {guess}."
                    if guess
                    else " Clean it with `python -m corpora prepare` or pass the right --encoding."
                )
                raise UserError(f"{path}: line {lineno}, byte offset {where}: not valid {encoding}.{hint}") from None
            offset += len(raw)
            yield line.rstrip("\r\n")


def iter_documents(path: str | Path, encoding: str = "utf-8", field: str = "text") -> Iterator[str]:
    """Documents of one file: a non-empty line of .txt, or `field` of each .jsonl/.json record."""
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".jsonl"):
        for lineno, line in enumerate(_decode_lines(path, encoding), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UserError(f"{path}: line {lineno}: expected an object with a string field {field!r}")
            if rec[field].strip():
                yield rec[field]
    elif name.endswith(".json"):
        text = "\n".join(_decode_lines(path, encoding))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records with a {field!r} field")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UserError(f"{path}: record {i}: expected an object with a string field {field!r}")
            if rec[field].strip():
                yield rec[field]
    else:
        for line in _decode_lines(path, encoding):
            if line.strip():
                yield line


def iter_corpus(paths: Iterable[str | Path], encoding: str = "utf-8", field: str = "text") -> Iterator[str]:
    for f in list_corpus_files(paths):
        yield from iter_documents(f, encoding=encoding, field=field)
