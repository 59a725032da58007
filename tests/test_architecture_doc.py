"""docs/ARCHITECTURE.md matches the tree: every module of the core and of each stage's main-modules column
exists, and every module of the core is named (a new core module without a line in the map fails here)."""
from __future__ import annotations

import re

from conftest import ROOT

DOC = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
STAGES = ["corpora", "vocab", "pretrain", "sft", "evaluation", "deploy"]


def _core_section() -> str:
    return DOC[DOC.index("### The core, `zhllama/`"):DOC.index("## Data flow")]


def test_every_core_module_is_in_the_map():
    rows = [l.split("|")[1] for l in _core_section().splitlines() if l.startswith("| `")]
    named = {n for cell in rows for n in re.findall(r"`([a-z_]+(?:\.py|/))`", cell)}
    present = {p.name for p in (ROOT / "zhllama").glob("*.py") if p.name != "__init__.py"}
    present |= {p.name + "/" for p in (ROOT / "zhllama").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(present - named) == [], "core modules missing from docs/ARCHITECTURE.md"
    assert sorted(named - present) == [], "docs/ARCHITECTURE.md names core modules that do not exist"


def test_every_stage_module_named_in_the_map_exists():
    for line in DOC.splitlines():
        m = re.match(r"\| `(\w+)/` \|", line)
        if not m or m.group(1) not in STAGES:
            continue
        cells = line.split("|")
        for name in re.findall(r"`([a-z_]+)(\*?)`", cells[3]):
            stem, star = name
            pattern = f"{stem}*.py" if star else f"{stem}.py"
            assert list((ROOT / m.group(1)).glob(pattern)), f"docs/ARCHITECTURE.md: {m.group(1)}/{stem}{star} not found"
    assert all(f"| `{s}/` |" in DOC for s in STAGES)
