"""LoRA SFT speed, side by side: zhllama vs plain HF Trainer + PEFT vs TRL's SFTTrainer vs LLaMA-Factory.

    python bench/sft_throughput.py [--steps 30] [--models tiny 58M] [--tools zhllama zhllama-padded hf trl llamafactory]
                                   [--data ALPACA.json] [--tokenizer tokenizer.model] [--cache DIR] [--profile]

Every tool does the same job on the same model: LoRA r=8 (alpha 32, dropout 0.05) on all linear layers of a
LLaMA-architecture model built from a config (random weights, seeded: the tiny recipe's shape untied, ~4M
parameters at a 32k vocabulary, and a ~58M shape), the same Alpaca records in the same (Stanford Alpaca) prompt format,
batch 4, max length 256, constant learning rate, fp32 on CPU, the same number of steps. Each runs in a fresh
process; the peers that pin other library versions (TRL, LLaMA-Factory) run in their own venvs, built on
first use (bench/peers/venvs.py). By default the training set is exactly steps x batch records, so every tool
trains on the same examples once (each in its own shuffled order). Reported per run:

* tokens/s: non-padding input tokens the tool's Trainer counted, over the Trainer's own train_runtime;
* peak RSS of the process;
* the tool's train loss (mean over the steps) and a common held-out loss: every saved adapter is loaded
  on the same base and scored by one evaluator on the same held-out records (mean cross-entropy per
  response token), so "equal or lower loss" does not depend on each tool's own bookkeeping.

`zhllama` is `python -m sft train` as shipped (padding-free packed batches, per-example attention, LM head on
trained positions only, cheaper LoRA dropout); `zhllama-padded` is the same with `packing=false
fast_lora_dropout=false`, the ablation. `--profile` adds a torch.profiler table of a few zhllama and padded
steps (what the time goes to).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, SHAPES, bench_env, print_table, run_measured, versions, write_results  # noqa: E402
from bench.peers.args import add_job_args  # noqa: E402
from bench.peers.venvs import ensure_venv  # noqa: E402

TOOLS = ["zhllama", "zhllama-padded", "hf", "trl", "llamafactory"]
DATA = Path(os.environ.get("ZHLLAMA_DATA", ROOT.parent / "shared" / "data"))


def _default_data() -> Path:
    p = DATA / "instructions" / "alpaca_zh_llamafactory_demo_1k.json"
    return p if p.is_file() else ROOT / "corpora" / "instructions_zh.json"


def _default_tokenizer() -> Path:
    p = DATA / "tokenizers" / "llama_tokenizer.model"
    return p if p.is_file() else ROOT / ".cache" / "zhllama" / "base" / "tokenizer.model"


def _model(shape: str, tokenizer: Path, cache: Path) -> Path:
    from zhllama.hashing import sha256_file

    out = cache / "models" / f"{shape}-{sha256_file(tokenizer)[:12]}"
    if not (out / "config.json").is_file():
        sets = [x for s in SHAPES[shape] for x in ("--set", s)]
        run_measured([sys.executable, "-m", "pretrain", "init", "--recipe", "tiny", "--tokenizer", tokenizer,
                      "--out", out, *sets], cache / "logs" / f"init-{shape}.log")
    return out


def _split(data: Path, n_train: int, n_eval: int, work: Path) -> tuple[Path, Path]:
    from sft.data import load_records

    recs = load_records([data], log=lambda *_: None)
    if len(recs) < n_train + n_eval:
        n_eval = max(1, len(recs) // 5)
        n_train = len(recs) - n_eval
    rows = [{"instruction": r.instruction, "input": r.input, "output": r.output} for r in recs]
    train, held = work / "train.json", work / "eval.json"
    train.write_text(json.dumps(rows[:n_train], ensure_ascii=False), encoding="utf-8")
    held.write_text(json.dumps(rows[-n_eval:], ensure_ascii=False), encoding="utf-8")
    return train, held


def _llamafactory(py: Path, a, model: Path, train: Path, out: Path, log: Path) -> int:
    ddir = out.parent / "lf_data"
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "train.json").write_text(train.read_text(encoding="utf-8"), encoding="utf-8")
    (ddir / "dataset_info.json").write_text(json.dumps({"bench_alpaca": {
        "file_name": "train.json", "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}))
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_target": "all", "lora_rank": a.r, "lora_alpha": a.alpha, "lora_dropout": a.dropout,
        "dataset": "bench_alpaca", "dataset_dir": str(ddir), "template": "alpaca", "cutoff_len": a.max_length,
        "overwrite_cache": True, "preprocessing_num_workers": 1, "output_dir": str(out), "logging_steps": 5,
        "save_strategy": "no", "plot_loss": False, "overwrite_output_dir": True,
        "per_device_train_batch_size": a.batch, "gradient_accumulation_steps": 1, "learning_rate": a.lr,
        "max_steps": a.steps, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "bf16": False, "fp16": False, "report_to": "none", "seed": a.seed,
        "include_num_input_tokens_seen": "non_padding",
    }
    import yaml

    yml = out.parent / "llamafactory.yaml"  # its JSON config reader is broken in 0.9.5
    yml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    rss = run_measured([py.parent / "llamafactory-cli", "train", yml], log, env=bench_env(PYTHONPATH=""))
    from bench.peers.args import trainer_state_result

    state = json.loads((out / "trainer_state.json").read_text())
    res = trainer_state_result(state["log_history"], state.get("num_input_tokens_seen", 0))
    res["versions"] = {"llamafactory": _peer_version(py, "llamafactory"), "transformers": _peer_version(py, "transformers"),
                       "peft": _peer_version(py, "peft")}
    (out / "bench_result.json").write_text(json.dumps(res, indent=2))
    return rss


def _peer_version(py: Path, pkg: str) -> str:
    import subprocess

    r = subprocess.run([str(py), "-c", f"from importlib.metadata import version; print(version({pkg!r}))"],
                       capture_output=True, text=True)
    return r.stdout.strip()


def _run_tool(tool: str, a, model: Path, train: Path, out: Path, logs: Path) -> dict:
    common = ["--model", model, "--data", train, "--out", out, "--steps", a.steps, "--batch", a.batch,
              "--max-length", a.max_length, "--lr", a.lr, "--r", a.r, "--alpha", a.alpha, "--dropout", a.dropout,
              "--seed", a.seed]
    log = logs / f"{model.name}-{tool}.log"
    if tool.startswith("zhllama"):
        sets = {"per_device_batch_size": a.batch, "global_batch_size": a.batch, "max_length": a.max_length,
                "learning_rate": a.lr, "lr_scheduler": "constant", "warmup_ratio": 0, "weight_decay": 0,
                "lora_r": a.r, "lora_alpha": a.alpha, "lora_dropout": a.dropout, "modules_to_save": "",
                "eval_ratio": 0, "logging_steps": 5, "save_steps": 100_000, "seed": a.seed}
        if tool == "zhllama-padded":
            sets.update(packing="false", fast_lora_dropout="false")
        shape = [x for s in SHAPES[model.name.split("-")[0]] for x in ("--set", s)]  # the recipe must fit the model
        cmd = [sys.executable, "-m", "sft", "train", "--recipe", "tiny", *shape, "--model", model, "--data", train,
               "--out", out, "--template", "stanford-alpaca", "--max-steps", a.steps, "--no-resume"]
        rss = run_measured(cmd + [x for k, v in sets.items() for x in ("--set", f"sft.{k}={v}")], log)
        from bench.peers.args import trainer_state_result

        r = json.loads((out / "result.json").read_text())
        res = trainer_state_result(json.loads((out / "log_history.json").read_text()), r["tokens_seen"])
        res["versions"] = versions("transformers", "peft")
    elif tool == "hf":
        rss = run_measured([sys.executable, ROOT / "bench" / "peers" / "hf_peft.py", *common], log)
        res = json.loads((out / "bench_result.json").read_text())
    elif tool == "trl":
        py = ensure_venv("trl", a.cache / "bench-venvs")
        rss = run_measured([py, ROOT / "bench" / "peers" / "trl_sft.py", *common], log, env=bench_env(PYTHONPATH=""))
        res = json.loads((out / "bench_result.json").read_text())
    elif tool == "llamafactory":
        py = ensure_venv("llamafactory", a.cache / "bench-venvs")
        rss = _llamafactory(py, a, model, train, out, log)
        res = json.loads((out / "bench_result.json").read_text())
    else:
        raise SystemExit(f"unknown tool {tool!r}; known: {', '.join(TOOLS)}")
    res["peak_rss_mib"] = round(rss / 1024)
    res["tokens_per_s"] = round(res["tokens"] / res["train_runtime"], 1)
    return res


def heldout_loss(model_dir: Path, adapter: Path | None, held: Path, max_length: int) -> tuple[float, int]:
    """One yardstick for every tool's adapter: mean response-token cross-entropy on the held-out records
    (and the base model's parameter count)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zhllama.trainer import plain_eval_loss
    from sft.data import Collator, ExampleEncoder, encode_records, load_records
    from zhllama.chat import get

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    enc = ExampleEncoder(tok, get("stanford-alpaca"), max_length)
    rows = encode_records(load_records([held], log=lambda *_: None), enc, "truncate", log=lambda *_: None).examples
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    n_params = sum(p.numel() for p in base.parameters())
    model = PeftModel.from_pretrained(base, str(adapter)) if adapter else base
    return plain_eval_loss(model, rows, Collator(0), 8), n_params


def profile(model: Path, train: Path, a, steps: int = 4) -> None:
    """torch.profiler over a few training steps of zhllama's packed batches and of right-padded batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft.config import ALL_PROJ
    from sft.data import Collator, ExampleEncoder, encode_records, load_records
    from sft.lora_dropout import use_fast_dropout
    from sft.packing import PackedCollator, packed_attention, selected_token_loss
    from zhllama.chat import get

    tok = AutoTokenizer.from_pretrained(str(model))
    enc = ExampleEncoder(tok, get("stanford-alpaca"), a.max_length)
    rows = encode_records(load_records([train], log=lambda *_: None), enc, log=lambda *_: None).examples
    for name in ("padded", "zhllama"):
        torch.manual_seed(0)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model)), LoraConfig(
            r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=ALL_PROJ, task_type="CAUSAL_LM"))
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=a.lr)
        batches = [rows[i * a.batch:(i + 1) * a.batch] for i in range(steps + 1)]

        def step(b):
            if name == "padded":
                loss = m(**Collator(0)(b)).loss
            else:
                batch = PackedCollator()(b)
                labels = batch.pop("labels")
                loss = selected_token_loss(m(**batch), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if name == "zhllama":
            use_fast_dropout(m)
            ctx = packed_attention(m)
        else:
            import contextlib
            ctx = contextlib.nullcontext()
        with ctx:
            step(batches[0])  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU]) as p:
                for b in batches[1:]:
                    step(b)
        print(f"\n### profile: {name} ({steps} steps, {model.name})")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=_default_data(), help="Alpaca records (default: the shared 1k demo set)")
    ap.add_argument("--tokenizer", type=Path, default=_default_tokenizer(), help="base tokenizer.model (32k)")
    ap.add_argument("--models", nargs="+", default=["4M", "58M"], choices=list(SHAPES))
    ap.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    add_job_args(ap)
    ap.add_argument("--train-records", type=int, help="default steps x batch: every tool sees the same examples once")
    ap.add_argument("--eval-records", type=int, default=100)
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("ZHLLAMA_BENCH_CACHE", ROOT / ".cache" / "zhllama")),
                    help="peers' venvs (bench-venvs/) and the benchmark models live here")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table per batching")
    ap.add_argument("--json", type=Path, default=RESULTS / "sft_throughput.json")
    a = ap.parse_args(argv)
    if not a.tokenizer.is_file():
        raise SystemExit(f"{a.tokenizer}: no base tokenizer.model; pass --tokenizer (or run `make sample` first)")
    for tool in a.tools:  # install the peers up front: a failed install should not come after an hour of runs
        if tool in ("trl", "llamafactory"):
            ensure_venv(tool, a.cache / "bench-venvs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, held = _split(a.data, a.train_records or a.steps * a.batch, a.eval_records, tmp)
        for shape in a.models:
            model = _model(shape, a.tokenizer, a.cache / "bench")
            base_loss, n_params = heldout_loss(model, None, held, a.max_length)
            for tool in a.tools:
                out = tmp / shape / tool
                print(f"{shape}: {tool} ...", flush=True)
                res = _run_tool(tool, a, model, train, out, a.cache / "bench" / "logs")
                res.update(model=shape, tool=tool, heldout_loss=round(heldout_loss(model, out, held, a.max_length)[0], 4),
                           heldout_loss_before=round(base_loss, 4), params=n_params)
                rows.append(res)
                print(f"  {res['tokens_per_s']:.1f} tok/s, peak RSS {res['peak_rss_mib']} MiB, "
                      f"train loss {res['train_loss']:.4f}, held-out {res['heldout_loss']:.4f}", flush=True)
            if a.profile:
                profile(model, train, a)
    for shape in a.models:
        ref = {r["tool"]: r["tokens_per_s"] for r in rows if r["model"] == shape}
        for r in rows:
            if r["model"] == shape:
                for peer in ("hf", "llamafactory"):
                    if peer in ref:
                        r[f"x_{peer}"] = round(r["tokens_per_s"] / ref[peer], 2)
    print()
    print_table(rows, ["model", "params", "tool", "tokens", "train_runtime", "tokens_per_s", "x_hf", "x_llamafactory",
                       "peak_rss_mib", "train_loss", "heldout_loss"],
                {"train_runtime": "train s", "tokens_per_s": "tokens/s", "x_hf": "vs plain HF",
                 "x_llamafactory": "vs LLaMA-Factory", "peak_rss_mib": "peak RSS MiB", "heldout_loss": "held-out loss"})
    write_results(a.json, settings={k: str(v) for k, v in vars(a).items()}, rows=rows,
                  versions=versions("torch", "transformers", "peft"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
