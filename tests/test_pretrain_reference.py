"""Reference tests: the real stories260K llama2.c checkpoint, tok512.model and the shared Chinese corpus."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

pytestmark = pytest.mark.reference


def _cli(*args):
    from pretrain.cli import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def stories(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("stories")
    tm = data_dir / "tiny_models"
    assert _cli("convert-llama2c", "--checkpoint", tm / "stories260K.bin", "--tokenizer", tm / "tok512.model", "--out", d / "base") == 0
    return d


def test_llama2c_greedy_output_matches(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(stories / "base")).eval()
    tok = AutoTokenizer.from_pretrained(str(stories / "base"))
    out = m.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time, there was a little girl named Lily.")
    assert m.config.tie_word_embeddings and m.config.vocab_size == 512


@pytest.fixture(scope="module")
def extended(stories, data_dir):
    from corpora.reader import iter_corpus
    from vocab.extend import ExtendConfig, extend_vocabulary
    from vocab.hf_export import save_tokenizer_folder
    from vocab.merge import build_extended
    from vocab.spmodel import load_model

    base = load_model(stories / "base" / "tokenizer.model")
    texts = list(itertools.islice(iter_corpus([data_dir / "zh_corpus" / "train"]), 3000))
    res = extend_vocabulary(base, texts, ExtendConfig(num_added=800, min_batch=50, character_coverage=0.8))
    save_tokenizer_folder(build_extended(base, res.pieces), stories / "tok")
    assert _cli("resize", "--model", stories / "base", "--tokenizer", stories / "tok", "--out", stories / "resized") == 0
    return stories


def test_resize_english_logits_exact_and_subword_means(extended):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = AutoModelForCausalLM.from_pretrained(str(extended / "base")).eval()
    b = AutoModelForCausalLM.from_pretrained(str(extended / "resized")).eval()
    tok = AutoTokenizer.from_pretrained(str(extended / "base"))
    ids = torch.tensor([tok("Once upon a time, there was a big dog. He liked to play in the sun with his friend.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits[..., :512])
    src = json.loads((extended / "resized" / "init_sources.json").read_text())
    w_old, w_new = a.model.embed_tokens.weight, b.model.embed_tokens.weight
    for k, (piece, ids_) in enumerate(src.items()):
        assert torch.equal(w_new[512 + k], w_old[ids_].mean(0)), piece
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()


def test_phase1_then_phase2_lower_heldout_chinese_loss(extended, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    corpus = tmp_path / "zh"
    corpus.mkdir()
    from corpora.reader import iter_corpus

    lines = list(itertools.islice(iter_corpus([data_dir / "zh_corpus" / "train"]), 4000))
    (corpus / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["--recipe", "tiny", "--corpus", corpus, "--cache-dir", tmp_path / "cache", "--block-size", "128",
              "--batch-size", "8", "--per-device-batch-size", "8", "--max-steps", "15", "--eval-steps", "100",
              "--save-steps", "100", "--set", "pretrain.eval_ratio=0.03"]
    assert _cli("phase1", "--model", extended / "resized", "--out", tmp_path / "p1", *common) == 0
    assert _cli("phase2", "--model", tmp_path / "p1", "--out", tmp_path / "p2", *common) == 0
    r1 = json.loads((tmp_path / "p1" / "result.json").read_text())
    r2 = json.loads((tmp_path / "p2" / "result.json").read_text())
    assert r1["eval_loss_after"] < r1["eval_loss_before"]
    assert r2["eval_loss_after"] < r2["eval_loss_before"] == pytest.approx(r1["eval_loss_after"], rel=1e-4)
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "p1"))
    model = PeftModel.from_pretrained(base, str(tmp_path / "p2")).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        la = model(ids).logits
        lb = model.merge_and_unload()(ids).logits
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
