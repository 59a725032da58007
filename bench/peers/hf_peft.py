"""The plain way: HF Trainer + PEFT LoRA, Alpaca prompts, right-padded batches (what alpaca-lora and
Chinese-LLaMA-Alpaca's SFT script do). Run by bench/sft_throughput.py in zhllama's own venv.

    python bench/peers/hf_peft.py --model DIR --data train.json --out DIR [--steps 30 --batch 4 ...]

On a GPU (bench/gpu/run.sh) the plain way is: model loaded in bf16, Trainer bf16 autocast, gradient
checkpointing, the same trained modules as zhllama's recipe (--bf16 --gradient-checkpointing
--modules-to-save embed_tokens,lm_head --template chinese-alpaca); bench_result.json then also holds the
step log (tokens and seconds per logged step) and the peak GPU memory.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.args import peer_args, write_result  # noqa: E402


def _gpu_args(ap) -> None:
    ap.add_argument("--bf16", action="store_true", help="load the model in bf16 and train with bf16 autocast (GPU)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--modules-to-save", default="", help="comma-separated fully trained modules, e.g. embed_tokens,lm_head")
    ap.add_argument("--template", default="stanford-alpaca")
    ap.add_argument("--logging-steps", type=int, default=5)


def main() -> int:
    a = peer_args(__doc__, _gpu_args)
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from zhllama.chat import get

    tmpl = get(a.template)
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    rows = []
    for r in json.loads(Path(a.data).read_text(encoding="utf-8")):
        prompt = tmpl.render(r["instruction"], r.get("input", ""))
        ids = tok(prompt + r["output"], truncation=True, max_length=a.max_length - 1)["input_ids"] + [tok.eos_token_id]
        n_prompt = min(len(tok(prompt)["input_ids"]), len(ids))
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [-100] * n_prompt + ids[n_prompt:]})
    torch.manual_seed(a.seed)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16 if a.bf16 and cuda else torch.float32)
    if a.gradient_checkpointing:
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM",
                                             modules_to_save=[m for m in a.modules_to_save.split(",") if m] or None))
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=a.logging_steps,
        save_strategy="no", report_to="none", seed=a.seed, use_cpu=not cuda, bf16=a.bf16 and cuda,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False,
        gradient_checkpointing=a.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.gradient_checkpointing else None,
    )
    steps = []

    class StepLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.append({"step": state.global_step, "tokens": int(state.num_input_tokens_seen or 0),
                              "elapsed_s": round(time.time() - self.t0, 3), "loss": logs["loss"]})

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tok, callbacks=[StepLog()],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    extra = {"step_log": steps}
    if cuda:
        extra["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    model.save_pretrained(a.out)
    write_result(a.out, trainer.state, "transformers", "peft", **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
