"""The one registry of prompt templates, used by training, preview, generate/chat and serving alike.

The reference projects rendered slightly different prompts in training, the CLI and the web demo, a
known cause of endless repetition. Here every consumer calls `get(name).render...(...)`, and the
template travels with the adapter and the merged model: its name in `sft_template.json`, and the same
template as a Jinja `chat_template.jinja` (transformers' convention), generated from the same strings,
so `tokenizer.apply_chat_template`, llama.cpp (GGUF `tokenizer.chat_template`), vLLM or TGI render
exactly the prompt the model was trained on.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": ...}``; a user
message may carry an Alpaca ``"input"``. Rendering (`render_messages`, and the Jinja template alike):
header (the system prompt: a leading system message, else the template's default), then per user
message its block, per assistant message the assistant prefix + answer + EOS + separator, and with
``add_generation_prompt`` the assistant prefix. Past answers end in EOS because every trained answer
does (multi-turn SFT trains each assistant turn as answer + EOS). A one-turn conversation renders
exactly the single-turn training prompt `render(instruction, input)`.

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

import json
import re
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

DEFAULT = "chinese-alpaca"
TEMPLATE_FILE = "sft_template.json"
JINJA_FILE = "chat_template.jinja"

_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_SYSTEM_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ROLES = ("system", "user", "assistant")


def check_messages(messages, need_last_assistant: bool = False) -> list[dict]:
    """Validated conversation: optional system first, then user/assistant alternating from a user."""
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation is a non-empty list of {role, content} messages")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"message {j}: needs string 'role' and 'content'")
        role = m["role"]
        if role not in ROLES:
            raise UserError(f"message {j}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and j != 0:
            raise UserError(f"message {j}: a system message is only allowed first")
        k = j - (1 if messages[0]["role"] == "system" else 0)
        if role != "system" and role != ("user" if k % 2 == 0 else "assistant"):
            raise UserError(f"message {j}: expected a {'user' if k % 2 == 0 else 'assistant'} message, got {role}")
        inp = m.get("input")
        if inp is not None and (role != "user" or not isinstance(inp, str)):
            raise UserError(f"message {j}: 'input' is a string on user messages only")
        out.append(m)
    if need_last_assistant and out[-1]["role"] != "assistant":
        raise UserError("the conversation must end with an assistant message (the answer to train on)")
    return out


def _jinja_expr(fmt: str, **values: str) -> str:
    """A str.format template as a Jinja expression: literals quoted, {name} -> the given Jinja expression."""
    parts = re.split(r"\{(\w+)\}", fmt)
    expr = [values[p] if i % 2 else json.dumps(p, ensure_ascii=False) for i, p in enumerate(parts) if i % 2 or p]
    return "(" + (" ~ ".join(expr) or '""') + ")"


@dataclass(frozen=True)
class Template:
    name: str
    system: str                      # the default system prompt
    user: str                        # one user block; contains {instruction}
    assistant: str                   # the generation prompt: written before every answer
    header: str = "{system}\n\n"     # written once at the top; contains {system}
    system_input: str | None = None  # default system prompt when the first user message has an input
    user_input: str | None = None    # contains {instruction} and {input}; None: input joined to the instruction
    separator: str = "\n\n"          # after a past answer's EOS, before the next user block; may contain {bos}
    source: str = ""
    eos: str | None = None           # the template's own end-of-turn token (Llama-3: <|eot_id|>); None: the model's EOS

    def _user(self, instruction: str, input: str = "") -> str:
        if input and self.user_input is not None:
            return self.user_input.format(instruction=instruction, input=input)
        if input:
            instruction = instruction + "\n" + input
        return self.user.format(instruction=instruction)

    def render_messages(self, messages: list[dict], add_generation_prompt: bool = True,
                        bos: str = "<s>", eos: str = "</s>") -> str:
        """The text after BOS: the chat template renders `bos + render_messages(...)`."""
        msgs = check_messages(messages)
        eos = self.eos or eos
        system = None
        if msgs[0]["role"] == "system":
            system, msgs = msgs[0]["content"], msgs[1:]
        if system is None:
            first_input = bool(msgs and msgs[0].get("input"))
            system = self.system_input if first_input and self.system_input is not None else self.system
        out = [self.header.format(system=system)]
        for m in msgs:
            if m["role"] == "user":
                out.append(self._user(m["content"], m.get("input") or ""))
            else:
                out.append(self.assistant + m["content"] + eos + self.separator.format(bos=bos))
        if add_generation_prompt:
            out.append(self.assistant)
        return "".join(out)

    def render(self, instruction: str, input: str = "") -> str:
        """The single-turn prompt the model sees; the target (output + EOS) follows it directly."""
        msg = {"role": "user", "content": instruction}
        if input:
            msg["input"] = input
        return self.render_messages([msg])

    def render_conversation(self, history: list[tuple[str, str]], instruction: str) -> str:
        """Prompt for a new instruction after earlier (instruction, answer) turns."""
        msgs = []
        for q, a in history:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return self.render_messages(msgs + [{"role": "user", "content": instruction}])

    def jinja(self) -> str:
        """The same template in Jinja (transformers' chat_template; llama.cpp, vLLM, TGI read it)."""
        sys_default = json.dumps(self.system, ensure_ascii=False)
        sys_input = json.dumps(self.system_input, ensure_ascii=False)
        user = _jinja_expr(self.user, instruction="m['content']")
        if self.user_input is not None:
            user_input = _jinja_expr(self.user_input, instruction="m['content']", input="m['input']")
        else:
            user_input = _jinja_expr(self.user, instruction="(m['content'] ~ \"\\n\" ~ m['input'])")
        assistant = _jinja_expr(self.assistant)
        lines = [
            f"{{#- zhllama template {self.name}: {self.source} -#}}",
            "{%- set ns = namespace(system=none, msgs=messages) -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] -%}{%- set ns.msgs = messages[1:] -%}",
        ] + ([
            "{%- elif messages and messages[0]['input'] is defined and messages[0]['input'] -%}",
            f"{{%- set ns.system = {sys_input} -%}}",
        ] if self.system_input is not None else []) + [
            "{%- else -%}",
            f"{{%- set ns.system = {sys_default} -%}}",
            "{%- endif -%}",
            "{{- bos_token ~ " + _jinja_expr(self.header, system="ns.system") + " -}}",
            "{%- for m in ns.msgs -%}",
            "{%- if m['role'] == 'user' -%}",
            "{%- if m['input'] is defined and m['input'] -%}{{- " + user_input + " -}}",
            "{%- else -%}{{- " + user + " -}}{%- endif -%}",
            "{%- elif m['role'] == 'assistant' -%}",
            "{{- " + assistant + " ~ m['content'] ~ " + (json.dumps(self.eos) if self.eos else "eos_token") + " ~ "
            + _jinja_expr(self.separator, bos="bos_token") + " -}}",
            "{%- else -%}",
            "{{- raise_exception('unsupported role ' ~ m['role'] ~ ': expected system (first), user, assistant') -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}{{- " + assistant + " -}}{%- endif -%}",
        ]
        return "\n".join(lines) + "\n"


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


def save_name(folder: str | Path, name: str) -> None:
    """Record the template with a model/adapter folder: its name, and the Jinja chat template beside the
    tokenizer (`chat_template.jinja`, which transformers v5 loads with the tokenizer)."""
    t = get(name)
    Path(folder, TEMPLATE_FILE).write_text(
        json.dumps({"template": t.name, "source": t.source}, indent=2) + "\n", encoding="utf-8"
    )
    Path(folder, JINJA_FILE).write_text(t.jinja(), encoding="utf-8")


def load_name(folder: str | Path, default: str | None = None) -> str:
    """The template recorded with a model/adapter folder (so serving uses what training used)."""
    p = Path(folder, TEMPLATE_FILE)
    if p.is_file():
        try:
            name = json.loads(p.read_text(encoding="utf-8"))["template"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{p}: not a template record ({e}); expected {{\"template\": NAME}}") from None
        get(name)
        return name
    return get(default).name
