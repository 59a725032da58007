"""Run a long command whose output is noise (a from-source build) and show, once a minute, that it is alive.

The command's whole output goes to a log file. Every --every seconds one line says how long it has run and its
latest progress line (ninja's "[12/200] Building CXX object ..."), so a CI log is never silent for half an hour.
Lines that say what happened (pip's "Successfully installed", errors) are passed through. On failure the log's
last lines are printed; the command's exit code is returned.

    python -m zhllama.build_log --log FILE [--every 60] [--label TEXT] -- COMMAND [ARG ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from zhllama.progress import format_duration

PROGRESS = re.compile(r"^\s*\[\d+/\d+\]")                 # ninja, cmake --build
PASS = re.compile(r"^(Successfully (installed|built)|ERROR|error:|CMake Error|ninja: build stopped)")
TAIL = 40


def _short(line: str) -> str:
    """ninja's "[12/140] /usr/bin/g++ ... -o path/x.cpp.o -c ..." (verbose builds) as "[12/140] x.cpp.o"."""
    step, rest = line.split("]", 1)
    target = re.search(r"\s-o\s+(\S+)", rest)
    return f"{step.strip()}] {Path(target.group(1)).name if target else rest.strip()}"


def run(cmd: list[str], log: Path, every: float, label: str, out=sys.stdout) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    latest = {"progress": "", "line": ""}
    tail: deque[str] = deque(maxlen=TAIL)
    t0 = time.monotonic()
    shown = shlex.join(cmd).replace("\n", "\\n")
    print(f"[{label}] started, full output in {log}: {shown[:300]}", file=out, flush=True)
    with open(log, "w", encoding="utf-8") as f:
        try:
            # a Python child (pip) writing to a pipe would hold its lines back in 8 KB blocks
            # its own process group: stopping the build stops pip's compiler grandchildren too
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace", bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                    start_new_session=True)
        except OSError as e:
            print(f"[{label}] error: cannot run {cmd[0]}: {e.strerror or e}", file=out, flush=True)
            return 127

        def read():
            for line in proc.stdout:
                f.write(line)
                s = line.strip()
                if not s:
                    continue
                tail.append(line.rstrip("\n"))
                latest["line"] = s
                if PROGRESS.match(s):
                    latest["progress"] = _short(s)
                if PASS.match(s):
                    print(f"[{label}] {s}", file=out, flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while True:
                reader.join(timeout=every)
                if not reader.is_alive():
                    break
                now = latest["progress"] or latest["line"] or "no output yet"
                print(f"[{label}] {format_duration(time.monotonic() - t0)}: {now[:160]}", file=out, flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait()
            print(f"[{label}] stopped after {format_duration(time.monotonic() - t0)}; output so far in {log}",
                  file=out, flush=True)
            return 130
    took = format_duration(time.monotonic() - t0)
    if rc:
        print(f"[{label}] failed (exit {rc}) after {took}; the last {len(tail)} lines of {log}:", file=out)
        for line in tail:
            print(f"  {line}", file=out)
        out.flush()
    else:
        print(f"[{label}] done in {took}", file=out, flush=True)
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: python -m zhllama.build_log --log FILE [--every S] [--label TEXT] -- COMMAND ...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m zhllama.build_log")
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--every", type=float, default=60.0)
    p.add_argument("--label", default="build")
    a = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        print("error: no command after --", file=sys.stderr)
        return 2
    # make or CI stopping this process stops the build too (an orphaned compiler would go on for minutes)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    return run(cmd, a.log, a.every, a.label)


if __name__ == "__main__":
    sys.exit(main())
