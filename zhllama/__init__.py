"""The shared layer every zhllama stage (corpora, vocab, pretrain, sft, evaluation, deploy, ...) builds on.

A stage is a typed config section + a function that runs it + a thin CLI; it imports `zhllama` and other
stages' public names only (tests/test_import_rules.py). Modules, each with its public API in its docstring:

    zhllama.recipe     the typed recipe (sections model, vocab, pretrain.phase1/phase2, sft; a field = default,
                       one-line doc, range/choices), load_recipe, apply_overrides, problems/validate
    zhllama.cli        --recipe / --config / --set section.key=value and one flag per recipe field for a stage's
                       argparse parser; resolve_recipe checks everything (ranges, recipe/model shape, LoRA module
                       names on the meta device) before weights load and reports every problem at once
    zhllama.runfolder  the run-folder contract: resolved_config.json / result.json / manifest.json (with parents),
                       lock, decide (up to date / resume / start over / refuse), staging + publish, finish; a failed
                       run leaves no partial output and the previous result in place; lock_file / atomic_file /
                       writing for single output files (unique temp names, full disk = a named error)
    zhllama.chat       the chat layer sft, evaluation, deploy and bench share: conversations, prompt templates
                       (registry, rendering, the Jinja twin, the record beside a model), stop handling, fitting a
                       conversation and its answer into the context
    zhllama.writes     writing / atomic_file: a failed write is one named error and never half a file
    zhllama.overlap    refuse_overlap: no stage writes its output over, into, or around one of its inputs
    zhllama.modelfiles config.json, safetensors headers and tokenizer files checked (torch-free) before a library
                       loads them: a truncated or corrupt file is one named error
    zhllama.trainer    run_training: the Trainer wrapper (collator required; resumable, seeded, whole-run loss; the
                       same model on any process count; weights gathered from every rank before the save)
    zhllama.engine     the launched engine (DDP, DeepSpeed ZeRO, FSDP2): its config may not contradict the recipe
                       (precision, batch, clipping), checked before weights load; FSDP2 for real on CPU
    zhllama.weightcheck a saved adapter or model: no empty tensor, the base config's shapes
    zhllama.models     load/check/resize Hugging Face model folders, copy tokenizers; load_adapter_chain: the one
                       loader of base + adapters (lineage-checked) for sft and evaluation
    zhllama.losses     chunked_linear_cross_entropy: LM head + cross-entropy a chunk of rows at a time (sft, evaluation)
    zhllama.errors     UserError and cli_entry (one "error: ..." line per problem, exit 2, no traceback)
    zhllama.manifest   write_manifest, write_json (atomic), library_versions
    zhllama.hashing    sha256 of bytes, files, file sets
    zhllama.run_report RUN/report.{md,html} from what a run wrote
    zhllama.cli_main   the `zhllama` command: run, status, and the stage commands (each runs `python -m STAGE`)
    zhllama.stages     the stage graph, declared once: each step's command, outputs, inputs, recipe sections
    zhllama.runstate   done / stale / missing per step and why (result.json, published files, RUN/stages.json)
    zhllama.pipeline   `zhllama run`: the steps that are not done, one process each; per-stage timings
"""
__version__ = "0.1.0"
