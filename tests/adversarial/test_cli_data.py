"""Bad data files through the real CLIs (issue 21, data-file cases): every case ends in exit 2 with one line naming
the file (never a traceback), or in correct output; the input files are byte-for-byte unchanged afterwards.

The files come from `BadFiles`, a small generator: wrong encoding, mixed encodings, empty, whitespace-only, a huge
CSV cell, a huge line, a header-only CSV, missing answers.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_chinese_lines, save_tiny_llama

CEVAL_HEAD = ["id", "question", "A", "B", "C", "D", "answer"]
ROWS = [("0", "路由器工作在OSI模型的____", "物理层", "数据链路层", "网络层", "应用层", "C"),
        ("1", "下列协议中面向连接的是____", "UDP", "TCP", "IP", "ICMP", "B"),
        ("2", "子网掩码255.255.255.0的前缀长度是____", "8", "16", "24", "32", "C")]


class BadFiles:
    """Writes one bad input of each kind under a root folder; each method returns the path it made."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lines = list(dict.fromkeys(make_chinese_lines(600, 21)))

    def _dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    # ---- corpora
    def empty(self) -> Path:
        d = self._dir("empty")
        (d / "a.txt").write_bytes(b"")
        return d

    def whitespace_only(self) -> Path:
        d = self._dir("whitespace")
        (d / "a.txt").write_bytes(b"   \n\t\n\r\n \xe3\x80\x80\n")   # spaces, tab, CRLF, U+3000 ideographic space
        (d / "b.jsonl").write_text('{"text": "   "}\n\n{"text": "\\n\\t"}\n', encoding="utf-8")
        return d

    def mixed_encodings(self) -> tuple[Path, list[str]]:
        """Every other line UTF-8 / GBK (GB18030), then one line that is neither; returns (folder, the good lines)."""
        d = self._dir("mixed")
        raw = b"".join((s.encode("gb18030") if i % 2 else s.encode("utf-8")) + b"\n" for i, s in enumerate(self.lines))
        (d / "m.txt").write_bytes(raw + b"\xff\xfe\xff\xfe\xff\n")
        return d, self.lines

    def wrong_encoding(self) -> tuple[Path, list[str]]:
        """A whole file in GB18030 (the reader detects it)."""
        d = self._dir("gbk")
        (d / "g.txt").write_bytes(("\n".join(self.lines) + "\n").encode("gb18030"))
        return d, self.lines

    def huge_line(self, chars: int) -> Path:
        """One line of `chars` Han characters without punctuation or newline inside: a single CJK span."""
        d = self._dir(f"huge_line_{chars}")
        han = "".join(re.findall(r"[\u4e00-\u9fff]", "".join(self.lines)))
        text = (han * (chars // len(han) + 1))[:chars]
        (d / "l.txt").write_text(text + "\n", encoding="utf-8")
        return d

    # ---- C-Eval folders (dev/ and val/ or test/)
    def ceval(self, name: str, val_rows=ROWS, val_head=CEVAL_HEAD, split: str = "val", dev_rows=ROWS) -> Path:
        d = self._dir(name)
        for sub, head, rows in (("dev", CEVAL_HEAD, dev_rows), (split, val_head, val_rows)):
            (d / sub).mkdir(exist_ok=True)
            with open(d / sub / f"computer_network_{sub}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(head)
                w.writerows(rows)
        return d

    def huge_cell(self) -> Path:
        big = "很" * 131_073   # one more than csv.field_size_limit()
        return self.ceval("huge_cell", val_rows=[ROWS[0], ("1", big, "A", "B", "C", "D", "A"), ROWS[2]])

    def header_only(self) -> Path:
        return self.ceval("header_only", val_rows=[])

    def missing_answers(self) -> Path:
        return self.ceval("missing_answers", val_rows=[ROWS[0], (*ROWS[1][:6], ""), ROWS[2]])

    def no_answer_column(self) -> Path:
        return self.ceval("no_answer_column", val_rows=[r[:6] for r in ROWS], val_head=CEVAL_HEAD[:6])


def _hashes(*paths: Path) -> dict:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert out
    return out


def _run(module: str, *args, inputs=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root; asserts the inputs are unchanged and no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ZHLLAMA_TRACEBACK", None)
    before = _hashes(*inputs) if inputs else {}
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    if inputs:
        assert _hashes(*inputs) == before
    return r


def _one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 and exactly one `error:` line on stderr, holding every needle."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> BadFiles:
    return BadFiles(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def model(tok_dir, tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("model"), tok_dir, max_positions=1024)


# ------------------------------------------------------------------ evaluation choice (C-Eval CSVs)
def test_choice_cell_over_the_csv_field_limit_is_a_named_error(bad, model, tmp_path):
    data = bad.huge_cell()
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--json", tmp_path / "o.json", "--no-progress",
             inputs=[data, model])
    _one_error(r, "computer_network_val.csv: line 3:", "131,072 characters")
    assert not (tmp_path / "o.json").exists()


def test_choice_header_only_csv_is_a_named_error(bad, model, tmp_path):
    data = bad.header_only()
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--json", tmp_path / "o.json", "--no-progress",
             inputs=[data])
    _one_error(r, "computer_network_val.csv", "no question rows")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("case", ["missing_answers", "no_answer_column"])
def test_choice_val_split_without_answers_is_a_named_error(bad, model, tmp_path, case):
    """C-Eval's val split is scored: a missing answer is an error naming the line, never accuracy null + exit 0."""
    data = getattr(bad, case)()
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--json", tmp_path / "o.json", "--no-progress",
             inputs=[data])
    line = "line 3" if case == "missing_answers" else "line 2"
    _one_error(r, f"computer_network_val.csv: record ending on {line}: no answer", "val split is scored")
    assert not (tmp_path / "o.json").exists()


def test_choice_test_split_is_scored_by_its_submission_and_half_answered_is_an_error(bad, model, tmp_path):
    # C-Eval's own test split has no answers: predictions and a submission file, accuracy null, exit 0
    data = bad.ceval("test_split", val_rows=[r[:6] for r in ROWS], val_head=CEVAL_HEAD[:6], split="test")
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--split", "test", "--shots", "1",
             "--json", tmp_path / "t.json", "--no-progress", inputs=[data])
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    sub = json.loads((tmp_path / "t.submission.json").read_text(encoding="utf-8"))
    assert res["subjects"]["computer_network"]["accuracy"] is None and res["subjects"]["computer_network"]["n"] == 3
    assert set(sub["computer_network"]) == {"0", "1", "2"}
    # some answers given, some not: which subset would the accuracy be of? an error naming the first gap
    data = bad.ceval("half_answered", val_rows=[ROWS[0], (*ROWS[1][:6], ""), ROWS[2]], split="test")
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--split", "test", "--json",
             tmp_path / "h.json", "--no-progress", inputs=[data])
    _one_error(r, "computer_network_test.csv: record ending on line 3: no answer, while 2 other row(s) have one")


def test_choice_header_only_dev_file_is_a_named_error(bad, model, tmp_path):
    data = bad.ceval("dev_header_only", dev_rows=[])
    r = _run("evaluation", "choice", "--model", model, "--data", data, "--json", tmp_path / "o.json", "--no-progress",
             inputs=[data])
    _one_error(r, "computer_network_dev.csv", "no question rows")


# ------------------------------------------------------------------ empty and whitespace-only corpora
@pytest.mark.parametrize("kind", ["whitespace_only", "empty"])
def test_corpora_prepare_refuses_a_corpus_without_text(bad, tmp_path, kind):
    corpus = getattr(bad, kind)()
    out = tmp_path / "out"
    r = _run("corpora", "prepare", corpus, "--out", out, "--no-progress", inputs=[corpus])
    _one_error(r, "a.txt", "no text in any input", "empty or holds only whitespace")
    assert not (out / "train").exists() and not (out / "stats.json").exists() and not (out / ".work").exists()


def test_vocab_build_and_train_refuse_a_whitespace_only_corpus(bad, tiny_base, tmp_path):
    corpus = bad.whitespace_only()
    r = _run("vocab", "build", "--base", tiny_base, "--corpus", corpus, "--out", tmp_path / "v", "--num-added", "50",
             inputs=[corpus, tiny_base])
    _one_error(r, "empty corpus", "a.txt", "b.jsonl", "whitespace")
    assert not (tmp_path / "v" / "tokenizer.model").exists()
    r = _run("vocab", "train", "--corpus", corpus, "--out", tmp_path / "t", inputs=[corpus])
    _one_error(r, "empty corpus", "a.txt", "b.jsonl")


TINY_RECIPE = """\
name: adversarial
model: {hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, max_position_embeddings: 64, base_vocab_size: 600}
pretrain:
  block_size: 32
  precision: fp32
  zero_stage: 0
  phase1: {learning_rate: 1.0e-2, global_batch_size: 2, per_device_batch_size: 2, max_steps: 1}
  phase2: {learning_rate: 1.0e-2, global_batch_size: 2, per_device_batch_size: 2, max_steps: 1}
"""


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_pretrain_refuses_a_whitespace_only_corpus(bad, tiny_base, tmp_path_factory, phase):
    from pretrain.phases import init_model
    from zhllama.recipe import load_recipe

    d = tmp_path_factory.mktemp("pt")
    recipe = d / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    init_model(load_recipe(recipe), tiny_base, d / "base", seed=1)
    corpus = bad.whitespace_only()
    # phase 1 also with the Chinese-share check off: still no text (phase 2 shares the check: once is enough there)
    for extra in ([], ["--min-chinese-share", "0"]) if phase == "phase1" else (["--min-chinese-share", "0"],):
        out = d / f"out{len(extra)}"
        r = _run("pretrain", phase, "--recipe", recipe, "--model", d / "base", "--corpus", corpus, "--out", out,
                 *(["--base-vocab-size", "600"] if phase == "phase1" else []), *extra, inputs=[corpus, d / "base"])
        _one_error(r, "a.txt", "no text", "whitespace")
        assert not list(out.glob("checkpoint-*")) and not (out / "result.json").exists()


# ------------------------------------------------------------------ encodings
def test_mixed_utf8_and_gbk_lines_are_each_decoded_and_the_rest_dropped_and_counted(bad, tiny_base, tmp_path):
    """The reader (through `vocab report`) reads both halves right; the undecodable line is dropped, counted
    and named on stderr."""
    corpus, lines = bad.mixed_encodings()
    out = tmp_path / "rep.json"
    r = _run("vocab", "report", "--tokenizer", tiny_base, "--base", tiny_base, "--text", corpus, "--json", out,
             inputs=[corpus, tiny_base])
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text(encoding="utf-8"))
    assert rep["lines"] == len(lines)
    assert rep["tokenizers"]["base"]["characters"] == sum(map(len, lines))
    warn = [w for w in r.stderr.splitlines() if w.startswith("warning:")]
    assert len(warn) == 1 and "m.txt: dropped 1 line(s)" in warn[0] and f"line {len(lines) + 1}" in warn[0]


def test_prepare_keeps_every_line_of_a_mixed_file_and_reports_codecs(bad, tmp_path):
    corpus, lines = bad.mixed_encodings()
    out = tmp_path / "out"
    r = _run("corpora", "prepare", corpus, "--out", out, "--no-progress", "--heldout-fraction", "0", "--min-chars", "1",
             inputs=[corpus])
    assert r.returncode == 0, r.stderr
    kept = [json.loads(s)["text"] for f in sorted((out / "train").glob("*.jsonl.gz")) for s in gzip.open(f, "rt")]
    assert kept == lines        # before: the UTF-8 half kept as GB18030 mojibake
    st = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    f = st["files"][str(corpus / "m.txt")]
    half = len(lines) // 2
    assert f["line_encodings"] == {"utf-8": len(lines) - half, "gb18030": half}
    assert f["lines_with_bad_bytes"] == 1
    assert "lines by codec: gb18030 %d, utf-8 %d" % (half, len(lines) - half) in r.stderr


def test_whole_gbk_file_reads_exactly_like_utf8(bad, tiny_base, tmp_path):
    corpus, lines = bad.wrong_encoding()
    out = tmp_path / "rep.json"
    r = _run("vocab", "report", "--tokenizer", tiny_base, "--base", tiny_base, "--text", corpus, "--json", out,
             inputs=[corpus])
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    rep = json.loads(out.read_text(encoding="utf-8"))
    assert rep["lines"] == len(lines) and rep["tokenizers"]["base"]["characters"] == sum(map(len, lines))
    # a wrong --encoding is still a named error (line and byte offset), not mojibake
    r = _run("vocab", "train", "--corpus", corpus, "--out", tmp_path / "t", "--encoding", "utf-8", inputs=[corpus])
    _one_error(r, "g.txt: line 1, byte offset", "not valid utf-8", "GB18030")


# ------------------------------------------------------------------ huge line
def test_vocab_build_cuts_an_overlong_line_at_the_default_limit_and_says_so(bad, tiny_base, tmp_path):
    """A single line of 3 x MAX_LINE_CHARS + 1 Han characters (the real default limit, ~0.9 MB): cut into 4 pieces,
    counted in train_stats.json, warned about, and the counting step announced. The 50 MB line of the issue is
    the same path, 50 times longer."""
    from vocab.spans import MAX_LINE_CHARS

    assert MAX_LINE_CHARS == 100_000
    corpus = bad.huge_line(3 * MAX_LINE_CHARS + 1)
    out = tmp_path / "v"
    r = _run("vocab", "build", "--base", tiny_base, "--corpus", corpus, "--out", out, "--num-added", "300",
             "--character-coverage", "0.7", "--num-proc", "1", inputs=[corpus, tiny_base], timeout=600)
    assert r.returncode == 0, r.stderr
    assert "[vocab] counting Chinese spans in 1 file(s)" in r.stderr  # progress goes to stderr: stdout may carry JSON
    assert "1 line(s) longer than 100,000 characters were cut" in r.stderr
    stats = json.loads((out / "train_stats.json").read_text(encoding="utf-8"))
    assert stats["corpus"]["split_lines"] == 1 and stats["corpus"]["docs"] == 1
    rep = json.loads((out / "vocab_report.json").read_text(encoding="utf-8"))
    assert rep["lines"] == 4        # the report measures the pieces, not one 300,001-character line
    assert (out / "tokenizer.model").is_file()


def test_overlong_lines_are_cut_and_normal_lines_untouched():
    from corpora.reader import CorpusStats
    from vocab.spans import split_overlong

    normal = ["短句。", "一" * 10]
    assert list(split_overlong(normal, max_chars=10)) == normal
    stats = CorpusStats()
    long = "甲" * 8 + "。" + "乙" * 25
    pieces = list(split_overlong([long], stats, max_chars=10))
    assert "".join(pieces) == long and [len(p) for p in pieces] == [10, 10, 10, 4]
    assert stats.split_lines == 1 and stats.as_dict()["split_lines"] == 1


def test_short_gbk_lines_that_are_valid_utf8_still_read_as_gbk(bad, tmp_path):
    """"一为之也" in GBK is the valid UTF-8 "һΪ֮Ҳ" (Cyrillic, Greek, Hebrew): in a GBK file it stays Chinese, while a
    UTF-8 line of a mostly-GBK file stays UTF-8."""
    from corpora.reader import CorpusStats, iter_corpus

    lines = bad.lines[:200] + ["一为之也", "时要说"]
    raw = b"".join(s.encode("gb18030") + b"\n" for s in lines) + "中文的UTF-8行".encode() + b"\n"
    assert "一为之也".encode("gb18030").decode("utf-8") == "һΪ֮Ҳ"
    (tmp_path / "g.txt").write_bytes(raw)
    stats = CorpusStats(warn=False)
    assert list(iter_corpus([tmp_path / "g.txt"], stats=stats)) == lines + ["中文的UTF-8行"]
    assert stats.as_dict()["line_encodings"] == {str(tmp_path / "g.txt"): {"gb18030": 202, "utf-8": 1}}
