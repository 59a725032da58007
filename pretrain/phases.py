"""Phase 1 (input embeddings only, optionally only the appended rows) and phase 2 (LoRA + full embed/head).

Public API:
    preflight(model_dir, corpus, out_dir, block_size) -> (model, tokenizer_dir)   all input checks, before training
        (the block size against config.json's context before any weight loads)
    Prepared                          what a phase starts from: model, tok_dir, train_ds, eval_ds, resolved, inputs,
                                      fingerprint
    run_phase1(model_dir, corpus, out_dir, recipe, settings, new_rows_only, resume, cache_dir, tokenizer_dir=None) -> dict
    run_phase2(model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir=None) -> dict
        settings: zhllama.trainer.TrainSettings.for_pretrain(recipe.pretrain, "phase1" | "phase2", ...)
    init_model(recipe, tokenizer, out_dir) -> Path     random LLaMA-architecture model from a recipe (tiny default)
    trainable_summary(model) -> dict
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.data import collate_blocks
from zhllama.errors import UserError
from zhllama.modelfiles import read_config
from zhllama.models import check_sizes, copy_tokenizer, load_model_dir, tokenizer_len
from zhllama.precision import upcast_trainable
from zhllama.recipe import context_problem
from zhllama.runfolder import ensure_writable


@dataclass
class Prepared:
    """What a phase starts from once every check passed: the loaded model, the data, and the run-folder records."""

    model: Any
    tok_dir: Path
    train_ds: Any
    eval_ds: Any
    resolved: dict  # resolved_config.json
    inputs: dict  # the inputs' paths and hashes (manifest.json)
    fingerprint: dict  # what decides resume vs start over


def trainable_summary(model) -> dict:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return {"trainable": trainable, "total": total, "percent": round(100 * trainable / max(total, 1), 4)}


def _weights_hash(model_dir: Path):
    from zhllama.hashing import sha256_files

    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    return sha256_files(files) if files else None


def preflight(model_dir, corpus, out_dir, block_size: int, tokenizer_dir=None, dtype=None):
    """Every check that can fail on user input, done before any data is tokenized or any step is taken."""
    from corpora.reader import list_corpus_files

    model_dir = Path(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    ensure_writable(Path(out_dir))
    files = list_corpus_files(corpus)
    if all(f.stat().st_size == 0 for f in files):
        raise UserError(f"corpus {', '.join(map(str, files[:3]))}: all files are empty; point --corpus at your text")
    n_tok = tokenizer_len(tok_dir)
    # config.json alone answers this: refused before the weights load (the CLI refuses it even before torch loads)
    bad = context_problem(block_size, read_config(model_dir), f"--block-size {block_size}")
    if bad:
        raise UserError(f"{bad} (--model {model_dir})")
    model = load_model_dir(model_dir, **({"dtype": dtype} if dtype is not None else {}))
    check_sizes(model, model_dir, n_tok, tok_dir)
    return model, tok_dir


FINGERPRINT_KEYS = ("settings", "block_size", "new_rows_only", "lora", "inputs")
# Below this share of Han characters a pretraining corpus is refused (an English-only corpus would train the
# new Chinese rows on nothing); below WARN_HAN_SHARE it is trained on with a warning.
MIN_HAN_SHARE = 0.01
WARN_HAN_SHARE = 0.3


def check_chinese(corpus, encoding: str = "auto", min_share: float = MIN_HAN_SHARE, stage: str = "pretraining") -> dict:
    """How much Chinese the corpus holds (first documents of every file); an error below min_share."""
    from corpora.reader import corpus_profile

    prof = corpus_profile(corpus, encoding)
    if prof.docs == 0:
        from corpora.reader import list_corpus_files

        names = [str(f) for f in list_corpus_files(corpus)]
        dropped = sum(len(v) for v in prof.dropped_files.values())
        raise UserError(f"corpus {', '.join(names[:3])}{f' (and {len(names) - 3} more)' if len(names) > 3 else ''}: "
                        "no text: every file is empty or holds only whitespace"
                        + (f" ({dropped} dropped as binary)" if dropped else "") + "; point --corpus at your text")
    share = prof.han_share
    found = (f"{prof.han_chars:,} Chinese characters in {prof.chars:,} sampled ({100 * share:.1f}%, "
             f"first documents of {prof.files} file(s))")
    if share < min_share:
        raise UserError(f"corpus {', '.join(map(str, corpus))}: {found}; {stage} needs Chinese text "
                        f"(at least {100 * min_share:g}%). Point --corpus at Chinese text, or pass --min-chinese-share 0")
    if share < WARN_HAN_SHARE:
        print(f"warning: corpus has little Chinese: {found}")
    return {"han_share": round(share, 4), "sampled_chars": prof.chars}


def _prepare(stage, model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir, extra, artefacts):
    """Checks, data, and the run-folder decision: a Prepared, or None when OUT is already up to date."""
    from pretrain.data import build_datasets, tokenizer_hash
    from zhllama import runfolder
    from zhllama.hashing import sha256_file
    from zhllama.precision import base_dtype

    out_dir, model_dir = Path(out_dir), Path(model_dir)
    pre = recipe.pretrain
    extra = dict(extra)
    encoding, min_han_share = extra.pop("encoding", "auto"), extra.pop("min_han_share", MIN_HAN_SHARE)
    # on a GPU at fp16/bf16 the frozen base is loaded in half precision (zhllama.precision)
    model, tok_dir = preflight(model_dir, corpus, out_dir, pre.block_size, tokenizer_dir,
                               dtype=base_dtype(settings.precision))
    chinese = check_chinese(corpus, encoding, min_han_share, stage.replace("pretrain.", "pretrain "))
    inputs = {
        "model": {"path": str(model_dir), "sha256": _weights_hash(model_dir)},
        "tokenizer": {"path": str(tok_dir), "sha256": tokenizer_hash(tok_dir)},
        "recipe": {"path": recipe.source, "sha256": sha256_file(recipe.source) if recipe.source else None},
    }
    resolved = {"stage": stage, "recipe": recipe.to_dict(), "settings": settings.to_dict(),
                "block_size": pre.block_size, "seed": settings.seed, "inputs": inputs, **extra}
    train_ds, eval_ds, data_info = build_datasets(
        corpus, tok_dir, pre.block_size, cache_dir or (out_dir.parent / "data_cache"),
        eval_ratio=pre.eval_ratio, max_eval_blocks=pre.max_eval_blocks, streaming=pre.streaming, encoding=encoding,
        num_proc=pre.num_proc, seed=settings.data_seed, shuffle_buffer=pre.shuffle_buffer,
    )
    if data_info.get("streaming"):
        print(f"data: streaming {data_info['units']} unit(s), shuffle buffer {data_info['shuffle_buffer']}, "
              f"{data_info['eval_blocks']} held-out blocks")
    else:
        print(f"data: {data_info['train_blocks']:,} blocks ({data_info['train_tokens']:,} tokens), "
              f"{data_info['eval_blocks']} held-out, {data_info['units']} unit(s) "
              + ("reused" if data_info["reused_cache"] else f"built ({data_info['built_units']} by this process, "
                 f"{data_info['num_proc']} worker(s), {data_info['build_seconds']} s)") + f" in {data_info['cache_dir']}")
    inputs["data"] = data_info["key"]
    resolved["data"] = {k: v for k, v in data_info.items() if k != "key"}
    resolved["data"]["chinese"] = chinese
    fingerprint = {k: resolved[k] for k in FINGERPRINT_KEYS if k in resolved}
    decision = runfolder.decide(out_dir, fingerprint, resume, artefacts=artefacts)
    if decision == "up-to-date":
        print(f"{out_dir} is up to date with its inputs and settings; nothing to do")
        return None
    runfolder.begin(out_dir, resolved, fingerprint, clear_checkpoints=decision == "start-over")
    return Prepared(model, tok_dir, train_ds, eval_ds, resolved, inputs, fingerprint)


def _finish(stage, out_dir: Path, model_dir, prep: Prepared, result, summary):
    from zhllama import runfolder

    inputs, tok_dir = prep.inputs, prep.tok_dir
    files = inputs["data"]["files"]  # the corpus files of the tokenized-data key, with their sha256
    manifest_inputs = {**inputs, "corpus": [{"path": str(Path(f["name"]).resolve()), "sha256": f["sha256"]} for f in files]}
    parents = [runfolder.parent_entry(model_dir)]
    if Path(tok_dir).resolve() != Path(model_dir).resolve():
        parents.append(runfolder.parent_entry(tok_dir))
    return runfolder.finish(out_dir, stage, {**result, "trainable": summary}, manifest_inputs, parents,
                            seed=prep.resolved["seed"], fingerprint=prep.fingerprint)


def base_vocab_size(model_dir, recipe, override: int | None = None) -> int:
    """Where the appended rows start: --base-vocab-size, else what `resize` recorded, else the recipe."""
    if override:
        return override
    man = Path(model_dir) / "manifest.json"
    if man.is_file():
        try:
            m = json.loads(man.read_text())
        except ValueError:
            m = {}
        cfg = m.get("config", {})
        if m.get("stage") == "pretrain.resize" and "old_vocab" in cfg:
            return int(cfg["old_vocab"])
        if m.get("stage") == "pretrain.phase1" and "base_vocab" in cfg:
            return int(cfg["base_vocab"])
    return recipe.model.base_vocab_size


def run_phase1(model_dir, corpus, out_dir, recipe, settings, new_rows_only=False, resume=True, cache_dir=None,
               tokenizer_dir=None, base_vocab: int | None = None, encoding: str = "auto",
               min_han_share: float = MIN_HAN_SHARE):
    extra = {"new_rows_only": bool(new_rows_only), "base_vocab": base_vocab_size(model_dir, recipe, base_vocab),
             "encoding": encoding, "min_han_share": min_han_share}
    return _run("pretrain.phase1", model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir,
                extra, ("config.json",), lambda prep: _phase1(prep, model_dir, out_dir, settings, new_rows_only))


def _run(stage, model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir, extra, artefacts, body):
    """The locked run folder around a phase: nothing to do when up to date, else body(prepared inputs)."""
    from zhllama import runfolder

    from zhllama.trainer import check_engine

    out_dir = Path(out_dir)
    check_engine(settings, stage)  # the engine config against the recipe, before any weights load
    with runfolder.lock(out_dir):
        prep = _prepare(stage, model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir, extra,
                        artefacts=artefacts)
        if prep is None:
            return runfolder.read_result(out_dir)
        from zhllama.trainer import end_of_run

        result = body(prep)
        end_of_run()
        return result


def _phase1(prep: Prepared, model_dir, out_dir, settings, new_rows_only):
    from zhllama import runfolder
    from zhllama.trainer import is_main_process, run_training

    model = prep.model
    base_vocab = prep.resolved["base_vocab"]
    n_rows = model.get_input_embeddings().weight.shape[0]
    for p in model.parameters():
        p.requires_grad_(False)
    if new_rows_only:
        if not 0 < base_vocab < n_rows:
            raise UserError(
                f"--new-rows-only: the base vocabulary has {base_vocab:,} pieces and {model_dir} has {n_rows:,} rows, so there "
                "are no appended rows to train; give the output of `python -m pretrain resize` or pass --base-vocab-size"
            )
        from peft import TrainableTokensConfig, get_peft_model

        # Only the appended rows get a trainable delta; old rows stay bit-identical by construction (no masking
        # tricks that weight decay or optimizer state could undo).
        cfg = TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=list(range(base_vocab, n_rows)))
        from transformers import set_seed

        set_seed(settings.seed)
        model = get_peft_model(model, cfg)
    else:
        model.get_input_embeddings().weight.requires_grad_(True)
    upcast_trainable(model)
    summary = trainable_summary(model)
    print(f"phase 1: training {summary['trainable']:,} of {summary['total']:,} parameters ({summary['percent']:.2f}%)")
    trainer, result = run_training(model, prep.train_ds, prep.eval_ds, settings, out_dir, collate_blocks)
    if is_main_process():
        stage = runfolder.staging(out_dir)
        sd = trainer.full_state  # gathered from every rank under ZeRO-3/FSDP, else None
        if sd is None:
            final = model.merge_and_unload() if new_rows_only else model
            final.save_pretrained(stage)
        else:
            final = model.get_base_model() if new_rows_only else model
            final.save_pretrained(stage, state_dict=_merged_trainable_tokens(sd, range(base_vocab, n_rows)) if new_rows_only else sd)
        copy_tokenizer(prep.tok_dir, stage)
        if sd is None:  # the live model is whole only when it was not sharded
            check_sizes(final, stage, tokenizer_len(stage), stage)
        from zhllama.weightcheck import check_weights

        for f in sorted(stage.glob("*.safetensors")):
            check_weights(f, final.config, vocab_rows=tokenizer_len(stage))
        return _finish("pretrain.phase1", out_dir, model_dir, prep, result, summary)
    return result


def _merged_trainable_tokens(sd: dict, token_indices) -> dict:
    """A gathered TrainableTokens (phase 1, new rows only) state dict as the plain model's: the trained rows
    copied into the base embedding, the PEFT prefixes dropped (what merge_and_unload does to live modules)."""
    import torch

    prefix = "base_model.model."
    out = {}
    for k, v in sd.items():
        k = k[len(prefix):] if k.startswith(prefix) else k
        if ".trainable_tokens_" in k:
            continue
        out[k.replace(".base_layer.weight", ".weight")] = v
    for k, delta in sd.items():
        if ".trainable_tokens_delta." in k:
            layer = k.split(".trainable_tokens_delta.")[0]
            name = (layer[len(prefix):] if layer.startswith(prefix) else layer) + ".weight"
            index = torch.as_tensor(list(token_indices))
            out[name] = out[name].index_copy(0, index, delta.to(out[name].dtype))
    return out


def lora_config(phase, model=None):
    from peft import LoraConfig, TaskType

    from zhllama.models import lora_tying

    tying = lora_tying(model, phase.lora_targets, phase.modules_to_save) if model is not None else {}
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=phase.lora_r, lora_alpha=phase.lora_alpha, lora_dropout=phase.lora_dropout,
        target_modules=list(phase.lora_targets), modules_to_save=list(phase.modules_to_save) or None, **tying,
    )


def check_adapter(out_dir: Path, config=None) -> dict:
    """Refuse to call a run finished when the adapter file is empty (the reference's 443-byte adapters), holds a
    zero-size tensor (a save over partitioned ZeRO-3/FSDP parameters) or, given the base's config, a tensor
    whose shape is not the base's."""
    from safetensors import safe_open

    f = out_dir / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"{f}: adapter was not written")
    with safe_open(str(f), "pt") as sf:
        keys = list(sf.keys())
        empty = [k for k in keys if 0 in tuple(sf.get_slice(k).get_shape())]
    lora = [k for k in keys if "lora_" in k]
    if not lora:
        raise UserError(f"{f}: adapter holds no LoRA weights ({len(keys)} tensors, {f.stat().st_size} bytes)")
    if empty:
        raise UserError(f"{f}: {len(empty)} tensor(s) are empty, e.g. {empty[0]} (a save over partitioned "
                        "ZeRO-3/FSDP parameters?); the run is not finished, rerun it")
    if config is not None:
        from zhllama.weightcheck import check_weights

        check_weights(f, config)
    return {"tensors": len(keys), "lora_tensors": len(lora), "bytes": f.stat().st_size,
            "full_modules": sorted({k.split(".")[-2] for k in keys if "lora_" not in k})}


def run_phase2(model_dir, corpus, out_dir, recipe, settings, resume=True, cache_dir=None, tokenizer_dir=None,
               encoding: str = "auto", min_han_share: float = MIN_HAN_SHARE):
    phase = recipe.pretrain.phase2
    extra = {"lora": {"r": phase.lora_r, "alpha": phase.lora_alpha, "dropout": phase.lora_dropout,
                      "targets": list(phase.lora_targets), "modules_to_save": list(phase.modules_to_save)},
             "encoding": encoding, "min_han_share": min_han_share}
    return _run("pretrain.phase2", model_dir, corpus, out_dir, recipe, settings, resume, cache_dir, tokenizer_dir,
                extra, ("adapter_model.safetensors",), lambda prep: _phase2(prep, model_dir, out_dir, phase, settings))


def _phase2(prep, model_dir, out_dir, phase, settings):
    from peft import get_peft_model
    from transformers import set_seed

    from zhllama import runfolder
    from zhllama.trainer import is_main_process, run_training

    # LoRA A matrices are drawn from torch's RNG when the adapter is created: seed first, or every run
    # (and a resumed run's first process) starts from different adapters.
    set_seed(settings.seed)
    model = get_peft_model(prep.model, lora_config(phase, prep.model))
    upcast_trainable(model)
    if settings.gradient_checkpointing:
        model.enable_input_require_grads()
    summary = trainable_summary(model)
    print(f"phase 2: training {summary['trainable']:,} of {summary['total']:,} parameters ({summary['percent']:.2f}%)")
    trainer, result = run_training(model, prep.train_ds, prep.eval_ds, settings, out_dir, collate_blocks)
    if is_main_process():
        stage = runfolder.staging(out_dir)
        # under ZeRO-3/FSDP the weights were gathered from every rank (trainer.full_state); else None
        model.save_pretrained(stage, state_dict=trainer.full_state)
        # vanilla PeftModel.from_pretrained(base, DIR) reads the base path from here
        acfg = json.loads((stage / "adapter_config.json").read_text())
        acfg["base_model_name_or_path"] = str(Path(model_dir).resolve())
        (stage / "adapter_config.json").write_text(json.dumps(acfg, indent=2) + "\n")
        copy_tokenizer(prep.tok_dir, stage)
        result["adapter"] = check_adapter(stage, model.get_base_model().config)
        from zhllama.lineage import record_lineage

        record_lineage(stage, model_dir, final_dir=out_dir)
        return _finish("pretrain.phase2", out_dir, model_dir, prep, result, summary)
    return result


def _bytelevel_bos_eos(bl) -> tuple[int | None, int | None]:
    cfg_p = bl.folder / "tokenizer_config.json"
    cfg = json.loads(cfg_p.read_text(encoding="utf-8")) if cfg_p.is_file() else {}

    def tid(key):
        v = cfg.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return bl.specials.get(v) if v else None

    return tid("bos_token"), tid("eos_token")


def init_model(recipe, tokenizer, out_dir, seed: int = 0, device: str = "cpu", dtype: str = "float32") -> Path:
    """A randomly initialised LLaMA-architecture model shaped by recipe.model, on the given base tokenizer.

    device "cuda" draws the weights on the GPU (a 7B model in seconds instead of minutes of CPU randn; the
    values differ from a CPU init with the same seed); dtype is what is stored (bfloat16 halves a 7B folder).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vocab.hf_export import save_tokenizer_folder
    from vocab.spmodel import load_model

    from vocab.bytelevel import ByteLevelBase, is_bytelevel

    out = Path(out_dir)
    ensure_writable(out)
    m = recipe.model
    if is_bytelevel(tokenizer):  # a byte-level tokenizer.json base (Llama-3, Qwen-2.5)
        bl = ByteLevelBase(tokenizer)
        sp, n = None, bl.next_id
        bos_id, eos_id = _bytelevel_bos_eos(bl)
    else:
        sp = load_model(tokenizer, what="--tokenizer")
        n = len(sp.pieces)
        bos_id, eos_id = sp.trainer_spec.bos_id, sp.trainer_spec.eos_id
    if m.base_vocab_size and m.base_vocab_size != n:
        raise UserError(f"{tokenizer} has {n:,} pieces but recipe {recipe.name} says model.base_vocab_size {m.base_vocab_size:,}; "
                        "fix the recipe (or --set model.base_vocab_size=N)")
    cfg = LlamaConfig(
        vocab_size=n, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_word_embeddings, rms_norm_eps=m.rms_norm_eps, initializer_range=m.initializer_range,
        bos_token_id=bos_id, eos_token_id=eos_id,
    )
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    from zhllama import runfolder

    with runfolder.lock(out):
        inputs = {"tokenizer": runfolder.input_entry(tokenizer)}
        config = {"stage": "pretrain.init", "recipe": recipe.name, "model": dataclasses.asdict(m), "seed": seed,
                  "device": device, "dtype": dtype}
        runfolder.begin(out, config, {"inputs": inputs, **config})
        stage = runfolder.staging(out)
        torch.manual_seed(seed)
        if device == "cpu" and dtype == "float32":
            model = LlamaForCausalLM(cfg)
        else:
            with torch.device(device):
                model = LlamaForCausalLM._from_config(cfg, dtype=getattr(torch, dtype))
        model.save_pretrained(stage)
        if sp is not None:
            save_tokenizer_folder(sp, stage)
        else:
            from vocab.bytelevel import BytelevelResult, write_folder

            write_folder(bl, BytelevelResult([], []), stage)  # the base as is (specials kept in the vocabulary)
        runfolder.finish(out, "pretrain.init", {"vocab_size": n, "recipe": recipe.name}, inputs,
                         [], seed=seed, fingerprint={"inputs": inputs, **config})
    return out
