"""TRL's SFTTrainer with a PEFT LoRA config on prompt/completion rows (completion-only loss), as its docs show.
Run by bench/sft_throughput.py with the TRL venv's python (see bench/peers/venvs.py).

    python bench/peers/trl_sft.py --model DIR --data train.json --out DIR [--steps 30 --batch 4 ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.args import peer_args, write_result  # noqa: E402
from zhllama.chat import get  # noqa: E402  (pure Python: the same Alpaca prompt strings)


def main() -> int:
    a = peer_args(__doc__)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tmpl = get("stanford-alpaca")
    recs = json.loads(Path(a.data).read_text(encoding="utf-8"))
    ds = Dataset.from_list([{"prompt": tmpl.render(r["instruction"], r.get("input", "")), "completion": r["output"]}
                            for r in recs])
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = SFTConfig(
        output_dir=a.out, per_device_train_batch_size=a.batch, max_steps=a.steps, learning_rate=a.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=5, save_strategy="no",
        report_to="none", seed=a.seed, use_cpu=True, include_num_input_tokens_seen="non_padding",
        max_length=a.max_length, packing=False, completion_only_loss=True, bf16=False, fp16=False,
    )
    peft_cfg = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    trainer.train()
    trainer.model.save_pretrained(a.out)
    write_result(a.out, trainer.state, "trl", "transformers", "peft")
    return 0


if __name__ == "__main__":
    sys.exit(main())
