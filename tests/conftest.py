"""Fixtures: tiny tokenizers and Chinese text built in-process (core), and ../shared/data (reference)."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ZHLLAMA_DATA", ROOT.parent / "shared" / "data"))
# llama.cpp's convert_hf_to_gguf.py + gguf-py from llama-cpp-python's source distribution (make setup-integration)
LLAMA_SRC = Path(os.environ.get("ZHLLAMA_LLAMA_CPP_SRC", ROOT / ".cache" / "zhllama" / "llama.cpp-src"))


def _integration_missing(tool: str) -> str | None:
    """Why an integration tool is unavailable, or None."""
    import importlib.util
    import shutil

    if tool == "llama_cpp":
        return None if importlib.util.find_spec("llama_cpp") else "llama-cpp-python is not installed (make setup-integration)"
    if tool == "llama_src":
        return None if (LLAMA_SRC / "convert_hf_to_gguf.py").is_file() else \
            f"llama.cpp's converter not found in {LLAMA_SRC} (make setup-integration, or set ZHLLAMA_LLAMA_CPP_SRC)"
    if tool == "deepspeed":
        return None if importlib.util.find_spec("deepspeed") else \
            "deepspeed is not installed (make setup-integration: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"
    if tool == "ray":
        return None if importlib.util.find_spec("ray") else "ray is not installed (make setup-integration, or pip install '.[ray]')"
    if tool == "chromium":
        if importlib.util.find_spec("selenium") is None:
            return "selenium is not installed (make setup-integration)"
        if not (shutil.which("chromium") and shutil.which("chromedriver")):
            return "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        return None
    raise ValueError(f"unknown integration tool {tool!r}")


def pytest_collection_modifyitems(config, items):
    # integration tier: skipped without its tools, except in CI (ZHLLAMA_REQUIRE_INTEGRATION=1), where a
    # missing tool fails the test instead of hiding it
    if os.environ.get("ZHLLAMA_REQUIRE_INTEGRATION") != "1":
        for item in items:
            m = item.get_closest_marker("integration")
            if m is not None:
                why = next(filter(None, (_integration_missing(t) for t in m.args)), None)
                if why:
                    item.add_marker(pytest.mark.skip(reason=why))
    if DATA.is_dir():
        return
    required = os.environ.get("ZHLLAMA_REQUIRE_REFERENCE") == "1"
    for item in items:
        if "reference" in item.keywords:
            if required:
                item.add_marker(pytest.mark.xfail(reason=f"reference data missing at {DATA}", run=False, strict=True))
            else:
                item.add_marker(pytest.mark.skip(reason=f"reference data not found at {DATA} (set ZHLLAMA_DATA)"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


_WORDS = None


def _jieba_words():
    """The 6,000 most frequent all-Han words of jieba's dictionary with cumulative weights."""
    global _WORDS
    if _WORDS is not None:
        return _WORDS
    import itertools

    import jieba

    path = Path(jieba.__file__).parent / "dict.txt"
    words, weights = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            w, c, *_ = line.split()
            if all("\u4e00" <= ch <= "\u9fff" for ch in w):
                words.append(w)
                weights.append(int(c))
    top = sorted(range(len(words)), key=lambda i: -weights[i])[:6000]
    _WORDS = [words[i] for i in top], list(itertools.accumulate(weights[i] for i in top))
    return _WORDS


def make_chinese_lines(n: int, seed: int) -> list[str]:
    """Pseudo-Chinese sentences drawn from jieba's word frequencies: real character statistics, no download."""
    words, cum = _jieba_words()
    rng = random.Random(seed)
    punct = ["，", "。", "、", "；", "！", "？"]
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(2, 5)):
            parts.append("".join(rng.choices(words, cum_weights=cum, k=rng.randint(3, 9))) + rng.choice(punct))
        if rng.random() < 0.2:
            parts.insert(rng.randint(0, len(parts)), f"{rng.randint(1, 2024)}年")
        lines.append("".join(parts))
    return lines


ENGLISH_WORDS = (
    "the of and to in is was for on that with as by at from his her are were this which be or an had "
    "not but one all their has have new after first two who they been its time year also more can other "
    "people state states city world school system water energy music history music eat east great three"
).split()


def make_english_lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ws = rng.choices(ENGLISH_WORDS, k=rng.randint(5, 15))
        s = " ".join(ws).capitalize()
        if rng.random() < 0.3:
            s += f" in {rng.randint(1, 2024)}"
        out.append(s + rng.choice([".", "!", "?", ","]))
    return out


def write_lines(path: Path, lines: list[str], end: str = "\n") -> None:
    """The lines, newline-separated, then `end`, as UTF-8."""
    path.write_text("\n".join(lines) + end, encoding="utf-8")


def write_text_records(path: Path, texts: list[str]) -> None:
    """A .jsonl of {"text": ...} records (characters unescaped)."""
    write_lines(path, [json.dumps({"text": t}, ensure_ascii=False) for t in texts])


def kill9_then_rerun_matches(cmd: list[str], run: Path, tmp_path: Path, env: dict) -> None:
    """Run cmd (a training writing into `run`, 8 steps, a checkpoint every 2) to the end; run it again, kill -9 it
    once checkpoint-4 is complete, rerun it: it resumes, ends at step 8, and its adapter equals the full run's.
    Both runs write to the same path: the trajectory was observed to depend on the output path."""
    import shutil
    import signal
    import subprocess
    import time

    import torch
    from safetensors.torch import load_file

    full = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    shutil.move(str(run), str(tmp_path / "full"))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints" / "checkpoint-4" / "zhllama_complete"
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter_model.safetensors").exists()
    again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    shutil.move(str(run), str(tmp_path / "cut"))
    res = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert res["resumed_from"] and res["global_step"] == 8
    a = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def resized_tiny_model(d: Path, recipe_text: str, tiny_base: Path, zh_corpus: Path) -> dict:
    """In d: the recipe file, a 400-piece continued-BPE extension of tiny_base (tok/), the recipe's random model
    on tiny_base (base/, seed 3) and that model resized to the extension (resized/)."""
    from corpora.reader import iter_corpus
    from pretrain.cli import main as pretrain_main
    from pretrain.phases import init_model
    from vocab.extend import ExtendConfig, extend_vocabulary
    from vocab.hf_export import save_tokenizer_folder
    from vocab.merge import build_extended
    from vocab.spmodel import load_model
    from zhllama.recipe import load_recipe

    recipe = d / "recipe.yaml"
    recipe.write_text(recipe_text)
    base = load_model(tiny_base)
    res = extend_vocabulary(base, iter_corpus([zh_corpus]), ExtendConfig(num_added=400, min_batch=50,
                                                                         character_coverage=0.7))
    ext = build_extended(base, res.pieces)
    save_tokenizer_folder(ext, d / "tok")
    init_model(load_recipe(recipe), tiny_base, d / "base", seed=3)
    assert pretrain_main(["resize", "--model", str(d / "base"), "--tokenizer", str(d / "tok"),
                          "--out", str(d / "resized")]) == 0
    return {"dir": d, "recipe": recipe, "tok": d / "tok", "base": d / "base", "resized": d / "resized",
            "corpus": zh_corpus, "n_old": len(base.pieces), "n_new": len(ext.pieces), "ext": ext}


@pytest.fixture(scope="session")
def zh_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("zh")
    (d / "a.txt").write_text("\n".join(make_chinese_lines(3000, 1)) + "\n", encoding="utf-8")
    (d / "b.jsonl").write_text(
        "\n".join('{"text": "%s"}' % s for s in make_chinese_lines(500, 2)) + "\n", encoding="utf-8"
    )
    return d


@pytest.fixture(scope="session")
def zh_heldout() -> list[str]:
    return make_chinese_lines(300, 99)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A LLaMA-layout base tokenizer (BPE, byte fallback, ids 0/1/2 = <unk>/<s>/</s>, bytes 3..258),
    trained on English with a sprinkle of Chinese so that some CJK pieces exist in the base."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("base")
    text = d / "en.txt"
    lines = make_english_lines(4000, 3) + make_chinese_lines(15, 4)
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=600,
        byte_fallback=True, split_digits=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, num_threads=1, minloglevel=2, user_defined_symbols=[],
    )
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def english_lines() -> list[str]:
    return make_english_lines(500, 7)


@pytest.fixture(scope="session")
def chat_model(tiny_base, tmp_path_factory) -> Path:
    """A small random LLaMA in the layout `sft merge` writes: safetensors, the SFT tokenizer ([PAD] appended,
    tokenizer.model beside it), sft_template.json + chat_template.jinja. Rows of 64 so that GGUF q8_0/q4_0
    blocks (32 values) fit."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zhllama.chat import save_name
    from sft.vocabcheck import prepare_tokenizer
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    src = tmp_path_factory.mktemp("chat_tok")
    save_tokenizer_folder(load_model(tiny_base), src)
    shutil.copy2(tiny_base, src / "tokenizer.model")
    d = tmp_path_factory.mktemp("chat_model")
    tok, _ = prepare_tokenizer(src, d, log=lambda *_: None)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    save_name(d, "chinese-alpaca")
    return d


@pytest.fixture(scope="session")
def tok_dir(tiny_base, tmp_path_factory) -> Path:
    """The tiny base tokenizer as a Hugging Face folder (tokenizer.model + tokenizer.json); tests only read it."""
    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    d = tmp_path_factory.mktemp("tok")
    save_tokenizer_folder(load_model(tiny_base), d)
    return d


def save_tiny_llama(d: Path, tok_dir: Path, seed: int = 0, hidden: int = 32, layers: int = 2,
                    max_positions: int = 512) -> Path:
    """A random LLaMA over `tok_dir`'s vocabulary saved with its tokenizer files: a model folder every stage loads."""
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    n = len(json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"])
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    for f in tok_dir.iterdir():
        shutil.copy2(f, d / f.name)
    return d
