"""Corpus -> packed blocks for causal-LM training, cached on disk under a key of everything that shapes them.

Public API:
    build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio=0.01, max_eval_blocks=1000,
                   streaming=False, encoding="auto", num_proc=0, seed=42, shuffle_buffer=10000)
        -> (train_dataset, eval_dataset, info: dict)
    build_cache(..., executor=None) -> info   only the cache (`python -m pretrain cache`; executor: an
                                              ExecutorConfig, local processes by default)
    PackedBlocks                              map-style dataset over the cache's memory-mapped shards
    collate_blocks(examples) -> {"input_ids", "labels"}   (labels = inputs; the model shifts them)
    tokenizer_hash(tokenizer_dir) -> str
    resolve_num_proc(num_proc) -> int         0 = this machine's cores

Each document is tokenized with the extended tokenizer (BOS as the tokenizer adds it) followed by EOS,
documents are concatenated and cut into block_size blocks. The corpus is cut into work units (pretrain.units:
a file, or a 32 MiB line-aligned range of a large .txt/.jsonl); each unit is packed on its own, the tail that
fills no block is dropped per unit, so the blocks depend on the corpus only, never on the number of processes.
Held-out documents are chosen by a hash of their text, so the split does not depend on file order and no
document is split between train and eval; the eval set is the first max_eval_blocks held-out blocks in unit order.

The cache (CACHE_DIR/KEY/): units/UID.train.bin and UID.eval.bin (little-endian int32, [blocks, block_size]),
units/UID.json (the unit's record: blocks, which host/pid/task built it, seconds), units/builds.jsonl (one line per
build), complete.json once every unit is finished. The units are the ranks of a datatrove pipeline
(zhllama.unit_pipeline) run by zhllama.executors: local worker processes (--num-proc / --workers), a Slurm job array
or Ray. The engine records finished ranks and a rerun skips them; a unit's files are written under temporary
names and renamed, its record last, so a build killed at any point (kill -9 included) continues from its finished
units and gives the same bytes. Under torchrun/accelerate, training rank 0 runs the build and the other ranks wait
for complete.json. A changed corpus, tokenizer or block setting is another KEY: a cache is never reused for
changed inputs.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import zlib
from itertools import chain
from pathlib import Path

from pretrain.units import Unit, plan_units, unit_bytes, unit_documents
from zhllama.errors import UserError
from zhllama.executors import ExecutorConfig
from zhllama.unit_pipeline import Submitted, UnitStep, run_units

FORMAT_VERSION = 2
_BATCH = 1000
_POLL_S = 0.5
_HOST = socket.gethostname()


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
    # only one training rank builds (the others wait): it may use every core
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def _done(units_dir: Path, uid: str) -> bool:
    return (units_dir / f"{uid}.json").is_file()


def _build_unit(unit: Unit, ctx: dict, task: int = 0) -> dict | None:
    """Tokenize and pack one unit into its shard files; the record, or None when it was finished meanwhile.

    Writes go to names of this process and are renamed into place, the record last (the unit is finished once
    UID.json exists): a kill at any point leaves no half shard under a final name, and two builders of one unit
    (a rerun while an old Slurm job still runs) write the same bytes."""
    units_dir = Path(ctx["cache"]) / "units"
    uid = unit.uid
    tag = f"tmp-{_HOST}-{os.getpid()}"
    tmp = {s: units_dir / f"{uid}.{s}.bin.{tag}" for s in ("train", "eval")}
    rtmp = units_dir / f"{uid}.json.{tag}"
    t0 = time.time()
    try:
        counts = {"train": 0, "eval": 0}
        with open(tmp["train"], "wb") as ft, open(tmp["eval"], "wb") as fe:
            out = {"train": ft, "eval": fe}
            for split, blocks in _unit_blocks(unit, ctx["tok_dir"], ctx["block_size"], ctx["eval_ratio"],
                                              ctx["max_eval_blocks"]):
                if len(blocks):
                    blocks.astype("<i4", copy=False).tofile(out[split])
                    counts[split] += len(blocks)
        rec = {"unit": {"file": unit.path, "start": unit.start, "end": unit.end, "sha256": unit.sha256},
               "train_blocks": counts["train"], "eval_blocks": counts["eval"], "host": _HOST, "pid": os.getpid(),
               "task": task, "seconds": round(time.time() - t0, 3)}
        if _done(units_dir, uid):
            return None
        for s in tmp:
            os.replace(tmp[s], units_dir / f"{uid}.{s}.bin")
        rtmp.write_text(json.dumps(rec))
        os.replace(rtmp, units_dir / f"{uid}.json")
        # every build appends a line (O_APPEND): a unit built twice would show up twice
        with open(units_dir / "builds.jsonl", "a") as log:
            log.write(json.dumps({"uid": uid, "host": _HOST, "pid": os.getpid(), "task": task,
                                  "rank": int(os.environ.get("RANK", "0"))}) + "\n")
        return rec
    finally:
        for t in (*tmp.values(), rtmp):
            t.unlink(missing_ok=True)


class PackUnits(UnitStep):
    """The datatrove step: tokenize + pack the units of this rank into CACHE/KEY/units/."""

    name = "tokenize-pack"
    type = "✂️ - TOKENIZER"

    def __init__(self, units: list[Unit], ctx: dict):
        super().__init__(len(units))
        self.units, self.ctx = units, ctx

    def unit_done(self, i: int) -> bool:
        return _done(Path(self.ctx["cache"]) / "units", self.units[i].uid)

    def build_unit(self, i: int, rank: int) -> None:
        if os.getpid() != self.ctx["parent_pid"]:
            # one of several worker processes: the tokenizer's own thread pool would only oversubscribe the cores
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        rec = _build_unit(self.units[i], self.ctx, rank)
        if rec is not None:
            self.stat_update("train_blocks", value=rec["train_blocks"], unit="unit")


def _build_units(units: list[Unit], ctx: dict, cfg: ExecutorConfig, progress: bool) -> int:
    """Build every unfinished unit on the executor (ranks of a datatrove pipeline); how many this call built."""
    units_dir = Path(ctx["cache"]) / "units"
    units_dir.mkdir(parents=True, exist_ok=True)
    unique = list({u.uid: u for u in units}.values())
    step = PackUnits(unique, dict(ctx, parent_pid=os.getpid()))
    return run_units(step, cfg, Path(ctx["cache"]) / "pipeline", progress="tokenize + pack" if progress else None)


def _unit_record(cache: Path, uid: str) -> dict:
    return json.loads((cache / "units" / f"{uid}.json").read_text())


def _write_complete(cache: Path, content: dict) -> None:
    """complete.json (atomically), then the temporary files of builders that died or lost a race to finish a
    unit: with every unit finished, none of them is needed."""
    tmp = cache / f"complete.json.tmp-{_HOST}-{os.getpid()}"
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, cache / "complete.json")
    for junk in (cache / "units").glob("*.tmp-*"):
        junk.unlink(missing_ok=True)


def _wait_for_rank0(cache: Path, progress: bool) -> None:
    """Training rank > 0: rank 0 builds the cache (on the executor); this rank waits for its complete.json. If rank 0
    fails, the launcher (torchrun, accelerate) stops this rank with it."""
    if progress:
        print(f"rank {os.environ.get('RANK')}: waiting for rank 0 to build the data cache {cache}", file=sys.stderr,
              flush=True)
    while not (cache / "complete.json").is_file():
        time.sleep(_POLL_S)


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
                max_eval_blocks: int = 1000, encoding: str = "auto", num_proc: int = 0, progress: bool = True,
                executor: ExecutorConfig | None = None) -> dict:
    """Tokenize and pack every unit into CACHE_DIR/KEY (once across processes and ranks); the data info.

    With a Slurm executor the units are submitted as a job array and info["submitted"] is True: the same command,
    rerun once the job has finished, finds every unit done and writes complete.json."""
    units, cache, key_info, info = _plan(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks,
                                         encoding)
    try:
        _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks, num_proc,
                      progress, [str(f) for f in info["files"]], executor)
    except Submitted as e:
        info.update(submitted=True, message=str(e))
    return info


def _executor(num_proc: int, executor: ExecutorConfig | None) -> ExecutorConfig:
    """--num-proc is the local executor's number of workers unless --workers says otherwise."""
    import dataclasses

    cfg = executor or ExecutorConfig()
    if not cfg.workers and cfg.executor == "local":
        cfg = dataclasses.replace(cfg, workers=resolve_num_proc(num_proc))
    cfg.validate()
    return cfg


def _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks, num_proc,
                  progress, files, executor: ExecutorConfig | None = None) -> list[dict]:
    """Build what is missing (info gets how); the record of every unit, in unit order."""
    cfg = _executor(num_proc, executor)
    info["num_proc"] = cfg.resolved_workers()
    info["executor"] = cfg.executor
    if (cache / "complete.json").is_file():
        info.update(reused_cache=True, built_units=0)
        return [_unit_record(cache, u.uid) for u in units]
    t0 = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        _wait_for_rank0(cache, progress)
        built = 0
    else:
        ctx = {"cache": str(cache), "tok_dir": str(tokenizer_dir), "block_size": block_size,
               "eval_ratio": eval_ratio, "max_eval_blocks": max_eval_blocks}
        built = _build_units(units, ctx, cfg, progress)
    recs = [_unit_record(cache, u.uid) for u in units]
    train_blocks = sum(r["train_blocks"] for r in recs)
    if not train_blocks:
        raise _empty(files, block_size)
    if not (cache / "complete.json").is_file():
        _write_complete(cache, dict(key_info, train_blocks=train_blocks,
                                    eval_blocks=sum(r["eval_blocks"] for r in recs), units=[u.uid for u in units]))
    info.update(reused_cache=False, built_units=built, build_seconds=round(time.time() - t0, 2))
    return recs


def build_datasets(corpus, tokenizer_dir, block_size: int, cache_dir, eval_ratio: float = 0.01,
                   max_eval_blocks: int = 1000, streaming: bool = False, encoding: str = "auto", num_proc: int = 0,
                   seed: int = 42, shuffle_buffer: int = 10000, progress: bool = True,
                   executor: ExecutorConfig | None = None):
    try:
        return _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming,
                               encoding, num_proc, seed, shuffle_buffer, progress, executor)
    except Submitted as e:
        raise UserError(f"the data cache is not finished: {e}") from None
    except Exception as e:  # a decode error inside datasets' generator: one line, not its 60-line traceback
        inner = _user_error_inside(e)
        if inner is None or inner is e:
            raise
        raise UserError(str(inner)) from None


def _build_datasets(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks, streaming, encoding,
                    num_proc, seed, shuffle_buffer, progress, executor=None):
    units, cache, key_info, info = _plan(corpus, tokenizer_dir, block_size, cache_dir, eval_ratio, max_eval_blocks,
                                         encoding)
    files = info["files"]
    if streaming:
        return _streaming(units, info, str(tokenizer_dir), block_size, eval_ratio, max_eval_blocks, seed,
                          shuffle_buffer, files)
    recs = _ensure_cache(units, cache, key_info, info, tokenizer_dir, block_size, eval_ratio, max_eval_blocks,
                         num_proc, progress, files, executor)
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
