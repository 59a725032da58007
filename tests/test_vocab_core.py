"""Core vocab tests: tiny tokenizers trained in-process, no shared data, no network."""
from __future__ import annotations

import json
import subprocess
import sys

import sentencepiece as spm

from corpora.probes import ENGLISH, probe_set, whitespace_probes
from vocab.audit import dead_pieces
from vocab.build import merge_to_folder
from vocab.extend import ExtendConfig, extend_vocabulary
from vocab.hf_export import save_tokenizer_folder
from vocab.merge import build_extended, improved_merge, reference_merge
from vocab.parity import disagreements, english_changed, hf_tokenizer
from vocab.spmodel import CJK_RE, NORMAL, load_model, processor


def _train_add(tmp_path, corpus_dir, model_type, vocab_size=3000):
    texts = (corpus_dir / "a.txt").read_text(encoding="utf-8")
    inp = tmp_path / f"zh_{model_type}.txt"
    inp.write_text(texts, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(inp), model_prefix=str(tmp_path / model_type), model_type=model_type, vocab_size=vocab_size,
        character_coverage=0.9995, normalization_rule_name="identity", num_threads=1, minloglevel=2,
    )
    return tmp_path / f"{model_type}.model"


def test_reference_merge_appends_unseen_pieces_with_score_zero(tmp_path, tiny_base, zh_corpus):
    base = load_model(tiny_base)
    add = load_model(_train_add(tmp_path, zh_corpus, "unigram"))
    res = reference_merge(base, add, pad=True)
    base_set = {p.piece for p in base.pieces}
    unseen = [p.piece for p in add.pieces if p.piece not in base_set]
    assert [p.piece for p in res.model.pieces[len(base.pieces):-1]] == unseen
    assert res.added == len(unseen) and res.overlap == len(add.pieces) - len(unseen)
    assert all(p.score == 0 for p in res.model.pieces[len(base.pieces):])
    assert res.model.pieces[res.pad_id].piece == "[PAD]" and res.pad_id == len(res.model.pieces) - 1
    # the reference's flaw this project fixes: unigram pieces appended to BPE are partly unreachable
    assert len(dead_pieces(res.model, len(base.pieces), len(base.pieces) + res.added)) > 0


def test_improved_merge_keeps_base_and_leaves_no_dead_piece(tmp_path, tiny_base, zh_corpus, english_lines):
    base = load_model(tiny_base)
    add = load_model(_train_add(tmp_path, zh_corpus, "unigram"))
    res = improved_merge(base, add)
    m = res.model
    n = len(base.pieces)
    for a, b in zip(base.pieces, m.pieces[:n]):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    assert dead_pieces(m, n) == []
    assert res.dropped_dead > 0  # the unigram model had unreachable pieces: dropped, not shipped
    scores = [p.score for p in m.pieces[n:]]
    assert all(x > y for x, y in zip(scores, scores[1:])) and scores[0] < min(p.score for p in base.pieces if p.type == NORMAL)
    assert all(CJK_RE.search(p.piece) for p in m.pieces[n:])
    assert english_changed(base, m, english_lines + ENGLISH) == 0


def test_extend_pieces_are_merges_reachable_and_compress(tiny_base, zh_corpus, zh_heldout, english_lines):
    base = load_model(tiny_base)
    from corpora.reader import iter_corpus

    res = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(num_added=600, min_batch=50, character_coverage=0.7))
    assert len(res.pieces) == 600 and len(set(res.pieces)) == 600
    m = build_extended(base, res.pieces)
    assert dead_pieces(m, len(base.pieces)) == []
    assert english_changed(base, m, english_lines + ENGLISH) == 0
    before = sum(len(x) for x in processor(base).encode(zh_heldout))
    after = sum(len(x) for x in processor(m).encode(zh_heldout))
    assert after < 0.75 * before
    # every merge (after the single characters) is two symbols the tokenizer already had
    vocab = {p.piece for p in base.pieces} | set(res.pieces[: res.new_chars])
    for piece in res.pieces[res.new_chars:]:
        assert any(piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece)))
        vocab.add(piece)


def test_hf_tokenizer_json_matches_sentencepiece_exactly(tmp_path, tiny_base, zh_corpus, zh_heldout, english_lines):
    base = load_model(tiny_base)
    from corpora.reader import iter_corpus

    res = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(num_added=400, min_batch=50, character_coverage=0.7))
    m = build_extended(base, res.pieces)
    save_tokenizer_folder(m, tmp_path / "tok")
    tok = hf_tokenizer(tmp_path / "tok")
    lines = zh_heldout + english_lines + whitespace_probes(500, seed=5) + [s for g in probe_set().values() for s in g]
    bad, examples = disagreements(m, tok, lines)
    assert bad == 0, examples
    # the base alone too, including runs of spaces (transformers' own conversion gets these wrong)
    save_tokenizer_folder(base, tmp_path / "base")
    assert disagreements(base, hf_tokenizer(tmp_path / "base"), lines)[0] == 0


def test_reference_style_ties_break_parity(tmp_path, tiny_base, zh_corpus, zh_heldout):
    """Score-0 ties (the reference) cannot be ordered like sentencepiece: the check must see it."""
    base = load_model(tiny_base)
    add = load_model(_train_add(tmp_path, zh_corpus, "bpe"))
    m = reference_merge(base, add).model
    save_tokenizer_folder(m, tmp_path / "ref")
    bad, _ = disagreements(m, hf_tokenizer(tmp_path / "ref"), zh_heldout)
    assert bad > 0


def test_autotokenizer_loads_folder_offline_with_bos(tmp_path, tiny_base, zh_corpus):
    from transformers import AutoTokenizer

    add = _train_add(tmp_path, zh_corpus, "bpe")
    rep = merge_to_folder(tiny_base, add, tmp_path / "tok", pad=True)
    assert rep["dead_pieces"]["count"] == 0
    assert all(p["disagreeing"] == 0 for p in rep["parity_hf_vs_sentencepiece"].values())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    m = load_model(tmp_path / "tok" / "tokenizer.model")
    text = "人工智能是计算机科学。 hello  world"
    assert tok(text).input_ids == [1] + processor(m).encode(text)
    assert len(tok) == len(m.pieces) and tok.pad_token == "[PAD]" and tok.pad_token_id == len(m.pieces) - 1
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "merge_report.json"):
        assert (tmp_path / "tok" / f).is_file()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vocab", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_inputs_give_one_clear_error(tmp_path, tiny_base, zh_corpus):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01not a model")
    r = _cli("merge", "--base", junk, "--add", tiny_base, "--out", tmp_path / "o")
    assert r.returncode == 2 and "not a SentencePiece model" in r.stderr and "Traceback" not in r.stderr
    r = _cli("merge", "--base", tmp_path / "missing.model", "--add", tiny_base, "--out", tmp_path / "o")
    assert r.returncode == 2 and "no such file" in r.stderr
    uni = _train_add(tmp_path, zh_corpus, "unigram")
    r = _cli("merge", "--base", uni, "--add", tiny_base, "--out", tmp_path / "o")
    assert r.returncode == 2 and "expected BPE with byte_fallback" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("\n\n", encoding="utf-8")
    r = _cli("train", "--corpus", empty, "--out", tmp_path / "t")
    assert r.returncode == 2 and "empty corpus" in r.stderr and "Traceback" not in r.stderr
    gb = tmp_path / "gb"
    gb.mkdir()
    (gb / "g.txt").write_bytes("第一行是正常的中文文本\n人工智能是计算机科学的一个分支\n".encode("gb18030"))
    # auto (the default) detects GB18030 like `corpora prepare`; a wrong --encoding is named by line and byte
    r = _cli("train", "--corpus", gb, "--out", tmp_path / "t", "--encoding", "utf-8")
    assert r.returncode == 2 and "g.txt: line 1, byte offset 0" in r.stderr and "GB18030" in r.stderr
    r = _cli("train", "--corpus", zh_corpus, "--out", tmp_path / "t", "--vocab-size", "200")
    assert r.returncode == 2 and "--vocab-size 200" in r.stderr and "Traceback" not in r.stderr


def test_cli_build_then_report(tmp_path, tiny_base, zh_corpus):
    out = tmp_path / "vocab"
    r = _cli("build", "--base", tiny_base, "--corpus", zh_corpus, "--out", out, "--num-added", "500", "--character-coverage", "0.7")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    assert rep["merge"]["total_pieces"] == len(load_model(tiny_base).pieces) + 500
    assert rep["dead_pieces"]["count"] == 0
    assert (out / "vocab_report.png").is_file() and (out / "manifest.json").is_file()
    # a rerun with unchanged inputs does not retrain
    r2 = _cli("build", "--base", tiny_base, "--corpus", zh_corpus, "--out", out, "--num-added", "500", "--character-coverage", "0.7")
    assert r2.returncode == 0 and "up to date" in r2.stdout
    j = tmp_path / "r" / "report.json"
    r = _cli("report", "--tokenizer", out, "--base", tiny_base, "--text", zh_corpus, "--json", j)
    assert r.returncode == 0, r.stderr
    rep = json.loads(j.read_text(encoding="utf-8"))
    ext = rep["tokenizers"]["extended"]
    assert ext["tokens"] < rep["tokenizers"]["base"]["tokens"] and ext["ratio_to_base"] < 0.8
    assert rep["dead_pieces"]["extended"] == 0 and rep["english_lines_changed"]["extended"] == 0
    assert rep["hf_vs_sentencepiece"]["disagreeing"] == 0
    assert 0 < rep["jieba_boundary_share"]["extended"] <= 1
    assert j.with_suffix(".png").stat().st_size > 1000
    assert "tok/1k chars" in r.stdout


def test_extend_refuses_a_budget_below_the_required_characters(tmp_path, tiny_base, zh_corpus):
    r = _cli("build", "--base", tiny_base, "--corpus", zh_corpus, "--out", tmp_path / "v", "--num-added", "50")
    assert r.returncode == 2 and "--num-added 50 is smaller than the" in r.stderr and "Traceback" not in r.stderr
