"""Progress off a terminal: whole lines with done/total, rate and ETA, at most one per interval."""
from __future__ import annotations

import io

from zhllama.progress import LineProgress, format_duration, progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_line_every_interval_with_eta():
    out, clock = io.StringIO(), Clock()
    p = LineProgress(100, "eval phase2", unit="tok", every=30, file=out, clock=clock)
    clock.t = 10
    p.update(25)                      # 10 s < 30 s: nothing yet
    assert out.getvalue() == ""
    clock.t = 40
    p.update(25)                      # 50 tok in 40 s: 1.25 tok/s, 50 left -> 40 s
    assert out.getvalue() == "[eval phase2] 50/100 tok (50%), 1.2 tok/s, ETA 40s, 40s elapsed\n"
    clock.t = 50
    p.update(10)                      # 10 s after the last line: no line
    clock.t = 80
    p.update(40)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["[eval phase2] 100/100 tok (100%), 1.2 tok/s, 1m20s elapsed"] * 2


def test_quick_work_prints_nothing_and_disabled_prints_nothing():
    out, clock = io.StringIO(), Clock()
    with LineProgress(3, "answers", file=out, every=30, clock=clock) as p:
        p.update(3)
    assert out.getvalue() == ""
    off = progress(10, "x", enabled=False, file=out)
    off.update(10)
    off.close()
    assert out.getvalue() == ""


def test_not_a_terminal_gets_lines_not_a_bar():
    out = io.StringIO()              # isatty() is False
    p = progress(4, "choice", unit="q", every=0, file=out)
    assert isinstance(p, LineProgress)
    p.update(2)
    assert out.getvalue().startswith("[choice] 2/4 q (50%)") and "\r" not in out.getvalue()


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 7322)] == ["0s", "59s", "1m01s", "59m59s",
                                                                               "1h00m", "2h02m"]
