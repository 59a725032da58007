"""Count the CJK spans of a whole corpus for continued BPE: fixed work units on a datatrove pipeline, a fixed memory
budget.

Work units (zhllama.units) depend on the corpus alone, never on the number of tasks or processes: every file is one
unit, except uncompressed .txt files over UNIT_BYTES, which are cut into line-aligned byte ranges of about
UNIT_BYTES. The units are the ranks of a datatrove pipeline (zhllama.unit_pipeline) on any executor of
zhllama.executors (local processes by default, Slurm, Ray): each unit is counted with the same sampling and pruning
and its counts written (atomically) to the cache folder; this process then merges them in unit order, so the
counts, and so the model, are the same for any number of tasks and workers. A rerun after a kill skips the ranks
the engine marked complete and the units whose counts are saved.

Memory: a counter holding more than 2 x max_spans distinct spans is pruned (lossy-counting style, see `prune`),
so a worker holds at most 2 x max_spans spans and the merging process at most 2 x max_spans plus one unit's
counts; training then keeps at most max_spans. With fewer distinct spans than max_spans nothing is pruned and
the counts are exact.

Public API:
    UNIT_BYTES, MAX_LINE_CHARS
    split_overlong(docs, stats=None, max_chars=MAX_LINE_CHARS) -> Iterator[str]   lines over the limit cut in pieces
    uncompressed_size(path) -> int                 bytes of text in a file (.gz: decompressed, exact)
    empty_corpus(files) -> str                     the error message for a corpus without a text line
    sample_threshold(total_bytes, max_chars) -> int     the hash threshold of `train.sampled_texts` (2**32: keep all)
    keep_doc(doc, seed, threshold) -> bool
    work_units(files) -> [zhllama.units.Unit]
    prune(counter, max_spans) -> Counter           (vocab.budget's, re-exported)
    count_spans(paths, cfg, stats=None, num_proc=0, progress=True, cache_dir=None, executor=None) -> Counter
        cfg: vocab.train.TrainConfig; cache_dir: the units' counts and the engine's records, reused by a rerun
        (default: a temporary folder); executor: a zhllama.executors.ExecutorConfig (default: local, num_proc
        workers). With Slurm it raises zhllama.unit_pipeline.Submitted once the job array is submitted.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import sys
import tempfile
from collections import Counter
from pathlib import Path

from corpora.reader import CorpusStats, iter_documents, iter_range_lines, list_corpus_files, sniff
from vocab.budget import prune
from vocab.extend import collect_spans
from zhllama.errors import UserError
from zhllama.executors import ExecutorConfig
from zhllama.unit_pipeline import UnitStep, run_units
from zhllama.units import Unit, plan_units

__all__ = ["UNIT_BYTES", "MAX_LINE_CHARS", "split_overlong", "uncompressed_size", "sample_threshold", "keep_doc",
           "work_units", "prune", "count_spans", "resolve_num_proc", "empty_corpus"]

UNIT_BYTES = 16 << 20  # a fixed unit size (never derived from N) keeps the merge order, and so the result, fixed
# A line (document) longer than this many characters is cut at sentence ends (corpora.clean.split_long, hard cuts
# where a sentence is longer) into pieces of at most this size, each sampled and counted as a document. One 50 MB
# line without a newline was otherwise a single document, and without punctuation a single span of 17 M
# characters that sentencepiece re-encodes on every merge round: vocab build never finished. The longest line of
# the shared corpus is 17,020 characters, so the vocabulary of normal corpora is unchanged.
MAX_LINE_CHARS = 100_000
_READ = 1 << 20


def empty_corpus(files) -> str:
    """The error for a corpus without one non-blank line, naming its files."""
    files = [str(f) for f in files]
    names = ", ".join(files[:3]) + (f" (and {len(files) - 3} more)" if len(files) > 3 else "")
    return f"empty corpus: no text lines in {names} (every file is empty or holds only whitespace); point --corpus at your text"


def uncompressed_size(path: str | Path) -> int:
    """Bytes of text in the file. A .gz is decompressed and counted (exact, constant memory): its ISIZE trailer
    holds only the last member's size modulo 4 GiB, wrong for concatenated or >4 GiB archives."""
    path = Path(path)
    if not path.name.endswith(".gz"):
        return path.stat().st_size
    n = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_READ):
                n += len(chunk)
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot be read as gzip ({e})") from None
    return n


def sample_threshold(total_bytes: int, max_chars: int) -> int:
    """Documents whose seeded hash is below this are kept: about max_chars characters of total_bytes of
    uncompressed text (~3 UTF-8 bytes per Chinese character)."""
    total = total_bytes
    keep = min(1.0, max_chars * 3 / max(1, total))
    return int(keep * 2**32)


def keep_doc(doc: str, seed: int, threshold: int) -> bool:
    if threshold >= 2**32:
        return True
    return int.from_bytes(hashlib.blake2b(f"{seed}:{doc}".encode(), digest_size=4).digest(), "little") < threshold


def work_units(files) -> list[Unit]:
    # cuts at line ends, each UNIT_BYTES past the previous one: the ranges this stage has always counted in
    return plan_units(files, UNIT_BYTES, splittable=(".txt",), cut="line_end")


def split_overlong(docs, stats: CorpusStats | None = None, max_chars: int = MAX_LINE_CHARS):
    """The documents with each one longer than max_chars cut into pieces (counted in stats.split_lines)."""
    from corpora.clean import split_long

    for doc in docs:
        if len(doc) <= max_chars:
            yield doc
            continue
        if stats is not None:
            stats.split_lines += 1
        yield from split_long(doc, max_chars)


def _unit_documents(unit: Unit, encoding: str, stats: CorpusStats):
    yield from split_overlong(_unit_lines(unit, encoding, stats), stats)


def _unit_lines(unit: Unit, encoding: str, stats: CorpusStats):
    if unit.end is None:
        yield from iter_documents(unit.path, encoding=encoding, stats=stats)
        return
    check = sniff(unit.path, encoding)
    if unit.start == 0:  # the file is counted (and a binary one reported) once, by its first range
        stats.files += 1
        stats.encodings[unit.path] = check.encoding
        if check.binary:
            stats.drop(check)
    if check.binary:
        return
    for _, line in iter_range_lines(unit.path, encoding, unit.start, unit.end, stats, check):
        if line.strip():
            stats.count(line)
            yield line


def _unit_key(job) -> str:
    """What a unit's counts depend on: the settings and the file's identity (size, mtime) and byte range."""
    unit = job[0]
    st = Path(unit.path).stat()
    ident = [str(Path(unit.path).resolve()), st.st_size, st.st_mtime_ns, unit.start, unit.end, *job[1:], MAX_LINE_CHARS]
    return hashlib.sha256(repr(ident).encode()).hexdigest()[:32]


class CountUnits(UnitStep):
    """The datatrove step: count the spans of this rank's units, each into FOLDER/UNIT_KEY.pkl."""

    name = "span-count"
    type = "📊 - STATS"

    def __init__(self, jobs: list[tuple], folder: str):
        super().__init__(len(jobs))
        self.jobs, self.folder = jobs, folder
        self.keys = [_unit_key(j) for j in jobs]

    def path(self, i: int) -> Path:
        return Path(self.folder) / f"{self.keys[i]}.pkl"

    def unit_done(self, i: int) -> bool:
        return self.path(i).is_file()

    def build_unit(self, i: int, rank: int) -> None:
        result = _count(*self.jobs[i])
        path = self.path(i)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
        self.stat_update("sampled_docs", value=result[2], unit="unit")


def _count(unit, encoding, seed, threshold, word_aware, digits, space_prefix, max_spans):
    stats = CorpusStats()
    docs = [0]

    def sampled():
        for doc in _unit_documents(unit, encoding, stats):
            if keep_doc(doc, seed, threshold):
                docs[0] += 1
                yield doc

    spans = collect_spans(sampled(), word_aware, digits, space_prefix, max_spans=max_spans)
    return spans, stats, docs[0]


def _merge_stats(into: CorpusStats, part: CorpusStats) -> None:
    into.files += part.files
    into.docs += part.docs
    into.chars += part.chars
    into.han_chars += part.han_chars
    into.encodings.update(part.encodings)
    into.split_lines += part.split_lines
    for f, codecs in part.line_encodings.items():
        mine = into.line_encodings.setdefault(f, {})
        for enc, n in codecs.items():
            mine[enc] = mine.get(enc, 0) + n
    for f, u in part.undecodable.items():
        mine = into.undecodable.setdefault(f, {"lines": 0, "first_line": u["first_line"], "bytes": 0})
        mine["lines"] += u["lines"]
        mine["bytes"] += u["bytes"]
    for why, items in part.dropped_files.items():
        into.dropped_files.setdefault(why, []).extend(items)


def resolve_num_proc(num_proc: int) -> int:
    if num_proc < 0:
        raise UserError(f"--num-proc must be 0 (all cores) or more, got {num_proc}")
    if num_proc == 0:
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover (macOS)
            return os.cpu_count() or 1
    return num_proc


def count_spans(paths, cfg, stats: CorpusStats | None = None, num_proc: int = 0, progress: bool = True,
                digits: bool = True, space_prefix: bool = True, cache_dir: str | Path | None = None,
                executor: ExecutorConfig | None = None) -> Counter:
    """The corpus's span counts under cfg's sampling (max_chars, seed, encoding) and budget (max_spans).

    cache_dir: each finished unit's counts are kept there, so a run killed while counting reuses them (the caller
    removes the folder when it no longer needs them); without it, a temporary folder is used and removed."""
    import dataclasses

    files = list_corpus_files(paths)
    stats = stats if stats is not None else CorpusStats()
    sizes = {str(f): uncompressed_size(f) for f in files}
    threshold = sample_threshold(sum(sizes.values()), cfg.max_chars)
    units = work_units(files)
    unit_size = [sizes[u.path] if u.end is None else u.end - u.start for u in units]
    cfg_ex = executor or ExecutorConfig()
    if not cfg_ex.workers and cfg_ex.executor == "local":
        cfg_ex = dataclasses.replace(cfg_ex, workers=resolve_num_proc(num_proc))
    cfg_ex.validate()
    jobs = [(u, cfg.encoding, cfg.seed, threshold, cfg.word_aware, digits, space_prefix, cfg.max_spans) for u in units]
    with contextlib.ExitStack() as stack:
        if cache_dir is None:
            cache_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="zhllama-spans-"))
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        step = CountUnits(jobs, str(cache_dir))
        if progress:
            n = min(cfg_ex.resolved_workers(), len(jobs)) if cfg_ex.executor == "local" else None
            where = f"{n} process(es)" if n else f"{cfg_ex.executor} executor"
            print(f"[vocab] counting Chinese spans in {len(files)} file(s), {sum(unit_size) / 1e6:,.1f} MB in "
                  f"{len(units)} unit(s), {where}", file=sys.stderr, flush=True)  # stdout may carry the JSON result
        # the engine's records of this set of units (another sample or budget is another set)
        run_id = hashlib.sha256(repr(step.keys).encode()).hexdigest()[:16]
        run_units(step, cfg_ex, Path(cache_dir) / "pipeline" / run_id, progress="counting spans" if progress else None)
        total = _merge(step, stats, cfg.max_spans, files)
    if progress and stats.split_lines:
        print(f"warning: {stats.split_lines:,} line(s) longer than {MAX_LINE_CHARS:,} characters were cut into pieces "
              f"of at most {MAX_LINE_CHARS:,} (vocab.spans.MAX_LINE_CHARS)", file=sys.stderr, flush=True)
    return total


def _merge(step: CountUnits, stats: CorpusStats, max_spans: int, files) -> Counter:
    """The units' counts added in unit order (pruned at the budget as they come): the same for any task count."""
    total: Counter = Counter()
    ndocs = 0
    limit = 2 * max_spans
    for i in range(step.n_units):
        with open(step.path(i), "rb") as f:
            spans, part, docs = pickle.load(f)
        _merge_stats(stats, part)
        ndocs += docs
        if not total:
            total = spans
        else:
            for s, c in spans.items():
                total[s] += c
                if limit and len(total) > limit:
                    total = prune(total, max_spans)
        if limit and len(total) > limit:
            total = prune(total, max_spans)
        del spans
    if ndocs == 0:
        raise UserError(empty_corpus(files))
    return prune(total, max_spans)
