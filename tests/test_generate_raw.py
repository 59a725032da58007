"""`sft generate --json` keeps what the model wrote with its special tokens ("raw"): an answer the tokenizer
decodes to nothing (special tokens only) is told apart from an empty generation."""
from __future__ import annotations

import json
import shutil


def test_json_rows_carry_raw_text_with_special_tokens(chat_model, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from sft.cli import main

    # a model whose LM head is all zeros: every logit ties, greedy picks id 0 (<unk>), a special token
    d = tmp_path / "flat"
    shutil.copytree(chat_model, d)
    m = AutoModelForCausalLM.from_pretrained(str(d))
    with torch.no_grad():
        m.lm_head.weight.zero_()
    m.save_pretrained(str(d))
    assert main(["generate", "--model", str(d), "--prompt", "你好", "--preset", "greedy", "--max-new-tokens", "5",
                 "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["answer"] == ""
    assert row["raw"] == "<unk>" * 5 and row["tokens"] == 5
