"""zhllama.build_log: a long quiet command shows a line per interval with its latest progress line; its whole
output is in the log; its exit code is kept and a failure shows the log's tail."""
from __future__ import annotations

import io
import re
import sys

from zhllama.build_log import run

SCRIPT = """
import sys, time
print("-- Configuring done", flush=True)
for i in range(1, 5):
    print(f"[{i}/4] /usr/bin/g++ -DGGML_BUILD -O3 -o ggml/src/CMakeFiles/part{i}.cpp.o -c src/part{i}.cpp", flush=True)
    time.sleep(0.4)
print("Successfully installed llama-cpp-python-0.3.36", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_progress_lines_log_and_exit_code(tmp_path):
    out = io.StringIO()
    log = tmp_path / "logs" / "build.log"
    assert run([sys.executable, "-c", SCRIPT, "0"], log, every=0.5, label="llama-cpp-python", out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"[llama-cpp-python] started, full output in {log}: ")
    beats = [ln for ln in lines[1:] if "part" in ln]
    assert len(beats) >= 2                           # ~1.6 s of building at one line per 0.5 s
    assert all(re.fullmatch(r"\[llama-cpp-python\] \ds: \[\d/4\] part\d\.cpp\.o", ln) for ln in beats), beats
    assert "[llama-cpp-python] Successfully installed llama-cpp-python-0.3.36" in lines
    assert lines[-1].startswith("[llama-cpp-python] done in ")
    assert log.read_text().splitlines() == ["-- Configuring done"] + [
        f"[{i}/4] /usr/bin/g++ -DGGML_BUILD -O3 -o ggml/src/CMakeFiles/part{i}.cpp.o -c src/part{i}.cpp"
        for i in range(1, 5)] + [
        "Successfully installed llama-cpp-python-0.3.36"]


def test_failure_keeps_exit_code_and_prints_the_tail(tmp_path):
    out = io.StringIO()
    assert run([sys.executable, "-c", SCRIPT, "3"], tmp_path / "b.log", every=60, label="b", out=out) == 3
    text = out.getvalue()
    assert "[b] failed (exit 3)" in text and "  [4/4] /usr/bin/g++ -DGGML_BUILD -O3 -o ggml/src/" in text
    assert run([str(tmp_path / "missing")], tmp_path / "c.log", every=60, label="c", out=out) == 127
