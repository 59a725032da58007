"""`corpora prepare`: raw Chinese text in any common shape -> clean, deduplicated, sharded JSONL.gz.

Two passes, both streaming:

1. per input file, in parallel worker processes: detect the encoding, decode, normalise, filter, split
   over-long documents, and write the kept documents to OUT/.work/files/<id>.jsonl.gz with a
   <id>.stats.json beside it. The stats file is written last and is the "this input is finished" marker;
   it records the input's size, mtime and the options, so a changed input or option redoes that file.
2. one process, files in input order: exact (and with --dedup near, MinHash LSH) dedup, a content-hash
   held-out split, and shards OUT/{train,heldout}/shard-NNNNN.jsonl.gz of --shard-docs documents.
   Each shard is written to a temp file and renamed, gzip without timestamp or name, so shards are
   byte-identical however often the run was interrupted; a rerun re-reads pass 1's output (to rebuild
   the dedup state) but does not rewrite finished shards.

OUT/.work is removed when the run succeeds (the run folder's recorded fingerprint then says what it was made
from, so an unchanged rerun does nothing); after a failure or kill it stays and the rerun continues from it.

Load the result with `datasets.load_dataset("json", data_files={"train": "OUT/train/*.jsonl.gz",
"heldout": "OUT/heldout/*.jsonl.gz"}, streaming=True)`; every record is {"text": ...}.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from zhllama.errors import UserError
from zhllama.manifest import write_json

from . import clean, dedup
from .reader import list_corpus_files, sniff

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
REASONS = ("empty", "malformed_json", "missing_field", "too_short", "low_cjk_ratio", "exact_duplicate",
           "near_duplicate")
SAMPLE_BYTES = 1 << 20
FORMAT_VERSION = 2  # bump when pass 1's output changes meaning, so old work folders are redone


@dataclass
class PrepareConfig:
    heldout_fraction: float = 0.01
    min_chars: int = 10
    min_cjk_ratio: float = 0.3
    dedup: str = "exact"
    near_threshold: float = 0.8
    encoding: str = "auto"
    field: str = "text"
    fullwidth_ascii: bool = False
    max_chars: int = 100_000
    shard_docs: int = 100_000
    workers: int = 0  # 0: all CPU cores

    def validate(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0.0 <= self.min_cjk_ratio <= 1.0:
            raise UserError(f"--min-cjk-ratio must be in [0, 1], got {self.min_cjk_ratio}")
        if self.dedup not in ("exact", "near"):
            raise UserError(f"--dedup must be exact or near, got {self.dedup!r}")
        if self.encoding not in ("auto", "utf-8", "gb18030", "big5"):
            raise UserError(f"--encoding must be auto, utf-8, gb18030 or big5, got {self.encoding!r}")
        if self.min_chars < 0 or self.max_chars < 1 or self.shard_docs < 1:
            raise UserError("--min-chars must be >= 0, --max-chars and --shard-docs >= 1")
        if not 0.0 < self.near_threshold <= 1.0:
            raise UserError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")

    def pass1_options(self) -> dict:
        """The options that change pass 1's output (the rest only affect pass 2)."""
        return {"encoding": self.encoding, "field": self.field, "fullwidth_ascii": self.fullwidth_ascii,
                "min_chars": self.min_chars, "min_cjk_ratio": self.min_cjk_ratio, "max_chars": self.max_chars,
                "signatures": self.dedup == "near", "format": FORMAT_VERSION}

    def public(self) -> dict:
        d = asdict(self)
        d.pop("workers")  # does not change the output; keeps stats.json identical across machines
        return d


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


def _raw_docs(path: Path, kind: str, enc: str, fld: str) -> Iterator[tuple[str | None, str | None, str]]:
    """(text, None, where) for each document, or (raw, reason, where) for a record that is unusable."""
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
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode(enc, errors="replace")  # bad bytes become U+FFFD, removed and counted by normalize
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
            if pid != os.getpid():
                os.kill(pid, 0)
                continue
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        f.unlink(missing_ok=True)


def _gzip_writer(path: Path, level: int):
    # no name and mtime 0 in the gzip header: identical content gives identical bytes
    raw = open(path, "wb")
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level)
    return raw, gz


def clean_file(path: Path, cfg: PrepareConfig, work: Path) -> dict:
    """Pass 1 for one input; returns its stats (also written to work/<id>.stats.json as the done marker)."""
    fid = _file_id(path)
    out, stats_path = work / f"{fid}.jsonl.gz", work / f"{fid}.stats.json"
    fp = _fingerprint(path, cfg)
    if stats_path.is_file():
        try:
            done = json.loads(stats_path.read_text(encoding="utf-8"))
            if done.get("fingerprint") == fp and out.is_file():
                return done
        except (OSError, json.JSONDecodeError):
            pass
    kind = _kind(path)
    st = FileStats()
    if kind == "parquet":
        st.encoding, st.encoding_detected_by = "utf-8", "parquet"
    else:
        # the same detection and binary check as every other stage's reader
        check = sniff(path, cfg.encoding)
        st.encoding, st.encoding_detected_by = check.encoding, check.detected_by
        if check.detected_by == "scored":
            sample, whole = _sample(path)
            st.encoding_scores = clean.detect_encoding(sample, final=whole).scores
        if check.binary:
            st.dropped_file = {"reason": "binary", "why": check.binary}
    fixes = clean.Fixes()
    near = cfg.dedup == "near"
    tmp = _tmp(out)
    raw, gz = _gzip_writer(tmp, 1)
    try:
        w = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
        docs = _raw_docs(path, kind, st.encoding, cfg.field) if not st.dropped_file else ()
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
            key = dedup.text_key(text).hex()
            pieces = clean.split_long(text, cfg.max_chars)
            if len(pieces) > 1:
                st.split["docs"] += 1
                st.split["pieces"] += len(pieces)
            for piece in pieces:
                rec = {"t": piece, "k": key}
                if near:
                    rec["s"] = base64.b64encode(dedup.signature(piece)).decode("ascii")
                w.write(json.dumps(rec, ensure_ascii=False) + "\n")
                st.pieces_out += 1
        w.flush()
        w.detach()
    finally:
        gz.close()
        raw.close()
    tmp.replace(out)
    st.empty_file = st.docs_in == 0
    st.normalisation = fixes.as_dict()
    result = {"fingerprint": fp, "stats": asdict(st)}
    tmp_stats = _tmp(stats_path)
    tmp_stats.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp_stats.replace(stats_path)
    return result


def _clean_job(args) -> tuple[int, dict]:
    i, path, cfg, work = args
    return i, clean_file(path, cfg, work)


# ---------------------------------------------------------------------------------------------- pass 2

class ShardWriter:
    """Fixed-size shards written atomically; a shard that already exists is consumed, not rewritten."""

    def __init__(self, folder: Path, per_shard: int):
        self.folder, self.per_shard = folder, per_shard
        folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count = 0, 0
        self.names: list[str] = []
        self.skipped = 0
        self._open: tuple | None = None

    def _path(self) -> Path:
        return self.folder / f"shard-{self.index:05d}.jsonl.gz"

    def write(self, text: str) -> None:
        if self.count == 0:
            final = self._path()
            if final.is_file():
                self._open = None
                self.skipped += 1
            else:
                tmp = _tmp(final)
                raw, gz = _gzip_writer(tmp, 6)
                self._open = (raw, gz, tmp, final)
        if self._open:
            self._open[1].write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
        self.count += 1
        if self.count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        if self._open:
            raw, gz, tmp, final = self._open
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


def _iter_cleaned(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        if isinstance(v, bool) or not isinstance(v, (int, dict)):
            continue
        if isinstance(v, dict):
            _add(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def _pass1(files, cfg: PrepareConfig, work: Path, progress: bool) -> dict[int, dict]:
    """Clean every file (in parallel); finished ones return their stored stats at once."""
    from tqdm import tqdm

    results: dict[int, dict] = {}
    jobs = [(i, f, cfg, work) for i, f in enumerate(files)]
    n_workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    bar = tqdm(total=len(jobs), desc="clean", unit="file", disable=not progress or None)
    if n_workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(n_workers) as pool:
            # big files first: the pool then ends with small ones and both cores stay busy
            order = sorted(jobs, key=lambda j: -j[1].stat().st_size)
            for i, res in pool.imap_unordered(_clean_job, order):
                results[i] = res
                bar.update(1)
    else:
        for job in jobs:
            i, res = _clean_job(job)
            results[i] = res
            bar.update(1)
    bar.close()
    return results


def _pass2(files, results: dict, cfg: PrepareConfig, out: Path, work: Path, progress: bool):
    """Deduplicate across files in input order and write the train/heldout shards; returns (per-file stats, writers)."""
    from tqdm import tqdm

    exact = dedup.ExactDedup()
    near = dedup.NearDedup(cfg.near_threshold) if cfg.dedup == "near" else None
    writers = {"train": ShardWriter(out / "train", cfg.shard_docs), "heldout": ShardWriter(out / "heldout", cfg.shard_docs)}
    per_file: dict[str, dict] = {}
    bar = tqdm(total=sum(results[i]["stats"]["pieces_out"] for i in results), desc="dedup+shard", unit="doc",
               disable=not progress or None)
    for i, f in enumerate(files):
        st = json.loads(json.dumps(results[i]["stats"]))  # a private copy: pass 2 adds to it
        for n, rec in enumerate(_iter_cleaned(work / f"{_file_id(f)}.jsonl.gz")):
            text = rec["t"]
            if exact.is_duplicate(text):
                reason = "exact_duplicate"
            elif near is not None and near.is_duplicate(base64.b64decode(rec["s"])):
                reason = "near_duplicate"
            else:
                reason = None
            if reason:
                d = st["dropped"][reason]
                d["docs"] += 1
                d["chars"] += len(text)
                ex = st["examples"].setdefault(reason, [])
                if len(ex) < 3:
                    ex.append(f"piece {n}")
            else:
                split = "heldout" if dedup.heldout_bucket(bytes.fromhex(rec["k"])) < cfg.heldout_fraction else "train"
                writers[split].write(text)
                st[split]["docs"] += 1
                st[split]["chars"] += len(text)
                st["docs_kept"] += 1
                st["chars_kept"] += len(text)
            bar.update(1)
        st["examples"] = {r: st["examples"][r] for r in REASONS if r in st["examples"]}
        per_file[str(f)] = st
    bar.close()
    for w in writers.values():
        w.close()
    return per_file, writers


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


def _log_summary(total: dict, per_file: dict, writers: dict, out: Path, log) -> None:
    skipped = sum(w.skipped for w in writers.values())
    dropped = {r: v["docs"] for r, v in total["dropped"].items() if v["docs"]}
    log(f"{total['docs_in']:,} documents in, {total['docs_kept']:,} kept ({total['train']['docs']:,} train, "
        f"{total['heldout']['docs']:,} held out), dropped: {dropped or 'none'}; "
        f"{len(writers['train'].names)} + {len(writers['heldout'].names)} shards in {out}"
        + (f" ({skipped} already finished)" if skipped else ""))
    for name, st in per_file.items():
        if st.get("dropped_file"):
            log(f"  {name}: dropped as {st['dropped_file']['reason']} ({st['dropped_file']['why']}); none of its text is used")
        elif st["encoding"] != "utf-8" or st["normalisation"].get("invalid_bytes"):
            log(f"  {name}: {st['encoding']} ({st['encoding_detected_by']}), "
                f"{st['normalisation'].get('invalid_bytes', 0)} undecodable bytes removed")


def prepare(inputs, out_dir, cfg: PrepareConfig | None = None, progress: bool = True, log=print) -> dict:
    """Run both passes into out_dir (a zhllama.runfolder run folder: locked while it runs, result.json and
    manifest.json when finished); returns the stats written to out_dir/stats.json."""
    from zhllama import runfolder

    cfg = cfg or PrepareConfig()
    cfg.validate()
    files = list_inputs(inputs)
    out = Path(out_dir)
    work = out / ".work" / "files"
    with runfolder.lock(out, log=lambda m: log(m)):
        # a finished run keeps no work folder (1x the corpus): its recorded fingerprint says it is up to date
        early = {"files": [_fingerprint(f, cfg) for f in files], "config": cfg.public()}
        if (out / "stats.json").is_file() and runfolder.decide(out, early, "auto", log=lambda m: None,
                                                               partial=True) == "up-to-date":
            log(f"{out} is up to date with its inputs and options; nothing to do")
            return json.loads((out / "stats.json").read_text(encoding="utf-8"))
        work.mkdir(parents=True, exist_ok=True)
        for d in (work, out / "train", out / "heldout"):
            _remove_stale_tmp(d)
        results = _pass1(files, cfg, work, progress)
        # pass 2 state: if the inputs or options differ from the run that wrote the shards, start over
        plan = {"files": [results[i]["fingerprint"] for i in range(len(files))], "config": cfg.public()}
        # up to date or resumable: pass 2 runs again and skips the shards it finished (same bytes)
        partial = any((out / d).is_dir() for d in ("train", "heldout")) or (out / "stats.json").is_file()
        if runfolder.decide(out, plan, "auto", log=log, partial=partial) == "start-over":
            for d in ("train", "heldout"):
                shutil.rmtree(out / d, ignore_errors=True)
            (out / "stats.json").unlink(missing_ok=True)
        runfolder.begin(out, {"stage": "corpora.prepare", "config": cfg.public()}, plan)
        per_file, writers = _pass2(files, results, cfg, out, work, progress)
        total = _totals(per_file)
        stats = {
            "accounting": ("documents are counted as read; a document longer than max_chars is split into pieces "
                           "(split.docs -> split.pieces) and counted as pieces from there on (dedup, kept): "
                           "docs_in - split.docs + split.pieces == docs_kept + sum(dropped.docs); characters: "
                           "chars_in - normalisation.chars_removed == chars_kept + sum(dropped.chars)"),
            "config": cfg.public(),
            "dedup_library": "datasketch (MinHash + MinHashLSH, character 5-grams)" if cfg.dedup == "near"
            else "exact (blake2b-128 set)",
            "shards": {k: w.names for k, w in writers.items()},
            "total": total,
            "files": per_file,
        }
        write_json(out / "stats.json", stats)
        inputs_m = {"raw": [runfolder.input_entry(f) for f in files]}
        runfolder.finish(out, "corpora.prepare", {k: total[k] for k in ("docs_in", "docs_kept", "chars_kept") if k in total}
                         | {"shards": {k: len(w.names) for k, w in writers.items()}}, inputs_m,
                         runfolder.parents_of(files), seed=None, fingerprint=plan)
        # success: the work folder goes; after a failure or kill it stays and the rerun continues from it
        shutil.rmtree(out / ".work", ignore_errors=True)
        _log_summary(total, per_file, writers, out, log)
        return stats
