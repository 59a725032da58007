"""`corpora prepare`: raw Chinese text in any common shape -> clean, deduplicated, sharded JSONL.gz.

Three passes, all streaming, with memory that does not grow with the corpus, the first and last in
`num_proc` worker processes (0: all cores). The work is cut into units that do not depend on num_proc:
one per input, except that uncompressed .txt/.jsonl inputs larger than UNIT_BYTES are cut into
line-aligned byte ranges of that size, so one big file keeps every core busy too.

1. clean, per unit: detect the encoding, decode, normalise, filter, split over-long documents; write the
   kept pieces to OUT/.work/units/<uid>.jsonl.gz and their dedup keys (blake2b-128 of the text, and with
   --dedup near the MinHash-LSH band keys) as sorted runs <uid>.{exact,near}.<r>.npy (corpora.dedup),
   then <uid>.stats.json, the "this unit is finished" marker: it records the input's size, mtime, the
   byte range and the options, so a changed input or option redoes that unit.
2. dedup, one key range at a time (corpora.dedup.find_duplicates, ranges spread over the processes): a
   piece whose key an earlier piece in input order has is a duplicate, so the first occurrence wins;
   the result is one bit per piece in OUT/.work/dedup/{exact,near}.npy.
3. shards, per unit: a content-hash held-out split and shards
   OUT/{train,heldout}/shard-<unit>-<n>.jsonl.gz of at most --shard-docs documents (names sort in input
   order). Each shard is written to a temp file and renamed, gzip without timestamp or name, so shards
   are byte-identical for any num_proc and however often the run was interrupted; finished units
   (OUT/.work/shards/<uid>.json) and finished shards are not redone.

OUT/.work is removed when the run succeeds (the run folder's recorded fingerprint then says what it was made
from, so an unchanged rerun does nothing); after a failure or kill it stays and the rerun continues from it.

Load the result with `datasets.load_dataset("json", data_files={"train": "OUT/train/*.jsonl.gz",
"heldout": "OUT/heldout/*.jsonl.gz"}, streaming=True)`; every record is {"text": ...}.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from zhllama.errors import UserError
from zhllama.manifest import write_json
from zhllama.procs import is_zombie, pid_alive
from zhllama.recipe import CorporaConfig, problems
from zhllama.units import Unit as WorkUnit, plan_units as plan_work_units, range_lines

from . import clean, dedup
from .reader import list_corpus_files, sniff

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
REASONS = ("empty", "malformed_json", "missing_field", "too_short", "low_cjk_ratio", "exact_duplicate",
           "near_duplicate")
SAMPLE_BYTES = 1 << 20
META = struct.Struct("<QI")  # per piece in <uid>.meta: held-out hash value (dedup.heldout_value), characters
UNIT_BYTES = 32 << 20  # uncompressed .txt/.jsonl inputs are cut into line-aligned work units of this size
FORMAT_VERSION = 5  # bump when pass 1's output changes meaning, so old work folders are redone


@dataclass
class PrepareConfig(CorporaConfig):
    """The `corpora:` recipe section (zhllama.recipe.CorporaConfig, where every field is documented)."""

    def validate(self) -> None:
        found = problems(self)
        if found:
            raise UserError("\n".join(f"corpora.{p}" for p in found))

    def pass1_options(self) -> dict:
        """The options that change pass 1's output (the rest only affect pass 2)."""
        return {"encoding": self.encoding, "field": self.field, "fullwidth_ascii": self.fullwidth_ascii,
                "min_chars": self.min_chars, "min_cjk_ratio": self.min_cjk_ratio, "max_chars": self.max_chars,
                "near_threshold": self.near_threshold if self.dedup == "near" else None, "format": FORMAT_VERSION}

    def public(self) -> dict:
        d = asdict(self)
        d.pop("num_proc")  # does not change the output; keeps stats.json identical across machines
        return d


def _names(files, n: int = 3) -> str:
    """The first n file names of a list, and how many more."""
    files = [str(f) for f in files]
    return ", ".join(files[:n]) + (f" (and {len(files) - n} more)" if len(files) > n else "")


def _num_proc(cfg: PrepareConfig) -> int:
    return cfg.num_proc or os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- inputs

def _kind(path: Path) -> str:
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


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _sample(path: Path) -> tuple[bytes, bool]:
    with _open(path) as f:
        data = f.read(SAMPLE_BYTES + 1)
    return data[:SAMPLE_BYTES], len(data) <= SAMPLE_BYTES


class _RepairingDecoder:
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


def _raw_docs(path: Path, kind: str, enc: str, fld: str, start: int = 0, end: int | None = None,
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
        with _open(path) as f:
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
    with _open(path) as f:
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


# ---------------------------------------------------------------------------------------------- pass 1

def _counts() -> dict:
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
    dropped: dict = field(default_factory=lambda: {r: _counts() for r in REASONS})
    examples: dict = field(default_factory=dict)  # reason -> first few locations ("line 12")
    split: dict = field(default_factory=lambda: {"docs": 0, "pieces": 0})
    normalisation: dict = field(default_factory=dict)
    pieces_out: int = 0      # pieces written by pass 1 (before dedup)
    docs_kept: int = 0
    chars_kept: int = 0
    train: dict = field(default_factory=_counts)
    heldout: dict = field(default_factory=_counts)
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


def _file_id(path: Path) -> str:
    return hashlib.blake2b(str(path.resolve()).encode(), digest_size=8).hexdigest()


def _fingerprint(path: Path, cfg: PrepareConfig) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "options": cfg.pass1_options()}


def _tmp(path: Path) -> Path:
    # per-process name: an orphaned worker of a killed run may still be writing the same file
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _remove_stale_tmp(folder: Path) -> None:
    """Temp files left by a killed run; those of a process still alive (an orphaned worker) are left to it."""
    for f in folder.glob("*.tmp"):
        try:
            pid = int(f.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        # a killed worker whose parent died too stays a zombie where nothing reaps orphans (containers)
        if pid == os.getpid() or not pid_alive(pid) or is_zombie(pid):
            f.unlink(missing_ok=True)


def _gzip_writer(path: Path, level: int):
    # no name and mtime 0 in the gzip header: identical content gives identical bytes
    raw = open(path, "wb")
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level)
    return raw, gz


def _write_json_atomic(path: Path, obj) -> None:
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _read_marker(path: Path, fp) -> dict | None:
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return done if done.get("fingerprint") == fp else None


@dataclass(frozen=True)
class Unit(WorkUnit):
    """A zhllama.units.Unit (fixed cuts: a whole input, or the lines that start in a byte range of a large
    uncompressed .txt/.jsonl) named by its input's identity and its part."""

    @property
    def uid(self) -> str:
        return f"{_file_id(Path(self.path))}-{self.part:05d}"


def plan_units(files: list[Path]) -> list[Unit]:
    return [Unit(**asdict(u)) for u in plan_work_units(files, UNIT_BYTES, splittable=_splittable)]


def _splittable(path: Path) -> bool:
    return _kind(path) in ("txt", "jsonl") and not path.name.lower().endswith(".gz")


def clean_unit(unit: Unit, cfg: PrepareConfig, work: Path) -> dict:
    """Pass 1 for one unit; returns its stats (also written to work/<uid>.stats.json as the done marker)."""
    path = Path(unit.path)
    out, stats_path = work / f"{unit.uid}.jsonl.gz", work / f"{unit.uid}.stats.json"
    fp = _fingerprint(path, cfg) | {"start": unit.start, "end": unit.end}
    done = _read_marker(stats_path, fp)
    if done and out.is_file() and (work / f"{unit.uid}.meta").is_file() and all((work / r).is_file() for r in done["runs"]["exact"] + done["runs"]["near"]):
        return done
    kind = _kind(path)
    st = FileStats()
    check = None
    if kind == "parquet":
        st.encoding, st.encoding_detected_by = "utf-8", "parquet"
    else:
        # the same detection and binary check as every other stage's reader (on the file's start, for every unit)
        check = sniff(path, cfg.encoding)
        st.encoding, st.encoding_detected_by = check.encoding, check.detected_by
        if check.detected_by == "scored" and unit.part == 0:
            sample, whole = _sample(path)
            st.encoding_scores = clean.detect_encoding(sample, final=whole).scores
        if check.binary:
            st.dropped_file = {"reason": "binary", "why": check.binary}
    fixes = clean.Fixes()
    near = cfg.dedup == "near"
    exact_keys = dedup.KeyWriter(work / f"{unit.uid}.exact")
    near_keys = dedup.KeyWriter(work / f"{unit.uid}.near") if near else None
    lines = [0]
    tmp, meta_path = _tmp(out), work / f"{unit.uid}.meta"
    meta_tmp = _tmp(meta_path)
    raw, gz = _gzip_writer(tmp, 1)
    meta = open(meta_tmp, "wb")
    try:
        w = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
        decode = _RepairingDecoder(check, cfg.encoding == "auto") if kind in ("txt", "jsonl") else None
        docs = (_raw_docs(path, kind, st.encoding, cfg.field, unit.start, unit.end, lines, decode)
                if not st.dropped_file else ())
        for text, bad, where in docs:
            st.docs_in += 1
            st.chars_in += len(text)
            if bad:
                st.drop(bad, len(text), where)
                continue
            text = clean.normalize(text, cfg.fullwidth_ascii, fixes)
            reason = clean.drop_reason(text, cfg.min_chars, cfg.min_cjk_ratio)
            if reason:
                st.drop(reason, len(text), where)
                continue
            # the held-out split follows the whole document, so pieces of one document never straddle it
            doc_key = dedup.text_key(text)
            bucket = dedup.heldout_value(doc_key)
            pieces = clean.split_long(text, cfg.max_chars)
            if len(pieces) > 1:
                st.split["docs"] += 1
                st.split["pieces"] += len(pieces)
            for piece in pieces:
                # the shard line as it will be written, so the shard pass only copies bytes
                w.write(json.dumps({"text": piece}, ensure_ascii=False) + "\n")
                meta.write(META.pack(bucket, len(piece)))
                exact_keys.add(doc_key if len(pieces) == 1 else dedup.text_key(piece), st.pieces_out)
                if near_keys is not None:
                    for bk in dedup.band_keys(dedup.signature(piece), cfg.near_threshold):
                        near_keys.add(bk, st.pieces_out)
                st.pieces_out += 1
        w.flush()
        w.detach()
    finally:
        gz.close()
        raw.close()
        meta.close()
    meta_tmp.replace(meta_path)
    tmp.replace(out)
    runs = {"exact": exact_keys.close(), "near": near_keys.close() if near_keys else []}
    st.empty_file = st.docs_in == 0
    st.normalisation = fixes.as_dict()
    if decode is not None:
        if check.per_line or set(decode.codecs) - {st.encoding}:
            st.line_encodings = decode.codecs
        st.lines_with_bad_bytes = decode.repaired
    stats_d = asdict(st)
    for k in ("line_encodings", "lines_with_bad_bytes"):
        if not stats_d[k]:
            del stats_d[k]
    result = {"fingerprint": fp, "stats": stats_d, "lines": lines[0], "runs": runs,
              "rows": {"exact": exact_keys.rows, "near": near_keys.rows if near_keys else 0}}
    _write_json_atomic(stats_path, result)
    return result


def _run_jobs(fn, jobs: list, num_proc: int, bar) -> list:
    """fn over jobs, in num_proc forked processes when more than one; results in job order."""
    results: list = [None] * len(jobs)
    n = min(num_proc, len(jobs))
    if n > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(n) as pool:
            for i, res in pool.imap_unordered(_indexed, [(fn, i, j) for i, j in enumerate(jobs)]):
                results[i] = res
                bar.update(1)
    else:
        for i, j in enumerate(jobs):
            results[i] = fn(j)
            bar.update(1)
    return results


def _indexed(args):
    fn, i, job = args
    return i, fn(job)


def _per_unit(fn, units: list[Unit], jobs: list, desc: str, num_proc: int, progress: bool) -> list:
    """fn over one job per unit (in parallel) with a progress bar; results in unit order."""
    from tqdm import tqdm

    # big units first: the pool then ends with small ones and every core stays busy to the end
    order = sorted(range(len(units)), key=lambda i: -units[i].size())
    with tqdm(total=len(jobs), desc=desc, unit="part", disable=not progress or None) as bar:
        res = _run_jobs(fn, [jobs[i] for i in order], num_proc, bar)
    results: list = [None] * len(units)
    for k, i in enumerate(order):
        results[i] = res[k]
    return results


def _pass1(units: list[Unit], cfg: PrepareConfig, work: Path, progress: bool) -> list[dict]:
    """Clean every unit (in parallel); finished ones return their stored stats at once."""
    return _per_unit(_clean_job, units, [(u, cfg, work) for u in units], "clean", _num_proc(cfg), progress)


def _clean_job(args) -> dict:
    return clean_unit(*args)


# ---------------------------------------------------------------------------------------------- dedup

def _dedup_job(args) -> tuple[str, np.ndarray]:
    kind, runs, lo, hi = args
    return kind, dedup.find_duplicates(runs, lo, hi)


def _dedup(units: list[Unit], results: list[dict], cfg: PrepareConfig, work: Path, progress: bool) -> Path:
    """Duplicate bits for every piece (global positions in input order): work/dedup/{exact,near}.npy."""
    from tqdm import tqdm

    folder = work.parent / "dedup"
    folder.mkdir(exist_ok=True)
    _remove_stale_tmp(folder)
    fp = {"units": [r["fingerprint"] for r in results], "dedup": cfg.dedup, "near_threshold": cfg.near_threshold}
    kinds = ("exact", "near") if cfg.dedup == "near" else ("exact",)
    if _read_marker(folder / "done.json", fp) and all((folder / f"{k}.npy").is_file() for k in kinds):
        return folder
    bases = _bases(results)
    total = bases[-1]
    jobs = []
    for kind in kinds:
        runs = [(str(work / name), bases[i]) for i, r in enumerate(results) for name in r["runs"][kind]]
        for lo, hi in dedup.group_bounds(sum(r["rows"][kind] for r in results)):
            jobs.append((kind, runs, lo, hi))
    bits = {k: np.zeros((total + 7) // 8, dtype=np.uint8) for k in kinds}
    bar = tqdm(total=len(jobs), desc="dedup", unit="range", disable=not progress or None)
    n = min(_num_proc(cfg), len(jobs))
    if n > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(n) as pool:
            for kind, pos in pool.imap_unordered(_dedup_job, jobs):
                dedup.set_bits(bits[kind], pos)
                bar.update(1)
    else:
        for job in jobs:
            kind, pos = _dedup_job(job)
            dedup.set_bits(bits[kind], pos)
            bar.update(1)
    bar.close()
    for k in kinds:
        dedup.save_atomic(folder / f"{k}.npy", bits[k])
    _write_json_atomic(folder / "done.json", {"fingerprint": fp})
    return folder


def _bases(results: list[dict]) -> list[int]:
    """Global position of each unit's first piece (and the total at the end)."""
    out = [0]
    for r in results:
        out.append(out[-1] + r["stats"]["pieces_out"])
    return out


# ---------------------------------------------------------------------------------------------- shards

class ShardWriter:
    """Fixed-size shards written atomically; a shard that already exists is consumed, not rewritten."""

    def __init__(self, folder: Path, per_shard: int, prefix: str = "shard-"):
        self.folder, self.per_shard, self.prefix = folder, per_shard, prefix
        folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count = 0, 0
        self.names: list[str] = []
        self.skipped = 0
        self._open: tuple | None = None

    def _path(self) -> Path:
        return self.folder / f"{self.prefix}{self.index:05d}.jsonl.gz"

    def write(self, line: bytes) -> None:
        """One JSON line ({"text": ...}\\n, UTF-8)."""
        if self.count == 0:
            final = self._path()
            if final.is_file():
                self._open = None
                self.skipped += 1
            else:
                tmp = _tmp(final)
                raw, gz = _gzip_writer(tmp, 6)
                self._open = (raw, gz, tmp, final, io.BufferedWriter(gz, 1 << 20))
        if self._open:
            self._open[4].write(line)
        self.count += 1
        if self.count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._open:
            raw, gz, tmp, final, buf = self._open
            buf.flush()
            buf.detach()
            gz.close()
            raw.flush()
            os.fsync(raw.fileno())
            raw.close()
            tmp.replace(final)
        self.names.append(self._path().name)
        self._open = None
        self.index += 1
        self.count = 0

    def close(self) -> None:
        if self.count:
            self._finish()


def _iter_cleaned(path: Path, meta: Path) -> Iterator[tuple[bytes, int, int]]:
    """(shard line, held-out hash value, characters) of each piece of a unit, in order."""
    with gzip.open(path, "rb") as f, open(meta, "rb") as m:
        while True:
            chunk = m.read(META.size * 65536)
            if not chunk:
                break
            for value, chars in META.iter_unpack(chunk):
                yield f.readline(), value, chars


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, bool) or not isinstance(v, (int, dict)):
            continue
        if isinstance(v, dict):
            _add(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def shard_unit(job) -> dict:
    """Pass 3 for one unit: its kept pieces into OUT/{train,heldout}/shard-<unit>-<n>.jsonl.gz, and what it dropped."""
    ordinal, uid, base, piece_base, fp, cfg, out, work = job
    marker = work.parent / "shards" / f"{uid}.json"
    done = _read_marker(marker, fp)
    if done:
        return done
    folder = work.parent / "dedup"
    exact = np.load(folder / "exact.npy", mmap_mode="r")
    near = np.load(folder / "near.npy", mmap_mode="r") if cfg.dedup == "near" else None
    writers = {s: ShardWriter(out / s, cfg.shard_docs, f"shard-{ordinal:05d}-") for s in ("train", "heldout")}
    st = {"dropped": {r: _counts() for r in ("exact_duplicate", "near_duplicate")}, "examples": {},
          "train": _counts(), "heldout": _counts(), "docs_kept": 0, "chars_kept": 0}
    cut = dedup.heldout_cut(cfg.heldout_fraction)
    for n, (line, value, chars) in enumerate(_iter_cleaned(work / f"{uid}.jsonl.gz", work / f"{uid}.meta")):
        g = base + n
        if dedup.get_bit(exact, g):
            reason = "exact_duplicate"
        elif near is not None and dedup.get_bit(near, g):
            reason = "near_duplicate"
        else:
            reason = None
        if reason:
            st["dropped"][reason]["docs"] += 1
            st["dropped"][reason]["chars"] += chars
            ex = st["examples"].setdefault(reason, [])
            if len(ex) < 3:
                ex.append(f"piece {piece_base + n}")
        else:
            split = "heldout" if value < cut else "train"
            writers[split].write(line)
            st[split]["docs"] += 1
            st[split]["chars"] += chars
            st["docs_kept"] += 1
            st["chars_kept"] += chars
    for w in writers.values():
        w.close()
    result = {"fingerprint": fp, "stats": st, "names": {s: w.names for s, w in writers.items()},
              "skipped": sum(w.skipped for w in writers.values())}
    _write_json_atomic(marker, result)
    return result


def _merge_file(units: list[Unit], res1: list[dict], res3: list[dict]) -> dict:
    """Stats of one input from its units' pass-1 and pass-3 results (examples renumbered to the whole file)."""
    st = json.loads(json.dumps(res1[0]["stats"]))
    examples = {r: list(v) for r, v in st["examples"].items()}
    line_offset = res1[0]["lines"]
    for r1 in res1[1:]:
        part = {k: v for k, v in r1["stats"].items() if k not in ("encoding_scores", "dropped_file", "examples")}
        _add(st, part)
        for reason, where in r1["stats"]["examples"].items():
            ex = examples.setdefault(reason, [])
            for w in where:
                if len(ex) < 3:
                    kind, _, num = w.partition(" ")
                    ex.append(f"{kind} {int(num) + line_offset}")
        line_offset += r1["lines"]
    for r3 in res3:
        _add(st, r3["stats"])
        for reason, where in r3["stats"]["examples"].items():
            ex = examples.setdefault(reason, [])
            ex.extend(where[:3 - len(ex)])
    st["empty_file"] = st["docs_in"] == 0
    st["examples"] = {r: examples[r] for r in REASONS if r in examples}
    return st


def _pass3(files, units: list[Unit], results: list[dict], cfg: PrepareConfig, out: Path, work: Path,
           progress: bool):
    """Shards of every unit (in parallel), then the per-file stats; returns (per-file stats, shard names, skipped)."""
    (work.parent / "shards").mkdir(exist_ok=True)
    _remove_stale_tmp(work.parent / "shards")
    bases = _bases(results)
    piece_base, jobs = {}, []
    for i, (u, r) in enumerate(zip(units, results)):
        pb = piece_base.get(u.file_index, 0)
        piece_base[u.file_index] = pb + r["stats"]["pieces_out"]
        fp = {"unit": r["fingerprint"], "config": cfg.public(), "base": bases[i], "ordinal": i}
        jobs.append((i, u.uid, bases[i], pb, fp, cfg, out, work))
    res3 = _per_unit(shard_unit, units, jobs, "shards", _num_proc(cfg), progress)
    per_file: dict[str, dict] = {}
    by_file: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        by_file.setdefault(u.file_index, []).append(i)
    for fi, f in enumerate(files):
        idx = by_file[fi]
        per_file[str(f)] = _merge_file([units[i] for i in idx], [results[i] for i in idx], [res3[i] for i in idx])
    names = {s: [n for r in res3 for n in r["names"][s]] for s in ("train", "heldout")}
    return per_file, names, sum(r["skipped"] for r in res3)


def _totals(per_file: dict) -> dict:
    total: dict = {}
    for st in per_file.values():
        _add(total, st)
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


def _log_summary(total: dict, per_file: dict, names: dict, skipped: int, out: Path, log) -> None:
    dropped = {r: v["docs"] for r, v in total["dropped"].items() if v["docs"]}
    log(f"{total['docs_in']:,} documents in, {total['docs_kept']:,} kept ({total['train']['docs']:,} train, "
        f"{total['heldout']['docs']:,} held out), dropped: {dropped or 'none'}; "
        f"{len(names['train'])} + {len(names['heldout'])} shards in {out}"
        + (f" ({skipped} already finished)" if skipped else ""))
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


def prepare(inputs, out_dir, cfg: PrepareConfig | None = None, progress: bool = True, log=print) -> dict:
    """Run the passes into out_dir (a zhllama.runfolder run folder: locked while it runs, result.json and
    manifest.json when finished); returns the stats written to out_dir/stats.json."""
    from zhllama import runfolder

    cfg = cfg or PrepareConfig()
    cfg.validate()
    files = list_inputs(inputs)
    out = Path(out_dir)
    work = out / ".work" / "units"
    with runfolder.lock(out, log=lambda m: log(m)):
        # a finished run keeps no work folder (1x the corpus): its recorded fingerprint says it is up to date
        plan = {"files": [_fingerprint(f, cfg) for f in files], "config": cfg.public()}
        if (out / "stats.json").is_file() and runfolder.decide(out, plan, "auto", log=lambda m: None,
                                                               partial=True) == "up-to-date":
            log(f"{out} is up to date with its inputs and options; nothing to do")
            return json.loads((out / "stats.json").read_text(encoding="utf-8"))
        work.mkdir(parents=True, exist_ok=True)
        for d in (work, out / "train", out / "heldout"):
            _remove_stale_tmp(d)
        units = plan_units(files)
        t0 = time.time()
        results = _pass1(units, cfg, work, progress)
        took = {"clean": time.time() - t0}
        if not any(r["stats"]["docs_in"] for r in results):
            # nothing to shard: an output of 0 documents with exit 0 would only fail a later stage
            shutil.rmtree(out / ".work", ignore_errors=True)
            binary = [str(u.path) for u, r in zip(units, results) if r["stats"].get("dropped_file")]
            raise UserError(f"{_names(files)}: no text in any input: every file is empty or holds only whitespace"
                            + (f" ({len(binary)} dropped as binary)" if binary else "") + "; nothing was written to "
                            f"{out}. Point the inputs at your text")
        # shards state: if the inputs or options differ from the run that wrote the shards, start over
        partial = any((out / d).is_dir() for d in ("train", "heldout")) or (out / "stats.json").is_file()
        if runfolder.decide(out, plan, "auto", log=log, partial=partial) == "start-over":
            for d in ("train", "heldout"):
                shutil.rmtree(out / d, ignore_errors=True)
            shutil.rmtree(out / ".work" / "shards", ignore_errors=True)
            (out / "stats.json").unlink(missing_ok=True)
        runfolder.begin(out, {"stage": "corpora.prepare", "config": cfg.public()}, plan)
        t0 = time.time()
        _dedup(units, results, cfg, work, progress)
        took["dedup"] = time.time() - t0
        t0 = time.time()
        per_file, names, skipped = _pass3(files, units, results, cfg, out, work, progress)
        took["shards"] = time.time() - t0
        for d in ("train", "heldout"):
            _remove_stale_tmp(out / d)  # again: a worker of a killed run may have been dying when this run began
        total = _totals(per_file)
        stats = {
            "accounting": ("documents are counted as read; a document longer than max_chars is split into pieces "
                           "(split.docs -> split.pieces) and counted as pieces from there on (dedup, kept): "
                           "docs_in - split.docs + split.pieces == docs_kept + sum(dropped.docs); characters: "
                           "chars_in - normalisation.chars_removed == chars_kept + sum(dropped.chars)"),
            "config": cfg.public(),
            "dedup_library": ("datasketch MinHash (character 5-grams), LSH bands deduplicated on disk by key range"
                              if cfg.dedup == "near" else "exact (blake2b-128 keys, deduplicated on disk by key range)"),
            "shards": names,
            "total": total,
            "files": per_file,
        }
        write_json(out / "stats.json", stats)
        inputs_m = {"raw": [runfolder.input_entry(f) for f in files]}
        runfolder.finish(out, "corpora.prepare", {k: total[k] for k in ("docs_in", "docs_kept", "chars_kept") if k in total}
                         | {"shards": {k: len(v) for k, v in names.items()}}, inputs_m,
                         runfolder.parents_of(files), seed=None, fingerprint=plan)
        # success: the work folder goes; after a failure or kill it stays and the rerun continues from it
        shutil.rmtree(out / ".work", ignore_errors=True)
        _log_summary(total, per_file, names, skipped, out, log)
        log(f"{len(units)} work units, {_num_proc(cfg)} processes; seconds: "
            + ", ".join(f"{k} {v:.1f}" for k, v in took.items()))
        return stats
