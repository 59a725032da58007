"""Progress that also shows in a log: a tqdm bar on a terminal, elsewhere one plain line every few seconds.

A tqdm bar written to a file or pipe (make's log, CI, nohup) is either off (tqdm's disable=None) or one endless
line of carriage returns; a long step then looks hung. Off a terminal this prints a line such as
    [eval phase2] 12,345/67,890 tok (18%), 420 tok/s, ETA 2m12s
every ZHLLAMA_PROGRESS_SECONDS (default 30) seconds, and one closing line when the work took longer than that.

Public API:
    progress(total, desc, unit="it", enabled=True, every=None, file=None)
        -> an object with update(n=1) and close() (also a context manager); enabled=False shows nothing
    format_duration(seconds) -> str     "45s", "2m12s", "1h03m"
"""
from __future__ import annotations

import os
import sys
import time

DEFAULT_EVERY = 30.0


def format_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _every() -> float:
    raw = os.environ.get("ZHLLAMA_PROGRESS_SECONDS")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_EVERY
    except ValueError:
        return DEFAULT_EVERY


class LineProgress:
    """tqdm's update/close, printed as whole lines at most every `every` seconds (0: every update)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float | None = None, file=None,
                 clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.every = _every() if every is None else every
        self.file = file if file is not None else sys.stderr
        self.clock = clock
        self.n = 0
        self.t0 = self.last = clock()
        self.printed = False

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.n:,}" + (f"/{self.total:,}" if self.total else "")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        speed = f", {rate:,.1f} {self.unit}/s" if rate else ""
        eta = ""
        if self.total and rate and self.n < self.total:
            eta = f", ETA {format_duration((self.total - self.n) / rate)}"
        return f"[{self.desc}] {done} {self.unit}{pct}{speed}{eta}, {format_duration(elapsed)} elapsed"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self._print(self.line())

    def _print(self, text: str) -> None:
        self.printed = True
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        # the closing line only for work that already showed progress: a quick step stays quiet
        if self.printed:
            self._print(self.line())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, every: float | None = None,
             file=None):
    """A progress display for `total` units of work: tqdm on a terminal, LineProgress elsewhere, nothing when not
    enabled."""
    if not enabled:
        return _Off()
    out = file if file is not None else sys.stderr
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=out, leave=False)
    return LineProgress(total, desc, unit, every=every, file=out)
