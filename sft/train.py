"""LoRA instruction tuning on Alpaca records: everything is checked before the first step.

The output folder is the PEFT adapter (adapter_model.safetensors with full embed_tokens/lm_head,
the SFT tokenizer with [PAD], sft_template.json) and also a run folder (zhllama.runfolder): locked while
the run lasts, resolved_config.json, result.json and manifest.json, checkpoints/, tensorboard/,
metrics.jsonl, loss.png. The adapter and tokenizer are written to OUT/.partial/ and moved into place only
when training is complete. Training goes through zhllama.trainer.run_training, so seeding, resume from
the newest complete checkpoint and logging are the same as in pretraining.

Public API:
    train(model_dir, data, out, adapter=None, template=None, max_steps=None, recipe=None, overrides=None,
          eval_data=None, drop_invalid=False, resume=True, log=print) -> result dict
        recipe: a zhllama.recipe.Recipe, a recipe name / path, or None (the recipe matching the model's shape);
        overrides: {sft field: value}; resume: True | "auto" (start over when inputs changed) | False
    load_base(model_dir, adapter=None) -> (model, tokenizer source folder)
    split_records(records, ratio, cap) -> (train, held_out)

The base is the pretrain stage's model: either a merged folder (--model), or the resized base plus
the phase-2 adapter (--model with --adapter), which is merged in memory by peft before SFT, the way
Chinese-Alpaca-Plus was trained on top of Chinese-LLaMA-Plus. `sft merge` then applies the phase-2
and SFT adapters in that order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

from sft.config import to_dict
from zhllama.errors import UserError


class ListDataset:
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _is_eval(rec, ratio: float) -> bool:
    # content hash, not position: adding files or records never moves an example between splits
    h = hashlib.sha256(rec.key().encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < ratio


def split_records(records, ratio: float, cap: int):
    if ratio <= 0:
        return records, []
    train, held = [], []
    for r in records:
        (held if _is_eval(r, ratio) and len(held) < cap else train).append(r)
    return train, held


def load_base(model_dir, adapter=None, log=print, dtype=None):
    """The model SFT starts from, with its tokenizer source folder (dtype: default fp32)."""
    from zhllama.models import load_model_dir

    if adapter:
        from sft.merge import load_adapter
        from zhllama.models import load_adapter_chain

        ad = load_adapter(adapter)  # validates the adapter and its tokenizer before loading 7B weights
        # the pretrain adapter must have been trained on exactly --model's weights (and its own parents come along)
        log(f"loading {model_dir} + pretrain adapter {adapter} (merged in memory)")
        model, _ = load_adapter_chain(model_dir, [adapter], dtype=dtype, log=log, merge=True)
        tok_src = adapter if ad.tokenizer_len is not None else model_dir
        return model, Path(tok_src)
    return load_model_dir(model_dir, **({"dtype": dtype} if dtype is not None else {})), Path(model_dir)


ARTEFACTS = ("adapter_model.safetensors", "adapter_config.json")


def _config(recipe, model_dir, overrides, template, max_steps):
    from sft.config import sft_config
    from zhllama.cli import pick_recipe
    from zhllama.recipe import Recipe, load_recipe

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe) if recipe else pick_recipe(model_dir)
    ov = dict(overrides or {})
    if template:
        ov["template"] = template
    if max_steps is not None:
        ov["max_steps"] = max_steps
    return rec, sft_config(rec.sft, ov, f"{rec.source or rec.name} sft")


def _records(data, eval_data, cfg, drop_invalid, log):
    from sft.data import load_records

    records = load_records(data, drop_invalid=drop_invalid, log=log)
    if eval_data:
        train_recs, eval_recs = records, load_records(eval_data, drop_invalid=drop_invalid, log=log)
    else:
        train_recs, eval_recs = split_records(records, cfg.eval_ratio, cfg.max_eval_examples)
    if not train_recs:
        raise UserError("every record landed in the held-out split; lower eval_ratio")
    return train_recs, eval_recs


def _encode(tok, tmpl, cfg, train_recs, eval_recs, log):
    from sft.data import ExampleEncoder, encode_records

    enc = ExampleEncoder(tok, tmpl, cfg.max_length, reference=cfg.reference_tokenization)
    train_set = encode_records(train_recs, enc, cfg.overlong, log=log)
    eval_set = encode_records(eval_recs, enc, "truncate", log=lambda *_: None) if eval_recs else None
    log(f"data: {len(train_set.examples)} training examples ({train_set.n_trained:,} of {train_set.n_tokens:,} "
        f"tokens trained), {len(eval_set.examples) if eval_set else 0} held out; template {tmpl.name}; "
        f"{'reference' if cfg.reference_tokenization else 'serving-consistent'} tokenization")
    return train_set, eval_set


def lora_config(cfg, model=None):
    """The SFT LoRA, every value from the recipe's sft section; given the model, a tied embedding/LM head stays
    tied (zhllama.models.lora_tying)."""
    from peft import LoraConfig

    from zhllama.models import lora_tying

    tying = lora_tying(model, cfg.lora_targets, cfg.modules_to_save) if model is not None else {}
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), modules_to_save=list(cfg.modules_to_save) or None,
                      task_type="CAUSAL_LM", **tying)


def _peft_model(model_dir, adapter, tok, pad_added, tok_src, cfg, log):
    """Base (+ pretrain adapter merged), grown by the [PAD] row if needed, with the SFT LoRA attached."""
    from peft import get_peft_model
    from transformers import set_seed

    from sft.vocabcheck import check_vocab
    from zhllama.models import lora_tying, resize_model
    from zhllama.precision import base_dtype, upcast_trainable

    # on a GPU at fp16/bf16 the frozen base is loaded in half precision, what trains is upcast to fp32
    model, _ = load_base(model_dir, adapter, log=log, dtype=base_dtype(cfg.precision))
    rows = model.get_input_embeddings().weight.shape[0]
    check_vocab(rows, len(tok), pad_added, f"{model_dir}" + (f" + {adapter}" if adapter else ""), tok_src)
    if rows != len(tok):
        # the [PAD] row: never an input that carries attention or a label, so mean init is harmless
        resize_model(model, len(tok), "mean")
    model.config.pad_token_id = tok.pad_token_id
    lora = lora_config(cfg, model)
    # LoRA A is drawn from torch's RNG when the adapter is created: seed first so runs and resumes agree
    set_seed(cfg.seed)
    model = get_peft_model(model, lora)
    upcast_trainable(model)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {n_train:,} of {n_all:,} = {100 * n_train / n_all:.2f}%")
    if cfg.fast_lora_dropout:
        from sft.lora_dropout import use_fast_dropout

        use_fast_dropout(model)
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, n_train, n_all


def _fit(model, tok, settings, train_set, eval_set, out):
    from sft.data import Collator
    from zhllama.trainer import run_training

    cfg = settings.section
    padded = Collator(tok.pad_token_id)
    if cfg.packing:
        from sft.packing import PackedCollator, packed_attention

        attention = packed_attention(model, cfg.loss_chunk_tokens)
    else:
        attention = contextlib.nullcontext()
    with attention as packed:
        train_kw = (dict(data_collator=PackedCollator(), compute_loss_func=packed.loss, eval_collator=padded)
                    if cfg.packing else dict(data_collator=padded))
        trainer, result = run_training(
            model, ListDataset(train_set.examples), ListDataset(eval_set.examples) if eval_set else None, settings,
            out, resume=True, processing_class=tok, **train_kw)
        if cfg.packing:
            result["packed_attention"] = packed.backend
            result["loss_chunk_tokens"] = cfg.loss_chunk_tokens if packed.chunked else 0
    return trainer, result


def _save_adapter(trainer, stage: Path, model_dir: Path, tmpl_name: str) -> None:
    from zhllama.chat import save_name

    from zhllama.weightcheck import check_weights

    # modules_to_save already holds the full embed/head; save_embedding_layers would add two more copies.
    # Under ZeRO-3/FSDP the weights were gathered from every rank (trainer.full_state); else None.
    trainer.model.save_pretrained(str(stage), save_embedding_layers=False, state_dict=trainer.full_state)
    f = stage / "adapter_model.safetensors"
    if not f.is_file() or f.stat().st_size < 1024:
        raise UserError(f"{stage}: the saved adapter is empty; nothing was trained")
    check_weights(f, trainer.model.get_base_model().config)
    # the adapter records the folder it applies to; with --adapter that is base + pretrain adapter
    acfg = json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))
    acfg["base_model_name_or_path"] = str(model_dir.resolve())
    (stage / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n", encoding="utf-8")
    save_name(stage, tmpl_name)


def train(model_dir, data, out, adapter=None, template=None, max_steps=None, recipe=None, overrides=None,
          eval_data=None, drop_invalid=False, resume=True, log=print) -> dict:
    from zhllama.chat import get
    from sft.vocabcheck import check_vocab, prepare_tokenizer
    from zhllama import runfolder
    from zhllama.hashing import sha256_file

    from zhllama.trainer import TrainSettings, check_engine

    out, model_dir = Path(out), Path(model_dir)
    rec, cfg = _config(recipe, model_dir, overrides, template, max_steps)
    tmpl = get(cfg.template)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a model folder (no config.json); pass the pretrain stage's merged model")
    # needs only the settings: before any data is read or weights load
    check_engine(TrainSettings.for_sft(cfg), "sft")  # the engine config against the recipe
    with runfolder.lock(out, log=log):
        # data first: a malformed file should fail in a second, not after loading the model
        train_recs, eval_recs = _records(data, eval_data, cfg, drop_invalid, log)
        stage = runfolder.staging(out)
        tok_src = Path(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_dir
        tok, pad_added = prepare_tokenizer(tok_src, stage, log=log, eos=tmpl.eos)
        if not adapter:
            model_cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
            check_vocab(model_cfg.get("vocab_size"), len(tok), pad_added, model_dir, tok_src)
        train_set, eval_set = _encode(tok, tmpl, cfg, train_recs, eval_recs, log)
        if cfg.num_epochs > 0:  # cfg is this run's copy of the section (sft_config)
            cfg.max_steps = max(1, math.ceil(cfg.num_epochs * len(train_set.examples) / cfg.global_batch_size))
        inputs = {
            "model_config": runfolder.input_entry(model_dir / "config.json"),
            "data": [runfolder.input_entry(d) for d in data],
            "eval_data": [runfolder.input_entry(d) for d in eval_data] if eval_data else None,
            "tokenizer_json": {"path": str(tok_src), "sha256": sha256_file(stage / "tokenizer.json")},
        }
        resolved = {"recipe": rec.name, "recipe_file": rec.source, "sft": to_dict(cfg), "tokenizer_len": len(tok),
                    "pad_added": pad_added, "pad_token_id": tok.pad_token_id,
                    "pretrain_adapter": str(Path(adapter).resolve()) if adapter else None}
        fingerprint = {"config": resolved, "model": str(model_dir.resolve()), **{k: v for k, v in inputs.items()}}
        decision = runfolder.decide(out, fingerprint, resume, log=log, artefacts=ARTEFACTS)
        if decision == "up-to-date":
            log(f"{out} is up to date with its inputs and settings; nothing to do")
            return runfolder.read_result(out)
        runfolder.begin(out, resolved, fingerprint, clear_checkpoints=decision == "start-over")
        model, n_train, n_all = _peft_model(model_dir, adapter, tok, pad_added, tok_src, cfg, log)
        trainer, result = _fit(model, tok, TrainSettings.for_sft(cfg), train_set, eval_set, out)
        from zhllama.trainer import end_of_run

        if not trainer.is_world_process_zero():
            end_of_run()
            return result
        _save_adapter(trainer, stage, model_dir, tmpl.name)
        from zhllama.lineage import record_lineage

        record_lineage(stage, model_dir, adapter, final_dir=out)
        result.update(trainable_params=n_train, total_params=n_all, train_examples=len(train_set.examples),
                      eval_examples=len(eval_set.examples) if eval_set else 0, overlong=len(train_set.overlong),
                      template=tmpl.name, vocab_size=len(tok))
        parents = [runfolder.parent_entry(model_dir)] + ([runfolder.parent_entry(adapter)] if adapter else [])
        result = runfolder.finish(out, "sft", result, inputs, parents, seed=cfg.seed, fingerprint=fingerprint)
        end_of_run()
        before, after = result.get("eval_loss_before"), result.get("eval_loss_after")
        if before is not None:
            log(f"held-out SFT loss: {before:.4f} -> {after:.4f} after {result['global_step']} steps")
        log(f"adapter saved to {out} (vocab {len(tok):,}, template {tmpl.name})")
        return result
