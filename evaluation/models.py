"""Which model to evaluate, and loading it through the SFT stage's loaders.

Syntax (one for every command): `--model DIR` names a model folder (a full model, or an adapter folder
whose recorded base is a folder, as `sft generate` accepts); `--adapter A` after a `--model` applies the
PEFT adapter A on that model, repeatable, in the order given (`--model phase1 --adapter phase2
--adapter sft_adapter`); `--label NAME` after a `--model` names it in tables and JSON. The tokenizer
is the last adapter's when it has one, else the model folder's: every model is scored with its own.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class ModelSpec:
    path: str
    adapters: list[str] = field(default_factory=list)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or "+".join([self.path, *self.adapters])


class _NewModel(argparse.Action):
    def __call__(self, parser, ns, value, option_string=None):
        specs = list(getattr(ns, self.dest, None) or [])
        specs.append(ModelSpec(value))
        setattr(ns, self.dest, specs)


class _OnLastModel(argparse.Action):
    """--adapter / --label: attach to the --model given just before."""

    def __call__(self, parser, ns, value, option_string=None):
        specs = getattr(ns, "models", None)
        if not specs:
            parser.error(f"{option_string} {value}: give --model first; {option_string} applies to the --model before it")
        if self.dest == "adapters":
            specs[-1].adapters.append(value)
        else:
            specs[-1].label = value


def add_model_args(p: argparse.ArgumentParser, many: bool) -> None:
    what = "model folder; repeat to compare models" if many else "model folder"
    p.add_argument("--model", dest="models", action=_NewModel, required=True, metavar="DIR",
                   help=f"{what} (a full model, or an adapter folder whose recorded base exists)")
    p.add_argument("--adapter", dest="adapters", action=_OnLastModel, metavar="DIR", default=argparse.SUPPRESS,
                   help="PEFT adapter applied on the --model before it; repeat for a chain, applied in order")
    p.add_argument("--label", dest="label", action=_OnLastModel, metavar="NAME", default=argparse.SUPPRESS,
                   help="name of the --model before it in tables and JSON (default: its paths joined by '+')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _tokenizer_dir(spec: ModelSpec) -> Path:
    for d in reversed([Path(a) for a in spec.adapters]):
        if any((d / f).is_file() for f in TOKENIZER_FILES):
            return d
    return Path(spec.path)


def load(spec: ModelSpec, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode on `device`, tokenizer, template name recorded with the model)."""
    import torch

    from sft.generate import load as load_folder
    from zhllama.chat import load_name

    if not spec.adapters:
        model, tok, template = load_folder(spec.path, dtype=dtype)
    else:
        from zhllama.models import check_sizes, load_adapter_chain, load_tokenizer

        for p in [spec.path, *spec.adapters]:
            if not Path(p).is_dir():
                raise UserError(f"{p}: no such model/adapter folder")
        for a in spec.adapters:
            if not (Path(a) / "adapter_config.json").is_file():
                raise UserError(f"{a}: not a PEFT adapter folder (no adapter_config.json)")
        tdir = _tokenizer_dir(spec)
        if not any((tdir / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{tdir}: no tokenizer (tokenizer.json) in the model folder or its adapters")
        tok = load_tokenizer(tdir)
        # the adapters' lineage records: order, gaps, duplicates and the base's weights are checked; merged, as
        # evaluation only runs plain forward passes
        model, _ = load_adapter_chain(spec.path, spec.adapters, dtype=getattr(torch, dtype),
                                      log=lambda m: print(m, file=sys.stderr), merge=True)
        check_sizes(model, spec.name, len(tok), tdir)
        template = load_name(spec.adapters[-1])
    if tok.bos_token_id is None:
        raise UserError(f"{spec.name}: the tokenizer has no BOS token; evaluation scores documents after BOS")
    model.to(device)
    model.eval()
    return model, tok, template


def context_of(model, requested: int | None) -> int:
    n = getattr(model.config, "max_position_embeddings", None) or 2048
    if requested is None:
        return n
    if requested < 2:
        raise UserError(f"--context {requested}: must be at least 2 tokens")
    if requested > n:
        raise UserError(f"--context {requested}: more than the model's max_position_embeddings {n}")
    return requested
