"""The template travels with the adapter and the merged model: its name in `sft_template.json`, and the same
template as a Jinja `chat_template.jinja` beside the tokenizer (transformers v5 loads it with the tokenizer), so
whatever serves the folder renders the prompt its training used.
"""
from __future__ import annotations

import json
from pathlib import Path

from zhllama.chat.registry import get
from zhllama.errors import UserError

TEMPLATE_FILE = "sft_template.json"
JINJA_FILE = "chat_template.jinja"


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
