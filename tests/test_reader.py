"""One corpus reader for prepare, vocab and pretrain: binary files dropped as "binary", encodings detected alike,
too little Chinese refused, decode errors named by file, line and byte, no work folders left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_chinese_lines, make_english_lines
from zhllama.errors import UserError


def _binary(tiny_base, path):
    """A real binary file renamed .txt: the base tokenizer's protobuf (mostly piece strings, some control bytes)."""
    shutil.copy2(tiny_base, path)
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("reader")
    lines = list(dict.fromkeys(make_chinese_lines(1500, 31)))
    clean = root / "clean"
    clean.mkdir()
    (clean / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    junk = root / "junk"
    shutil.copytree(clean, junk)
    _binary(tiny_base, junk / "model.txt")
    (junk / "elf.txt").write_bytes(b"\x7fELF\x02\x01\x01" + "中文".encode() * 200)
    gbk = root / "gbk"
    gbk.mkdir()
    (gbk / "a.txt").write_bytes(("\n".join(lines) + "\n").encode("gb18030"))
    en = root / "en"
    en.mkdir()
    (en / "a.txt").write_text("\n".join(make_english_lines(1500, 5)) + "\n", encoding="utf-8")
    return {"root": root, "lines": lines, "clean": clean, "junk": junk, "gbk": gbk, "en": en}


def test_sniff_drops_binary_and_keeps_text(corpora, tiny_base):
    from corpora.reader import CorpusStats, iter_corpus, sniff

    assert sniff(corpora["junk"] / "model.txt").binary
    assert "ELF" in sniff(corpora["junk"] / "elf.txt").binary
    assert sniff(corpora["clean"] / "a.txt").binary is None
    g = sniff(corpora["gbk"] / "a.txt")
    assert (g.encoding, g.binary) == ("gb18030", None)
    stats = CorpusStats(warn=False)
    assert list(iter_corpus([corpora["junk"]], stats=stats)) == corpora["lines"]
    assert sorted(d["file"].rsplit("/", 1)[-1] for d in stats.dropped_files["binary"]) == ["elf.txt", "model.txt"]
    assert list(iter_corpus([corpora["gbk"]])) == corpora["lines"]


def test_prepare_drops_the_binary_file_by_name(corpora, tmp_path):
    from corpora.prepare import PrepareConfig, prepare

    out = tmp_path / "out"
    stats = prepare([corpora["junk"]], out, PrepareConfig(heldout_fraction=0.0, num_proc=1), progress=False,
                    log=lambda m: None)
    names = sorted(p.rsplit("/", 1)[-1] for p in stats["total"]["dropped_files"]["binary"])
    assert names == ["elf.txt", "model.txt"]
    per = {k.rsplit("/", 1)[-1]: v for k, v in stats["files"].items()}
    assert per["model.txt"]["dropped_file"]["reason"] == "binary" and per["model.txt"]["docs_kept"] == 0
    import gzip

    kept = [json.loads(l)["text"] for s in sorted((out / "train").glob("*.gz")) for l in gzip.open(s, "rt")]
    assert kept == [l for l in corpora["lines"] if len(l) >= 10]
    assert not (out / ".work").exists() and (out / "result.json").is_file()


def test_vocab_ignores_binary_and_refuses_english(corpora, tiny_base, tmp_path):
    from vocab.train import TrainConfig, train

    cfg = TrainConfig(model_type="extend", num_added=300, character_coverage=0.7)
    a = train([corpora["clean"]], tmp_path / "a", cfg, base_path=tiny_base)
    b = train([corpora["junk"]], tmp_path / "b", cfg, base_path=tiny_base)
    assert (tmp_path / "a" / "chinese_sp.model").read_bytes() == (tmp_path / "b" / "chinese_sp.model").read_bytes()
    assert len(b["corpus"]["dropped_files"]["binary"]) == 2 and a["pieces"] == 300
    r = subprocess.run([sys.executable, "-m", "vocab", "build", "--base", str(tiny_base), "--corpus", str(corpora["en"]),
                        "--out", str(tmp_path / "en"), "--num-added", "300"], cwd=ROOT, capture_output=True, text=True)
    # progress lines may come first (stderr); the error itself is one line, the last, and no traceback
    errs = [l for l in r.stderr.strip().splitlines() if not l.startswith("[vocab] ")]
    assert r.returncode == 2 and len(errs) == 1 and errs[0].startswith("error: ") and "Chinese characters" in errs[0]
    # a little Chinese among English: far fewer pieces than asked is an error, unless --allow-fewer
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(make_english_lines(800, 6) + corpora["lines"][:20]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"only [\d,]+ of the 3,000 requested pieces.*Chinese characters"):
        train([mixed], tmp_path / "m", TrainConfig(model_type="extend", num_added=3000, character_coverage=0.7),
              base_path=tiny_base)
    s = train([mixed], tmp_path / "m", TrainConfig(model_type="extend", num_added=3000, character_coverage=0.7),
              base_path=tiny_base, allow_fewer=True)
    assert 0 < s["pieces"] < 2700


def _blocks(corpus, tok_dir, cache):
    from pretrain.data import build_datasets

    tr, ev, info = build_datasets([corpus], tok_dir, 32, cache, eval_ratio=0.05)
    return [r["input_ids"] for r in tr], info


def test_pretrain_reads_gbk_like_utf8_and_drops_binary(corpora, tok_dir, tmp_path):
    ref, _ = _blocks(corpora["clean"], tok_dir, tmp_path / "c1")
    gbk, info = _blocks(corpora["gbk"], tok_dir, tmp_path / "c2")
    assert gbk == ref and len(ref) > 100 and list(info["encodings"].values()) == ["gb18030"]
    junk, info = _blocks(corpora["junk"], tok_dir, tmp_path / "c3")
    assert junk == ref and len(info["dropped_files"]["binary"]) == 2


def test_pretrain_decode_error_is_one_line_and_leaves_no_building_folder(corpora, tok_dir, tmp_path):
    from pretrain.data import build_datasets

    bad = tmp_path / "bad"
    bad.mkdir()
    lines = corpora["lines"]
    # valid UTF-8 in the sniffed first MiB, a stray GBK byte pair far beyond it
    head = ("\n".join(lines) + "\n").encode() * 8
    assert len(head) > (1 << 20)
    n_lines = head.count(b"\n")
    (bad / "a.txt").write_bytes(head + "坏".encode("gb18030") + b"\n" + "\n".join(lines[:50]).encode())
    with pytest.raises(UserError) as e:
        build_datasets([bad], tok_dir, 32, tmp_path / "cache")
    msg = str(e.value)
    assert f"line {n_lines + 1}, byte offset {len(head)}: not valid utf-8" in msg and "\n" not in msg
    assert not list((tmp_path / "cache").glob("*.building"))


def test_phase1_refuses_english_only_corpus(corpora, tmp_path, capsys):
    from pretrain.phases import check_chinese

    with pytest.raises(UserError, match=r"0 Chinese characters in [\d,]+ sampled \(0\.0%"):
        check_chinese([corpora["en"]], stage="pretrain phase1")
    assert check_chinese([corpora["en"]], min_share=0.0)["han_share"] == 0.0
    assert "warning: corpus has little Chinese" in capsys.readouterr().out
    assert check_chinese([corpora["gbk"]])["han_share"] > 0.5
