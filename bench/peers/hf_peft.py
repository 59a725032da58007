"""The plain way: HF Trainer + PEFT LoRA, Alpaca prompts, right-padded batches (what alpaca-lora and
Chinese-LLaMA-Alpaca's SFT script do). Run by bench/sft_throughput.py in zhllama's own venv.

    python bench/peers/hf_peft.py --model DIR --data train.json --out DIR [--steps 30 --batch 4 ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.args import peer_args, write_result  # noqa: E402


def main() -> int:
    a = peer_args(__doc__)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from sft.template import get

    tmpl = get("stanford-alpaca")
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
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=5, save_strategy="no",
        report_to="none", seed=a.seed, use_cpu=True, include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    model.save_pretrained(a.out)
    write_result(a.out, trainer.state, "transformers", "peft")
    return 0


if __name__ == "__main__":
    sys.exit(main())
