"""Corpus -> packed blocks for causal-LM training, cached on disk under a key of everything that shapes them.

Public API:
    build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio=0.01, max_eval_blocks=1000,
                   streaming=False, encoding="auto", num_proc=0, seed=42, shuffle_buffer=10000)
        -> (train_dataset, eval_dataset, info: dict)
    build_cache(...) -> info                  only the cache (`python -m pretrain cache`)
    PackedBlocks                              map-style dataset over the cache's memory-mapped shards
    collate_blocks(examples) -> {"input_ids", "labels"}   (labels = inputs; the model shifts them)
    tokenizer_hash(tokenizer_dir) -> str
    resolve_num_proc(num_proc) -> int         0 = this machine's cores, divided among the local ranks

Each document is tokenized with the extended tokenizer (BOS as the tokenizer adds it) followed by EOS,
documents are concatenated and cut into block_size blocks. The corpus is cut into work units (pretrain.units:
a file, or a 32 MiB line-aligned range of a large .txt/.jsonl); each unit is packed on its own, the tail that
fills no block is dropped per unit, so the blocks depend on the corpus only, never on the number of processes.
Held-out documents are chosen by a hash of their text, so the split does not depend on file order and no
document is split between train and eval; the eval set is the first max_eval_blocks held-out blocks in unit order.

The cache (CACHE_DIR/KEY/): units/UID.train.bin and UID.eval.bin (little-endian int32, [blocks, block_size]),
units/UID.json (the unit's record: blocks, which host/pid/rank built it, seconds), units/builds.jsonl (one line per
build), complete.json once
every unit is finished. Every process of every rank (torchrun, accelerate, several nodes on a shared filesystem)
claims units with an O_EXCL claim file (host, pid), builds them in --num-proc worker processes, then waits until
all are finished: each unit is built exactly once, nothing is deleted by another process, and a build killed at
any point continues from its finished units when rerun. A dead process's claim on this host is taken over at
once; a builder touches its claim at least every HEARTBEAT_S seconds, so a claim from another node whose
modification time has not changed for STALE_S seconds (as seen by the waiting process's own clock, so clocks of
different nodes need not agree) is taken over too: a node that died mid-build needs no hand clean-up. A builder
that was only stalled finds at its next heartbeat that the claim is no longer its own and leaves the unit to
the new holder (blocks are deterministic, so whoever finishes writes the same bytes).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import zlib
from itertools import chain
from pathlib import Path

from pretrain.units import Unit, plan_units, unit_bytes, unit_documents
from zhllama.errors import UserError
from zhllama.procs import pid_alive, process_start

FORMAT_VERSION = 2
_BATCH = 1000
_POLL_S = 0.5
_HOST = socket.gethostname()
HEARTBEAT_S = 30.0  # a builder touches its claim this often
STALE_S = 600.0  # a claim of another host that nobody touched for this long belongs to a dead node
_SEEN: dict = {}  # claim path -> (its mtime_ns, when this process first saw that mtime) for claims of other hosts


def tokenizer_hash(tokenizer_dir: str | Path) -> str:
    from zhllama.hashing import sha256_files

    d = Path(tokenizer_dir)
    files = [d / n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (d / n).is_file()]
    if not files:
        raise UserError(f"{d}: no tokenizer files (tokenizer.json / tokenizer.model)")
    return sha256_files(files)


def resolve_num_proc(num_proc: int = 0) -> int:
    if num_proc and num_proc > 0:
        return int(num_proc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # every local rank runs its own workers: together they use the cores once
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _is_eval(doc: str, eval_ratio: float) -> bool:
    return eval_ratio > 0 and zlib.crc32(doc.encode("utf-8")) % 100_000 < eval_ratio * 100_000


def _batches(docs, size: int):
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Packer:
    """Token sequences -> consecutive full blocks, linear in the tokens (the carried tail is < block_size)."""

    def __init__(self, block_size: int, limit: int | None = None):
        import numpy as np

        self.np, self.block_size, self.limit, self.blocks = np, block_size, limit, 0
        self.pending = np.empty(0, np.int32)

    @property
    def full(self) -> bool:
        return self.limit is not None and self.blocks >= self.limit

    def add(self, seqs, eos: int):
        """The blocks completed by these sequences (each followed by EOS), as an int32 [n, block_size] array."""
        np, bs = self.np, self.block_size
        if self.full or not seqs:
            return np.empty((0, bs), np.int32)
        total = sum(len(s) + 1 for s in seqs)
        new = np.fromiter(chain.from_iterable(chain(s, (eos,)) for s in seqs), np.int32, count=total)
        buf = np.concatenate((self.pending, new)) if len(self.pending) else new
        n = len(buf) // bs
        if self.limit is not None:
            n = min(n, self.limit - self.blocks)
        self.blocks += n
        self.pending = buf[n * bs:].copy() if not self.full else buf[:0]
        return buf[: n * bs].reshape(n, bs)


_TOKENIZERS: dict = {}


def _tokenizer(tok_dir: str):
    if tok_dir not in _TOKENIZERS:
        from zhllama.models import load_tokenizer

        _TOKENIZERS[tok_dir] = load_tokenizer(tok_dir)
    return _TOKENIZERS[tok_dir]


def _unit_blocks(unit: Unit, tok_dir: str, block_size: int, eval_ratio: float, max_eval_blocks: int,
                 train: bool = True, held_out: bool = True):
    """("train" | "eval", int32 [n, block_size]) chunks of one unit, in document order."""
    tok = _tokenizer(tok_dir)
    eos = tok.eos_token_id
    tp, ep = _Packer(block_size), _Packer(block_size, limit=max_eval_blocks if eval_ratio > 0 else 0)
    for batch in _batches(unit_documents(unit), _BATCH):
        split = [_is_eval(d, eval_ratio) for d in batch] if eval_ratio > 0 else [False] * len(batch)
        tr = [d for d, e in zip(batch, split) if not e] if train else []
        ev = [d for d, e in zip(batch, split) if e] if held_out and not ep.full else []
        if tr:
            yield "train", tp.add(tok(tr)["input_ids"], eos)
        if ev:
            yield "eval", ep.add(tok(ev)["input_ids"], eos)
        if not train and ep.full:
            return


# ---------------------------------------------------------------- building the cache, unit by unit


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _claim_path(units_dir: Path, uid: str) -> Path:
    return units_dir / f"{uid}.claim"


def _done(units_dir: Path, uid: str) -> bool:
    return (units_dir / f"{uid}.json").is_file()


def _stale_claim(claim: Path) -> dict | None:
    """The claim's content when its process is gone (on this host), else None (alive, elsewhere, or no claim)."""
    try:
        text = claim.read_text()
        age = time.time() - claim.stat().st_mtime
    except OSError:
        return None
    try:
        c = json.loads(text)
    except ValueError:
        # created but never written: its owner died between open and write (or is writing right now)
        return {"host": _HOST, "pid": f"empty-{int(claim.stat().st_mtime_ns)}"} if age > 60 else None
    if c.get("host") != _HOST:
        return c if _unchanged_for(claim, STALE_S) else None
    if pid_alive(c["pid"]) and process_start(c["pid"]) == c.get("start"):
        return None
    return c


def _unchanged_for(claim: Path, seconds: float) -> bool:
    """True when this process has seen the claim's mtime stay the same for `seconds` of its own clock."""
    try:
        mtime = claim.stat().st_mtime_ns
    except OSError:
        return False
    now = time.monotonic()
    seen = _SEEN.get(str(claim))
    if seen is None or seen[0] != mtime:
        _SEEN[str(claim)] = (mtime, now)
        return False
    return now - seen[1] >= seconds


def _try_claim(units_dir: Path, uid: str) -> bool:
    claim = _claim_path(units_dir, uid)
    me = {"host": _HOST, "pid": os.getpid(), "start": process_start(os.getpid()), "rank": _rank()}
    for _ in range(3):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale = _stale_claim(claim)
            if stale is None:
                return False
            # only one process takes over a given dead claim: the one that creates this name first
            try:
                os.close(os.open(units_dir / f"{uid}.takeover-{stale['host']}-{stale['pid']}",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return False
            for junk in units_dir.glob(f"{uid}.*.tmp-{stale['host']}-{stale['pid']}"):
                junk.unlink(missing_ok=True)
            claim.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def _build_unit(unit: Unit, ctx: dict) -> dict | None:
    """Claim and build one unit; None when another process holds it or it is finished."""
    units_dir = Path(ctx["cache"]) / "units"
    uid = unit.uid
    if _done(units_dir, uid) or not _try_claim(units_dir, uid):
        return None
    claim = _claim_path(units_dir, uid)
    if _done(units_dir, uid):  # finished between the check and the claim
        claim.unlink(missing_ok=True)
        return None
    tag = f"tmp-{_HOST}-{os.getpid()}"
    tmp = {s: units_dir / f"{uid}.{s}.bin.{tag}" for s in ("train", "eval")}
    t0 = beat = time.time()
    try:
        counts = {"train": 0, "eval": 0}
        with open(tmp["train"], "wb") as ft, open(tmp["eval"], "wb") as fe:
            out = {"train": ft, "eval": fe}
            for split, blocks in _unit_blocks(unit, ctx["tok_dir"], ctx["block_size"], ctx["eval_ratio"],
                                              ctx["max_eval_blocks"]):
                if time.time() - beat >= HEARTBEAT_S:
                    beat = time.time()
                    if not _owns(claim):
                        return None  # this process stalled and its claim was taken over: the new holder builds it
                    with contextlib.suppress(OSError):
                        os.utime(claim)
                if len(blocks):
                    blocks.astype("<i4", copy=False).tofile(out[split])
                    counts[split] += len(blocks)
        if not _owns(claim):
            return None
        rec = {"unit": {"file": unit.path, "start": unit.start, "end": unit.end, "sha256": unit.sha256},
               "train_blocks": counts["train"], "eval_blocks": counts["eval"], "host": _HOST, "pid": os.getpid(),
               "rank": _rank(), "seconds": round(time.time() - t0, 3)}
        rtmp = units_dir / f"{uid}.json.{tag}"
        try:
            for s in tmp:
                os.replace(tmp[s], units_dir / f"{uid}.{s}.bin")
            rtmp.write_text(json.dumps(rec))
            os.replace(rtmp, units_dir / f"{uid}.json")  # the unit is finished once this name exists
        except FileNotFoundError:
            return None  # taken over just now (the taker removed this process's temp files)
        # every build appends a line (O_APPEND): a unit built twice would show up twice
        with open(units_dir / "builds.jsonl", "a") as log:
            log.write(json.dumps({"uid": uid, "host": _HOST, "pid": os.getpid(), "rank": _rank()}) + "\n")
        return rec
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
        if _owns(claim):  # never the claim of a process that took this unit over
            claim.unlink(missing_ok=True)


def _owns(claim: Path) -> bool:
    """Does this process still hold the claim? Only a claim shown to be gone or someone else's is not ours: an
    unreadable one (a filesystem hiccup) is, so a builder never abandons a unit it alone holds."""
    try:
        c = json.loads(claim.read_text())
    except (FileNotFoundError, ValueError):
        return False  # removed by a taker, or a taker's claim being written
    except OSError:
        return True
    return isinstance(c, dict) and c.get("host") == _HOST and c.get("pid") == os.getpid()


def _worker_init():
    # each worker is one of num_proc processes: the tokenizer's own thread pool would only oversubscribe the cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _build_unit_star(args):
    return _build_unit(*args)


def _build_units(units: list[Unit], ctx: dict, num_proc: int, progress: bool) -> int:
    """Build every unfinished unit (claimed by this process or its workers), then wait for all; returns how many this
    process built."""
    from tqdm.auto import tqdm

    units_dir = Path(ctx["cache"]) / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    unique = list({u.uid: u for u in units}.values())
    count_done = lambda: sum(_done(units_dir, u.uid) for u in unique)  # noqa: E731
    todo = [u for u in unique if not _done(units_dir, u.uid)]
    bar = tqdm(total=len(unique), initial=len(unique) - len(todo), unit="unit", desc="tokenize + pack",
               disable=not progress or None)
    built = 0
    try:
        n = min(num_proc, len(todo))
        if n <= 1:
            for u in todo:
                built += _build_unit(u, ctx) is not None
                bar.n = count_done()
                bar.refresh()
        elif todo:
            import multiprocessing as mp

            # fork: workers inherit the imported modules (spawn would re-import transformers per worker)
            with mp.get_context("fork").Pool(n, initializer=_worker_init) as pool:
                for rec in pool.imap_unordered(_build_unit_star, [(u, ctx) for u in todo]):
                    built += rec is not None
                    bar.n = count_done()
                    bar.refresh()
        # units claimed by other ranks/processes: wait for them, taking over the claims of dead processes
        while True:
            missing = [u for u in unique if not _done(units_dir, u.uid)]
            bar.n = len(unique) - len(missing)
            if not missing:
                bar.set_postfix_str("", refresh=False)
            bar.refresh()
            if not missing:
                break
            progressed = False
            for u in missing:
                if _build_unit(u, ctx) is not None:
                    built += 1
                    progressed = True
            if not progressed:
                # say why the bar stands still: another process (rank, node) is building these units
                bar.set_postfix_str(f"waiting for {len(missing)} unit(s) claimed by other processes", refresh=False)
                time.sleep(_POLL_S)
    finally:
        bar.close()
    return built


def _unit_record(cache: Path, uid: str) -> dict:
    return json.loads((cache / "units" / f"{uid}.json").read_text())


def _write_complete(cache: Path, content: dict) -> None:
    """complete.json, written once: the first process to link its finished file under the name wins."""
    done = cache / "complete.json"
    if done.is_file():
        return
    tmp = cache / f"complete.json.tmp-{_HOST}-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1))
    try:
        os.link(tmp, done)
    except FileExistsError:
        return
    finally:
        tmp.unlink(missing_ok=True)
    # the markers of taken-over dead claims are needed only while units are still being claimed; a claim left by a
    # process killed between finishing its unit and removing the claim names a finished unit: nobody needs it
    units_dir = cache / "units"
    for marker in units_dir.glob("*.takeover-*"):
        marker.unlink(missing_ok=True)
    for claim in units_dir.glob("*.claim"):
        if _done(units_dir, claim.name[: -len(".claim")]):
            claim.unlink(missing_ok=True)


class PackedBlocks:
    """Map-style dataset of blocks over memory-mapped unit shards: {"input_ids": [block_size ints]} per row.

    Memory stays bounded by the page cache whatever the corpus size; under the Trainer's distributed sampler
    each rank reads its own disjoint rows."""

    def __init__(self, parts: list[tuple[str, int]], block_size: int, limit: int | None = None):
        import numpy as np

        parts = [(p, n) for p, n in parts if n > 0]
        self.block_size = block_size
        self._paths = [p for p, _ in parts]
        self._counts = [n for _, n in parts]
        self._starts = np.concatenate(([0], np.cumsum(self._counts))).astype(np.int64)
        total = int(self._starts[-1])
        self._len = total if limit is None else min(total, limit)
        self._maps: list = [None] * len(parts)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):  # DataLoader workers reopen the maps instead of pickling their contents
        return dict(self.__dict__, _maps=[None] * len(self._paths))

    def row(self, i: int):
        import numpy as np

        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        j = int(np.searchsorted(self._starts, i, side="right")) - 1
        if self._maps[j] is None:
            self._maps[j] = np.memmap(self._paths[j], dtype="<i4", mode="r", shape=(self._counts[j], self.block_size))
        return self._maps[j][i - int(self._starts[j])]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return {"input_ids": [self.row(k).tolist() for k in range(*i.indices(self._len))]}
        return {"input_ids": self.row(int(i)).tolist()}

    def __iter__(self):
        for i in range(self._len):
            yield self[i]


# ---------------------------------------------------------------- public entry points


def cache_key(files, tok_hash: str, block_size: int, eval_ratio: float, max_eval_blocks: int,
              hashes: dict | None = None) -> tuple[str, dict]:
    from zhllama.hashing import sha256_bytes, sha256_file

    key = {
        "format": FORMAT_VERSION,
        "unit_bytes": unit_bytes(),
        "tokenizer": tok_hash,
        "files": [{"name": str(f), "sha256": (hashes or {}).get(f) or sha256_file(f)} for f in files],
        "block_size": block_size,
        "eval_ratio": eval_ratio,
        "max_eval_blocks": max_eval_blocks,
    }
    # names are in the key for the manifest only; the hash uses content so a moved corpus is reused
    hashed = dict(key, files=sorted(x["sha256"] for x in key["files"]))
    return sha256_bytes(json.dumps(hashed, sort_keys=True).encode())[:24], key


def _user_error_inside(e: BaseException):
    """The UserError that `datasets` wrapped (DatasetGenerationError) while running our generator, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def readable_files(corpus, encoding: str = "auto") -> tuple[list, dict, dict]:
    """(text files, file -> encoding, dropped files) through the shared corpus reader's checks."""
    files, encodings, dropped, _ = _readable(corpus, encoding)
    return files, encodings, dropped


def _readable(corpus, encoding: str):
    """readable_files and the set of files decoded line by line (corpora.reader.LineDecoder: mixed encodings)."""
    from corpora.reader import CorpusStats, list_corpus_files, sniff

    files, encodings, stats, per_line = [], {}, CorpusStats(), set()
    for f in list_corpus_files(corpus):
        check = sniff(f, encoding)
        if check.binary:
            stats.drop(check)
            continue
        files.append(f)
        encodings[f] = check.encoding
        if check.per_line:
            per_line.add(f)
    if not files:
        raise UserError(f"corpus {', '.join(map(str, corpus))}: no text files left (all dropped as binary)")
    return files, encodings, stats.dropped_files, per_line


def _plan(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, encoding):
    from zhllama.hashing import sha256_file

    files, encodings, dropped, per_line = _readable(corpus, encoding)
    tok = _tokenizer(str(tokenizer_dir))
    if tok.eos_token_id is None:
        raise UserError(f"{tokenizer_dir}: tokenizer has no EOS token; documents need one between them")
    hashes = {f: sha256_file(f) for f in files}
    key, key_info = cache_key(files, tokenizer_hash(tokenizer_dir), block_size, eval_ratio, max_eval_blocks, hashes)
    cache = Path(cache_dir) / key
    # a file decoded line by line (mixed encodings) is read with "auto", so each unit decodes it the same way
    units = plan_units(files, {f: "auto" if f in per_line else e for f, e in encodings.items()}, hashes)
    info = {"cache_key": key, "cache_dir": str(cache), "key": key_info, "files": [str(f) for f in files],
            "encodings": {str(f): e for f, e in encodings.items()}, "dropped_files": dropped, "units": len(units)}
    return units, cache, key_info, info


def build_cache(corpus, tokenizer_dir, block_size: int, cache_dir, eval_ratio: float = 0.01,
                max_eval_blocks: int = 1000, encoding: str = "auto", num_proc: int = 0, progress: bool = True) -> dict:
    """Tokenize and pack every unit into CACHE_DIR/KEY (once across processes and ranks); the data info."""
    units, cache, key_info, info = _plan(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks,
                                         encoding)
    _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks, num_proc,
                  progress, [str(f) for f in info["files"]])
    return info


def _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks, num_proc,
                  progress, files) -> list[dict]:
    """Build what is missing (info gets how); the record of every unit, in unit order."""
    n = resolve_num_proc(num_proc)
    info["num_proc"] = n
    if (cache / "complete.json").is_file():
        info.update(reused_cache=True, built_units=0)
        return [_unit_record(cache, u.uid) for u in units]
    t0 = time.time()
    ctx = {"cache": str(cache), "tok_dir": str(tokenizer_dir), "block_size": block_size, "eval_ratio": eval_ratio,
           "max_eval_blocks": max_eval_blocks}
    built = _build_units(units, ctx, n, progress)
    recs = [_unit_record(cache, u.uid) for u in units]
    train_blocks = sum(r["train_blocks"] for r in recs)
    if not train_blocks:
        raise _empty(files, block_size)
    _write_complete(cache, dict(key_info, train_blocks=train_blocks, eval_blocks=sum(r["eval_blocks"] for r in recs),
                                units=[u.uid for u in units]))
    info.update(reused_cache=False, built_units=built, build_seconds=round(time.time() - t0, 2))
    return recs


def build_datasets(corpus, tokenizer_dir, block_size: int, cache_dir, eval_ratio: float = 0.01,
                   max_eval_blocks: int = 1000, streaming: bool = False, encoding: str = "auto", num_proc: int = 0,
                   seed: int = 42, shuffle_buffer: int = 10000, progress: bool = True):
    try:
        return _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming,
                               encoding, num_proc, seed, shuffle_buffer, progress)
    except Exception as e:  # a decode error inside datasets' generator: one line, not its 60-line traceback
        inner = _user_error_inside(e)
        if inner is None or inner is e:
            raise
        raise UserError(str(inner)) from None


def _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming, encoding,
                    num_proc, seed, shuffle_buffer, progress):
    units, cache, key_info, info = _plan(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks,
                                         encoding)
    files = info["files"]
    if streaming:
        return _streaming(units, info, str(tokenizer_dir), block_size, eval_ratio, max_eval_blocks, seed,
                          shuffle_buffer, files)
    recs = _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks,
                         num_proc, progress, files)
    units_dir = cache / "units"
    train_ds = PackedBlocks([(str(units_dir / f"{u.uid}.train.bin"), r["train_blocks"]) for u, r in zip(units, recs)],
                            block_size)
    eval_ds = PackedBlocks([(str(units_dir / f"{u.uid}.eval.bin"), r["eval_blocks"]) for u, r in zip(units, recs)],
                           block_size, limit=max_eval_blocks)
    if len(eval_ds) == 0:
        eval_ds = None
    info.update(streaming=False, train_blocks=len(train_ds), eval_blocks=0 if eval_ds is None else len(eval_ds),
                train_tokens=len(train_ds) * block_size)
    return train_ds, eval_ds, info


def _stream_blocks(units, tok_dir, block_size, eval_ratio):
    for u in units:
        for _, blocks in _unit_blocks(Unit(**u), tok_dir, block_size, eval_ratio, 0, held_out=False):
            for b in blocks:
                yield {"input_ids": b.tolist()}


def _streaming(units, info, tok_dir, block_size, eval_ratio, max_eval_blocks, seed, shuffle_buffer, files):
    """Tokenized on the fly: unit order shuffled, then blocks through a seeded buffer; the same order every run, so
    the Trainer's resume (it skips the batches already trained on) lands at the right position."""
    from datasets import Dataset, Features, IterableDataset, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32"))})
    eval_rows = []
    for u in units:
        if len(eval_rows) >= max_eval_blocks or eval_ratio <= 0:
            break
        for _, blocks in _unit_blocks(u, tok_dir, block_size, eval_ratio, max_eval_blocks - len(eval_rows),
                                      train=False):
            eval_rows += [{"input_ids": b.tolist()} for b in blocks]
    eval_ds = Dataset.from_list(eval_rows, features=features) if eval_rows else None
    kwargs = {"units": [vars(u) for u in units], "tok_dir": tok_dir, "block_size": block_size, "eval_ratio": eval_ratio}
    plain = IterableDataset.from_generator(_stream_blocks, features=features, gen_kwargs=kwargs)
    if next(iter(plain), None) is None:
        raise _empty(files, block_size)
    train_ds = plain.shuffle(seed=seed, buffer_size=shuffle_buffer)
    info.update(streaming=True, eval_blocks=len(eval_rows), shuffle_buffer=shuffle_buffer, seed=seed)
    return train_ds, eval_ds, info


def _empty(files, block_size):
    names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return UserError(f"corpus {names} yields no training block of {block_size} tokens (empty or too short); "
                     "add text or lower --block-size")


def collate_blocks(examples):
    import torch

    ids = torch.tensor([e["input_ids"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}
