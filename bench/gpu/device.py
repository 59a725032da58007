"""The GPU measurement (`bench/gpu/run.sh device`): zhllama's real entry points at LLaMA-7B/13B shape, one table.

run.sh has installed the carried wheels and zhllama itself (no dependencies) into a temporary site folder;
every stage below is the shipped command line, run in its own process through bench/gpu/probe.py (which
only records torch.cuda.max_memory_allocated and the peak RSS at exit):

    python -m pretrain init    --recipe llama-7b --dtype bfloat16      (random weights drawn on the GPU)
    python -m pretrain resize  --init subword-mean                      (32,000 -> 49,953 rows)
    python -m pretrain phase2  --recipe llama-7b --precision bf16       (micro-batch 1, 4, 16, ... until OOM)
    python -m sft train        --recipe llama-7b --set sft.precision=bf16   (same; and once without the chunked loss)
    python bench/peers/hf_peft.py --bf16 --gradient-checkpointing ...   (plain transformers Trainer + PEFT)
    accelerate launch --config_file recipes/accelerate/{fsdp,deepspeed_zero3}.yaml --num_processes 1 -m sft train
                                                                        (the engine path, micro-batch 1; ZeRO-3 only
                                                                         where deepspeed is installed)

Before them, a check of the packed-batch attention kernels on the GPU (loss and gradients against the padded
batch; host synchronisations counted with torch.cuda.set_sync_debug_mode). Each training run takes a few
optimizer steps with one micro-batch per step (global batch = micro-batch); tokens/s is read between the
log lines of the measured steps (the first `--warmup` steps excluded), from the run's own metrics.jsonl.

MFU convention (frozen base + LoRA): model FLOPs per token = 4 x N_layers (forward + input gradients of the
transformer blocks' weights; LoRA's own FLOPs and the recomputation of gradient checkpointing not counted)
+ 12 x L x d x c (attention scores and mixing, forward + backward, c = mean attended context: 256.5 for full
512-token blocks, from the data for SFT) + 6 x d x V per trained position (the trained LM head: forward,
input and weight gradients), over the card's dense bf16 peak (H100 SXM / H200: 989 TFLOP/s, H100 PCIe: 756;
--peak-tflops to set). zhllama and the plain-HF peer are credited the same FLOPs per non-padding token, so
their MFU ratio is their tokens/s ratio.

--cpu-smoke runs the same script on the CPU with the tiny recipe and small micro-batches (tests/test_bench_gpu.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).resolve().parent / "probe.py"
PEER = ROOT / "bench" / "peers" / "hf_peft.py"
RECIPES = {"7b": "llama-7b", "13b": "llama-13b", "tiny": "tiny"}
PEAKS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0)]
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "out of memory")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- environment


def environment(peak_tflops) -> dict:
    import torch

    from importlib.metadata import PackageNotFoundError, version

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for p in ("transformers", "peft", "accelerate", "datasets", "tokenizers", "sentencepiece", "safetensors",
              "protobuf", "flash_attn", "zhllama"):
        try:
            env[p] = version(p)
        except PackageNotFoundError:
            env[p] = None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        env["gpu_total_gib"] = round(total / 2**30, 1)
        name = env["device"]
        env["peak_tflops"] = peak_tflops or next((v for k, v in PEAKS if k in name), None)
    else:
        env["peak_tflops"] = None
    from sft import packing

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    env["packed_kernel"] = packing.choose_backend(dev, half=dev == "cuda")
    env["packed_kernels_available"] = packing.kernels_available(dev)
    return env


# ------------------------------------------------------------------------ packed attention on this device


def _tiny_lora(device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # head_dim 64 (what the flash kernels are built for); smaller on the CPU smoke run
    hidden, layers = (512, 4) if device == "cuda" else (128, 2)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False,
                      attn_implementation="sdpa")
    m = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, task_type="CAUSAL_LM",
                                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                         modules_to_save=["lm_head"]))
    return m.to(device)


def packed_check(backends, device: str) -> list[dict]:
    """Each packed kernel against the padded batch on this device: loss, gradients, host syncs per forward+backward."""
    import torch

    from sft.data import Collator
    from sft.packing import BACKEND_ENV, PackedCollator, packed_attention

    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (37, 200, 5, 120, 64, 250):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        cut = max(1, n // 3)
        examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    model = _tiny_lora(device)
    model.train()
    cuda = device == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def run(batch_fn, loss_fn):
        model.zero_grad(set_to_none=True)
        with amp:
            loss = loss_fn(batch_fn())
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def to_dev(b):
        return {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()}

    padded = to_dev(Collator(pad_id=0)(examples))
    ref_loss, ref_grads = run(lambda: padded, lambda b: model(**b).loss)
    rows = []
    for backend in backends:
        os.environ[BACKEND_ENV] = backend
        t0 = time.time()
        try:
            with packed_attention(model, loss_chunk_tokens=128) as packed:
                batch = to_dev(PackedCollator()(examples))
                labels = batch.pop("labels")
                n_items = (labels[..., 1:] != -100).sum()
                run(lambda: batch, lambda b: packed.loss(model(**b), labels, n_items))  # warm-up / compile
                syncs = []
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("warn")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    loss, grads = run(lambda: batch, lambda b: packed.loss(model(**b), labels, n_items))
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
                syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
            rel_loss = abs(float(loss - ref_loss)) / abs(float(ref_loss))
            rel_grad = max(float((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp(min=1e-12)) for k in ref_grads)
            # bf16 autocast: both sides round differently; per-layer host syncs (>= the 4 layers) fail a device kernel
            ok = rel_loss < 2e-2 and rel_grad < 5e-2 and (backend == "sdpa_loop" or not cuda or len(syncs) < 4)
            rows.append({"kernel": backend, "loss": round(float(loss), 5), "padded_loss": round(float(ref_loss), 5),
                         "rel_loss_diff": rel_loss, "max_rel_grad_diff": rel_grad, "host_syncs": len(syncs) if cuda else None,
                         "first_sync": syncs[0] if syncs else None, "seconds": round(time.time() - t0, 1),
                         "ok": ok})
        except Exception as e:  # a kernel missing or failing here is a finding, not the end of the run
            rows.append({"kernel": backend, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
        finally:
            os.environ.pop(BACKEND_ENV, None)
        log(f"packed check {backend}: {rows[-1]}")
    model.to("cpu")  # free the GPU for the real runs' processes
    if cuda:
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ FLOPs


def model_flops(config: dict, context: float, trained_frac: float) -> float:
    d, L, ff, V = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = d // config["num_attention_heads"]
    n_layers = L * (2 * d * d + 2 * d * kv * head_dim + 3 * d * ff)
    return 4 * n_layers + 12 * L * d * context + 6 * d * V * trained_frac


def sft_data_stats(alpaca: Path, tok_dir: Path, recipe_name: str) -> dict:
    """Mean attended context and trained fraction of the SFT examples, as zhllama encodes them."""
    from transformers import AutoTokenizer

    from zhllama.recipe import load_recipe
    from sft.config import sft_config
    from sft.data import ExampleEncoder, encode_records, load_records
    from zhllama.chat import get

    rec = load_recipe(recipe_name)
    cfg = sft_config(rec.sft)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    enc = ExampleEncoder(tok, get(cfg.template), cfg.max_length)
    ds = encode_records(load_records([alpaca], log=lambda *_: None), enc, "truncate", log=lambda *_: None)
    lens = [len(e["input_ids"]) for e in ds.examples]
    trained = sum(sum(1 for y in e["labels"][1:] if y != -100) for e in ds.examples)
    return {"examples": len(lens), "mean_length": sum(lens) / len(lens),
            "context": sum(n * (n + 1) / 2 for n in lens) / sum(lens), "trained_frac": trained / sum(lens),
            "max_length": cfg.max_length, "template": cfg.template, "learning_rate": cfg.learning_rate}


# ------------------------------------------------------------------------------------------------- runs


class Runner:
    def __init__(self, work: Path, out: Path, env: dict, budget_s: float, t0: float):
        self.work, self.out, self.env, self.budget_s, self.t0 = work, out, env, budget_s, t0
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.durations: dict[str, float] = {}

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def fits(self, kind: str, default_s: float) -> bool:
        return self.durations.get(kind, default_s) < self.left()

    def run(self, name: str, kind: str, argv: list[str]) -> dict:
        probe = self.work / f"{name}.probe.json"
        probe.unlink(missing_ok=True)
        logf = self.logs / f"{name}.log"
        cmd = [sys.executable, str(PROBE), str(probe), *map(str, argv)]
        log(f"{name}: {' '.join(map(str, argv))}")
        t = time.time()
        with open(logf, "w", encoding="utf-8") as f:
            f.write(" ".join(map(str, cmd)) + "\n")
            f.flush()
            r = subprocess.run(cmd, cwd=self.work, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        dt = time.time() - t
        self.durations[kind] = max(self.durations.get(kind, 0.0), dt)
        text = logf.read_text(encoding="utf-8", errors="replace")
        res = json.loads(probe.read_text()) if probe.is_file() else {}
        status = "ok" if r.returncode == 0 else ("OOM" if any(m in text for m in OOM_MARKERS) else "failed")
        res.update(status=status, returncode=r.returncode, wall_s=round(dt, 1))
        log(f"{name}: {status} in {dt:.0f} s" + ("" if status == "ok" else f"\n{text[-2500:]}"))
        return res


def steady_rate(lines: list[dict], warmup: int) -> tuple[float | None, float | None]:
    """tokens/s between the last warm-up log line and the last line; and the last logged loss."""
    lines = [x for x in lines if "elapsed_s" in x and "tokens" in x and "loss" in x]
    if not lines:
        return None, None
    loss = lines[-1]["loss"]
    if len(lines) <= warmup:
        a, b = {"tokens": 0, "elapsed_s": 0.0}, lines[-1]
    else:
        a, b = lines[warmup - 1] if warmup > 0 else {"tokens": 0, "elapsed_s": 0.0}, lines[-1]
    dt = b["elapsed_s"] - a["elapsed_s"]
    return ((b["tokens"] - a["tokens"]) / dt if dt > 0 else None), loss


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", required=True, help=".gpu/inputs (from `run.sh prepare`)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu"))
    ap.add_argument("--work", default=None, help="scratch folder for the models (default: a temporary folder)")
    ap.add_argument("--model", choices=["7b", "13b"], default="7b")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny recipe on the CPU, small micro-batches: the script's own test")
    ap.add_argument("--micro", default=None, help="micro-batch sizes, comma-separated (default 1,4,16,64; smoke 1,2)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="logged steps left out of tokens/s (default 2; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no run that would end after this many seconds (default 450; 13B 510)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: from its name)")
    a = ap.parse_args(argv)

    import torch

    t0 = time.time()
    smoke = a.cpu_smoke
    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        print("no CUDA device: use --cpu-smoke for the CPU run of this script", file=sys.stderr)
        return 2
    key = "tiny" if smoke else a.model
    recipe_name = RECIPES[key]
    recipe = str(ROOT / "recipes" / f"{recipe_name}.yaml")  # a path: the installed package carries no recipes/
    micro = [int(x) for x in (a.micro or ("1,2" if smoke else ("1" if key == "13b" else "1,4,16,64"))).split(",")]
    steps = a.steps or (3 if smoke else 6)
    warmup = a.warmup if a.warmup is not None else (1 if smoke else 2)
    precision = "fp32" if smoke else "bf16"
    inputs = Path(a.inputs).resolve()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve() if a.work else Path(__import__("tempfile").mkdtemp(prefix="zhllama-gpu-"))
    work.mkdir(parents=True, exist_ok=True)

    env = environment(a.peak_tflops)
    env.update(recipe=recipe_name, micro_batches=micro, steps=steps, warmup=warmup, precision=precision,
               smoke=smoke, work=str(work))
    log("environment: " + json.dumps(env))
    results = {"env": env, "packed_check": [], "runs": [], "date": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save():
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    # the packed kernels on this device, before anything large is loaded
    from sft.packing import kernels_available

    # FlexAttention compiles for tens of seconds: checked last, when time is left (it is not the default kernel
    # where flash_attn or torch's varlen_attn exist)
    kernels = [k for k in kernels_available("cuda" if cuda else "cpu") if k != "flex"]
    results["packed_check"] = packed_check(kernels, "cuda" if cuda else "cpu")
    save()

    sub_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1",
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    budget = a.budget_s or (510.0 if key == "13b" else 450.0)
    runner = Runner(work, out, sub_env, budget if not smoke else 1e9, t0)
    rows = results["runs"]
    failed = []

    def record(row):
        rows.append(row)
        save()
        if row["status"] == "failed":
            failed.append(row["stage"])

    # 1. init + resize
    r = runner.run("init", "init", ["-m", "pretrain", "init", "--recipe", recipe, "--tokenizer", inputs / "base" / "tokenizer.model",
                                    "--out", work / "base", "--dtype", "float32" if smoke else "bfloat16",
                                    "--device", "cpu" if smoke else "cuda"])
    record({"stage": "init", "micro_batch": None, **r})
    if r["status"] != "ok":
        return finish(results, out, work, failed, t0, smoke)
    r = runner.run("resize", "resize", ["-m", "pretrain", "resize", "--model", work / "base", "--tokenizer", inputs / "vocab",
                                        "--out", work / "resized", "--init", "subword-mean"])
    record({"stage": "resize", "micro_batch": None, **r})
    shutil.rmtree(work / "base", ignore_errors=True)  # disk: a 13B base is 26 GB
    if r["status"] != "ok":
        return finish(results, out, work, failed, t0, smoke)
    config = json.loads((work / "resized" / "config.json").read_text())
    results["env"]["vocab_size"] = config["vocab_size"]
    stats = sft_data_stats(inputs / "alpaca.json", work / "resized", recipe)
    results["sft_data"] = stats
    block = {"tiny": 128}.get(key, 512)

    def phase2(m):
        name = f"phase2-m{m}"
        r = runner.run(name, "phase2", ["-m", "pretrain", "phase2", "--recipe", recipe, "--model", work / "resized",
                                        "--corpus", inputs / "corpus", "--out", work / name, "--cache-dir", work / "data_cache",
                                        "--per-device-batch-size", m, "--batch-size", m, "--max-steps", steps,
                                        "--logging-steps", 1, "--save-steps", 100000, "--eval-ratio", 0,
                                        "--warmup-ratio", 0, "--precision", precision, "--no-resume"])
        rate, loss = steady_rate(read_metrics(work / name / "metrics.jsonl"), warmup)
        fpt = model_flops(config, (block + 1) / 2, 1.0)
        keep(work / name, name)
        return {"stage": "pretrain phase2", "micro_batch": m, "tokens_per_micro_batch": m * block, **r,
                "tokens_per_s": rate, "loss": loss, "flops_per_token": fpt}

    def sft(m, chunk=None):
        name = f"sft-m{m}" + ("" if chunk is None else f"-chunk{chunk}")
        sets = {"per_device_batch_size": m, "global_batch_size": m, "precision": precision, "eval_ratio": 0,
                "logging_steps": 1, "save_steps": 100000, "warmup_ratio": 0, "lr_scheduler": "constant"}
        if chunk is not None:
            sets["loss_chunk_tokens"] = chunk
        r = runner.run(name, "sft", ["-m", "sft", "train", "--recipe", recipe, "--model", work / "resized",
                                     "--data", inputs / "alpaca.json", "--out", work / name, "--max-steps", steps,
                                     "--no-resume", *[x for k, v in sets.items() for x in ("--set", f"sft.{k}={v}")]])
        rate, loss = steady_rate(read_metrics(work / name / "metrics.jsonl"), warmup)
        res = json.loads((work / name / "result.json").read_text()) if (work / name / "result.json").is_file() else {}
        keep(work / name, name)
        return {"stage": "sft train" + (" (unchunked loss)" if chunk == 0 else ""), "micro_batch": m, **r,
                "tokens_per_s": rate, "loss": loss, "packed_kernel": res.get("packed_attention"),
                "loss_chunk_tokens": res.get("loss_chunk_tokens"),
                "flops_per_token": model_flops(config, stats["context"], stats["trained_frac"])}

    def peer(m):
        name = f"hf-peft-m{m}"
        argv = [PEER, "--model", work / "resized", "--data", inputs / "alpaca.json", "--out", work / name,
                "--steps", steps, "--batch", m, "--max-length", stats["max_length"], "--lr", stats["learning_rate"],
                "--template", stats["template"], "--modules-to-save", "embed_tokens,lm_head", "--logging-steps", 1]
        if not smoke:
            argv += ["--bf16", "--gradient-checkpointing"]
        r = runner.run(name, "peer", argv)
        res = json.loads((work / name / "bench_result.json").read_text()) if (work / name / "bench_result.json").is_file() else {}
        rate, loss = steady_rate(res.get("step_log", []), warmup)
        keep(work / name, name)
        return {"stage": "plain HF Trainer + PEFT (sft)", "micro_batch": m, **r, "tokens_per_s": rate, "loss": loss,
                "flops_per_token": model_flops(config, stats["context"], stats["trained_frac"])}

    def keep(folder: Path, name: str):
        for f in ("metrics.jsonl", "result.json", "train_result.json", "bench_result.json"):
            if (folder / f).is_file():
                shutil.copyfile(folder / f, runner.logs / f"{name}.{f}")
        shutil.rmtree(folder, ignore_errors=True)  # disk: every adapter holds a full embedding and head

    # 2. the plan, in order of what matters most if time runs short: micro-batch 1 of each stage (the 24 GB
    # question), the SFT comparison at each size, then the largest sizes; a stage stops growing at its first OOM
    # the unchunked-loss SFT run comes right after the second size (so it happens even when time runs short),
    # at the largest SFT micro-batch that has run by then
    plan = []
    for i, m in enumerate(micro):
        plan += [("phase2", m), ("sft", m), ("peer", m)]
        if i == min(1, len(micro) - 1):
            plan.append(("sft-unchunked", None))
    if key == "13b":
        plan = [("phase2", m) for m in micro]
    stopped: set[str] = set()
    best_sft = None
    defaults = {"phase2": 60.0, "sft": 60.0, "peer": 60.0}
    for kind, m in plan:
        if kind == "sft-unchunked":
            # 3. the chunked loss against the unchunked one
            if best_sft is None:
                continue
            if runner.fits("sft", defaults["sft"]):
                record(sft(best_sft, chunk=0))
            else:
                record({"stage": "sft train (unchunked loss)", "micro_batch": best_sft, "status": "skipped (time)"})
            continue
        if kind in stopped:
            continue
        if not runner.fits(kind, defaults[kind]):
            record({"stage": kind, "micro_batch": m, "status": "skipped (time)"})
            continue
        row = {"phase2": phase2, "sft": sft, "peer": peer}[kind](m)
        record(row)
        if row["status"] != "ok":
            stopped.add(kind)
        elif kind == "sft":
            best_sft = m
    # 4. the engine path: SFT at micro-batch 1 under FSDP2 and DeepSpeed ZeRO-3 (1 process), launched with the
    # shipped engine configs as a user launches them; on the CPU smoke run tests/test_engines.py covers them
    if cuda:
        import importlib.util

        for engine in ("fsdp", "deepspeed_zero3"):
            if engine.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
                record({"stage": f"sft train ({engine})", "micro_batch": 1, "status": "skipped (no deepspeed)"})
                continue
            if not runner.fits("sft", defaults["sft"]):
                record({"stage": f"sft train ({engine})", "micro_batch": 1, "status": "skipped (time)"})
                continue
            name = f"sft-{engine}"
            sets = {"per_device_batch_size": 1, "global_batch_size": 1, "precision": precision, "eval_ratio": 0,
                    "logging_steps": 1, "save_steps": 100000, "warmup_ratio": 0}
            r = runner.run(name, "sft", ["-m", "accelerate.commands.launch", "--config_file",
                                         ROOT / "recipes" / "accelerate" / f"{engine}.yaml", "--num_processes", 1,
                                         "-m", "sft", "train", "--recipe", recipe, "--model", work / "resized",
                                         "--data", inputs / "alpaca.json", "--out", work / name, "--max-steps", steps,
                                         "--no-resume", *[x for k, v in sets.items() for x in ("--set", f"sft.{k}={v}")]])
            res = json.loads((work / name / "result.json").read_text()) if (work / name / "result.json").is_file() else {}
            rate, loss = steady_rate(read_metrics(work / name / "metrics.jsonl"), warmup)
            keep(work / name, name)
            record({"stage": f"sft train ({engine})", "micro_batch": 1, **r, "tokens_per_s": rate, "loss": loss,
                    "engine": res.get("engine")})
    # 5. FlexAttention (the CUDA fallback without a varlen kernel) on this GPU, if time is left
    if cuda and "flex" in kernels_available("cuda"):
        if runner.left() > 90:
            results["packed_check"] += packed_check(["flex"], "cuda")
        else:
            results["packed_check"].append({"kernel": "flex", "ok": True, "skipped": "time"})
        save()
    return finish(results, out, work, failed, t0, smoke)


def finish(results, out: Path, work: Path, failed, t0, smoke) -> int:
    env = results["env"]
    peak = env.get("peak_tflops")
    table = []
    for r in results["runs"]:
        gib = r.get("peak_gpu_bytes")
        mem = (f"{gib / 2**30:.2f}" if gib else (f"{r['peak_rss_bytes'] / 2**30:.2f} (RSS)" if r.get("peak_rss_bytes") else ""))
        tps = r.get("tokens_per_s")
        mfu = (f"{100 * tps * r['flops_per_token'] / (peak * 1e12):.1f}%" if tps and peak and r.get("flops_per_token") else "")
        table.append({"stage": r["stage"], "micro-batch": r.get("micro_batch") or "", "status": r["status"],
                      "peak GiB": mem, "tokens/s": f"{tps:,.0f}" if tps else "", "MFU": mfu,
                      "loss": f"{r['loss']:.4f}" if isinstance(r.get("loss"), (int, float)) else "",
                      "s": r.get("wall_s", "")})
    # zhllama SFT vs plain HF + PEFT at each micro-batch both ran
    by = {(r["stage"], r.get("micro_batch")): r for r in results["runs"] if r.get("tokens_per_s")}
    ratios = {}
    for (stage, m), r in by.items():
        p = by.get(("plain HF Trainer + PEFT (sft)", m))
        if stage == "sft train" and p:
            ratios[m] = round(r["tokens_per_s"] / p["tokens_per_s"], 3)
    results["sft_vs_plain_hf"] = ratios
    results["total_s"] = round(time.time() - t0, 1)
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md = ["| stage | micro-batch | status | peak GiB | tokens/s | MFU | loss | s |", "|---|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(str(row[k]) for k in row) + " |" for row in table]
    lines = [f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}; "
             f"recipe {env['recipe']}, {env['precision']}; packed kernel {env['packed_kernel']}; "
             f"peak memory = torch.cuda.max_memory_allocated (RSS on CPU); "
             f"MFU = (4 x block params + 12 L d c + 6 d V x trained fraction) x tokens/s / {peak or 'n/a'} TFLOP/s"]
    for c in results["packed_check"]:
        if "error" in c or "skipped" in c:
            lines.append(f"packed kernel {c['kernel']}: {c.get('error') or 'skipped (time)'}")
            continue
        lines.append(f"packed kernel {c['kernel']}: rel. loss diff {c['rel_loss_diff']:.1e}, max rel. grad diff "
                     f"{c['max_rel_grad_diff']:.1e} vs the padded batch, host syncs in forward+backward "
                     f"{c['host_syncs']}, ok {c['ok']}")
    if ratios:
        lines.append("zhllama SFT tokens/s / plain HF + PEFT: " + ", ".join(f"micro-batch {m}: {v:.2f}x" for m, v in sorted(ratios.items())))
    lines.append(f"total {results['total_s']:.0f} s; JSON and logs in {out}")
    text = "\n".join(lines + [""] + md) + "\n"
    (out / "table.md").write_text(text, encoding="utf-8")
    logs = out / "logs"
    if logs.is_dir():  # the device returns at most 8 files, 2 folders deep: the logs travel as one archive
        with tarfile.open(out / "logs.tar.gz", "w:gz") as tf:
            tf.add(logs, arcname="logs")
        if not smoke:
            shutil.rmtree(logs)
    shutil.rmtree(work, ignore_errors=True)
    print("\n" + text, flush=True)
    bad_checks = [c["kernel"] for c in results["packed_check"] if not c.get("ok")]
    if failed or bad_checks:
        print(f"FAILED: runs {failed}, packed kernels {bad_checks}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
