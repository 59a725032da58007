"""evaluation bpc, hermetic: bits equal an independent float64 loop, sliding windows score each token once,
chars/bytes do not depend on the tokenizer, batch size and padding side do not change results."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import make_chinese_lines, make_english_lines
from evaluation.bpc import BPCConfig, encode, evaluate_model, plan_windows
from evaluation.cli import main


def _model_folder(tok_dir, out, seed, max_pos=256):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    n = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=max_pos, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a random init is nearly uniform; sharper logits make the comparisons meaningful
        m.lm_head.weight.mul_(10)
    m.save_pretrained(str(out))
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def two_models(tiny_base, tmp_path_factory):
    """Two models with different tokenizers: the English-heavy base (600 pieces) and a Chinese one (1,500)."""
    import sentencepiece as spm

    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    d = tmp_path_factory.mktemp("bpc_models")
    zh = d / "zh.txt"
    zh.write_text("\n".join(make_chinese_lines(400, 11)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(zh), model_prefix=str(d / "zh"), model_type="bpe", vocab_size=1500, byte_fallback=True,
        character_coverage=0.98, normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    dirs = []
    for name, sp, seed in (("en", tiny_base, 0), ("zh", d / "zh.model", 1)):
        t = d / f"tok_{name}"
        save_tokenizer_folder(load_model(sp), t)
        m = d / f"model_{name}"
        m.mkdir()
        dirs.append(_model_folder(t, m, seed))
    return dirs


@pytest.fixture(scope="module")
def short_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("bpc_text") / "short.txt"
    lines = [l[:40] for l in make_chinese_lines(12, 5)] + make_english_lines(4, 6) + ["", "  ", "混合 mixed 文本 123。"]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def long_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("bpc_long") / "long.jsonl"
    docs = ["".join(make_chinese_lines(3, s)) for s in range(6)] + ["短句。"]
    p.write_text("\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    return p


def _load(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))


def _reference_bits(model, tok, docs, context=None, stride=None):
    """One document at a time, float64: full document when it fits, else explicit sliding windows."""
    import torch

    total, scored = 0.0, 0
    for doc in docs:
        ids = tok(doc)["input_ids"]          # the tokenizer's own BOS handling, not evaluation.bpc's
        assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id
        n = len(ids)
        covered = [0] * n
        if context is None or n <= context:
            spans = [(0, n, 1)]
        else:
            spans, done = [(0, context, 1)], context
            while done < n:
                end = min(done + stride, n)
                spans.append((end - context, end, done))
                done = end
        for start, end, first in spans:
            with torch.no_grad():
                logp = model(torch.tensor([ids[start:end]])).logits[0].double().log_softmax(-1)
            for p in range(first, end):
                total += -logp[p - 1 - start, ids[p]].item() / math.log(2)
                covered[p] += 1
        assert covered[1:] == [1] * (n - 1)
        scored += n - 1
    return total, scored


def test_plan_windows_scores_each_token_once_with_enough_context():
    for n in list(range(0, 120)) + [500, 1001]:
        for context, stride in ((32, 16), (32, 31), (8, 1), (16, 5)):
            seen = [0] * n
            for start, end, first in plan_windows(n, context, stride):
                assert end - start <= context and start >= 0 and first >= max(1, start + 1)
                for p in range(first, end):
                    seen[p] += 1
                    assert p - start >= min(p, context - stride)   # left context
            assert seen[1:] == [1] * max(0, n - 1) and (n == 0 or seen[0] == 0)


def test_total_bits_equal_independent_loop_and_chars_do_not_depend_on_tokenizer(two_models, short_text, tmp_path):
    out = tmp_path / "bpc.json"
    assert main(["bpc", "--model", str(two_models[0]), "--label", "en", "--model", str(two_models[1]),
                 "--text", str(short_text), "--batch-size", "3", "--json", str(out), "--chart", str(tmp_path / "c.png"),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text(encoding="utf-8"))["models"]
    docs = [l for l in short_text.read_text(encoding="utf-8").split("\n") if l.strip()]
    assert [r["model"] for r in res] == ["en", str(two_models[1])]
    for r, d in zip(res, two_models):
        model, tok = _load(d)
        bits, tokens = _reference_bits(model, tok, docs)
        assert r["documents"] == len(docs) == 17
        assert r["tokens"] == tokens
        assert abs(r["bits"] - bits) <= 1e-6 * bits
        assert r["bits_per_char"] == pytest.approx(r["bits"] / sum(map(len, docs)), rel=1e-12)
        assert r["bits_per_byte"] == pytest.approx(r["bits"] / len("".join(docs).encode()), rel=1e-12)
        assert r["token_ppl"] == pytest.approx(2 ** (r["bits"] / tokens), rel=1e-12)
    assert res[0]["chars"] == res[1]["chars"] == sum(len(d) for d in docs)
    assert res[0]["bytes"] == res[1]["bytes"] == len("".join(docs).encode("utf-8"))
    assert res[0]["tokens"] != res[1]["tokens"]          # really two different tokenizers
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_sliding_window_counts_and_bits(two_models, long_text, tmp_path):
    out = tmp_path / "bpc.json"
    assert main(["bpc", "--model", str(two_models[1]), "--text", str(long_text), "--context", "32", "--stride", "16",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text(encoding="utf-8"))["models"][0]
    model, tok = _load(two_models[1])
    docs = [json.loads(l)["text"] for l in long_text.read_text(encoding="utf-8").splitlines()]
    lengths = [len(tok(d)["input_ids"]) for d in docs]
    assert sum(n > 32 for n in lengths) == 6 == r["long_documents"]
    assert r["tokens"] == sum(n - 1 for n in lengths)         # every token after BOS once
    assert r["windows"] == sum(len(plan_windows(n, 32, 16)) for n in lengths)
    assert r["windows"] == sum(1 + math.ceil(max(0, n - 32) / 16) for n in lengths)
    bits, _ = _reference_bits(model, tok, docs, context=32, stride=16)
    assert abs(r["bits"] - bits) <= 1e-6 * bits


def test_batch_size_and_padding_side_do_not_change_results(two_models, short_text, long_text):
    model, tok = _load(two_models[0])
    docs = [l for l in short_text.read_text(encoding="utf-8").split("\n") if l.strip()]
    docs += [json.loads(l)["text"] for l in long_text.read_text(encoding="utf-8").splitlines()[:3]]
    runs = [evaluate_model(model, tok, docs, BPCConfig(context=48, stride=20, batch_size=b, padding_side=side),
                           progress=False) for b, side in ((1, "right"), (4, "left"), (7, "right"), (32, "left"))]
    for r in runs[1:]:
        assert r["tokens"] == runs[0]["tokens"] and r["windows"] == runs[0]["windows"]
        assert abs(r["bits"] - runs[0]["bits"]) <= 1e-5 * runs[0]["bits"]


def test_bos_first_and_no_eos_scored(two_models):
    _, tok = _load(two_models[1])
    ids = encode(tok, ["你好。"])[0]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids


def test_cli_errors_are_one_line(two_models, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    assert main(["bpc", "--model", str(two_models[0]), "--text", str(empty), "--json", str(tmp_path / "o.json")]) == 2
    assert "no non-empty lines" in capsys.readouterr().err
    assert main(["bpc", "--model", str(tmp_path / "nope"), "--text", str(empty), "--json", str(tmp_path / "o.json")]) == 2
    t = tmp_path / "t.txt"
    t.write_text("一些文字。\n", encoding="utf-8")
    assert main(["bpc", "--model", str(two_models[0]), "--text", str(t), "--context", "32", "--stride", "40",
                 "--json", str(tmp_path / "o.json")]) == 2
    assert "--stride 40" in capsys.readouterr().err
    assert main(["bpc", "--model", str(two_models[0]), "--text", str(t), "--context", "4096", "--json", str(tmp_path / "o.json")]) == 2
    assert "max_position_embeddings 256" in capsys.readouterr().err


def test_model_plus_adapter_syntax_scores_the_peft_model(two_models, short_text, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    base, tok = _load(two_models[1])
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    ad = tmp_path / "adapter"
    peft_model.save_pretrained(str(ad))
    peft_model.eval()
    docs = [l for l in short_text.read_text(encoding="utf-8").split("\n") if l.strip()]
    bits, _ = _reference_bits(peft_model, tok, docs)
    out = tmp_path / "bpc.json"
    assert main(["bpc", "--model", str(two_models[1]), "--adapter", str(ad), "--label", "lora", "--model",
                 str(two_models[1]), "--text", str(short_text), "--json", str(out), "--no-progress"]) == 0
    with_adapter, plain = json.loads(out.read_text(encoding="utf-8"))["models"]
    assert with_adapter["model"] == "lora" and plain["model"] == str(two_models[1])
    assert abs(with_adapter["bits"] - bits) <= 1e-5 * bits
    assert abs(plain["bits"] - bits) > 1e-3 * bits                 # the adapter really changed the model


def test_adapter_before_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bpc", "--adapter", "x", "--model", "m", "--text", "t", "--json", "o"])
    assert e.value.code == 2 and "give --model first" in capsys.readouterr().err


def test_cli_shows_progress_in_a_log(two_models, short_text, tmp_path):
    """Off a terminal (stderr is a pipe, as in make's log), bpc says which model it scores and, every
    ZHLLAMA_PROGRESS_SECONDS, how many tokens are done with an ETA; it used to print nothing until the table."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, ZHLLAMA_PROGRESS_SECONDS="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "evaluation", "bpc", "--model", str(two_models[0]), "--label", "en",
                        "--model", str(two_models[1]), "--label", "zh", "--text", str(short_text), "--batch-size", "4",
                        "--json", str(tmp_path / "bpc.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    err = r.stderr.splitlines()
    assert "[eval] model 1/2 en: scoring 17 documents" in err
    assert "[eval] model 2/2 zh: scoring 17 documents" in err
    done = [ln for ln in err if re.fullmatch(r"\[eval zh\] [\d,]+/[\d,]+ tok \(\d+%\), .* elapsed", ln)]
    assert len(done) >= 2 and any("ETA" in ln for ln in done)
    res = json.loads((tmp_path / "bpc.json").read_text(encoding="utf-8"))["models"]
    assert done[-1].startswith(f"[eval zh] {res[1]['tokens']:,}/{res[1]['tokens']:,} tok (100%)")
    assert any(ln.startswith(f"[eval] model 2/2 zh: {res[1]['bits_per_char']:.4f} bits/char") for ln in err)
    assert "\r" not in r.stderr
