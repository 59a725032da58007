"""zhllama.units: the work units every parallel stage cuts its input into, and the lines of one range."""
from __future__ import annotations

import gzip

import pytest

from zhllama.errors import UserError
from zhllama.units import decode_lines, plan_units, range_lines


@pytest.fixture
def text(tmp_path):
    # CRLF, an empty line, a line longer than several units, no final newline
    lines = [f"第{i}行，一些中文。" for i in range(40)]
    lines[7] = "长" * 200
    lines[12] = ""
    data = ("\r\n".join(lines[:20]) + "\n" + "\n".join(lines[20:])).encode("utf-8")
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("cut", ["fixed", "line_end"])
def test_ranges_hold_every_line_once(text, cut):
    path, data = text
    whole = [raw for _, raw in range_lines(open(path, "rb"), 0, None)]
    assert b"".join(whole) == data
    for size in (1, 7, 64, data.index(b"\n") + 1, len(data) - 1):
        units = plan_units([path], size, cut=cut)
        assert units[0].start == 0 and units[-1].end == len(data) and [u.part for u in units] == list(range(len(units)))
        assert all(a.end == b.start for a, b in zip(units, units[1:]))
        got = []
        for u in units:
            with open(path, "rb") as f:
                got += [raw for _, raw in range_lines(f, u.start, u.end)]
        assert got == whole, (cut, size)
        if cut == "fixed":
            assert [u.start for u in units] == list(range(0, len(data), size))
        else:  # cuts at line ends: every range but the last ends with a newline
            assert all(data[u.end - 1:u.end] == b"\n" for u in units[:-1])
    # a file no larger than a unit, or not splittable, is one whole unit
    assert [(u.start, u.end) for u in plan_units([path], len(data), cut=cut)] == [(0, None)]
    assert [(u.start, u.end) for u in plan_units([path], 7, splittable=(".jsonl",), cut=cut)] == [(0, None)]


def test_fixed_cuts_inside_a_long_line_give_empty_ranges(text):
    path, data = text
    units = plan_units([path], 16)
    counts = [sum(1 for _ in decode_lines(path, "utf-8", u.start, u.end)) for u in units]
    assert 0 in counts and sum(counts) == data.count(b"\n") + 1


def test_decode_lines_offsets_and_strict_errors(tmp_path, text):
    path, data = text
    got = list(decode_lines(path, "utf-8", 0, None))
    assert [line for _, line in got] == data.decode().replace("\r\n", "\n").split("\n")
    assert all(data[pos:].startswith(line.encode()) for pos, line in got)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好\n坏".encode() + b"\xff\n")
    with pytest.raises(UserError, match=rf"^{bad}: byte offset 7: not valid utf-8\."):
        list(decode_lines(bad, "utf-8", 0, None))
    gz = tmp_path / "a.txt.gz"
    with gzip.open(gz, "wb") as f:
        f.write(data)
    with gzip.open(gz, "rb") as f:  # a whole .gz is read from its start, never sought
        assert b"".join(raw for _, raw in range_lines(f, 0, None)) == data
