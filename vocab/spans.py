"""Count the CJK spans of a whole corpus for continued BPE: fixed work units, N processes, a fixed memory budget.

Work units (zhllama.units) depend on the corpus alone, never on N: every file is one unit, except uncompressed .txt
files over UNIT_BYTES, which are cut into line-aligned byte ranges of about UNIT_BYTES. Each unit is counted in a worker
process (in this process for N=1) with the same sampling and pruning, and the counts are merged in unit order,
so the counts, and so the model, are the same for every N.

Memory: a counter holding more than 2 x max_spans distinct spans is pruned (lossy-counting style, see `prune`),
so a worker holds at most 2 x max_spans spans and the merging process at most 2 x max_spans plus one unit's
counts; training then keeps at most max_spans. With fewer distinct spans than max_spans nothing is pruned and
the counts are exact.

Public API:
    UNIT_BYTES, MAX_LINE_CHARS
    split_overlong(docs, stats=None, max_chars=MAX_LINE_CHARS) -> Iterator[str]   lines over the limit cut in pieces
    uncompressed_size(path) -> int                 bytes of text in a file (.gz: decompressed, exact)
    sample_threshold(total_bytes, max_chars) -> int     the hash threshold of `train.sampled_texts` (2**32: keep all)
    keep_doc(doc, seed, threshold) -> bool
    work_units(files) -> [zhllama.units.Unit]
    prune(counter, max_spans) -> Counter
    count_spans(paths, cfg, stats=None, num_proc=0, progress=True, cache_dir=None) -> Counter
                                                   (cfg: vocab.train.TrainConfig; cache_dir: finished units, reused)
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import sys
import zlib
from collections import Counter
from pathlib import Path

from corpora.reader import CorpusStats, iter_documents, iter_range_lines, list_corpus_files, sniff
from zhllama.errors import UserError
from zhllama.units import Unit, plan_units

UNIT_BYTES = 16 << 20  # a fixed unit size (never derived from N) keeps the merge order, and so the result, fixed
# A line (document) longer than this many characters is cut at sentence ends (corpora.clean.split_long, hard cuts
# where a sentence is longer) into pieces of at most this size, each sampled and counted as a document. One 50 MB
# line without a newline was otherwise a single document, and without punctuation a single span of 17 M
# characters that sentencepiece re-encodes on every merge round: vocab build never finished. The longest line of
# the shared corpus is 17,020 characters, so the vocabulary of normal corpora is unchanged.
MAX_LINE_CHARS = 100_000
_READ = 1 << 20


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


def prune(counter: Counter, max_spans: int) -> Counter:
    """The max_spans most frequent spans, rarest dropped first (lossy counting). Of the count class at the cut, the
    spans with the smallest CRC-32 are kept: neither the order spans were seen in nor their code points bias the
    choice, and the result is the same for any order. A kept span can be undercounted by at most the sum of the
    cut counts of the earlier prunes that dropped it."""
    if not max_spans or len(counter) <= max_spans:
        return counter
    classes = Counter(counter.values())
    above, cut = 0, 0
    for v in sorted(classes, reverse=True):
        if above + classes[v] > max_spans:
            cut = v
            break
        above += classes[v]
    boundary = sorted((s for s, n in counter.items() if n == cut), key=lambda s: (zlib.crc32(s.encode()), s))
    keep = set(boundary[:max_spans - above])
    return Counter({s: n for s, n in counter.items() if n > cut or s in keep})


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


def _count_unit(job):
    """One unit's spans (pruned at the budget), the reader's statistics, and the number of documents sampled;
    with a cache folder, reused from there or saved there (atomically) for a rerun after a kill."""
    cache = job[-1]
    path = Path(cache) / f"{_unit_key(job[:-1])}.pkl" if cache else None
    if path is not None and path.is_file():
        with open(path, "rb") as f:
            return pickle.load(f)
    result = _count(*job[:-1])
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            pickle.dump(result, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    return result


def _count(unit, encoding, seed, threshold, word_aware, digits, space_prefix, max_spans):
    from vocab.extend import collect_spans

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
                digits: bool = True, space_prefix: bool = True, cache_dir: str | Path | None = None) -> Counter:
    """The corpus's span counts under cfg's sampling (max_chars, seed, encoding) and budget (max_spans).

    cache_dir: each finished unit's counts are kept there, so a run killed while counting reuses them (the caller
    removes the folder when it no longer needs them)."""
    files = list_corpus_files(paths)
    stats = stats if stats is not None else CorpusStats()
    sizes = {str(f): uncompressed_size(f) for f in files}
    threshold = sample_threshold(sum(sizes.values()), cfg.max_chars)
    units = work_units(files)
    unit_size = [sizes[u.path] if u.end is None else u.end - u.start for u in units]
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(u, cfg.encoding, cfg.seed, threshold, cfg.word_aware, digits, space_prefix, cfg.max_spans,
             str(cache_dir) if cache_dir is not None else None) for u in units]
    n = min(resolve_num_proc(num_proc), len(jobs))
    if progress:
        # the bar below moves once per finished unit (and only on a terminal): say what is being done first
        print(f"[vocab] counting Chinese spans in {len(files)} file(s), {sum(unit_size) / 1e6:,.1f} MB in {len(units)} "
              f"unit(s), {n} process(es)", file=sys.stderr, flush=True)  # stdout may carry the JSON result
    bar = None
    if progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (a log file or a test keeps only the messages)
        bar = tqdm(total=sum(unit_size), desc=f"counting spans ({n} proc)", unit="B", unit_scale=True, disable=None)
    total: Counter = Counter()
    ndocs = 0
    pool = None
    try:
        if n > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(n)
            results = pool.imap(_count_unit, jobs)
        else:
            results = map(_count_unit, jobs)
        for size, (spans, part, docs) in zip(unit_size, results):
            _merge_stats(stats, part)
            ndocs += docs
            limit = 2 * cfg.max_spans
            if not total:
                total = spans
            else:
                for s, c in spans.items():
                    total[s] += c
                    if limit and len(total) > limit:
                        total = prune(total, cfg.max_spans)
            if limit and len(total) > limit:
                total = prune(total, cfg.max_spans)
            del spans
            if bar is not None:
                bar.update(size)
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if progress and stats.split_lines:
        print(f"warning: {stats.split_lines:,} line(s) longer than {MAX_LINE_CHARS:,} characters were cut into pieces "
              f"of at most {MAX_LINE_CHARS:,} (vocab.spans.MAX_LINE_CHARS)", file=sys.stderr, flush=True)
    if ndocs == 0:
        from vocab.train import empty_corpus

        raise UserError(empty_corpus(files))
    return prune(total, cfg.max_spans)
