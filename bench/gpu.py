"""GPU benchmark: phase-2 and SFT steps of LLaMA-7B/13B-shaped models (random weights, no download).

    python bench/gpu.py                      # on a CUDA machine: measure
    python bench/gpu.py --dry-run            # anywhere: shapes, parameter counts, memory estimate, FLOPs per step

Measured (CUDA): peak GPU memory, tokens/s and model FLOPs utilisation at 512 tokens, bf16, gradient
checkpointing, for each micro-batch size until one does not fit. MFU counts 6 x parameters + attention
FLOPs per token (the usual convention) against the device's dense bf16 peak (--peak-tflops, default H100 SXM).
The dry run uses the same shapes on the meta device and `pretrain.plan`'s memory estimate.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/tokenizers.py is named like the `tokenizers` package: keep this folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, print_table, write_results  # noqa: E402

STAGES = {  # what trains in each measured stage, from the recipes
    "phase2": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"], vocab=49953),
    "sft": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], vocab=49954),
}


def _config(recipe, vocab: int):
    from transformers import LlamaConfig

    m = recipe.model
    return LlamaConfig(vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                       num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                       num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
                       tie_word_embeddings=False)


def _lora(targets):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")


def flops_per_token(cfg, n_params: int, seq: int) -> float:
    return 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def dry_run(names, seq: int) -> list[dict]:
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from pretrain.plan import plan
    from zhllama.recipe import load_recipe

    rows = []
    for name in names:
        recipe = load_recipe(name)
        p = plan(recipe, vocab_size=49953, num_gpus=1)
        mem = {ph["phase"]: ph.get("memory_per_gpu") for ph in p["phases"] if ph.get("enabled")}
        for stage, spec in STAGES.items():
            cfg = _config(recipe, spec["vocab"])
            with torch.device("meta"):
                model = get_peft_model(LlamaForCausalLM(cfg), _lora(spec["targets"]))
            # modules_to_save keeps a frozen original beside the trained copy: count each matrix once
            n_base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append({
                "model": name, "stage": stage, "vocab": spec["vocab"], "hidden": cfg.hidden_size,
                "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "parameters": n_base,
                "trainable": n_train, "trainable_percent": round(100 * n_train / (n_base + n_train - 2 * spec["vocab"] * cfg.hidden_size), 2),
                "gflops_per_token": round(flops_per_token(cfg, n_base, seq) / 1e9, 2),
                "plan_phase2_GiB_per_gpu": round((mem.get("phase2") or {}).get("total_gib", float("nan")), 1),
            })
    return rows


def measure(names, seq: int, steps: int, peak_tflops: float, max_micro: int) -> list[dict]:
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from zhllama.recipe import load_recipe

    rows = []
    for name in names:
        recipe = load_recipe(name)
        for stage, spec in STAGES.items():
            cfg = _config(recipe, spec["vocab"])
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype=torch.bfloat16, device="cuda")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model = get_peft_model(model, _lora(spec["targets"]))
            n = sum(p.numel() for nm, p in model.named_parameters() if "lora_" not in nm and "modules_to_save" not in nm)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
            micro = 1
            while micro <= max_micro:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    ids = torch.randint(0, spec["vocab"], (micro, seq), device="cuda")
                    for i in range(steps + 2):  # two warm-up steps
                        if i == 2:
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                        loss = model(input_ids=ids, labels=ids).loss
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                except torch.cuda.OutOfMemoryError:
                    break
                tps = micro * seq * steps / dt
                rows.append({"model": name, "stage": stage, "micro_batch": micro, "seq": seq,
                             "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                             "tokens_per_s": round(tps), "mfu": round(tps * flops_per_token(cfg, n, seq) / (peak_tflops * 1e12), 3)})
                print(rows[-1], flush=True)
                micro *= 2
            del model, opt
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no GPU needed: shapes, counts, estimates")
    ap.add_argument("--models", nargs="+", default=["llama-7b", "llama-13b"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-micro-batch", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device (H100 SXM: 989)")
    ap.add_argument("--json", default=str(RESULTS / "gpu.json"))
    a = ap.parse_args(argv)
    import torch

    dry = a.dry_run or not torch.cuda.is_available()
    if dry and not a.dry_run:
        print("no CUDA device: running the dry run (shapes, parameter counts, memory estimate)")
    rows = dry_run(a.models, a.seq) if dry else measure(a.models, a.seq, a.steps, a.peak_tflops, a.max_micro_batch)
    if rows:
        print_table(rows, list(rows[0]))
    write_results(a.json, device="dry-run" if dry else torch.cuda.get_device_name(), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
