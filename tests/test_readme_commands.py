"""The documented commands are the ones that exist: every `python -m ...` line of README.md and docs/*.md (and `accelerate launch ... -m ...`)
runs with --help, and every flag it uses is in that help; `make help` names every target and variable."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def readme_commands() -> dict[tuple[str, str], set[str]]:
    """(module, subcommand) -> the flags the README passes to it, over every mention."""
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    text = "\n".join(d.read_text(encoding="utf-8") for d in docs).replace("\\\n", " ")
    found: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        for m in re.finditer(r"(?:python -m|accelerate launch [^`]*?-m) ([a-z_][a-z0-9_.]*)((?: [a-z][a-z0-9-]*)?)([^`|#]*)", line):
            key = (m.group(1), m.group(2).strip())
            found.setdefault(key, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", m.group(3)))
    return found


COMMANDS = readme_commands()


def test_readme_has_the_stage_commands():
    mods = {m for m, _ in COMMANDS}
    assert {"vocab", "pretrain", "sft", "corpora"} <= mods
    assert ("sft", "train") in COMMANDS and ("pretrain", "phase1") in COMMANDS


@pytest.mark.parametrize("module,sub", sorted(COMMANDS), ids=lambda x: x or "-")
def test_readme_command_exists(module, sub):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", module] + ([sub] if sub else []) + ["--help"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd[1:])}: {r.stderr[-800:]}"
    missing = sorted(f for f in COMMANDS[(module, sub)] - {"--help"} if not re.search(re.escape(f) + r"\b", r.stdout))
    assert missing == [], f"README passes {missing} to python -m {module} {sub}, which has no such flag"


def test_make_help_lists_every_target_and_variable():
    mk = (ROOT / "Makefile").read_text(encoding="utf-8")
    phony = set()
    for m in re.finditer(r"^\.PHONY:(.*)$", mk, re.M):
        phony.update(m.group(1).split())
    phony.discard("FORCE")
    variables = set(re.findall(r"^([A-Z_]+) \?=", mk, re.M))
    r = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert phony and variables
    assert sorted(t for t in phony if not re.search(rf"make {re.escape(t)}\b", r.stdout)) == []
    assert sorted(v for v in variables if f"{v}=" not in r.stdout) == []
