"""The one corpus reader of every stage (prepare, vocab, pretrain, evaluation).

Stream documents out of text corpora (.txt lines, .jsonl/.json records, plain or .gz) with the same
encoding detection everywhere (`encoding="auto"`: UTF-8 if the file's first MiB decodes strictly, else the
candidate among GB18030/Big5 whose decoding looks most like Chinese, see corpora.clean.detect_encoding) and
the same binary/garbage detector (`sniff`): a file that starts with a known binary magic number, or whose
sample is more than a few percent NUL/control characters or undecodable bytes, is dropped whole with reason
"binary" (recorded in `CorpusStats.dropped_files`, warned about), and none of its text is ever yielded.
Decoding is strict for a file whose first MiB is UTF-8 or whose --encoding is given: a bad byte later in the file
is a one-line error naming file, line and byte offset (`corpora prepare` is the tool that repairs such files).
A file whose first MiB is not pure UTF-8 (`detected_by == "scored"`) is decoded line by line (`LineDecoder`): files
that mix encodings are common (UTF-8 lines appended to a GBK file), and one codec for the whole file keeps every line
of the other as mojibake, since GB18030 decodes most UTF-8 byte runs without error. Each line is taken as UTF-8 when
it is valid UTF-8 (GBK text almost never is: 0 of 6,000 Chinese lines measured), else in the file's legacy codec
(GB18030 or Big5); a line that neither decodes is dropped, counted per file in `CorpusStats.undecodable` and
reported on stderr.

Public names (stable): TEXT_SUFFIXES, list_corpus_files, parse_jsonl, sniff, FileCheck, CorpusStats, LineDecoder,
iter_documents, iter_range_lines, iter_corpus, corpus_profile.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from zhllama.errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz")
ENCODINGS = ("auto", "utf-8", "gb18030", "big5")
_ENCODINGS = ("utf-8", "gb18030", "big5")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")
SNIFF_BYTES = 1 << 20
# Known binary formats by their first bytes (a .txt that is really one of these is dropped as "binary").
BINARY_MAGIC = {
    b"\x7fELF": "ELF executable", b"PK\x03\x04": "zip archive", b"PK\x05\x06": "zip archive",
    b"%PDF-": "PDF", b"\x89PNG\r\n\x1a\n": "PNG image", b"GIF87a": "GIF image", b"GIF89a": "GIF image",
    b"\xff\xd8\xff": "JPEG image", b"\x1f\x8b": "gzip data", b"BZh": "bzip2 data", b"\xfd7zXZ\x00": "xz data",
    b"(\xb5/\xfd": "zstd data", b"7z\xbc\xaf\x27\x1c": "7z archive", b"Rar!\x1a\x07": "RAR archive",
    b"PAR1": "parquet file", b"SQLite format 3\x00": "SQLite database", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1": "MS Office file",
    b"\x00asm": "WebAssembly", b"\xca\xfe\xba\xbe": "Mach-O/Java class", b"\xcf\xfa\xed\xfe": "Mach-O executable",
    b"MZ\x90\x00": "Windows executable", b"OggS": "Ogg media", b"fLaC": "FLAC audio", b"ID3": "MP3 audio",
    b"\x93NUMPY": "numpy array", b"\x80\x02\x8a\n": "torch pickle",
}
# Shares of the sniffed sample above which a file is not text. Measured: binaries (executables, images, model
# files, float weights, random bytes) read as GB18030 show 12-87% control characters and 6-15% undecodable
# bytes; a damaged text file that `prepare` should repair (the core tests' bad.txt) 2.0% and 1.8%.
MAX_NUL_SHARE = 0.01
MAX_CONTROL_SHARE = 0.05
MAX_UNDECODABLE_SHARE = 0.05
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# JSON may escape lone UTF-16 surrogates ("\ud800"); such a string is not text and cannot even be written as UTF-8
_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    return _SURROGATE.search(text) is not None


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


@dataclass
class FileCheck:
    """What `sniff` found out about one file."""
    path: Path
    encoding: str            # the codec documents are decoded with (line by line: the codec of most of the sample)
    detected_by: str         # "given", "bom", "utf-8 (strict)", "scored"
    binary: str | None = None  # why the file is not text (None: it is)
    legacy: str | None = None  # "scored" files: the non-UTF-8 codec lines are decoded with when not UTF-8

    @property
    def per_line(self) -> bool:
        """Whether lines are decoded one by one (UTF-8 or `legacy`), not strictly in one codec."""
        return self.detected_by == "scored"


def _sample(path: Path) -> tuple[bytes, bool]:
    try:
        with _open_binary(path) as f:
            data = f.read(SNIFF_BYTES + 1)
    except (OSError, EOFError) as e:  # a .gz that is not gzip, truncated archives
        raise UserError(f"{path}: cannot be read ({e})") from None
    return data[:SNIFF_BYTES], len(data) <= SNIFF_BYTES


def binary_reason(sample: bytes, encoding: str) -> str | None:
    """Why these bytes are not text in `encoding` (None: they are)."""
    for magic, what in BINARY_MAGIC.items():
        if sample.startswith(magic):
            return f"starts like a {what}"
    if sample.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 (convert it to UTF-8 with iconv -f UTF-16 -t UTF-8)"
    if not sample:
        return None
    nul = sample.count(0) / len(sample)
    if nul > MAX_NUL_SHARE:
        return f"{100 * nul:.1f}% NUL bytes"
    text = sample.decode(encoding, errors="replace")
    if not text:
        return None
    bad = text.count("\ufffd") / len(text)
    if bad > MAX_UNDECODABLE_SHARE:
        return f"{100 * bad:.1f}% undecodable as {encoding}"
    ctrl = len(_CONTROL.findall(text)) / len(text)
    if ctrl > MAX_CONTROL_SHARE:
        return f"{100 * ctrl:.1f}% control characters"
    return None


def sniff(path: str | Path, encoding: str = "auto") -> FileCheck:
    """Encoding (detected from the first MiB unless given) and whether the file is binary/garbage."""
    from corpora.clean import detect_encoding

    path = Path(path)
    if encoding not in ENCODINGS:
        raise UserError(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    sample, whole = _sample(path)
    legacy = None
    if encoding == "auto":
        g = detect_encoding(sample, final=whole)
        enc, how = g.encoding, g.how
        if how == "scored":
            legacy = enc if enc != "utf-8" else max(_ENCODINGS[1:], key=lambda e: (g.scores.get(e, 0.0), e == "gb18030"))
    else:
        enc, how = encoding, "given"
    if not whole:  # a character cut at the sample's end is not garbage
        sample = sample[: max(0, len(sample) - 4)]
    why = binary_reason(sample, enc)
    if why and how == "given" and "undecodable" in why:
        # text in another encoding than the one given: strict decoding names the line, byte and the likely codec
        g = detect_encoding(sample, final=whole)
        if g.encoding != enc and binary_reason(sample, g.encoding) is None:
            why = None
    return FileCheck(path, enc, how, why, legacy)


@dataclass
class CorpusStats:
    """Filled while reading: files dropped and why, encodings used, documents and Chinese characters seen."""
    files: int = 0
    docs: int = 0
    chars: int = 0
    han_chars: int = 0
    encodings: dict = field(default_factory=dict)       # file -> encoding
    dropped_files: dict = field(default_factory=dict)   # reason -> [{"file", "why"}]
    warn: bool = True
    line_encodings: dict = field(default_factory=dict)  # file decoded line by line -> {codec: lines}
    undecodable: dict = field(default_factory=dict)     # file -> {"lines": dropped lines, "first_line", "bytes"}
    split_lines: int = 0  # lines a stage cut into pieces because they were overlong (vocab.spans.MAX_LINE_CHARS)

    def add_decoded(self, dec: "LineDecoder") -> None:
        """What one file's (or one range's) line decoder saw: codecs used and lines dropped."""
        if not dec.check.per_line:
            return
        name = str(dec.check.path)
        into = self.line_encodings.setdefault(name, {})
        for enc, n in dec.codecs.items():
            into[enc] = into.get(enc, 0) + n
        if dec.dropped:
            u = self.undecodable.setdefault(name, {"lines": 0, "first_line": dec.first_dropped, "bytes": 0})
            u["lines"] += dec.dropped
            u["bytes"] += dec.dropped_bytes
            if dec.first_dropped is not None and (u["first_line"] is None or dec.first_dropped < u["first_line"]):
                u["first_line"] = dec.first_dropped

    def drop(self, check: FileCheck) -> None:
        self.dropped_files.setdefault("binary", []).append({"file": str(check.path), "why": check.binary})
        if self.warn:
            print(f"warning: {check.path}: dropped as binary ({check.binary}); none of its text is used",
                  file=sys.stderr)

    def count(self, doc: str) -> None:
        self.docs += 1
        self.chars += len(doc)
        self.han_chars += len(_HAN.findall(doc))

    @property
    def han_share(self) -> float:
        return self.han_chars / self.chars if self.chars else 0.0

    def as_dict(self) -> dict:
        d = {"files": self.files, "docs": self.docs, "chars": self.chars, "han_chars": self.han_chars,
             "han_share": round(self.han_share, 4), "encodings": self.encodings, "dropped_files": self.dropped_files}
        # only when there is something to say: the statistics of clean corpora stay as they were
        mixed = {f: c for f, c in self.line_encodings.items() if len(c) > 1}
        if mixed:
            d["line_encodings"] = mixed
        if self.undecodable:
            d["undecodable_lines"] = self.undecodable
        if self.split_lines:
            d["split_lines"] = self.split_lines
        return d


# A line of a UTF-8 file (per line: its first MiB had bad bytes) decoded in the legacy codec must read as Chinese:
# of its Han characters (when it has at least this many) this share must be among the 500 most common. Measured on
# 6,000 Chinese lines: correctly decoded, the 1st percentile is 0.32; UTF-8 lines misread as GB18030, 95th is 0.06.
LEGACY_MIN_HAN = 8
LEGACY_MIN_COMMON_SHARE = 0.15
_CJKISH = re.compile(r"[　-〿㐀-䶿一-鿿豈-﫿＀-￯𠀀-𱍏]")


def _looks_chinese(text: str) -> bool:
    from corpora.clean import _COMMON

    han = _HAN.findall(text)
    return len(han) < LEGACY_MIN_HAN or sum(c in _COMMON for c in han) / len(han) >= LEGACY_MIN_COMMON_SHARE


class LineDecoder:
    """Decodes the raw lines of one file the way `sniff` says: strictly in one codec (a bad line is a UserError), or
    line by line for a file whose first MiB is not pure UTF-8 (see the module's docstring); `decode` then returns
    None for a line that neither codec decodes and counts it (dropped, dropped_bytes, first_dropped)."""

    def __init__(self, check: FileCheck):
        self.check = check
        self.codecs: dict[str, int] = {}
        self.dropped = 0
        self.dropped_bytes = 0
        self.first_dropped: int | None = None
        self.last: str | None = None  # the codec of the last line decoded line by line

    def decode(self, raw: bytes, lineno: int | None, offset: int) -> str | None:
        """The line without its ending; lineno None: unknown (a byte range of a file), offset: of the line's start."""
        chk = self.check
        if not chk.per_line:
            try:
                return raw.decode(chk.encoding).rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise UserError(_decode_error(chk.path, chk.encoding, raw, lineno, offset + e.start)) from None
        if raw.isascii():
            return raw.decode("ascii").rstrip("\r\n")
        text, enc = self._decode_mixed(raw)
        if text is None:
            self.dropped += 1
            self.dropped_bytes += len(raw)
            if self.first_dropped is None:
                self.first_dropped = lineno
            return None
        self.codecs[enc] = self.codecs.get(enc, 0) + 1
        self.last = enc
        return text.rstrip("\r\n")

    def _decode_mixed(self, raw: bytes) -> tuple[str | None, str | None]:
        legacy = self.check.legacy
        try:
            utf8 = raw.decode("utf-8")
        except UnicodeDecodeError:
            utf8 = None
        if utf8 is not None and (self.check.encoding == "utf-8" or _CJKISH.search(utf8)):
            return utf8, "utf-8"  # a mostly-UTF-8 file, or Chinese as UTF-8: the legacy reading is never better
        try:
            other = raw.decode(legacy)
        except UnicodeDecodeError:
            other = None
        if utf8 is not None:
            # GBK text that happens to be valid UTF-8 (a few short lines) reads as Latin/Cyrillic/Arabic letters
            if other is not None and all(c.isascii() or _CJKISH.match(c) for c in other):
                return other, legacy
            return utf8, "utf-8"
        if other is None:
            return None, None
        if self.check.encoding == "utf-8" and not _looks_chinese(other):
            return None, None  # a damaged UTF-8 line, not text in the legacy codec
        return other, legacy

    def report(self, stats: "CorpusStats | None") -> None:
        """Into stats (if any) and, for dropped lines, a warning on stderr (unless stats.warn is False)."""
        if stats is not None:
            stats.add_decoded(self)
        if self.dropped and (stats is None or stats.warn):
            where = f" (the first on line {self.first_dropped})" if self.first_dropped else ""
            print(f"warning: {self.check.path}: dropped {self.dropped} line(s), {self.dropped_bytes:,} bytes, that are "
                  f"neither UTF-8 nor {self.check.legacy.upper()}{where}", file=sys.stderr)


def _decode_error(path: Path, encoding: str, raw: bytes, lineno: int | None, where: int) -> str:
    guess = _guess_encoding(raw) if encoding == "utf-8" else None
    hint = (
        f" It looks like {guess.upper()}: convert it with `iconv -f {guess.upper()} -t UTF-8 {path} > out.txt` "
        f"or pass --encoding {guess}."
        if guess
        else " Clean it with `python -m corpora prepare` or pass the right --encoding."
    )
    line = f"line {lineno}, " if lineno is not None else ""
    return f"{path}: {line}byte offset {where}: not valid {encoding}.{hint}"


def _decode_lines(path: Path, encoding: str | LineDecoder) -> Iterator[str]:
    """Yield decoded lines (a line the decoder drops is skipped); strict decoding raises a UserError naming the
    line, byte offset and a fix."""
    dec = encoding if isinstance(encoding, LineDecoder) else LineDecoder(FileCheck(path, encoding, "given"))
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = dec.decode(raw, lineno, offset)
            offset += len(raw)
            if line is not None:
                yield line


def iter_range_lines(path: str | Path, encoding: str, start: int, end: int | None,
                     stats: CorpusStats | None = None, check: FileCheck | None = None) -> Iterator[tuple[int, str]]:
    """(byte offset, line) of the lines that start in [start, end) of an uncompressed file (zhllama.units ranges),
    decoded like iter_documents: strictly (zhllama.units.decode_lines, its messages), or line by line for a file
    `sniff` scored, with dropped lines counted into stats and warned about."""
    from zhllama.units import decode_lines, range_lines

    path = Path(path)
    check = check or sniff(path, encoding)
    if not check.per_line:
        yield from decode_lines(path, check.encoding, start, end)
        return
    dec = LineDecoder(check)
    with open(path, "rb") as f:
        for pos, raw in range_lines(f, start, end):
            line = dec.decode(raw, None, pos)
            if line is not None:
                yield pos, line
    dec.report(stats)


def iter_documents(path: str | Path, encoding: str = "auto", field: str = "text",
                   stats: CorpusStats | None = None) -> Iterator[str]:
    """Documents of one file: a non-empty line of .txt, or `field` of each .jsonl/.json record.

    The file is sniffed first (encoding, binary); a binary file yields nothing and is recorded in `stats`.
    """
    path = Path(path)
    check = sniff(path, encoding)
    if stats is not None:
        stats.files += 1
        stats.encodings[str(path)] = check.encoding
    if check.binary:
        if stats is None:
            stats = CorpusStats()
        stats.drop(check)
        return
    dec = LineDecoder(check)
    for doc in _documents(path, dec, field):
        if stats is not None:
            stats.count(doc)
        yield doc
    dec.report(stats)


def _documents(path: Path, encoding: "str | LineDecoder", field: str) -> Iterator[str]:
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
            if has_lone_surrogate(rec[field]):
                raise UserError(f"{path}: line {lineno}: field {field!r} holds a lone surrogate escape (\\ud800-\\udfff), "
                                "which is not Unicode text")
            if rec[field].strip():
                yield rec[field]
    elif name.endswith(".json"):
        text = "\n".join(_decode_lines(path, encoding))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise UserError(f"{path}: JSON nested too deeply") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of records with a {field!r} field")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UserError(f"{path}: record {i}: expected an object with a string field {field!r}")
            if has_lone_surrogate(rec[field]):
                raise UserError(f"{path}: record {i}: field {field!r} holds a lone surrogate escape (\\ud800-\\udfff), "
                                "which is not Unicode text")
            if rec[field].strip():
                yield rec[field]
    else:
        for line in _decode_lines(path, encoding):
            if line.strip():
                yield line


def iter_corpus(paths: Iterable[str | Path], encoding: str = "auto", field: str = "text",
                stats: CorpusStats | None = None) -> Iterator[str]:
    for f in list_corpus_files(paths):
        yield from iter_documents(f, encoding=encoding, field=field, stats=stats)


def corpus_profile(paths: Iterable[str | Path], encoding: str = "auto", sample_docs: int = 2000) -> CorpusStats:
    """A quick look at a corpus before a long job: the first `sample_docs` documents of every file."""
    stats = CorpusStats(warn=False)
    for f in list_corpus_files(paths):
        for n, _ in enumerate(iter_documents(f, encoding=encoding, stats=stats), 1):
            if n >= sample_docs:
                break
    return stats
