"""Every shipped engine config trains, evaluates and saves correctly with 2 processes on CPU (gloo), and gives the
model 1 process gives for the same global batch: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (the shipped YAML, and a JSON
that partitions every parameter), for pretraining phase 1, phase 2 and SFT; plus resume after kill -9 of one
rank, a 2-"node" launch, and the engine config that contradicts the recipe.

DeepSpeed runs are the integration tier (`make setup-integration` installs it for CPU)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, make_english_lines
from test_pretrain_core import _env, setup  # noqa: F401  (session fixture: tiny model + extended tokenizer)

ACC = ROOT / "recipes" / "accelerate"
SFT_SECTION = """
sft: {max_length: 320, learning_rate: 3.0e-3, global_batch_size: 8, per_device_batch_size: 4, max_steps: 6,
      precision: fp32, gradient_checkpointing: false, eval_ratio: 0.0, logging_steps: 1, eval_steps: 100,
      save_steps: 100, warmup_ratio: 0.0, lora_dropout: 0.1}
"""
# ZeRO-3 that partitions every parameter: the default persistence threshold keeps a tiny model's tensors whole
FULL_ZERO3 = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "train_batch_size": "auto",
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_gather_16bit_weights_on_model_save": True},
              "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
_PORT = [29700]


def _port():
    _PORT[0] += 1
    return str(_PORT[0])


@pytest.fixture(scope="module")
def eng(setup, tmp_path_factory):  # noqa: F811
    """The pretrain setup plus an SFT section, SFT data, and the fully partitioning ZeRO-3 engine config."""
    import random

    d = tmp_path_factory.mktemp("engines")
    recipe = d / "engines.yaml"
    recipe.write_text(Path(setup["recipe"]).read_text() + SFT_SECTION)
    rng = random.Random(0)
    words = [ln.split()[0] for ln in make_english_lines(200, 5)[:120]]
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"} for w in words]
    rows += [{"instruction": "Count", "input": str(n), "output": " ".join(str(k) for k in range(n, n + rng.randint(1, 9)))}
             for n in range(60)]
    rng.shuffle(rows)
    (d / "train.json").write_text(json.dumps(rows[:150]))
    (d / "eval.json").write_text(json.dumps(rows[150:]))
    (d / "zero3_full.json").write_text(json.dumps(FULL_ZERO3))
    (d / "zero3_full.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {d / 'zero3_full.json'}\n  zero3_init_flag: false\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nmain_training_function: main\n"
        "rdzv_backend: static\nsame_network: true\nuse_cpu: false\n")
    return {**setup, "recipe": recipe, "d": d}


def _stage_args(eng, stage, out):
    r = eng["recipe"]
    if stage == "sft":
        return ["-m", "sft", "train", "--recipe", r, "--model", eng["resized"], "--data", eng["d"] / "train.json",
                "--eval-data", eng["d"] / "eval.json", "--out", out]
    return ["-m", "pretrain", stage, "--recipe", r, "--model", eng["resized"], "--corpus", eng["corpus"],
            "--out", out, "--cache-dir", eng["dir"] / "cache", "--save-steps", "100", "--lora-dropout", "0.1"] \
        if stage == "phase2" else \
        ["-m", "pretrain", stage, "--recipe", r, "--model", eng["resized"], "--corpus", eng["corpus"], "--out", out,
         "--cache-dir", eng["dir"] / "cache", "--save-steps", "100"]


def _config(eng, engine):
    return eng["d"] / "zero3_full.yaml" if engine == "zero3_full" else ACC / f"{engine}.yaml"


def _launch(eng, engine, stage, out, *extra, procs=2, timeout=400):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(eng, engine)),
           "--num_processes", str(procs), "--main_process_port", _port()]
    return [str(x) for x in cmd + _stage_args(eng, stage, out) + list(extra)]


def _run(cmd, timeout=400):
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, f"no weights in {out}"
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


@pytest.fixture(scope="module")
def single(eng):
    """1 process, the same global batch (micro-batch 4 x accumulation 2), for each stage."""
    out = {}
    for stage in ("phase1", "phase2", "sft"):
        o = eng["d"] / f"one-{stage}"
        _run([sys.executable] + [str(x) for x in _stage_args(eng, stage, o)])
        out[stage] = o
    return out


def _same_model(one: Path, two: Path):
    r1, r2 = (json.loads((p / "result.json").read_text()) for p in (one, two))
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    for key in ("eval_loss_before", "eval_loss_after"):
        assert math.isfinite(r2[key]) and math.isfinite(r1[key])
        assert abs(r2[key] - r1[key]) <= 0.01 * abs(r1[key]), (key, r1[key], r2[key])
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].numel() > 0 and b[k].shape == a[k].shape, k
        # float reordering only: measured max |diff| ~1e-7 on these runs
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), (k, float((a[k] - b[k]).abs().max()))
    return r1, r2


DS = pytest.mark.integration("deepspeed")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", pytest.param("deepspeed_zero2", marks=DS),
                                    pytest.param("deepspeed_zero3", marks=DS), pytest.param("zero3_full", marks=DS)])
@pytest.mark.parametrize("stage", ["phase1", "phase2", "sft"])
def test_two_processes_train_the_single_process_model(eng, single, engine, stage, tmp_path):
    out = tmp_path / "two"  # does not exist yet: the ranks create it together
    _run(_launch(eng, engine, stage, out))
    r1, r2 = _same_model(single[stage], out)
    kind = engine if engine in ("ddp", "fsdp") else "deepspeed"
    # the engine that trained is the one launched (accelerate alone would run FSDP on CPU as DDP)
    assert r2["engine"]["kind"] == kind and r2["engine"]["applied"] == {"ddp": "MULTI_CPU"}.get(kind, kind.upper())
    if kind == "deepspeed":
        assert r2["engine"]["zero_stage"] == (2 if engine.endswith("2") else 3)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["phase1", "phase2"])
def test_fsdp_with_tied_embeddings_trains_the_single_process_model(eng, stage, tmp_path):
    """Tied embedding and head (the tiny default's shape): phase 1 trains the tied matrix, phase 2 adds
    modules_to_save copies beside the tied frozen originals (a KeyError / shared-parameter error before)."""
    from pretrain.cli import main
    from pretrain.phases import init_model
    from zhllama.recipe import load_recipe

    recipe = tmp_path / "tied.yaml"
    recipe.write_text(Path(eng["recipe"]).read_text().replace("tie_word_embeddings: false", "tie_word_embeddings: true"))
    init_model(load_recipe(recipe), Path(eng["base"]) / "tokenizer.model", tmp_path / "tbase", seed=3)
    assert main(["resize", "--model", str(tmp_path / "tbase"), "--tokenizer", str(eng["tok"]),
                 "--out", str(tmp_path / "tresized")]) == 0
    tied = {**eng, "recipe": recipe, "resized": tmp_path / "tresized"}
    _run([sys.executable] + [str(x) for x in _stage_args(tied, stage, tmp_path / "one")])
    _run(_launch(tied, "fsdp", stage, tmp_path / "two"))
    _same_model(tmp_path / "one", tmp_path / "two")


def _kill_one_rank_then_rerun(cmd, run: Path, tmp_path: Path):
    full = run.parent / "full"
    _run(cmd)
    shutil.move(str(run), str(full))
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    marker = run / "checkpoints" / "checkpoint-4" / "zhllama_complete"
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert kids, "no rank processes found under the launcher"
    os.kill(int(kids[-1]), signal.SIGKILL)  # one rank dies; the launcher stops the others
    try:
        proc.wait(timeout=120)
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert not (run / "adapter_model.safetensors").exists()
    _run(cmd)
    res = json.loads((run / "result.json").read_text())
    assert res["resumed_from"] and res["global_step"] == 8
    a, b = _weights(full), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("engine", [pytest.param("deepspeed_zero2", marks=DS), "fsdp"])
def test_kill9_of_one_rank_then_rerun_equals_uninterrupted(eng, engine, tmp_path):
    run = tmp_path / "run"
    cmd = _launch(eng, engine, "phase2", run, "--max-steps", "8", "--save-steps", "2")
    _kill_one_rank_then_rerun(cmd, run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", pytest.param("deepspeed_zero2", marks=DS)])
def test_two_node_launch_trains_the_single_process_adapter(eng, single, engine, tmp_path):
    """2 machine ranks of 1 process each, rendezvous on 127.0.0.1, as two nodes are started (the README's command)."""
    out, port = tmp_path / "two-node", _port()
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config(eng, engine)),
               "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--num_processes", "2"] + \
            (["--deepspeed_multinode_launcher", "standard"] if engine.startswith("deepspeed") else []) + \
            [str(x) for x in _stage_args(eng, "sft", out)]
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    _same_model(single["sft"], out)


@pytest.mark.slow
def test_twenty_two_process_launches_into_new_output_folders_all_succeed(eng, tmp_path):
    """One rank used to check the new --out while the other created it: 1 of 2 launches failed."""
    for i in range(20):
        out = tmp_path / f"new{i}" / "run"
        _run(_launch(eng, "ddp", "phase1", out, "--max-steps", "1", "--no-resume"))
        assert json.loads((out / "result.json").read_text())["world_size"] == 2


def test_new_output_folder_checked_by_many_processes_at_once(tmp_path):
    """The ranks of a launch check a new --out at the same moment (it failed in 1 of 2 launches before)."""
    code = ("import sys; from pathlib import Path; from zhllama.runfolder import ensure_writable\n"
            "[ensure_writable(Path(sys.argv[1]) / f'o{i}' / 'x') for i in range(300)]")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=_env(), cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert len(list(tmp_path.glob("o*/x"))) == 300 and not list(tmp_path.glob("o*/x/.write_test*"))


@pytest.mark.parametrize("env, expect", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "ACCELERATE_MIXED_PRECISION": "bf16"},
     "mixed_precision bf16 contradicts the recipe's sft.precision fp32"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "gradient_accumulation_steps 4 contradicts the recipe's 2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"}, "ZeRO-3 without gathering the weights on save"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
     "fsdp_cpu_ram_efficient_loading: true has no use here"),
])
def test_engine_config_contradicting_the_recipe_is_one_line_before_weights_load(eng, env, expect, tmp_path):
    # a model folder whose weights cannot load: the engine check must come first
    bad = tmp_path / "model"
    shutil.copytree(eng["resized"], bad)
    for f in bad.glob("*.safetensors"):
        f.write_bytes(b"not weights")
    cmd = [sys.executable, "-m", "sft", "train", "--recipe", str(eng["recipe"]), "--model", str(bad),
           "--data", str(eng["d"] / "train.json"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, env={**_env(), **env}, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and expect in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_shipped_engine_configs_leave_precision_and_batch_to_the_recipe():
    import yaml

    for path in sorted(ACC.glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        assert "mixed_precision" not in cfg, path
        ds = cfg.get("deepspeed_config") or {}
        for key in ("gradient_accumulation_steps", "gradient_clipping"):
            assert ds.get(key, "auto") == "auto", (path, key)


def test_check_adapter_refuses_a_zero_size_tensor(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pretrain.phases import check_adapter
    from zhllama.errors import UserError

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=100, num_hidden_layers=1)
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {f"{pre}.lora_A.weight": torch.ones(8, 32), f"{pre}.lora_B.weight": torch.ones(32, 8),
            "base_model.model.lm_head.weight": torch.ones(100, 32)}
    save_file(good, str(tmp_path / "adapter_model.safetensors"))
    assert check_adapter(tmp_path, cfg)["lora_tensors"] == 2
    # what rank 0 alone writes over partitioned ZeRO-3 parameters
    save_file({**good, "base_model.model.lm_head.weight": torch.ones(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="empty"):
        check_adapter(tmp_path, cfg)
    save_file({**good, f"{pre}.lora_B.weight": torch.ones(16, 8)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(UserError, match=r"shape \[16, 8\]"):
        check_adapter(tmp_path, cfg)


def test_plan_memory_by_engine_follows_the_zero_formulas():
    """ZeRO paper, mixed precision: weights 2 bytes/param, gradients 2 and optimizer states K=12 per trainable
    param; ZeRO-2 shards gradients and states over N GPUs, ZeRO-3 (and FSDP full sharding) the weights too."""
    from pretrain.plan import GiB, _memory, plan
    from zhllama.recipe import load_recipe

    for name in ("llama-7b", "llama-13b"):
        rec = load_recipe(name)
        p = plan(rec, 49953, 8)
        ph = p["phases"][-1]
        n, total, t = 8, ph["total"], ph["trainable"]
        mem = {e: _memory(rec, rec.pretrain.phase2, total, t, n, 49953, e)["total_gib"] for e in ("ddp", "zero2", "zero3", "fsdp")}
        assert mem["ddp"] - mem["zero2"] == pytest.approx((2 + 12) * t * (1 - 1 / n) / GiB, rel=1e-9)
        assert mem["zero2"] - mem["zero3"] == pytest.approx(2 * total * (1 - 1 / n) / GiB, rel=1e-9)
        assert mem["fsdp"] == mem["zero3"]
        assert ph["memory_per_gpu_by_engine"]["zero3"] == round(mem["zero3"], 1)


def test_rerun_after_a_failure_past_the_final_checkpoint_trains_no_extra_step(eng, tmp_path):
    """A run that saved its last checkpoint and then failed (say, writing the model) is rerun: transformers,
    resumed from a checkpoint at max_steps, trains one step more (global_step 5 of 4 before)."""
    from safetensors.torch import load_file

    out = tmp_path / "p1"
    cmd = [sys.executable] + [str(x) for x in _stage_args(eng, "phase1", out)] + ["--save-steps", "2"]
    _run(cmd)
    first = load_file(str(out / "model.safetensors"))
    assert (out / "checkpoints" / "checkpoint-4" / "zhllama_complete").is_file()
    for name in ("result.json", "manifest.json", "model.safetensors", "config.json"):
        (out / name).unlink()
    _run(cmd)
    res = json.loads((out / "result.json").read_text())
    assert res["global_step"] == 4 and res["resumed_from"].endswith("checkpoint-2")
    again = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
