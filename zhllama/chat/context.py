"""A conversation and its answer within the model's context (`sft chat`).

Earlier turns are kept as long as the prompt leaves room for a short answer; the answer's token budget is then
clipped to what is left of the context. With the answer budget reserved in full instead, a default model (context
512, answers of up to 512 new tokens) dropped every earlier turn, and the chat forgot everything after each answer.
"""
from __future__ import annotations

from zhllama.errors import UserError

MIN_ANSWER_TOKENS = 16  # the shortest answer budget worth generating; below it turns are dropped, then refused


class TooLong(UserError):
    """A single message that cannot fit the context even without history."""


def fit_prompt(tok, template, history: list, message: str, max_new_tokens: int, context: int):
    """(prompt, answer budget, turns dropped) for `message` after `history` [(question, answer), ...].

    The budget is min(max_new_tokens, context - prompt tokens). The oldest turns are dropped (from `history`
    itself) only while the prompt leaves less than min(MIN_ANSWER_TOKENS, max_new_tokens) for the answer; a
    message that leaves less than that on its own is refused (TooLong). Prompt tokens are counted as generation
    feeds them: `tok(prompt)["input_ids"]`, BOS included.
    """
    need = min(MIN_ANSWER_TOKENS, max_new_tokens)

    def render():
        prompt = template.render_conversation(history, message)
        return prompt, len(tok(prompt)["input_ids"])

    dropped = 0
    prompt, n = render()
    while history and n + need > context:
        history.pop(0)
        dropped += 1
        prompt, n = render()
    if n + need > context:
        raise TooLong(f"this message is {n:,} tokens with the template; with --context {context:,} that leaves "
                      f"{max(0, context - n)} for the answer (need {need}): shorten it or raise --context")
    return prompt, min(max_new_tokens, context - n), dropped
