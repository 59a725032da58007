"""Byte-level BPE bases (Llama-3, Qwen-2.5 tokenizer.json): Chinese tokens and merges appended, base untouched."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corpora.probes import ENGLISH, TABLE1
from vocab.spmodel import CJK_RE

pytestmark = pytest.mark.reference

N_ADDED = 1000


def _vocab(*args):
    return subprocess.run([sys.executable, "-m", "vocab", *map(str, args)], capture_output=True, text=True)


def _train_lines(data_dir: Path, per_file: int) -> list[str]:
    out = []
    for f in sorted((data_dir / "zh_corpus" / "train").glob("*.txt")):
        with open(f, encoding="utf-8") as fh:
            for k, line in enumerate(fh):
                if k >= per_file:
                    break
                out.append(line.rstrip("\n"))
    return out


def _alpaca(data_dir: Path, name: str, n: int) -> list[str]:
    recs = json.loads((data_dir / "instructions" / name).read_text(encoding="utf-8"))
    lines = []
    for r in recs:
        lines.extend(s for s in (r["instruction"], r["input"], r["output"]) if s.strip())
        if len(lines) >= n:
            break
    return lines


@pytest.fixture(scope="module")
def zh_small(data_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zhbl")
    (d / "zh.txt").write_text("\n".join(_train_lines(data_dir, 300)) + "\n", encoding="utf-8")  # ~0.8M chars
    return d


@pytest.fixture(scope="module")
def llama3_run(data_dir, zh_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "vocab"
    r = _vocab("build", "--base", data_dir / "tokenizers" / "llama3" / "tokenizer.json", "--corpus", zh_small,
               "--out", out, "--num-added", N_ADDED)
    assert r.returncode == 0, r.stderr
    return out


def test_llama3_extension_loads_as_plain_bpe_with_base_ids_kept(data_dir, llama3_run):
    from transformers import AutoTokenizer

    base_json = json.loads((data_dir / "tokenizers" / "llama3" / "tokenizer.json").read_text(encoding="utf-8"))
    ext_json = json.loads((llama3_run / "tokenizer.json").read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(llama3_run)
    assert len(tok) == 128256 + N_ADDED
    # no added-token tricks: the added tokens are the base's 256 specials, at their ids
    assert ext_json["added_tokens"] == base_json["added_tokens"]
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_245|>"]) == \
        [128000, 128009, 128255]
    bv, ev = base_json["model"]["vocab"], ext_json["model"]["vocab"]
    assert all(ev[s] == i for s, i in bv.items())
    new = sorted(i for s, i in ev.items() if s not in bv and i >= 128000 and not s.startswith("<|"))
    assert new == list(range(128256, 128256 + N_ADDED))
    # merges: the base's, unchanged and in order, then one per new token
    bm, em = base_json["model"]["merges"], ext_json["model"]["merges"]
    assert em[:len(bm)] == bm and len(em) == len(bm) + N_ADDED
    assert tok("Hello world")["input_ids"] == [128000, 9906, 1917]


def test_rerun_with_unchanged_inputs_does_nothing(data_dir, zh_small, llama3_run):
    before = (llama3_run / "tokenizer.json").stat().st_mtime_ns
    r = _vocab("build", "--base", data_dir / "tokenizers" / "llama3" / "tokenizer.json", "--corpus", zh_small,
               "--out", llama3_run, "--num-added", N_ADDED)
    assert r.returncode == 0 and "up to date" in r.stdout
    assert (llama3_run / "tokenizer.json").stat().st_mtime_ns == before


def test_every_new_token_is_reachable_and_decodes_to_its_text(llama3_run):
    from tokenizers import Tokenizer

    from vocab.bytelevel import to_bytes

    tok = Tokenizer.from_file(str(llama3_run / "tokenizer.json"))
    ids = list(range(128256, 128256 + N_ADDED))
    texts = [to_bytes(tok.id_to_token(i)).decode("utf-8") for i in ids]
    assert all(CJK_RE.search(t) for t in texts)
    enc = tok.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in enc] == [[i] for i in ids]
    assert [tok.decode([i]) for i in ids] == texts
    rep = json.loads((llama3_run / "vocab_report.json").read_text(encoding="utf-8"))
    assert rep["dead_pieces"]["extended"] == 0 and rep["english_lines_changed"]["extended"] == 0


def test_text_without_cjk_encodes_identically(data_dir, llama3_run):
    from transformers import AutoTokenizer

    from vocab.bytelevel_build import english_probe_lines

    lines = _alpaca(data_dir, "alpaca_en_52k_original.part01.json", 2000)
    lines = [s for s in lines if not CJK_RE.search(s)]
    assert len(lines) >= 2000
    lines += english_probe_lines() + ["1234567890 3.14159 -42 0x1F", "😀🎉👍🏽 emoji 🇨🇳", "for (int i = 0; i < n; ++i) {}"]
    base = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama3")
    ext = AutoTokenizer.from_pretrained(llama3_run)
    assert base(lines)["input_ids"] == ext(lines)["input_ids"]


def test_chinese_gets_shorter_on_held_out_text(data_dir, llama3_run):
    from transformers import AutoTokenizer

    lines = [r["output"] for r in json.loads(
        (data_dir / "instructions" / "alpaca_zh_llamafactory_demo_1k.json").read_text(encoding="utf-8"))[:300]]
    base = AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "llama3")
    ext = AutoTokenizer.from_pretrained(llama3_run)
    nb = sum(map(len, base(lines, add_special_tokens=False)["input_ids"]))
    ne = sum(map(len, ext(lines, add_special_tokens=False)["input_ids"]))
    assert ne < 0.95 * nb
    assert len(ext(TABLE1, add_special_tokens=False)["input_ids"]) < 25  # Llama-3: 25 (data README)
    # round trip
    assert ext.decode(ext(lines[:50], add_special_tokens=False)["input_ids"][0]) == lines[0]


def test_cli_report_on_a_bytelevel_base(data_dir, llama3_run, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("\n".join(_alpaca(data_dir, "alpaca_zh_llamafactory_demo_1k.json", 300)) + "\n", encoding="utf-8")
    j = tmp_path / "rep" / "report.json"
    r = _vocab("report", "--tokenizer", llama3_run, "--base", data_dir / "tokenizers" / "llama3" / "tokenizer.json",
               "--text", held, "--json", j, "--compare", f"qwen2.5={data_dir / 'tokenizers' / 'qwen2.5'}",
               f"chinese-llama2={data_dir / 'tokenizers' / 'chinese_llama2_tokenizer.model'}")
    assert r.returncode == 0, r.stderr
    rep = json.loads(j.read_text(encoding="utf-8"))
    rows = rep["tokenizers"]
    assert set(rows) == {"base", "extended", "qwen2.5", "chinese-llama2"}
    assert rows["extended"]["tokens"] < rows["base"]["tokens"]
    assert rep["vocab_size"]["qwen2.5"] == 151665 and rep["vocab_size"]["chinese-llama2"] == 55296
    assert rep["base_prefix_unchanged"] is True and rep["added_pieces"] == N_ADDED
    assert "tok/1k chars" in r.stdout and j.with_suffix(".png").stat().st_size > 1000


def test_qwen_extension_keeps_its_specials_and_english(data_dir, tmp_path):
    from tokenizers import Tokenizer

    from vocab.bytelevel import ByteLevelBase, lines_changed, train_bytelevel, unreachable, write_checked

    base = ByteLevelBase(data_dir / "tokenizers" / "qwen2.5")
    assert base.next_id == 151665
    res = train_bytelevel(_train_lines(data_dir, 80), base, 300, max_chars=4, max_bytes=32)
    res, dropped = write_checked(base, res, tmp_path / "q")
    assert len(res.tokens) == 300 and dropped == 0
    tok = Tokenizer.from_file(str(tmp_path / "q" / "tokenizer.json"))
    assert tok.get_vocab_size() == 151665 + 300
    assert all(tok.token_to_id(s) == i for s, i in base.specials.items())
    assert tok.token_to_id("<|im_end|>") == 151645
    assert unreachable(tok, base, 300) == []
    assert lines_changed(base, tok, ENGLISH + _alpaca(data_dir, "alpaca_en_52k_original.part02.json", 500)) == 0
    cfg = json.loads((tmp_path / "q" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "chat_template" in cfg  # Qwen's ChatML template travels with the tokenizer


def test_token_length_cap_in_bytes(data_dir):
    from vocab.bytelevel import ByteLevelBase, train_bytelevel

    base = ByteLevelBase(data_dir / "tokenizers" / "llama3")
    docs = _train_lines(data_dir, 60)
    capped = train_bytelevel(docs, base, 200, max_chars=0, max_bytes=6)
    assert len(capped.tokens) == 200 and max(map(len, capped.tokens)) <= 6
    free = train_bytelevel(docs, base, 200, max_chars=0, max_bytes=0)
    assert max(map(len, free.tokens)) > 6  # the cap did bind


def test_english_only_and_too_small_corpora_are_one_line_errors(data_dir, tmp_path):
    base = data_dir / "tokenizers" / "llama3" / "tokenizer.json"
    en = tmp_path / "en"
    en.mkdir()
    (en / "e.txt").write_text("\n".join(_alpaca(data_dir, "alpaca_en_52k_original.part03.json", 300)) + "\n",
                              encoding="utf-8")
    r = _vocab("build", "--base", base, "--corpus", en, "--out", tmp_path / "v1", "--num-added", "100")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no CJK text" in r.stderr and "Chinese characters in" in r.stderr
    zh = tmp_path / "zh"
    zh.mkdir()
    (zh / "z.txt").write_text("\n".join(_train_lines(data_dir, 3)) + "\n", encoding="utf-8")
    r = _vocab("build", "--base", base, "--corpus", zh, "--out", tmp_path / "v2", "--num-added", "20000")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "of the 20,000 requested pieces could be learned" in r.stderr and "--allow-fewer" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "WordPiece"}}', encoding="utf-8")
    r = _vocab("build", "--base", bad, "--corpus", zh, "--out", tmp_path / "v3")
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(bad) in r.stderr


def _tiny_model(kind: str, rows: int, tied: bool, folder: Path, tok_src: Path) -> Path:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, tie_word_embeddings=tied)
    model = (Qwen2ForCausalLM(Qwen2Config(**shape)) if kind == "qwen2" else LlamaForCausalLM(LlamaConfig(**shape)))
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tok_src / f, folder / f)
    return folder


def test_resize_llama3_rows_are_the_mean_of_the_base_encoding(data_dir, llama3_run, tmp_path):
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from pretrain.embeddings import resize_folder
    from pretrain.embeddings_bytelevel import merge_sources
    from vocab.bytelevel import to_bytes

    src = _tiny_model("llama", 128256, False, tmp_path / "m", data_dir / "tokenizers" / "llama3")
    summary = resize_folder(src, llama3_run, tmp_path / "r")
    assert summary["old_vocab"] == 128256 and summary["new_vocab"] == 128256 + N_ADDED and not summary["tied"]
    old = AutoModelForCausalLM.from_pretrained(src)
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    # the new rows' sources are the base tokenizer's encoding of each new token's text
    base = Tokenizer.from_file(str(data_dir / "tokenizers" / "llama3" / "tokenizer.json"))
    ext_json = json.loads((llama3_run / "tokenizer.json").read_text(encoding="utf-8"))
    sources = merge_sources(ext_json, 128256)
    inv = {i: s for s, i in ext_json["model"]["vocab"].items()}
    texts = [to_bytes(inv[128256 + k]).decode("utf-8") for k in range(N_ADDED)]
    assert sources == [e.ids for e in base.encode_batch(texts, add_special_tokens=False)]
    for get in (lambda m: m.get_input_embeddings().weight, lambda m: m.get_output_embeddings().weight):
        w_old, w_new = get(old), get(new)
        assert torch.equal(w_new[:128256], w_old)
        for k in (0, 1, N_ADDED // 2, N_ADDED - 1):
            assert torch.allclose(w_new[128256 + k], w_old[sources[k]].mean(0))


def test_resize_qwen_tied_reuses_padding_rows_and_stays_tied(data_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pretrain.embeddings import resize_folder
    from vocab.bytelevel import ByteLevelBase, to_token, train_bytelevel, write_checked

    base = ByteLevelBase(data_dir / "tokenizers" / "qwen2.5")
    res, _ = write_checked(base, train_bytelevel(_train_lines(data_dir, 80), base, 400, 4, 32), tmp_path / "tok")
    # Qwen-2.5-0.5B's shape: 151,936 rows for 151,665 ids, tied
    src = _tiny_model("qwen2", 151936, True, tmp_path / "m", data_dir / "tokenizers" / "qwen2.5")
    for init in ("subword-mean", "normal"):
        s = resize_folder(src, tmp_path / "tok", tmp_path / init, init=init)
        assert s["old_vocab"] == 151665 and s["new_vocab"] == 151665 + 400 and s["tied"]
        m = AutoModelForCausalLM.from_pretrained(tmp_path / init)
        assert m.config.tie_word_embeddings and m.get_output_embeddings().weight.data_ptr() == \
            m.get_input_embeddings().weight.data_ptr()
        w = m.get_input_embeddings().weight
        w_old = AutoModelForCausalLM.from_pretrained(src).get_input_embeddings().weight
        assert torch.equal(w[:151665], w_old[:151665])
        first = base.encode_word(to_token(res.tokens[0]))
        mean0 = w_old[first].mean(0)
        assert torch.allclose(w[151665], mean0) == (init == "subword-mean")


def test_gguf_writes_the_extended_bytelevel_vocabulary(data_dir, llama3_run, tmp_path):
    from gguf import GGUFReader

    from deploy.gguf_bytelevel import pre_tokenizer_name
    from deploy.gguf_export import export
    from zhllama.chat import save_name
    from sft.vocabcheck import prepare_tokenizer

    model = _tiny_model("llama", 128256 + N_ADDED, False, tmp_path / "m", llama3_run)
    prepare_tokenizer(llama3_run, model, eos="<|eot_id|>")  # the SFT tokenizer: EOS <|eot_id|>
    save_name(model, "llama3")
    info = export(model, tmp_path / "m.gguf", "f32", log=lambda *_: None)
    assert info["tokenizer"] == {"model": "gpt2", "pre": "llama-bpe", "merges": 280147 + N_ADDED}
    r = GGUFReader(info["gguf"])
    f = lambda k: r.fields[k].contents()  # noqa: E731
    ext = json.loads((llama3_run / "tokenizer.json").read_text(encoding="utf-8"))
    inv = {i: s for s, i in ext["model"]["vocab"].items()}
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "llama-bpe"
    assert f("tokenizer.ggml.tokens") == [inv[i] for i in range(128256 + N_ADDED)]
    assert f("tokenizer.ggml.merges") == ext["model"]["merges"]
    types = f("tokenizer.ggml.token_type")
    assert types[128009] == 3 and types[127999] == 1 and types[128256] == 1 and set(types[128000:128256]) == {3}
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")) == (128000, 128009)
    assert f("tokenizer.ggml.add_bos_token") is True
    assert f("tokenizer.chat_template") == (model / "chat_template.jinja").read_text(encoding="utf-8")
    # the pre-tokenizer is named from the split regex, never from a hash of ids an extension changes
    qwen = json.loads((data_dir / "tokenizers" / "qwen2.5" / "tokenizer.json").read_text(encoding="utf-8"))
    assert pre_tokenizer_name(qwen) == "qwen2"


@pytest.mark.integration("llama_cpp")
def test_llama_cpp_tokenizes_the_extension_like_transformers(data_dir, llama3_run, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from deploy.gguf_export import export

    model = _tiny_model("llama", 128256 + N_ADDED, False, tmp_path / "m", llama3_run)
    gguf = export(model, tmp_path / "m.gguf", "f32", log=lambda *_: None)["gguf"]
    llm = Llama(model_path=gguf, vocab_only=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(llama3_run)
    lines = ([r["output"] for r in json.loads((data_dir / "instructions" /
              "alpaca_zh_hikariming_translated.part02.json").read_text(encoding="utf-8"))[:700]]
             + _alpaca(data_dir, "alpaca_en_52k_original.part06.json", 300))
    lines = [s for s in lines if s.strip()][:1000]
    assert len(lines) == 1000
    cpp = [llm.tokenize(s.encode("utf-8"), add_bos=True, special=False) for s in lines]
    assert cpp == tok(lines)["input_ids"]
    new = range(128256, 128256 + N_ADDED)
    assert [llm.detokenize([i]).decode("utf-8") for i in new] == [tok.decode([i]) for i in new]
