"""The settings every SFT-benchmark peer takes, and the result file each writes (read by bench/sft_throughput.py).

Kept free of zhllama imports: the TRL peer runs in its own venv with only this folder on its path.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_job_args(ap) -> None:
    """The SFT job every tool runs; bench/sft_throughput.py takes the same flags and passes them on."""
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)


def peer_args(doc: str, extra=None):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="JSON array of Alpaca records")
    ap.add_argument("--out", required=True)
    add_job_args(ap)
    if extra:
        extra(ap)
    return ap.parse_args()


def trainer_state_result(log_history: list, tokens: int) -> dict:
    """tokens/s and losses from a Trainer's log history: non-padding tokens over the Trainer's own train_runtime."""
    end = next(h for h in reversed(log_history) if "train_runtime" in h)
    losses = [h["loss"] for h in log_history if "loss" in h]
    return {"tokens": int(tokens), "train_runtime": float(end["train_runtime"]), "train_loss": float(end["train_loss"]),
            "last_logged_loss": float(losses[-1]) if losses else None,
            "steps": int(end.get("step", 0)) or None}


def write_result(out, state, *packages, **extra) -> None:
    from importlib.metadata import version

    res = trainer_state_result(state.log_history, state.num_input_tokens_seen)
    res["versions"] = {p: version(p) for p in packages}
    res.update(extra)
    Path(out, "bench_result.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
