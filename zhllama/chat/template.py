"""One prompt template: its text rendering and the same template as Jinja, generated from the same strings.

Rendering (`Template.render_messages`, and the Jinja template alike): header (the system prompt: a leading system
message, else the template's default), then per user message its block, per assistant message the assistant prefix
+ answer + EOS + separator, and with ``add_generation_prompt`` the assistant prefix. Past answers end in EOS because
every trained answer does (multi-turn SFT trains each assistant turn as answer + EOS). A one-turn conversation
renders exactly the single-turn training prompt `render(instruction, input)`.

The Jinja twin is what travels as `chat_template.jinja` (transformers' convention) and as the GGUF's
`tokenizer.chat_template`, so `tokenizer.apply_chat_template`, llama.cpp, vLLM or TGI render exactly the prompt the
model was trained on (tests/test_chat_template.py checks the two byte for byte).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from zhllama.chat.messages import check_messages


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
