"""What bench/gpu/run.sh measures, without a GPU: LLaMA-7B/13B shapes on the meta device.

    python bench/gpu/shapes.py        # shapes, parameter counts, trainable fractions, plan's memory estimate, FLOPs/token

The GPU measurement itself is `bench/gpu/run.sh device` (the real `pretrain` / `sft` entry points); this
script only states what those runs train, so the numbers they report can be checked against it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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


def flops_per_token(cfg, n_layer_params: int, seq: int) -> float:
    """bench/gpu/device.py's convention for a frozen base + LoRA: 4 x block weights (forward + input gradients),
    attention 12 L d c (c = mean causal context of a full block), trained head 6 d V."""
    d, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    return 4 * n_layer_params + 12 * L * d * (seq + 1) / 2 + 6 * d * V


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
            n_layers = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "lora_" not in n)
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            rows.append({
                "model": name, "stage": stage, "vocab": spec["vocab"], "hidden": cfg.hidden_size,
                "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "parameters": n_base,
                "trainable": n_train, "trainable_percent": round(100 * n_train / (n_base + n_train - 2 * spec["vocab"] * cfg.hidden_size), 2),
                "gflops_per_token": round(flops_per_token(cfg, n_layers, seq) / 1e9, 2),
                "plan_phase2_GiB_per_gpu": round((mem.get("phase2") or {}).get("total_gib", float("nan")), 1),
            })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-7b", "llama-13b"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--json", default=str(RESULTS / "gpu_shapes.json"))
    a = ap.parse_args(argv)
    rows = dry_run(a.models, a.seq)
    print_table(rows, list(rows[0]))
    write_results(a.json, device="meta (no GPU)", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
