"""Memory of one packed SFT step with the chunked LM head + loss (loss_chunk_tokens) against the unchunked one, on CPU.

    python bench/sft_loss_memory.py [--shape 58M] [--micro 16] [--chunks 0 1024]

What is measured, per setting, in a fresh process (LoRA r=8 on all projections + trained embed/head copies,
like the recipes; a 49,954 vocabulary; `--micro` examples of 128-256 tokens, the first 40% of each untrained):

* saved MiB: bytes of the tensors autograd keeps between forward and backward (each storage counted once):
  exact, independent of the allocator;
* step peak MiB: the process's peak RSS during forward + loss + backward minus its RSS just before (peak reset
  through /proc/self/clear_refs, freed heap returned with malloc_trim first), after one warm-up step.

The GPU script (bench/gpu/run.sh) measures the same switch at 7B shape with torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, print_table, write_results  # noqa: E402

SHAPES = {"58M": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8),
          "4M": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)}


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def one(shape: str, micro: int, chunk: int, seed: int = 0) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.config import ALL_PROJ
    from sft.packing import PackedCollator, packed_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49954, tie_word_embeddings=False, attn_implementation="sdpa", **SHAPES[shape])
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=32, target_modules=ALL_PROJ,
                                                             modules_to_save=["embed_tokens", "lm_head"],
                                                             task_type="CAUSAL_LM"))
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    examples = []
    for _ in range(micro):
        n = int(torch.randint(128, 257, (1,), generator=g))
        ids = torch.randint(3, 49953, (n,), generator=g).tolist()
        cut = int(0.4 * n)
        examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    batch = PackedCollator()(examples)
    labels = batch.pop("labels")
    trained = int((labels[..., 1:] != -100).sum())
    libc = ctypes.CDLL("libc.so.6")

    def step(saved=None):
        model.zero_grad(set_to_none=True)
        if saved is None:
            loss = packed.loss(model(**batch), labels)
        else:
            seen = {}

            def pack(t):
                s = t.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = packed.loss(model(**batch), labels)
            saved.append(sum(seen.values()))
        loss.backward()
        return float(loss)

    with packed_attention(model, loss_chunk_tokens=chunk) as packed:
        step()  # warm-up: optimizer-free, but grads and allocator pools exist from here on
        model.zero_grad(set_to_none=True)
        libc.malloc_trim(0)
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        saved: list[int] = []
        loss = step(saved)
        peak = _status("VmHWM")
    return {"shape": shape, "micro_batch": micro, "tokens": int(batch["input_ids"].shape[1]), "trained_tokens": trained,
            "loss_chunk_tokens": chunk, "saved_MiB": round(saved[0] / 2**20, 1),
            "step_peak_MiB": round((peak - before) / 2**20, 1), "loss": round(loss, 5)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="58M", choices=list(SHAPES))
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(RESULTS / "sft_loss_memory.json"))
    a = ap.parse_args(argv)
    if a.one is not None:
        print(json.dumps(one(a.shape, a.micro, a.one)))
        return 0
    rows = []
    for chunk in a.chunks:  # a fresh process each: nothing of one setting's heap is left for the other
        r = subprocess.run([sys.executable, __file__, "--shape", a.shape, "--micro", str(a.micro), "--one", str(chunk)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print_table(rows, list(rows[0]))
    write_results(a.json, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
