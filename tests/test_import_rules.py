"""The layering rules, checked on the source: stages use `zhllama` and each other's public names only.

* no module imports an underscore name (or an underscore module) of another top-level package;
* sft/ never imports pretrain/ (what both need lives in zhllama/);
* zhllama/ imports no stage (it is the layer every stage builds on), zhllama/chat/ included;
* nothing outside sft/ imports sft.template (the chat layer is zhllama.chat; issue 24);
* no import cycle between modules: an import anywhere in a module, a function-level one too, is an edge
  (a lazy import hides a cycle from the interpreter, not from the reader).
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


# modules scanned besides the shipped packages: they import the packages too
EXTRA_DIRS = ("bench", "tests")
# cycles known and accepted, each an exact set of modules with the reason (none today)
KNOWN_CYCLES: list[set[str]] = []


def module_files(root: Path, dirs) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level folders (a package is its __init__)."""
    out = {}
    for d in dirs:
        for path in sorted((root / d).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported_names(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the file, wherever it is; `from a import b` gives a.b (a module b
    of a, or a name of a), relative imports resolved against `module`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the repository modules it imports (a name resolves to its longest known module prefix)."""
    graph = {}
    for m, path in mods.items():
        edges = set()
        for _, name in imported_names(path, m):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != m:
                edges.add(name)
        graph[m] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan), each a set of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_repository_keeps_the_import_rules():
    pkgs = packages(ROOT)
    assert {"zhllama", "vocab", "pretrain", "sft", "corpora"} <= set(pkgs)
    assert violations(ROOT, pkgs) == []


def sft_template_imports(root: Path, dirs) -> list[str]:
    """Imports of sft.template (or a name in it) by a module outside sft/."""
    return [f"{path.relative_to(root)}:{line}: imports {name}"
            for m, path in module_files(root, dirs).items() if m != "sft" and not m.startswith("sft.")
            for line, name in imported_names(path, m) if name == "sft.template" or name.startswith("sft.template.")]


def test_nothing_outside_sft_imports_sft_template():
    dirs = sorted({p.split(".")[0] for p in packages(ROOT)} | set(EXTRA_DIRS))
    assert sft_template_imports(ROOT, dirs) == []


def test_no_import_cycle_between_modules():
    dirs = sorted({p.split(".")[0] for p in packages(ROOT)} | {"bench"})
    found = [c for c in cycles(import_graph(module_files(ROOT, dirs))) if c not in KNOWN_CYCLES]
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_cycle_and_template_checks_catch_what_they_are_for(tmp_path):
    for pkg, files in {"zhllama": {"a.py": "from zhllama.b import x\n",
                                   "b.py": "def f():\n    from zhllama import a\n",   # lazy: still a cycle
                                   "c.py": "from . import a\n", "d.py": "import zhllama.c\n"},
                       "sft": {"template.py": "", "data.py": "from sft.template import get\n"},
                       "deploy": {"x.py": "from sft import template\n", "y.py": "from sft.template import get\n"}}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    mods = module_files(tmp_path, ["zhllama", "sft", "deploy"])
    graph = import_graph(mods)
    assert graph["zhllama.c"] == {"zhllama.a"} and graph["zhllama.d"] == {"zhllama.c"}
    assert cycles(graph) == [{"zhllama.a", "zhllama.b"}]
    assert sft_template_imports(tmp_path, ["zhllama", "sft", "deploy"]) == [
        "deploy/x.py:1: imports sft.template", "deploy/y.py:1: imports sft.template.get"]


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
