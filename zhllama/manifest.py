"""Self-describing output folders: what produced them, from which inputs, with which library versions.

Public API:
    write_manifest(out_dir, stage, config, inputs, parents=(), seed=None) -> dict   OUT/manifest.json
        {"stage", "created", "command", "config", "inputs", "parents", "seed", "versions"}; `parents` are the run
        folders (zhllama.runfolder.parent_entry) this one was made from, `inputs` the files with their hashes
    write_json(path, obj)        atomic (unique temporary file + rename)
    library_versions() -> dict
"""
from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

_LIBS = ("torch", "transformers", "tokenizers", "peft", "datasets", "accelerate", "sentencepiece", "protobuf", "jieba")


def library_versions() -> dict:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _LIBS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        out["zhllama"] = metadata.version("zhllama")
    except metadata.PackageNotFoundError:
        pass
    return out


def write_json(path: str | Path, obj) -> None:
    """Write JSON atomically so an interrupted run never leaves a half-written file (a unique temporary name:
    two writers of one file never share one; a full disk is a UserError naming the file)."""
    from zhllama.writes import atomic_file

    text = json.dumps(obj, ensure_ascii=False, indent=2) + "\n"
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_manifest(out_dir: str | Path, stage: str, config: dict, inputs: dict, parents=(), seed=None) -> dict:
    manifest = {
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": config,
        "inputs": inputs,
        "parents": list(parents),
        "seed": seed,
        "versions": library_versions(),
    }
    write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest
