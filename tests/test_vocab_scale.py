"""vocab at corpus scale: span counting in fixed work units by N processes, the span budget, the .gz sample size."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter

import pytest

from conftest import make_chinese_lines, write_lines, write_text_records
from corpora.reader import iter_corpus
from vocab import spans as spans_mod
from vocab.extend import ExtendConfig, collect_spans, extend_vocabulary
from vocab.spans import count_spans, prune, work_units
from vocab.spmodel import load_model
from vocab.train import TrainConfig, sampled_texts, train


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """A .txt big enough to be cut into byte ranges (with a small UNIT_BYTES), a .jsonl and a .txt.gz."""
    d = tmp_path_factory.mktemp("mixed")
    write_lines(d / "a.txt", make_chinese_lines(3000, 1), end="\n\n")
    write_text_records(d / "b.jsonl", make_chinese_lines(500, 2))
    with gzip.open(d / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(make_chinese_lines(800, 3)) + "\n")
    return d


def test_work_units_are_line_aligned_and_cover_the_file(mixed_corpus, monkeypatch):
    monkeypatch.setattr(spans_mod, "UNIT_BYTES", 20_000)
    units = work_units(sorted(mixed_corpus.iterdir()))
    a = [u for u in units if u.path.endswith("a.txt")]
    data = (mixed_corpus / "a.txt").read_bytes()
    assert len(a) > 5 and a[0].start == 0 and a[-1].end == len(data)
    assert all(x.end == y.start for x, y in zip(a, a[1:]))
    assert all(data[u.end - 1:u.end] == b"\n" for u in a)
    assert [u.end for u in units if not u.path.endswith("a.txt")] == [None, None]  # .jsonl and .gz stay whole


@pytest.mark.parametrize("max_chars", [10**9, 40_000])  # everything, and a sample
def test_counting_in_units_equals_one_stream(mixed_corpus, monkeypatch, max_chars):
    """Byte ranges + merge in unit order = counting the sampled stream in one go, for N=1 and N=2."""
    monkeypatch.setattr(spans_mod, "UNIT_BYTES", 20_000)
    cfg = TrainConfig(model_type="extend", max_chars=max_chars, max_spans=0)
    expected = collect_spans(sampled_texts([mixed_corpus], cfg))
    one = count_spans([mixed_corpus], cfg, num_proc=1, progress=False)
    two = count_spans([mixed_corpus], cfg, num_proc=2, progress=False)
    assert list(one.items()) == list(expected.items()) == list(two.items())  # same counts, same order
    if max_chars < 10**9:
        assert 0 < sum(one.values()) < sum(count_spans([mixed_corpus], TrainConfig(max_spans=0), num_proc=1, progress=False).values())


def test_extend_model_identical_for_one_and_two_processes(tmp_path, tiny_base, mixed_corpus, monkeypatch):
    monkeypatch.setattr(spans_mod, "UNIT_BYTES", 20_000)
    out = {}
    for n in (1, 2):
        cfg = TrainConfig(model_type="extend", num_added=300, character_coverage=0.7, num_proc=n)
        train([mixed_corpus], tmp_path / str(n), cfg, base_path=tiny_base, allow_fewer=True)
        out[n] = (tmp_path / str(n) / "chinese_sp.model").read_bytes()
    assert out[1] == out[2]
    # and the same pieces as the whole corpus counted as one stream (the pre-unit code path)
    base = load_model(tiny_base)
    res = extend_vocabulary(base, iter_corpus([mixed_corpus]), ExtendConfig(num_added=300, character_coverage=0.7))
    assert [p.piece for p in load_model(tmp_path / "1" / "chinese_sp.model").pieces[-300:]] == res.pieces


def test_prune_keeps_the_most_frequent_whatever_the_order():
    c = Counter({"甲": 5, "乙": 3, "丙": 3, "丁": 1, "戊": 1, "己": 1, "庚": 1})
    assert prune(c, 7) is c
    for k in range(1, 7):
        p = prune(c, k)
        assert len(p) == k and all(p[s] == c[s] for s in p)
        assert min(p.values()) >= max((n for s, n in c.items() if s not in p), default=0)
        assert prune(Counter(dict(reversed(list(c.items())))), k) == p  # independent of the order seen
    assert set(prune(c, 3)) == {"甲", "乙", "丙"}


def test_span_budget_bounds_the_spans_and_default_changes_nothing(tiny_base, zh_corpus):
    base = load_model(tiny_base)
    exact = collect_spans(iter_corpus([zh_corpus]))
    small = collect_spans(iter_corpus([zh_corpus]), max_spans=len(exact) // 4)
    small = prune(small, len(exact) // 4)
    assert len(small) == len(exact) // 4
    assert all(exact[s] >= n for s, n in small.items())  # counts are never over-counted
    cfg = dict(num_added=300, min_batch=50, character_coverage=0.7)
    ref = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(**cfg))
    same = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(**cfg, max_spans=len(exact)))
    assert same.pieces == ref.pieces and same.stats == ref.stats
    bound = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(**cfg, max_spans=len(exact) // 4))
    assert bound.stats["distinct_spans"] <= len(exact) // 4 < ref.stats["distinct_spans"]


def test_gz_sample_is_sized_by_its_uncompressed_text(tmp_path):
    """--max-chars caps the text read from a .gz as from the same .txt (not its smaller size on disk)."""
    lines = make_chinese_lines(3000, 7)
    (tmp_path / "t").mkdir()
    (tmp_path / "g").mkdir()
    (tmp_path / "t" / "x.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "g" / "x.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    assert (tmp_path / "g" / "x.txt.gz").stat().st_size < 0.6 * (tmp_path / "t" / "x.txt").stat().st_size
    cfg = TrainConfig(max_chars=sum(map(len, lines)) // 4)
    from_txt = list(sampled_texts([tmp_path / "t"], cfg))
    assert list(sampled_texts([tmp_path / "g"], cfg)) == from_txt
    assert 0.15 < sum(map(len, from_txt)) / sum(map(len, lines)) < 0.4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "vocab", *map(str, args)], capture_output=True, text=True)


def test_build_reuses_training_through_the_run_folder_and_num_proc_is_not_an_input(tmp_path, tiny_base, zh_corpus):
    out = tmp_path / "vocab"
    common = ["build", "--base", tiny_base, "--corpus", zh_corpus, "--out", out, "--num-added", "300",
              "--character-coverage", "0.7"]
    r = _cli(*common, "--num-proc", "1")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "resolved_config.json").read_text(encoding="utf-8"))
    assert cfg["steps"]["train"]["config"]["num_added"] == 300 and not (out / "train_stamp.json").exists()
    assert not (out / ".spans").exists()  # the counted units go once the model is written
    model = (out / "chinese_sp.model").read_bytes()
    r = _cli(*common, "--num-proc", "2")  # another N: nothing to redo
    assert r.returncode == 0 and "up to date" in r.stdout
    r = _cli(*common, "--set", "vocab.pad=true")  # only the merge changed: training is reused
    assert r.returncode == 0, r.stderr
    assert "skipping training" in r.stdout and (out / "chinese_sp.model").read_bytes() == model
    assert len(load_model(out / "tokenizer.model").pieces) == len(load_model(tiny_base).pieces) + 301
    r = _cli(*common, "--max-spans", "50")  # a binding budget is a different training input
    assert r.returncode == 0, r.stderr
    assert "skipping training" not in r.stdout
    assert json.loads((out / "train_stats.json").read_text())["distinct_spans"] <= 50


def test_train_and_merge_take_recipes(tmp_path, tiny_base, zh_corpus):
    r = _cli("train", "--corpus", zh_corpus, "--out", tmp_path / "t", "--base", tiny_base, "--recipe", "tiny",
             "--set", "vocab.num_added=300", "--character-coverage", "0.7", "--allow-fewer")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[:r.stdout.rindex("}") + 1])["model_type"] == "extend"  # the recipe's, not bpe
    r = _cli("merge", "--base", tiny_base, "--add", tmp_path / "t" / "chinese_sp.model", "--out", tmp_path / "m",
             "--set", "vocab.pad=true")
    assert r.returncode == 0, r.stderr
    assert load_model(tmp_path / "m" / "tokenizer.model").pieces[-1].piece == "[PAD]"
    r = _cli("train", "--corpus", zh_corpus, "--out", tmp_path / "t", "--set", "vocab.max_spans=-1")
    assert r.returncode == 2 and "max_spans" in r.stderr and "Traceback" not in r.stderr


def test_counted_units_are_reused_after_a_kill(tmp_path, mixed_corpus, monkeypatch):
    """Each finished unit is saved as it completes: a rerun recounts only the units that were not finished."""
    monkeypatch.setattr(spans_mod, "UNIT_BYTES", 20_000)
    cfg = TrainConfig(model_type="extend", max_spans=0)
    cache = tmp_path / "cache"
    full = count_spans([mixed_corpus], cfg, num_proc=2, progress=False, cache_dir=cache)
    saved = sorted(cache.glob("*.pkl"))
    assert len(saved) == len(work_units(sorted(mixed_corpus.iterdir()))) > 5
    for f in saved[::2]:  # as if killed with half the units counted
        f.unlink()
    counted = []
    real = spans_mod._count
    monkeypatch.setattr(spans_mod, "_count", lambda *job: counted.append(job[0]) or real(*job))
    again = count_spans([mixed_corpus], cfg, num_proc=1, progress=False, cache_dir=cache)
    assert list(again.items()) == list(full.items())
    assert len(counted) == len(saved[::2])


@pytest.mark.parametrize("tasks,workers", [(1, 1), (2, 2), (4, 2)])
def test_span_counts_identical_for_1_2_and_4_datatrove_tasks(mixed_corpus, monkeypatch, tmp_path, tasks, workers):
    """The units dealt over 1, 2 or 4 datatrove ranks (round-robin) give the counts, in the same order, and the
    reader statistics of one rank per unit in one process."""
    from corpora.reader import CorpusStats
    from zhllama.executors import ExecutorConfig

    monkeypatch.setattr(spans_mod, "UNIT_BYTES", 20_000)
    cfg = TrainConfig(model_type="extend", max_chars=60_000, max_spans=500)  # sampled, and the budget binds
    ref_stats, got_stats = CorpusStats(), CorpusStats()
    ref = count_spans([mixed_corpus], cfg, ref_stats, num_proc=1, progress=False)
    got = count_spans([mixed_corpus], cfg, got_stats, progress=False, cache_dir=tmp_path / "c",
                      executor=ExecutorConfig(tasks=tasks, workers=workers))
    assert len(work_units(sorted(mixed_corpus.iterdir()))) > 4
    assert list(got.items()) == list(ref.items()) and len(ref) == 500
    assert got_stats.as_dict() == ref_stats.as_dict()
    run = next((tmp_path / "c" / "pipeline").iterdir()) / f"tasks-{tasks}"
    assert sorted(p.name for p in (run / "completions").iterdir()) == [f"{i:05d}" for i in range(tasks)]


_COUNT = """
import pickle, sys
from vocab import spans
from vocab.train import TrainConfig
spans.UNIT_BYTES = 2_000
c = spans.count_spans([sys.argv[1]], TrainConfig(model_type="extend", max_spans=0), num_proc=2, progress=False,
                      cache_dir=sys.argv[2])
open(sys.argv[3], "wb").write(pickle.dumps(list(c.items())))
"""


def test_kill9_while_counting_then_rerun_gives_identical_counts(tmp_path):
    """kill -9 of the whole process group (the command and its datatrove workers) after a few units are counted;
    the same command then counts only the rest, and the counts equal an uninterrupted run's."""
    import os
    import signal
    import time

    from conftest import ROOT

    corpus = tmp_path / "zh"
    corpus.mkdir()
    write_lines(corpus / "a.txt", make_chinese_lines(6000, 5))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-c", _COUNT, str(corpus)]
    ref = subprocess.run([*cmd, str(tmp_path / "ref"), str(tmp_path / "ref.pkl")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    n_units = len(list((tmp_path / "ref").glob("*.pkl")))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, str(cut), str(tmp_path / "cut.pkl")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while len(list(cut.glob("*.pkl"))) < 3 and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    assert proc.poll() is None, "counting finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.read_bytes() for p in cut.glob("*.pkl")}
    assert 3 <= len(before) < n_units and not (tmp_path / "cut.pkl").exists()
    again = subprocess.run([*cmd, str(cut), str(tmp_path / "cut.pkl")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "cut.pkl").read_bytes() == (tmp_path / "ref.pkl").read_bytes()
    assert all((cut / n).read_bytes() == b for n, b in before.items())  # finished units were not redone
    assert not list(cut.glob("*.tmp*"))


def test_vocab_modules_import_no_cycle():
    """Issue 24: vocab.extend and vocab.spans imported each other (inside functions, to dodge the cycle); the
    shared budget lives in vocab.budget now. No vocab module may reach itself through vocab imports, lazy ones
    included."""
    import ast

    from conftest import ROOT

    graph = {}
    for path in (ROOT / "vocab").glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vocab."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "vocab":
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vocab."))
        graph[path.stem] = deps - {path.stem}

    def reaches(start, node, seen):
        for d in graph.get(node, ()):
            if d == start:
                return True
            if d not in seen:
                seen.add(d)
                if reaches(start, d, seen):
                    return True
        return False

    assert [m for m in sorted(graph) if reaches(m, m, set())] == []
