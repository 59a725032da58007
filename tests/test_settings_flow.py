"""One setting shape (issue 24): every field of the recipe's training sections reaches what trains with the recipe's
value. Each field is set, through the command line the stages run, to a value no default has; the test then reads
what the Trainer held (result.json's training_arguments, from its TrainingArguments), what PEFT saved
(adapter_config.json) and what the stage recorded. A second copy of defaults or a dropped field fails it: the
value read back would be the default. Two variants flip every boolean, so neither truth value can be a default
that happens to match."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from zhllama.recipe import PhaseConfig, PretrainConfig, SFTConfig

# Where each field of the training sections goes. "trainer": a TrainingArguments value (checked below);
# "lora": adapter_config.json; anything else names the stage code that reads it (not the Trainer's business).
PHASE_DEST = {
    "learning_rate": "trainer", "global_batch_size": "trainer", "per_device_batch_size": "trainer",
    "max_steps": "trainer", "lr_scheduler": "trainer", "warmup_ratio": "trainer", "weight_decay": "trainer",
    "max_grad_norm": "trainer", "save_steps": "trainer", "eval_steps": "trainer", "logging_steps": "trainer",
    "save_total_limit": "trainer",
    "lora_r": "lora", "lora_alpha": "lora", "lora_dropout": "lora", "lora_targets": "lora", "modules_to_save": "lora",
    "enabled": "which phases run (the pipeline)", "new_rows_only": "phase 1's trainable rows (run_phase1)",
}
PRETRAIN_DEST = {
    "precision": "trainer", "gradient_checkpointing": "trainer", "seed": "trainer",
    "block_size": "data", "eval_ratio": "data", "max_eval_blocks": "data", "streaming": "data",
    "shuffle_buffer": "data", "num_proc": "data", "init": "resize", "zero_stage": "plan", "num_gpus": "plan",
    "phase1": "section", "phase2": "section",
}
SFT_DEST = dict(
    {k: v for k, v in PHASE_DEST.items() if v in ("trainer", "lora")},
    precision="trainer", gradient_checkpointing="trainer", seed="trainer",
    template="sft_template.json", max_length="data", num_epochs="max_steps when > 0", eval_ratio="data",
    max_eval_examples="data", reference_tokenization="data", packing="collator", fast_lora_dropout="LoRA dropout",
    loss_chunk_tokens="packed loss", overlong="data",
)


def test_every_training_field_has_a_destination():
    """A field added to a training section must say where it goes (and, if the Trainer's, is checked below)."""
    for cls, dest in ((PhaseConfig, PHASE_DEST), (PretrainConfig, PRETRAIN_DEST), (SFTConfig, SFT_DEST)):
        assert {f.name for f in dataclasses.fields(cls)} == set(dest), cls.__name__


# Two variants of values no default or shipped recipe has; every boolean differs between them.
OPTIM = [
    dict(learning_rate=3.1e-3, global_batch_size=6, per_device_batch_size=3, max_steps=3, lr_scheduler="linear",
         warmup_ratio=0.34, weight_decay=0.07, max_grad_norm=0.7, save_steps=2, eval_steps=2, logging_steps=1,
         save_total_limit=5, lora_r=6, lora_alpha=12, lora_dropout=0.11, lora_targets=["q_proj", "v_proj"],
         modules_to_save=["lm_head"], seed=1234, gradient_checkpointing=True, precision="bf16"),
    dict(learning_rate=7.7e-4, global_batch_size=4, per_device_batch_size=1, max_steps=2, lr_scheduler="constant_with_warmup",
         warmup_ratio=0.67, weight_decay=0.13, max_grad_norm=2.5, save_steps=1, eval_steps=1, logging_steps=2,
         save_total_limit=4, lora_r=4, lora_alpha=20, lora_dropout=0.2, lora_targets=["k_proj", "o_proj"],
         modules_to_save=["embed_tokens"], seed=4321, gradient_checkpointing=False, precision="fp32"),
]


def _sets(section: str, values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        v = "[" + ",".join(v) + "]" if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v
        out += ["--set", f"{section}.{k}={v}"]
    return out


def _check_trainer(res: dict, v: dict, count_tokens: str, data_seed: int) -> None:
    """What the Trainer held against the recipe's values (on CPU fp16/bf16 run as fp32, by design)."""
    import torch

    got = res["training_arguments"]
    want = {
        "learning_rate": v["learning_rate"], "per_device_train_batch_size": v["per_device_batch_size"],
        "gradient_accumulation_steps": v["global_batch_size"] // v["per_device_batch_size"],
        "max_steps": v["max_steps"], "lr_scheduler_type": v["lr_scheduler"],
        "warmup_steps": math.ceil(v["warmup_ratio"] * v["max_steps"]), "weight_decay": v["weight_decay"],
        "max_grad_norm": v["max_grad_norm"], "seed": v["seed"], "data_seed": data_seed,
        "gradient_checkpointing": v["gradient_checkpointing"], "save_steps": v["save_steps"],
        "save_total_limit": v["save_total_limit"], "logging_steps": v["logging_steps"], "eval_steps": v["eval_steps"],
        "full_determinism": False, "include_num_input_tokens_seen": count_tokens, "deepspeed": None,
        "bf16": v["precision"] == "bf16" and torch.cuda.is_available(), "fp16": False,
    }
    assert {k: got[k] for k in want} == want
    assert res["settings"]["precision"] == v["precision"]  # the recipe's, handed to the trainer as is
    assert res["global_step"] == v["max_steps"]


def _check_lora(adapter_dir, v: dict) -> None:
    a = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert (a["r"], a["lora_alpha"], a["lora_dropout"]) == (v["lora_r"], v["lora_alpha"], v["lora_dropout"])
    assert sorted(a["target_modules"]) == sorted(v["lora_targets"])
    assert sorted(a["modules_to_save"]) == sorted(v["modules_to_save"])


PHASE_FIELDS = [k for k, d in PHASE_DEST.items() if d in ("trainer", "lora")]


@pytest.fixture(scope="module")
def pretrain_setup(tmp_path_factory, tiny_base):
    from pretrain.phases import init_model
    from zhllama.recipe import load_recipe

    d = tmp_path_factory.mktemp("flow")
    recipe = d / "r.yaml"
    recipe.write_text("name: flow\nmodel: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                      "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64, base_vocab_size: 600}\n"
                      "pretrain: {block_size: 32, eval_ratio: 0.02, max_eval_blocks: 4}\n")
    init_model(load_recipe(recipe), tiny_base, d / "base", seed=3)
    return d, recipe


@pytest.mark.parametrize("variant", [0, 1])
def test_every_pretrain_field_reaches_the_trainer(pretrain_setup, zh_corpus, tmp_path, variant, capsys):
    from pretrain.cli import main

    d, recipe = pretrain_setup
    v = OPTIM[variant]
    phase = {k: v[k] for k in PHASE_FIELDS}
    pre = {k: v[k] for k in ("precision", "gradient_checkpointing", "seed")}
    out = tmp_path / "p2"
    assert main([str(x) for x in ["phase2", "--recipe", recipe, "--model", d / "base", "--corpus", zh_corpus,
                                   "--out", out, "--cache-dir", d / "cache", *_sets("pretrain.phase2", phase),
                                   *_sets("pretrain", pre)]]) == 0
    res = json.loads((out / "result.json").read_text())
    _check_trainer(res, v, "all", v["seed"] + 1)  # phase 2 draws its blocks in its own order
    _check_lora(out, v)
    _check_log_lines(capsys.readouterr().out, v)


DURATION = r"(\d+h\d\dm|\d+m\d\ds|\d+s)"


def _check_log_lines(stdout: str, v: dict) -> None:
    """Training logs are formatted lines (step, loss, lr, tokens/s, ETA), one per logged step, never dicts."""
    import re

    n, every = v["max_steps"], v["logging_steps"]
    lines = [ln for ln in stdout.splitlines() if re.match(r"step +\d+/\d+  loss ", ln)]
    assert [int(re.match(r"step +(\d+)/", ln).group(1)) for ln in lines] == list(range(every, n + 1, every)), stdout
    for ln in lines:
        assert re.fullmatch(rf"step +\d+/{n}  loss \d+\.\d{{4}}  lr \d\.\d\de[-+]\d+  grad norm \S+  "
                            rf"[\d,]+ tokens/s  ETA {DURATION}", ln), ln
    assert re.search(rf"^trained {n} steps in {DURATION}: mean loss \d+\.\d{{4}}, [\d,]+ tokens/s$", stdout, re.M), stdout
    assert "{'" not in stdout and "'loss'" not in stdout


@pytest.mark.parametrize("variant", [0, 1])
def test_every_sft_field_reaches_the_trainer(tok_dir, english_lines, tmp_path, variant):
    from conftest import save_tiny_llama
    from sft.cli import main

    model = save_tiny_llama(tmp_path / "m", tok_dir)
    rows = [{"instruction": f"Repeat: {w}", "input": "", "output": w} for w in (ln.split()[0] for ln in english_lines[:40])]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: flow\nmodel: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
                      "num_attention_heads: 4, num_key_value_heads: 2, base_vocab_size: 600, check: false}\n")
    v = OPTIM[variant]
    sft = {k: v[k] for k in SFT_DEST if SFT_DEST[k] in ("trainer", "lora")}
    sft.update(template=["alpaca-lora", "stanford-alpaca"][variant], packing=[True, False][variant],
               fast_lora_dropout=[False, True][variant], loss_chunk_tokens=[96, 64][variant], eval_ratio=0.2,
               max_length=[160, 192][variant], reference_tokenization=[True, False][variant])
    out = tmp_path / "a"
    assert main([str(x) for x in ["train", "--recipe", recipe, "--model", model, "--data", tmp_path / "d.json",
                                   "--out", out, *_sets("sft", sft)]]) == 0
    res = json.loads((out / "result.json").read_text())
    _check_trainer(res, v, "non_padding", v["seed"])
    _check_lora(out, v)
    assert json.loads((out / "sft_template.json").read_text())["template"] == sft["template"]
    resolved = json.loads((out / "resolved_config.json").read_text())["sft"]
    assert {k: resolved[k] for k in sft} == sft
    if sft["packing"]:
        assert res["loss_chunk_tokens"] in (0, sft["loss_chunk_tokens"]) and "packed_attention" in res
    else:
        assert "packed_attention" not in res


def test_phase2_does_not_replay_phase1s_blocks(tmp_path):
    """The blocks each phase's Trainer draws, in order: phase 2 must not retrain phase 1's blocks step for step.
    With one order its training loss on the tiny default rose from 7.6 to 8.3: it moved from blocks phase 1 had
    fitted at a high learning rate to blocks phase 1 had barely trained on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    from zhllama.recipe import load_recipe
    from zhllama.trainer import TrainSettings, training_arguments

    pre = load_recipe("tiny").pretrain
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))

    class Index(torch.utils.data.Dataset):  # row i is its own index: the batches show the order
        def __len__(self):
            return 20_000

        def __getitem__(self, i):
            return {"i": i}

    def order(phase):
        args, _ = training_arguments(TrainSettings.for_pretrain(pre, phase), tmp_path / phase, has_eval=False)
        t = Trainer(model=model, args=args, train_dataset=Index(),
                    data_collator=lambda rows: {"i": torch.tensor([r["i"] for r in rows])})
        out = []
        for b in t.get_train_dataloader():
            out += b["i"].tolist()
            if len(out) >= 1200:  # the blocks of the tiny recipe's 150 phase-1 steps
                return out

    one, two = order("phase1"), order("phase2")
    assert sorted(one) != list(range(1200)) and len(set(one)) == 1200  # a shuffled draw, not the file order
    same_position = sum(a == b for a, b in zip(one, two))
    assert same_position < 10 and len(set(one) & set(two)) < 200  # random overlap: 1,200 of 20,000 -> ~72 shared
