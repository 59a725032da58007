"""The datatrove pipeline steps of `corpora prepare`, one job each.

Stage "clean" (T tasks, rank r takes work units r, r+T, ...):
    UnitReader -> Clean -> DedupKeys -> UnitWriter
  Documents flow between the steps as datatrove Documents; the reader follows each unit's documents with an
  end-of-unit marker (metadata["end"]) that the steps pass on, so the writer knows when a unit is complete even
  if all its documents were dropped. The per-unit statistics (corpora.stats.FileStats) travel in the
  documents' metadata as one shared object, updated by the step that drops or changes a document.
Stage "dedup" (T tasks): FindDuplicates, one key range per job (corpora.dedup), first occurrence in input order
  wins; the result does not depend on T.
Stage "shards" (T tasks): WriteShards, each unit's kept pieces split held-out/train by document hash.
Stage "merge" (1 task): MergeStats, per-file and total statistics into OUT/stats.json.

Every file a task writes is named by its unit (never by its rank) and written to a temporary name, then renamed,
so a task that datatrove reruns after a kill (its completion marker missing) rewrites the same bytes.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep

import zhllama.executors  # noqa: F401  (quiet task logging also where only the pickled steps are loaded)
from zhllama.units import Unit

from . import clean, dedup, minhash, records
from .reader import sniff
from .stats import FileStats, counts, merge_file

META = struct.Struct("<QI")  # per piece in <unit>.meta: held-out hash value (dedup.heldout_value), characters


def unit_name(i: int) -> str:
    return f"u{i:06d}"


def _tmp(work: Path, final: Path) -> Path:
    # one fixed temporary name per final file: a rerun of a killed task overwrites what it left
    d = work / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{final.parent.name}.{final.name}.tmp"


def write_json_atomic(work: Path, path: Path, obj) -> None:
    tmp = _tmp(work, path)
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def _gzip_writer(path: Path, level: int):
    # no name and mtime 0 in the gzip header: identical content gives identical bytes
    raw = open(path, "wb")
    return raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level)


def _progress(stage: str, rank: int, world_size: int, logging_dir: str | None) -> None:
    """One stderr line per finished task (the executor's own logging goes to the logging folder)."""
    if not logging_dir:
        return
    done = len(list((Path(logging_dir) / "completions").glob("*"))) + 1
    print(f"  {stage}: {min(done, world_size)}/{world_size} tasks done", file=os.sys.stderr, flush=True)


class _Step(PipelineStep):
    def __init__(self, work: Path, progress_dir: str | None = None):
        super().__init__()
        self.work = Path(work)
        self.progress_dir = progress_dir


# ---------------------------------------------------------------------------------------------- stage clean

class UnitState:
    """What the steps of one unit share: its index, input, statistics and normalisation counts."""

    def __init__(self, index: int, unit: Unit):
        self.index, self.unit = index, unit
        self.stats = FileStats()
        self.fixes = clean.Fixes()
        self.lines = [0]
        self.decoder = None
        self.check = None


class UnitReader(PipelineStep):
    """Documents of this rank's work units: zhllama's reader (encoding per file and per line, binary files dropped
    whole), every record including the unusable ones (metadata["bad"]: their reason), then an end marker."""

    name = "zhllama unit reader"
    type = "📖 - READER"

    def __init__(self, units: list[Unit], cfg):
        super().__init__()
        self.units, self.cfg = units, cfg

    def _open_unit(self, i: int) -> UnitState:
        st = UnitState(i, self.units[i])
        path = Path(st.unit.path)
        if records.kind(path) == "parquet":
            st.stats.encoding, st.stats.encoding_detected_by = "utf-8", "parquet"
            return st
        check = sniff(path, self.cfg.encoding)
        st.stats.encoding, st.stats.encoding_detected_by = check.encoding, check.detected_by
        if check.detected_by == "scored" and st.unit.part == 0:
            data, whole = records.sample(path)
            st.stats.encoding_scores = clean.detect_encoding(data, final=whole).scores
        if check.binary:
            st.stats.dropped_file = {"reason": "binary", "why": check.binary}
        if records.kind(path) in ("txt", "jsonl"):
            st.decoder = records.RepairingDecoder(check, self.cfg.encoding == "auto")
        st.check = check
        return st

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for i in range(rank, len(self.units), world_size):
            st = self._open_unit(i)
            u = st.unit
            if not st.stats.dropped_file:
                docs = records.raw_docs(Path(u.path), records.kind(Path(u.path)), st.stats.encoding, self.cfg.field,
                                        u.start, u.end, st.lines, st.decoder)
                for n, (text, bad, where) in enumerate(docs):
                    self.stat_update("documents")
                    yield Document(text=text, id=f"{i}/{n}", metadata={"state": st, "bad": bad, "where": where})
            yield Document(text="", id=f"{i}/end", metadata={"state": st, "end": True})


class Clean(PipelineStep):
    """Normalise (corpora.clean.normalize), drop unusable, short and non-Chinese documents, split over-long ones
    at sentence ends; each piece carries its document's held-out hash, so pieces never straddle the split."""

    name = "zhllama clean and filter"
    type = "🔻 - FILTER"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def run(self, data, rank: int = 0, world_size: int = 1):
        cfg = self.cfg
        for doc in data:
            md = doc.metadata
            if md.get("end"):
                yield doc
                continue
            st: FileStats = md["state"].stats
            st.docs_in += 1
            st.chars_in += len(doc.text)
            if md["bad"]:
                st.drop(md["bad"], len(doc.text), md["where"])
                self.stat_update(md["bad"])
                continue
            text = clean.normalize(doc.text, cfg.fullwidth_ascii, md["state"].fixes)
            reason = clean.drop_reason(text, cfg.min_chars, cfg.min_cjk_ratio)
            if reason:
                st.drop(reason, len(text), md["where"])
                self.stat_update(reason)
                continue
            doc_key = dedup.text_key(text)
            pieces = clean.split_long(text, cfg.max_chars)
            if len(pieces) > 1:
                st.split["docs"] += 1
                st.split["pieces"] += len(pieces)
            heldout = dedup.heldout_value(doc_key)
            for j, piece in enumerate(pieces):
                key = doc_key if len(pieces) == 1 else dedup.text_key(piece)
                yield Document(text=piece, id=f"{doc.id}/{j}",
                               metadata={"state": md["state"], "heldout": heldout, "exact": key})


class DedupKeys(PipelineStep):
    """With dedup near, each piece's MinHash-LSH band keys (corpora.minhash), computed for a batch of pieces at
    a time; the exact key (blake2b-128 of the piece) comes from Clean."""

    name = "zhllama dedup keys"
    type = "🫂 - DEDUP"

    BATCH_CHARS = 1 << 18  # characters per batch: its numpy arrays take about 20 MiB

    def __init__(self, near: bool, threshold: float):
        super().__init__()
        self.near, self.threshold = near, threshold

    def _keyed(self, batch: list):
        if batch:
            with self.track_time(unit="batch"):
                keys = minhash.band_keys(minhash.signatures([d.text for d in batch]), self.threshold)
                # big-endian (key_hi, key_lo) rows: the byte form dedup.KeyWriter sorts
                rows = keys.astype(">u8").reshape(len(batch), -1)
            for doc, r in zip(batch, rows):
                doc.metadata["near"] = r.tobytes()
        return batch

    def run(self, data, rank: int = 0, world_size: int = 1):
        if not self.near:
            yield from data
            return
        batch, chars = [], 0
        for doc in data:
            if doc.metadata.get("end"):  # a unit ends: its pieces first, in order
                yield from self._keyed(batch)
                batch, chars = [], 0
                yield doc
                continue
            batch.append(doc)
            chars += len(doc.text)
            if chars >= self.BATCH_CHARS:
                yield from self._keyed(batch)
                batch, chars = [], 0
        yield from self._keyed(batch)


class UnitWriter(_Step):
    """Each unit's pieces (the shard lines as they will be written), their held-out hash and length, its sorted
    dedup key runs, then <unit>.json: its statistics and key runs."""

    name = "zhllama unit writer"
    type = "💽 - WRITER"

    def __init__(self, work: Path, near: bool, progress_dir: str | None = None):
        super().__init__(work, progress_dir)
        self.near = near

    def _start(self, st: UnitState) -> dict:
        d = self.work / "units"
        d.mkdir(parents=True, exist_ok=True)
        name = unit_name(st.index)
        final = {"text": d / f"{name}.jsonl.gz", "meta": d / f"{name}.meta"}
        tmp = {k: _tmp(self.work, p) for k, p in final.items()}
        raw, gz = _gzip_writer(tmp["text"], 1)
        return {"state": st, "final": final, "tmp": tmp, "raw": raw, "gz": gz,
                "w": io.BufferedWriter(gz, 1 << 20), "meta": open(tmp["meta"], "wb"), "n": 0,
                "exact": dedup.KeyWriter(d / f"{name}.exact"),
                "near": dedup.KeyWriter(d / f"{name}.near") if self.near else None}

    def _finish(self, cur: dict) -> None:
        cur["w"].flush()
        cur["w"].detach()
        cur["gz"].close()
        cur["raw"].close()
        cur["meta"].close()
        for k in ("text", "meta"):
            cur["tmp"][k].replace(cur["final"][k])
        st: UnitState = cur["state"]
        runs = {"exact": cur["exact"].close(), "near": cur["near"].close() if cur["near"] else []}
        s = st.stats
        s.empty_file = s.docs_in == 0
        s.normalisation = st.fixes.as_dict()
        s.pieces_out = cur["n"]
        if st.decoder is not None:
            if st.check.per_line or set(st.decoder.codecs) - {s.encoding}:
                s.line_encodings = st.decoder.codecs
            s.lines_with_bad_bytes = st.decoder.repaired
        stats_d = asdict(s)
        for k in ("line_encodings", "lines_with_bad_bytes"):
            if not stats_d[k]:
                del stats_d[k]
        result = {"unit": asdict(st.unit), "stats": stats_d, "lines": st.lines[0], "runs": runs,
                  "rows": {"exact": cur["exact"].rows, "near": cur["near"].rows if cur["near"] else 0}}
        write_json_atomic(self.work, self.work / "units" / f"{unit_name(st.index)}.json", result)

    def run(self, data, rank: int = 0, world_size: int = 1):
        cur = None
        for doc in data:
            st = doc.metadata["state"]
            if cur is None or cur["state"] is not st:
                cur = self._start(st)
            if doc.metadata.get("end"):
                self._finish(cur)
                cur = None
                continue
            cur["w"].write((json.dumps({"text": doc.text}, ensure_ascii=False) + "\n").encode("utf-8"))
            cur["meta"].write(META.pack(doc.metadata["heldout"], len(doc.text)))
            cur["exact"].add(doc.metadata["exact"], cur["n"])
            if cur["near"] is not None:
                cur["near"].add(doc.metadata["near"], cur["n"])
            cur["n"] += 1
            self.stat_update("pieces")
        _progress("clean", rank, world_size, self.progress_dir)
        return
        yield  # a generator, like every step


def load_units(work: Path, n: int) -> list[dict]:
    return [json.loads((work / "units" / f"{unit_name(i)}.json").read_text(encoding="utf-8")) for i in range(n)]


def bases(results: list[dict]) -> list[int]:
    """Global position of each unit's first piece (and the total at the end)."""
    out = [0]
    for r in results:
        out.append(out[-1] + r["stats"]["pieces_out"])
    return out


def kinds(cfg) -> tuple[str, ...]:
    return ("exact", "near") if cfg.dedup == "near" else ("exact",)


# ---------------------------------------------------------------------------------------------- stage dedup

def dedup_jobs(results: list[dict], cfg, work: Path) -> list[tuple[str, list, int, int | None]]:
    """(kind, runs, lo, hi) for every key range: fixed by the key counts, not by the number of tasks."""
    b = bases(results)
    jobs = []
    for kind in kinds(cfg):
        runs = [(str(work / "units" / name), b[i]) for i, r in enumerate(results) for name in r["runs"][kind]]
        for lo, hi in dedup.group_bounds(sum(r["rows"][kind] for r in results)):
            jobs.append((kind, runs, lo, hi))
    return jobs


class FindDuplicates(_Step):
    """This rank's key ranges: the global positions of the pieces whose key an earlier piece has."""

    name = "zhllama find duplicates"
    type = "🫂 - DEDUP"

    def __init__(self, work: Path, n_units: int, cfg, progress_dir: str | None = None):
        super().__init__(work, progress_dir)
        self.n_units, self.cfg = n_units, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        jobs = dedup_jobs(load_units(self.work, self.n_units), self.cfg, self.work)
        folder = self.work / "dedup"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(rank, len(jobs), world_size):
            kind, runs, lo, hi = jobs[j]
            with self.track_time():
                pos = dedup.find_duplicates(runs, lo, hi)
            tmp = _tmp(self.work, folder / f"{kind}-{j:06d}.npy")
            with open(tmp, "wb") as f:
                np.save(f, pos)
            tmp.replace(folder / f"{kind}-{j:06d}.npy")
            self.stat_update(f"{kind}_duplicates", value=len(pos))
        _progress("dedup", rank, world_size, self.progress_dir)
        return
        yield


def duplicate_bits(work: Path, results: list[dict], cfg) -> dict[str, np.ndarray]:
    """One bit per piece (global position in input order) and kind, from the dedup stage's files."""
    total = bases(results)[-1]
    jobs = dedup_jobs(results, cfg, work)
    bits = {k: np.zeros((total + 7) // 8, dtype=np.uint8) for k in kinds(cfg)}
    for j, (kind, *_rest) in enumerate(jobs):
        dedup.set_bits(bits[kind], np.load(work / "dedup" / f"{kind}-{j:06d}.npy"))
    return bits


# ---------------------------------------------------------------------------------------------- stage shards

class ShardWriter:
    """Fixed-size gzip JSONL shards, each written to a temporary file and renamed when complete."""

    def __init__(self, work: Path, folder: Path, per_shard: int, prefix: str):
        self.work, self.folder, self.per_shard, self.prefix = work, folder, per_shard, prefix
        folder.mkdir(parents=True, exist_ok=True)
        self.index, self.count = 0, 0
        self.names: list[str] = []
        self._open: tuple | None = None

    def write(self, line: bytes) -> None:
        if self.count == 0:
            final = self.folder / f"{self.prefix}{self.index:05d}.jsonl.gz"
            tmp = _tmp(self.work, final)
            raw, gz = _gzip_writer(tmp, 6)
            self._open = (raw, gz, tmp, final, io.BufferedWriter(gz, 1 << 20))
        self._open[4].write(line)
        self.count += 1
        if self.count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        raw, gz, tmp, final, buf = self._open
        buf.flush()
        buf.detach()
        gz.close()
        raw.flush()
        os.fsync(raw.fileno())
        raw.close()
        tmp.replace(final)
        self.names.append(final.name)
        self._open = None
        self.index += 1
        self.count = 0

    def close(self) -> None:
        if self.count:
            self._finish()


def _iter_pieces(path: Path, meta: Path):
    """(shard line, held-out hash value, characters) of each piece of a unit, in order."""
    with gzip.open(path, "rb") as f, open(meta, "rb") as m:
        while True:
            chunk = m.read(META.size * 65536)
            if not chunk:
                break
            for value, chars in META.iter_unpack(chunk):
                yield f.readline(), value, chars


class WriteShards(_Step):
    """This rank's units into OUT/{train,heldout}/shard-<unit>-<n>.jsonl.gz (names sort in input order), without
    their duplicates; <unit>.json in the work folder's shards/ records what was kept and dropped."""

    name = "zhllama shards"
    type = "💽 - WRITER"

    def __init__(self, work: Path, out: Path, n_units: int, cfg, progress_dir: str | None = None):
        super().__init__(work, progress_dir)
        self.out, self.n_units, self.cfg = Path(out), n_units, cfg

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        cfg, work = self.cfg, self.work
        results = load_units(work, self.n_units)
        b = bases(results)
        mine = range(rank, self.n_units, world_size)
        bits = duplicate_bits(work, results, cfg) if len(mine) else {}
        first_piece: dict[int, int] = {}  # piece number within its file of each unit's first piece
        for i, r in enumerate(results):
            fi = r["unit"]["file_index"]
            first_piece.setdefault(fi, 0)
            r["piece_base"] = first_piece[fi]
            first_piece[fi] += r["stats"]["pieces_out"]
        cut = dedup.heldout_cut(cfg.heldout_fraction)
        (work / "shards").mkdir(parents=True, exist_ok=True)
        for i in mine:
            name = unit_name(i)
            writers = {s: ShardWriter(work, self.out / s, cfg.shard_docs, f"shard-{i:05d}-") for s in ("train", "heldout")}
            st = {"dropped": {r: counts() for r in ("exact_duplicate", "near_duplicate")}, "examples": {},
                  "train": counts(), "heldout": counts(), "docs_kept": 0, "chars_kept": 0}
            pieces = _iter_pieces(work / "units" / f"{name}.jsonl.gz", work / "units" / f"{name}.meta")
            for n, (line, value, chars) in enumerate(pieces):
                g = b[i] + n
                reason = next((f"{k}_duplicate" for k in kinds(cfg) if dedup.get_bit(bits[k], g)), None)
                if reason:
                    st["dropped"][reason]["docs"] += 1
                    st["dropped"][reason]["chars"] += chars
                    ex = st["examples"].setdefault(reason, [])
                    if len(ex) < 3:
                        ex.append(f"piece {results[i]['piece_base'] + n}")
                    continue
                split = "heldout" if value < cut else "train"
                writers[split].write(line)
                st[split]["docs"] += 1
                st[split]["chars"] += chars
                st["docs_kept"] += 1
                st["chars_kept"] += chars
            for w in writers.values():
                w.close()
            write_json_atomic(work, work / "shards" / f"{name}.json",
                              {"stats": st, "names": {s: w.names for s, w in writers.items()}})
            self.stat_update("units")
        _progress("shards", rank, world_size, self.progress_dir)
        return
        yield


# ---------------------------------------------------------------------------------------------- stage merge

class MergeStats(_Step):
    """The final single task: per-file statistics (a file's units merged in order) into work/merged.json."""

    name = "zhllama merge statistics"
    type = "💽 - WRITER"

    def __init__(self, work: Path, files: list[str], n_units: int):
        super().__init__(work)
        self.files, self.n_units = files, n_units

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        res1 = load_units(self.work, self.n_units)
        res3 = [json.loads((self.work / "shards" / f"{unit_name(i)}.json").read_text(encoding="utf-8"))
                for i in range(self.n_units)]
        by_file: dict[int, list[int]] = {}
        for i, r in enumerate(res1):
            by_file.setdefault(r["unit"]["file_index"], []).append(i)
        per_file = {f: merge_file([res1[i] for i in by_file[fi]], [res3[i] for i in by_file[fi]])
                    for fi, f in enumerate(self.files)}
        names = {s: [n for r in res3 for n in r["names"][s]] for s in ("train", "heldout")}
        write_json_atomic(self.work, self.work / "merged.json", {"files": per_file, "shards": names})
        return
        yield
