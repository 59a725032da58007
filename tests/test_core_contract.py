"""The shared layer's promises: typed recipe checked before weights load (every problem at once), recipe/model
agreement, one --set syntax, and the run-folder contract (lock, stale lock, decision function, atomic publish)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ZHLLAMA_TRACEBACK", None)
    return env


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *map(str, args)], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _config_folder(path, **shape):
    """A model folder with config.json only: what every check before weights load needs, and nothing more."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=shape.pop("vocab_size", 49953), **shape).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama7b_config(tmp_path_factory):
    return _config_folder(tmp_path_factory.mktemp("m") / "llama-7b-shaped", hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("d") / "d.json"
    p.write_text(json.dumps([{"instruction": "说", "input": "", "output": "好"}]), encoding="utf-8")
    return p


def test_every_bad_value_reported_at_once_before_weights_load(llama7b_config, data_file, tmp_path):
    r = _run("sft", "train", "--model", llama7b_config, "--data", data_file, "--out", tmp_path / "o",
             "--set", "sft.lora_dropout=1.5", "--set", "sft.learning_rate=-1", "--set", "sft.lora_targets=[qproj]")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [
        "error: sft.learning_rate: -1.0 must be greater than 0",
        "error: sft.lora_dropout: 1.5 must be less than 1",
        f"error: sft.lora_targets: 'qproj' is not a module of {llama7b_config} (it has down_proj, embed_tokens, "
        "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)",
    ]
    assert not any((tmp_path / "o").iterdir())  # locked first (so a second run fails at once), nothing written


def test_checks_before_weights_load_never_import_torch(llama7b_config, data_file, tmp_path):
    """The checks take a fraction of a second because neither the CLI modules nor the checks import torch or
    transformers (their import alone takes ~5 s on a small machine)."""
    code = f"""
import sys
import {', '.join(ENTRY_MODULES)}
from sft.cli import main
rc = main(["train", "--model", {str(llama7b_config)!r}, "--data", {str(data_file)!r}, "--out", {str(tmp_path / 'o')!r},
           "--set", "sft.lora_dropout=1.5", "--set", "sft.lora_targets=[qproj]"])
print(rc, sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[0] == "2 []", r.stdout + r.stderr
    assert "error: sft.lora_targets: 'qproj' is not a module" in r.stderr


ENTRY_MODULES = ("sft.cli", "pretrain.cli", "evaluation.cli", "deploy.cli", "corpora.cli")


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_known_module_names_equal_the_meta_built_ones(tmp_path, model_type):
    from transformers import AutoConfig

    from zhllama.cli import KNOWN_MODULES, built_module_names, module_names

    AutoConfig.for_model(model_type, vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(tmp_path))
    assert module_names(tmp_path) == set(KNOWN_MODULES[model_type]) == built_module_names(tmp_path)


def test_unknown_model_types_are_built_on_the_meta_device(tmp_path):
    from transformers import GPT2Config

    from zhllama.cli import module_names

    GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=300).save_pretrained(str(tmp_path))
    names = module_names(tmp_path)
    assert {"c_attn", "c_proj", "wte", "lm_head"} <= names and "q_proj" not in names


def test_training_without_recipe_picks_the_matching_one_or_refuses(llama7b_config, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("你好\n", encoding="utf-8")
    r = _run("pretrain", "phase1", "--model", llama7b_config, "--corpus", corpus, "--out", tmp_path / "p")
    # llama-7b is chosen; the run then stops at the first missing input (no tokenizer in a config-only folder)
    assert f"recipe: llama-7b (its model: section matches {llama7b_config}/config.json)" in r.stderr
    assert r.returncode == 2 and "not a tokenizer folder" in r.stderr and "Traceback" not in r.stderr
    r = _run("pretrain", "phase1", "--recipe", "tiny", "--model", llama7b_config, "--corpus", corpus, "--out", tmp_path / "p")
    assert r.returncode == 2 and "is not the shape recipe tiny is for: hidden_size 4096 (model) vs 64 (recipe)" in r.stderr
    assert "--recipe llama-7b matches it" in r.stderr and "model.check=false" in r.stderr
    odd = _config_folder(tmp_path / "odd", hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4)
    r = _run("pretrain", "phase2", "--model", odd, "--corpus", corpus, "--out", tmp_path / "p")
    assert r.returncode == 2 and "no recipe matches its shape; pass --recipe NAME|PATH" in r.stderr
    assert all(name in r.stderr for name in ("llama-13b (hidden_size 5120", "llama-7b (hidden_size 4096", "tiny (hidden_size 64"))
    # the explicit switch: the user means it, so the check passes and the run goes on to its next check
    r = _run("pretrain", "phase1", "--recipe", "tiny", "--set", "model.check=false", "--model", llama7b_config,
             "--corpus", corpus, "--out", tmp_path / "p")
    assert r.returncode == 2 and "not a tokenizer folder" in r.stderr and "is not the shape" not in r.stderr


def test_one_set_syntax_with_typed_values():
    from zhllama.cli import resolve_recipe
    from zhllama.errors import UserError
    from pretrain.cli import parser

    a = parser().parse_args(["plan", "--recipe", "llama-7b", "--set", "sft.lora_targets=[q_proj, v_proj]",
                             "--set", "pretrain.phase2.lora_r=16", "--set", "vocab.pad=true", "--set", "model.check=off"])
    r = resolve_recipe(a)
    assert r.sft.lora_targets == ["q_proj", "v_proj"] and r.pretrain.phase2.lora_r == 16 and r.vocab.pad is True
    assert r.model.check is False and r.pretrain.phase1.lora_r == 8
    a = parser().parse_args(["plan", "--recipe", "tiny", "--set", "learning_rate=1", "--set", "sft.lora_r=two",
                             "--set", "pretrain.phase9.max_steps=1", "--set", "sft.precision=fp8"])
    with pytest.raises(UserError) as e:
        resolve_recipe(a)
    assert str(e.value).splitlines() == [
        "--set learning_rate: name the section (model, vocab, pretrain, sft, corpora) and the field, e.g. --set sft.learning_rate=...",
        "--set.sft.lora_r: 'two' is not a whole number",
        "--set.pretrain: unknown setting 'phase9'; known: block_size, precision, gradient_checkpointing, zero_stage, "
        "init, eval_ratio, max_eval_blocks, seed, streaming, shuffle_buffer, num_proc, num_gpus, phase1, phase2",
        "sft.precision: 'fp8' is not one of fp32, fp16, bf16",
    ]


def test_flags_are_generated_from_the_recipe_fields():
    from sft.cli import _parser
    from zhllama.recipe import SFTConfig, field_doc

    help_text = " ".join(_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for name in ("learning_rate", "lora_dropout", "max_steps", "packing", "overlong"):
        assert f"--{name.replace('_', '-')}" in help_text
        assert " ".join(field_doc(SFTConfig, name).split()) in help_text
    assert "--batch-size" in help_text and "[sft.global_batch_size]" in help_text


def test_second_run_into_a_busy_folder_fails_at_once_and_stale_lock_is_taken_over(tmp_path):
    from zhllama import runfolder
    from zhllama.errors import UserError

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from zhllama import runfolder\n"
        f"with runfolder.lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n")],
        env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(UserError, match=f"{out} is in use by process {holder.pid} "):
            with runfolder.lock(out):
                pass
        assert time.time() - t0 < 1
        # the stage commands take the lock before any check or import of the training stack (inputs that do not
        # exist: only the refusal of an --out inside an input comes before the lock, as it writes nothing)
        r = _run("sft", "train", "--model", tmp_path / "no_model", "--data", tmp_path / "no_data", "--out", out)
        assert r.returncode == 2 and f"{out} is in use by process {holder.pid} " in r.stderr
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file behind: the next run takes it over and says so
    assert (out / runfolder.LOCK).read_text() == str(holder.pid)
    said = []
    with runfolder.lock(out, log=said.append):
        assert (out / runfolder.LOCK).read_text() == str(os.getpid())
    assert said == [f"{out}: taking over the lock of process {holder.pid} (no longer running)"]
    assert not (out / runfolder.LOCK).exists()


def test_decision_function(tmp_path):
    from zhllama import runfolder
    from zhllama.errors import UserError

    out = tmp_path / "r"
    fp = {"data": "abc", "lr": 1}
    assert runfolder.decide(out, fp) == "start-over"  # nothing there
    runfolder.begin(out, {"stage": "t"}, fp)
    (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-2" / "zhllama_complete").write_text("{}")
    assert runfolder.decide(out, fp) == "resume"
    with pytest.raises(UserError, match="different lr"):
        runfolder.decide(out, {**fp, "lr": 2})
    assert runfolder.decide(out, {**fp, "lr": 2}, "auto", log=lambda *_: None) == "start-over"
    assert runfolder.decide(out, fp, False) == "start-over"
    stage = runfolder.staging(out)
    (stage / "weights.bin").write_bytes(b"w")
    assert not (out / "weights.bin").exists()  # nothing final until it is published
    runfolder.finish(out, "t", {"loss": 1.0}, {"x": runfolder.input_entry(stage / "weights.bin")}, [], seed=3,
                     fingerprint=fp)
    assert (out / "weights.bin").read_bytes() == b"w" and not (out / ".partial").exists()
    assert runfolder.decide(out, fp, artefacts=("weights.bin",)) == "up-to-date"
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "t" and man["seed"] == 3 and man["parents"] == [] and "torch" in man["versions"]
    assert runfolder.read_result(out)["loss"] == 1.0
    runfolder.begin(out, {"stage": "t"}, {**fp, "lr": 5})  # a new run no longer claims the old result
    assert runfolder.read_result(out) is None
