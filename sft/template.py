"""The one registry of prompt templates, used by training, preview, generate/chat and serving alike.

The reference projects rendered slightly different prompts in training, the CLI and the web demo, a
known cause of endless repetition. Here every consumer calls `get(name).render(...)`, and the template
name travels with the adapter and the merged model (`sft_template.json`) so serving cannot drift.

Templates are byte-exact copies of their sources:
* chinese-alpaca (default): Chinese-LLaMA-Alpaca's single template; the input is joined to the
  instruction as ``instruction + "\\n" + input``; note the trailing space after ``Response:``.
* stanford-alpaca: Stanford Alpaca's two templates (with and without ``### Input:``), ending in
  ``### Response:`` with no space.
* alpaca-lora: tloen/alpaca-lora's templates, ending in ``### Response:\\n``.

Multi-turn chat is an inference-time convention (training data is single-turn): the header is
written once, then each past turn as its instruction block followed by its answer and a blank line,
then the new instruction block. A one-turn conversation renders exactly like `render`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zhllama.errors import UserError

DEFAULT = "chinese-alpaca"
TEMPLATE_FILE = "sft_template.json"

_HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class Template:
    name: str
    header: str              # written once at the top
    turn: str                # one instruction block; contains {instruction}
    header_input: str | None = None   # None: input is joined into the instruction
    turn_input: str | None = None     # contains {instruction} and {input}
    turn_separator: str = "\n\n"      # after a past answer, before the next turn (chat only)
    source: str = ""

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt the model sees; the target (output + EOS) follows it directly."""
        if input and self.turn_input is not None:
            return self.header_input + self.turn_input.format(instruction=instruction, input=input)
        if input:
            instruction = instruction + "\n" + input
        return self.header + self.turn.format(instruction=instruction)

    def render_conversation(self, history: list[tuple[str, str]], instruction: str) -> str:
        """Prompt for a new instruction after earlier (instruction, answer) turns."""
        if not history:
            return self.render(instruction)
        parts = [self.header]
        for q, a in history:
            parts.append(self.turn.format(instruction=q) + a + self.turn_separator)
        parts.append(self.turn.format(instruction=instruction))
        return "".join(parts)


REGISTRY: dict[str, Template] = {
    "chinese-alpaca": Template(
        name="chinese-alpaca",
        header=_HEADER,
        turn="### Instruction:\n{instruction}\n\n### Response: ",
        source="ymcui/Chinese-LLaMA-Alpaca scripts/training/build_dataset.py PROMPT_TEMPLATE",
    ),
    "stanford-alpaca": Template(
        name="stanford-alpaca",
        header=_HEADER,
        turn="### Instruction:\n{instruction}\n\n### Response:",
        header_input=_HEADER_INPUT,
        turn_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        source="tatsu-lab/stanford_alpaca train.py PROMPT_DICT",
    ),
    "alpaca-lora": Template(
        name="alpaca-lora",
        header=_HEADER,
        turn="### Instruction:\n{instruction}\n\n### Response:\n",
        header_input=_HEADER_INPUT,
        turn_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        source="tloen/alpaca-lora templates/alpaca.json",
    ),
}


def get(name: str | None) -> Template:
    name = name or DEFAULT
    if name not in REGISTRY:
        raise UserError(f"unknown template {name!r}; known templates: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def save_name(folder: str | Path, name: str) -> None:
    t = get(name)
    Path(folder, TEMPLATE_FILE).write_text(
        json.dumps({"template": t.name, "source": t.source}, indent=2) + "\n", encoding="utf-8"
    )


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
