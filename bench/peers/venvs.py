"""The peers' own virtual environments, built on first use under a cache folder (default .cache/zhllama/bench-venvs).

Each peer gets its own venv because their pins clash with zhllama's (LLaMA-Factory 0.9.5 wants
transformers <= 5.6, peft <= 0.18, trl <= 0.24). torch is installed first and pinned with a constraint in
every later pip call: anything that asks for another torch would otherwise pull a 5.5 GB CUDA build.
A venv is reused while its `zhllama-venv.json` records the same packages; delete the folder to rebuild.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"

SPECS = {
    "trl": ["trl==1.16.0", "transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0",
            "sentencepiece==0.2.3", "protobuf==7.36.2"],
    "llamafactory": ["llamafactory==0.9.5"],
}


def _fix_llamafactory(venv: Path) -> None:
    # LLaMA-Factory requires torchvision and torchaudio; PyPI's builds of them do not load with the CPU torch
    # 2.13 ("operator torchvision::nms does not exist", torchaudio's .so fails to link). Text SFT never uses
    # them: transformers works without torchvision, and torchaudio imports as pure Python without its
    # compiled extension (it checks for the file).
    subprocess.run([str(_python(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False,
                   capture_output=True)
    for so in venv.glob("lib/python*/site-packages/torchaudio/lib/*.so"):
        so.unlink()


FIXES = {"llamafactory": _fix_llamafactory}


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(name: str, cache: Path, log=print) -> Path:
    """The peer's python, installing its venv first if needed (needs PyPI once; ~1-2 minutes)."""
    venv = Path(cache) / name
    marker = venv / "zhllama-venv.json"
    want = {"torch": TORCH, "packages": SPECS[name]}
    if marker.is_file() and json.loads(marker.read_text()) == want and _python(venv).exists():
        return _python(venv)
    log(f"installing {name} into its own venv {venv} (first use; needs PyPI) ...")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip_log = venv.parent / f"{name}-install.log"
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)],
             [str(_python(venv)), "-m", "pip", "install", "-q", TORCH]]
    constraint = venv.parent / "torch-constraint.txt"
    constraint.write_text(TORCH + "\n")
    steps.append([str(_python(venv)), "-m", "pip", "install", "-q", *SPECS[name], "-c", str(constraint)])
    with open(pip_log, "w") as f:
        for cmd in steps:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
            if r.returncode:
                raise SystemExit(f"installing {name} failed at: {' '.join(cmd)}\nsee {pip_log}")
    if name in FIXES:
        FIXES[name](venv)
    marker.write_text(json.dumps(want, indent=2) + "\n")
    return _python(venv)
