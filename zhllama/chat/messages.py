"""A conversation as every consumer takes it: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

An optional system message first, then user and assistant messages alternating from a user message; a user
message may carry an Alpaca ``"input"``. Training, rendering and the server all check with `check_messages`, so a
conversation one of them accepts, the others accept too.
"""
from __future__ import annotations

from zhllama.errors import UserError

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
