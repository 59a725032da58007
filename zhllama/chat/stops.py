"""Where a generated answer ends, besides EOS and the token budget.

`StopText` cuts streamed text at the request's stop strings (the OpenAI `stop` field); `StopWhen` is the
transformers StoppingCriteria that ends generation after the current token once a flag says so (Ctrl-C in
`sft chat`, a server request whose client left or whose time ran out).
"""
from __future__ import annotations

from typing import Callable


class StopText:
    """Cuts streamed text before the first stop string; holds back only a tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self.buf += piece
        found = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, out, self.buf = True, self.buf[:min(found)], ""
            return out
        hold = 0
        for k in range(min(max(map(len, self.stops)) - 1, len(self.buf)), 0, -1):
            if any(s.startswith(self.buf[-k:]) for s in self.stops):
                hold = k
                break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class StopWhen:
    """A transformers StoppingCriteria (duck-typed: generate() only calls it) that is true for every row once
    `should_stop()` is; checked after each token, so the text generated so far is kept."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)
