"""Generation speed in Chinese characters per second: base vocabulary vs extended vocabulary, same model dimensions.

    python bench/generation.py [--base-tokenizer BASE.model] [--tokenizer RUN/vocab] [--text FILE...]

Two LLaMA-architecture models with identical dimensions and random weights (speed does not depend on
what they learned) differ only in vocabulary size. Each generates --new-tokens tokens greedily from the
same Chinese prompts on CPU; tokens/s is measured. Characters per token of each tokenizer are measured on
the Chinese text; Chinese characters/s = tokens/s x characters/token, the quantity the paper's "about 2x
faster" refers to (a trained model emits text with those statistics).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenizers.py is named like the `tokenizers` package: keep this folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, print_table, write_results  # noqa: E402

PROMPTS = ["人工智能是计算机科学的一个分支，", "今天天气很好，我们一起去公园散步，", "请介绍一下中国的四大发明。"]


def _chars_per_token(model_path: Path, lines: list[str]) -> float:
    from vocab.spmodel import load_model, processor

    sp = processor(load_model(model_path))
    return sum(len(s) for s in lines) / max(1, sum(len(e) for e in sp.encode(lines)))


def _model(vocab: int, hidden: int, layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _rate(model, vocab: int, new_tokens: int, prompt: int) -> float:
    import torch

    ids = torch.randint(3, vocab, (1, 12), generator=torch.Generator().manual_seed(prompt))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


def tokens_per_s(vocabs: dict[str, int], hidden: int, layers: int, new_tokens: int, repeats: int) -> dict[str, float]:
    """Median tokens/s per model; the models take turns so that drifts of the machine hit both alike."""
    models = {name: _model(v, hidden, layers) for name, v in vocabs.items()}
    rates: dict[str, list[float]] = {name: [] for name in vocabs}
    for r in range(repeats + 1):
        for p in range(len(PROMPTS)):
            for name, m in models.items():
                rate = _rate(m, vocabs[name], new_tokens, p)
                if r:  # the first round warms up
                    rates[name].append(rate)
    return {name: statistics.median(v) for name, v in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-tokenizer", default=str(ROOT / ".cache" / "zhllama" / "base" / "tokenizer.model"))
    ap.add_argument("--tokenizer", default=str(ROOT / "runs" / "default" / "vocab"), help="extended tokenizer folder or .model")
    ap.add_argument("--text", nargs="*", default=[str(ROOT / ".cache" / "zhllama" / "zh")], help="Chinese text for characters/token")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-lines", type=int, default=2000)
    ap.add_argument("--json", default=str(RESULTS / "generation.json"))
    a = ap.parse_args(argv)
    from corpora.reader import iter_corpus
    from vocab.spmodel import load_model

    lines = []
    for doc in iter_corpus(a.text):
        lines.append(doc)
        if len(lines) >= a.max_lines:
            break
    paths = {"base": Path(a.base_tokenizer), "extended": Path(a.tokenizer)}
    vocabs = {name: len(load_model(p).pieces) for name, p in paths.items()}
    tps = tokens_per_s(vocabs, a.hidden, a.layers, a.new_tokens, a.repeats)
    rows = {}
    for name, path in paths.items():
        cpt = _chars_per_token(path, lines)
        rows[name] = {"vocab": vocabs[name], "chars_per_token": round(cpt, 3), "tokens_per_s": round(tps[name], 1),
                      "chinese_chars_per_s": round(tps[name] * cpt, 1)}
    rows["extended"]["speedup_chars_per_s"] = round(rows["extended"]["chinese_chars_per_s"] / rows["base"]["chinese_chars_per_s"], 2)
    print_table([{"model": name, **r} for name, r in rows.items()],
                ["model", "vocab", "chars_per_token", "tokens_per_s", "chinese_chars_per_s"],
                {"chars_per_token": "chars/token", "tokens_per_s": "tokens/s", "chinese_chars_per_s": "Chinese chars/s"})
    print(f"extended / base, Chinese characters per second: {rows['extended']['speedup_chars_per_s']}x "
          f"(model: hidden {a.hidden}, {a.layers} layers, greedy, {a.new_tokens} new tokens, CPU)")
    write_results(a.json, settings=vars(a), results=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
