"""Reference vocab tests on the real LLaMA tokenizer, the official Chinese model and real Chinese/English text."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from corpora.probes import TABLE1, probe_set
from vocab.audit import dead_pieces
from vocab.parity import disagreements, english_changed, hf_tokenizer
from vocab.spmodel import load_model, processor
from zhllama.hashing import sha256_file

pytestmark = pytest.mark.reference

OFFICIAL_49953 = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
OFFICIAL_49954 = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"


def _vocab(*args):
    r = subprocess.run([sys.executable, "-m", "vocab", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def llama(data_dir):
    return data_dir / "tokenizers" / "llama_tokenizer.model"


@pytest.fixture(scope="module")
def chinese_sp(data_dir):
    return data_dir / "tokenizers" / "chinese_sp.model"


@pytest.fixture(scope="module")
def zh_lines(data_dir):
    """2,000 lines across every source of the shared corpus."""
    files = sorted((data_dir / "zh_corpus" / "train").glob("*.txt"))
    per = 2000 // len(files) + 1
    lines = []
    for f in files:
        lines += [l for l in f.read_text(encoding="utf-8").splitlines() if l.strip()][:per]
    return lines[:2000]


@pytest.fixture(scope="module")
def en_outputs(data_dir):
    recs = json.loads((data_dir / "instructions" / "alpaca_en_52k_original.part01.json").read_text(encoding="utf-8"))
    return [r["output"] for r in recs[:3000] if r["output"].strip()]


@pytest.mark.parametrize("pad,pieces,sha", [(False, 49953, OFFICIAL_49953), (True, 49954, OFFICIAL_49954)])
def test_reference_merge_reproduces_official_tokenizers(tmp_path, llama, chinese_sp, pad, pieces, sha):
    args = ["merge", "--base", llama, "--add", chinese_sp, "--out", tmp_path / "tok", "--reference"] + (["--pad"] if pad else [])
    r = _vocab(*args)
    assert sha256_file(tmp_path / "tok" / "tokenizer.model") == sha
    m = load_model(tmp_path / "tok" / "tokenizer.model")
    assert len(m.pieces) == pieces
    if pad:
        assert m.pieces[49953].piece == "[PAD]"
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).pad_token_id == 49953
    rep = json.loads((tmp_path / "tok" / "merge_report.json").read_text(encoding="utf-8"))
    assert rep["merge"]["added_pieces"] == 17953 and rep["merge"]["overlapping_pieces"] == 2047
    assert rep["dead_pieces"]["count"] == 345  # the reference's defect, measured and reported
    assert sha in r.stdout


def test_table1_sentence(tmp_path, llama, chinese_sp):
    _vocab("merge", "--base", llama, "--add", chinese_sp, "--out", tmp_path / "ref", "--reference")
    assert len(processor(load_model(llama)).encode(TABLE1)) == 35
    assert len(processor(load_model(tmp_path / "ref")).encode(TABLE1)) == 16


def test_improved_merge_of_official_chinese_model(tmp_path, llama, chinese_sp, zh_lines, en_outputs):
    _vocab("merge", "--base", llama, "--add", chinese_sp, "--out", tmp_path / "imp", "--pad")
    base, m = load_model(llama), load_model(tmp_path / "imp")
    assert all((a.piece, a.score) == (b.piece, b.score) for a, b in zip(base.pieces, m.pieces[:32000]))
    assert dead_pieces(m, 32000) == []
    tok = hf_tokenizer(tmp_path / "imp")
    probes = [s for g in probe_set().values() for s in g]
    bad, examples = disagreements(m, tok, zh_lines + en_outputs + probes)
    assert bad == 0, examples
    assert english_changed(base, m, en_outputs) == 0


@pytest.fixture(scope="module")
def default_build(tmp_path_factory, llama, data_dir):
    out = tmp_path_factory.mktemp("build") / "vocab"
    _vocab("build", "--base", llama, "--corpus", data_dir / "zh_corpus" / "train", "--out", out)
    return out


def test_default_build_on_shared_corpus(default_build, llama, zh_lines, en_outputs):
    base, m = load_model(llama), load_model(default_build / "tokenizer.model")
    assert len(m.pieces) <= 49953
    assert all((a.piece, a.score) == (b.piece, b.score) for a, b in zip(base.pieces, m.pieces[:32000]))
    assert dead_pieces(m, 32000) == []
    tok = hf_tokenizer(default_build)
    bad, examples = disagreements(m, tok, zh_lines + en_outputs)
    assert bad == 0, examples
    assert english_changed(base, m, en_outputs) == 0
    sp_base, sp_ext = processor(base), processor(m)
    before = sum(len(x) for x in sp_base.encode(zh_lines))
    after = sum(len(x) for x in sp_ext.encode(zh_lines))
    assert after < 0.55 * before
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(default_build))
    assert hf(TABLE1).input_ids == [1] + sp_ext.encode(TABLE1)
