"""How long `evaluation choice` takes on CPU: C-Eval-shaped 5-shot questions, a GPT-2-small-sized LLaMA.

    python bench/choice_speed.py --tokenizer runs/default/vocab [--subjects 3 --questions 26]

Builds a random LLaMA (hidden 768, 12 layers, tied embeddings: 124M parameters at a 49,953 vocabulary)
and a C-Eval-layout folder whose questions and options are held-out corpus lines cut to C-Eval's typical
lengths (question 20-120 characters, options 4-30), 26 questions per subject (C-Eval val has 1,346 in 52
subjects). Times `--method logits` with the shared-prefix cache (the default) and without it, and
extrapolates to the 1,346 val questions. Random weights: the answers are meaningless, the time is not.
CPU seconds are reported beside wall seconds: on a shared machine they are the stabler figure (on an
otherwise idle machine with N threads, wall time is about CPU time / N).
"""
from __future__ import annotations

import argparse
import csv
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, print_table, versions, write_results  # noqa: E402


def _folder(root: Path, lines: list[str], subjects: int, questions: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    names = [f"subject_{i:02d}" for i in range(subjects)]

    def text(lo, hi):
        line = rng.choice(lines)
        n = rng.randint(lo, hi)
        return (line * (1 + n // max(1, len(line))))[:n]

    for s in names:
        for split, n in (("dev", 5), ("val", questions)):
            p = root / split / f"{s}_{split}.csv"
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
                for i in range(n):
                    w.writerow([i, text(20, 120), *(text(4, 30) for _ in range(4)), rng.choice("ABCD")])
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer folder (the embedded default's runs/default/vocab)")
    ap.add_argument("--text", default="runs/default/corpus/heldout", help="text the questions are cut from")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--questions", type=int, default=26)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evaluation.bpc import read_documents
    from evaluation.choice import ChoiceConfig, evaluate

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = _folder(Path(tmp), read_documents([a.text]), a.subjects, a.questions)
        for cache in (True, False):
            c = ChoiceConfig(subjects=tuple(names if cache else names[:1]), batch_size=a.batch_size, prefix_cache=cache)
            t0, c0 = time.perf_counter(), time.process_time()
            res = evaluate(model, tok, tmp, c, progress=False, log=lambda *_: None)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            n = res["questions"]
            rows.append({"path": "shared-prefix cache (default)" if cache else "whole prompts", "questions": n,
                         "wall s": round(secs, 1), "CPU s": round(cpu, 1), "CPU s / question": cpu / n,
                         "1,346 questions, CPU min": 1346 * cpu / n / 60})
    print(f"model: {params / 1e6:.0f}M parameters, vocabulary {len(tok):,}, torch threads {torch.get_num_threads()}")
    print_table(rows, ["path", "questions", "wall s", "CPU s", "CPU s / question", "1,346 questions, CPU min"])
    write_results(RESULTS / "choice_speed.json", parameters=params, rows=rows, versions=versions("torch", "transformers"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
