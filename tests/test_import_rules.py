"""The layering rules, checked on the source: stages use `zhllama` and each other's public names only.

* no module imports an underscore name (or an underscore module) of another top-level package;
* sft/ never imports pretrain/ (what both need lives in zhllama/);
* zhllama/ imports no stage (it is the layer every stage builds on).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

# stages that must not depend on another stage at all
FORBIDDEN = {"sft": {"pretrain"}, "zhllama": {"vocab", "pretrain", "sft", "corpora", "evaluation", "deploy"}}


def packages(root: Path) -> list[str]:
    """The packages pyproject.toml ships: every stage, zhllama, and whatever later stages add."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r"^packages\s*=\s*\[([^\]]*)\]", text, re.M)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def violations(root: Path, pkgs: list[str]) -> list[str]:
    out = []
    top = {p.split(".")[0] for p in pkgs}
    for pkg in sorted(top):
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            where = path.relative_to(root)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods, names = [node.module], [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    mods, names = [a.name for a in node.names], []
                else:
                    continue
                for mod in mods:
                    parts = mod.split(".")
                    other = parts[0]
                    if other not in top or other == pkg:
                        continue
                    if other in FORBIDDEN.get(pkg, ()):
                        out.append(f"{where}:{node.lineno}: {pkg}/ must not import {mod}")
                    private = [p for p in parts[1:] if p.startswith("_") and p != "__main__"]
                    private += [n for n in names if n.startswith("_")]
                    if private:
                        out.append(f"{where}:{node.lineno}: private name {', '.join(private)} of package {other}")
    return out


def test_repository_keeps_the_import_rules():
    pkgs = packages(ROOT)
    assert {"zhllama", "vocab", "pretrain", "sft", "corpora"} <= set(pkgs)
    assert violations(ROOT, pkgs) == []


def test_checker_catches_each_kind_of_violation(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools]\npackages = ["zhllama", "vocab", "pretrain", "sft"]\n')
    for pkg in ("zhllama", "vocab", "pretrain", "sft"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "sft" / "ok.py").write_text("from vocab.merge import append_pad\nfrom sft._own import _x\nimport zhllama.trainer\n")
    (tmp_path / "sft" / "bad.py").write_text(
        "def f():\n    from vocab.merge import PAD, _append_pad\n    import pretrain.cli\n")
    (tmp_path / "vocab" / "bad.py").write_text("from pretrain._internal import thing\n")
    (tmp_path / "zhllama" / "bad.py").write_text("from sft.data import Collator\n")
    got = violations(tmp_path, packages(tmp_path))
    assert got == [
        "sft/bad.py:2: private name _append_pad of package vocab",
        "sft/bad.py:3: sft/ must not import pretrain.cli",
        "vocab/bad.py:1: private name _internal of package pretrain",
        "zhllama/bad.py:1: zhllama/ must not import sft.data",
    ]
