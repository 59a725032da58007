"""Is another process (the owner of a lock, a claim or a temp file) still there? Linux /proc where it matters.

Public API:
    pid_alive(pid) -> bool              a process with this pid exists (a zombie counts: see is_zombie)
    process_start(pid) -> str | None    the kernel's start time of the process, so a reused pid is not taken for
                                        the one that wrote a claim
    is_zombie(pid) -> bool              a killed process nobody reaped (containers with no init reaping orphans)
"""
from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_field(pid: int, index: int) -> str | None:
    # fields after the command name, which is in parentheses and may hold spaces
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index]
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    return _stat_field(pid, 19)


def is_zombie(pid: int) -> bool:
    return _stat_field(pid, 0) == "Z"
