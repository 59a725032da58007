"""Result files of the evaluation stage: atomic JSON that says what produced it (zhllama's manifest fields)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from zhllama.manifest import library_versions, write_json


def inputs_of(texts, model_dirs) -> dict:
    """Paths of what was evaluated; model folders are large, so their config hash stands for them."""
    from zhllama.hashing import sha256_file

    out = {}
    for p in model_dirs:
        cfg = Path(p) / "config.json"
        if not cfg.is_file():
            cfg = Path(p) / "adapter_config.json"
        out[str(p)] = {"path": str(p), "sha256": sha256_file(cfg) if cfg.is_file() else None}
    for t in texts:
        out[str(t)] = {"path": str(t)}
    return out


def write_result(path, stage: str, obj: dict, config: dict, inputs: dict) -> None:
    obj = dict(obj)
    obj["manifest"] = {"stage": stage, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "command": " ".join(sys.argv), "config": config, "inputs": inputs,
                       "versions": library_versions()}
    write_json(Path(path), obj)
