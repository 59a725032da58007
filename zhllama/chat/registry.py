"""The one registry of prompt templates, used by training, preview, generate/chat, evaluation and serving alike.

The reference projects rendered slightly different prompts in training, the CLI and the web demo, a known cause of
endless repetition. Here every consumer calls `get(name).render...(...)`.

Templates are byte-exact copies of their sources:
* chinese-alpaca (default): Chinese-LLaMA-Alpaca's single template; the input is joined to the
  instruction as ``instruction + "\\n" + input``; note the trailing space after ``Response:``.
* stanford-alpaca: Stanford Alpaca's two templates (with and without ``### Input:``), ending in
  ``### Response:`` with no space.
* alpaca-lora: tloen/alpaca-lora's templates, ending in ``### Response:\\n``.
* chinese-llama-2: Chinese-LLaMA-Alpaca-2's Llama-2 chat format with its bilingual system prompt;
  later turns follow Llama-2's ``</s><s>[INST] ...`` convention.
* llama3: Meta's Llama-3 instruct format (``<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>``), with
  Chinese-LLaMA-Alpaca-3's default system prompt; turns end in ``<|eot_id|>`` (the template's own `eos`), and the
  SFT tokenizer's eos_token is set to it, so training, generation, the server and the GGUF all stop on it.
* chatml: ChatML-style roles (``<|im_start|>role\\n...<|im_end|>``); an assistant turn ends in the
  model's EOS (``</s>``, the token it is trained to stop on) where ChatML writes ``<|im_end|>``.
"""
from __future__ import annotations

from zhllama.chat.template import Template
from zhllama.errors import UserError

DEFAULT = "chinese-alpaca"

_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

_ALPACA = {"system": _SYSTEM, "user": "### Instruction:\n{instruction}\n\n"}
_ALPACA_INPUT = {**_ALPACA, "system_input": _SYSTEM_INPUT,
                 "user_input": "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"}
_LLAMA2_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"

# name: (the fields that differ from Template's defaults, source)
_TABLE = {
    "chinese-alpaca": ({**_ALPACA, "assistant": "### Response: "},
                       "ymcui/Chinese-LLaMA-Alpaca scripts/training/build_dataset.py PROMPT_TEMPLATE"),
    "stanford-alpaca": ({**_ALPACA_INPUT, "assistant": "### Response:"}, "tatsu-lab/stanford_alpaca train.py PROMPT_DICT"),
    "alpaca-lora": ({**_ALPACA_INPUT, "assistant": "### Response:\n"}, "tloen/alpaca-lora templates/alpaca.json"),
    "chinese-llama-2": (
        {"system": _LLAMA2_SYSTEM, "header": "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n", "user": "{instruction}",
         "assistant": " [/INST]", "separator": "{bos}[INST] "},
        "ymcui/Chinese-LLaMA-Alpaca-2 scripts/training/build_dataset.py PROMPT_TEMPLATE, DEFAULT_SYSTEM_PROMPT"),
    "llama3": (
        {"system": _LLAMA2_SYSTEM, "header": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
         "user": "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>",
         "assistant": "<|start_header_id|>assistant<|end_header_id|>\n\n", "separator": "", "eos": "<|eot_id|>"},
        "meta-llama/llama-models llama_models/llama3/chat_format.py (Llama-3 instruct), default system prompt of "
        "ymcui/Chinese-LLaMA-Alpaca-3"),
    "chatml": (
        {"system": "You are a helpful assistant.", "header": "<|im_start|>system\n{system}<|im_end|>\n",
         "user": "<|im_start|>user\n{instruction}<|im_end|>\n", "assistant": "<|im_start|>assistant\n", "separator": "\n"},
        "ChatML (OpenAI), as used by Qwen and LLaMA-Factory's chatml template; EOS ends assistant turns"),
}
REGISTRY: dict[str, Template] = {name: Template(name=name, source=src, **fields) for name, (fields, src) in _TABLE.items()}


def get(name: str | None) -> Template:
    name = name or DEFAULT
    if name not in REGISTRY:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
