"""Library warnings that tell the user nothing they can act on, filtered in one place.

Every stage command installs this (zhllama.errors.cli_entry), so a `make` log shows only warnings that matter.
Each filter names the exact message, the library that prints it and why it is noise here; everything else still
shows. A warning that points to a real problem is fixed where it is caused, not listed here (peft's
`ensure_weight_tying`: zhllama.models.lora_tying passes it).

Public API:
    install()      add the filters (idempotent); off a terminal also turns off the library progress bars that a log
                   only shows as carriage-return noise (model loading, shard writing)
    NOISE          [(category, message regex, library, why)]
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

NOISE = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", "peft 0.21 via transformers 5",
     "peft reads the attribute that transformers renamed; nothing in our code or the user's settings uses it"),
    (UserWarning, r"Setting `save_embedding_layers` to `True` as (embedding layers found|the embedding layer has "
                  r"been resized)", "peft",
     "peft's own 'auto' choice: the trained (or [PAD]-resized) embedding rows are meant to be saved with the adapter"),
    (UserWarning, r"flex_attention called without torch\.compile\(\)", "torch",
     "the CPU reference path of packed attention is eager on purpose (FlexAttention has no compiled CPU backward); "
     "on CUDA sft.packing compiles it"),
]

# logging records (not warnings.warn) of the same kind: logger name -> message prefixes
NOISE_LOGS = {
    # DeepSpeed finds no GPU on a CPU machine and says so on every import (accelerate imports it when installed)
    "DeepSpeed": ("Setting accelerator to CPU",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    for category, message, _lib, _why in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in NOISE_LOGS.items():
        # a filter on the logger itself: DeepSpeed sets its own level and handler when imported, but keeps filters
        logging.getLogger(name).addFilter(_DropPrefixes(prefixes))
    isatty = getattr(sys.stderr, "isatty", None)
    if not (isatty and isatty()):
        # read by huggingface_hub (and through it transformers) when first imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
