"""No stage writes into what it reads: an output path equal to, inside, or holding one of its inputs is refused.

Public API:
    refuse_overlap(outputs, inputs)     outputs/inputs: {"--flag": path | [paths] | None}; UserError (one line,
                                        naming both flags and paths) when an output is an input, lies inside one,
                                        or is a folder that holds one. Paths are compared after resolving symlinks,
                                        so an alias of the input is caught too.
"""
from __future__ import annotations

from pathlib import Path

from zhllama.errors import UserError


def _paths(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [Path(v) for v in value if v is not None]
    return [Path(value)]


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def refuse_overlap(outputs: dict, inputs: dict) -> None:
    for oflag, ovalue in outputs.items():
        for out in _paths(ovalue):
            o = out.resolve()
            for iflag, ivalue in inputs.items():
                for inp in _paths(ivalue):
                    i = inp.resolve()
                    if o == i:
                        raise UserError(f"{oflag} {out} is the input {iflag} {inp}: a stage never writes over its "
                                        f"inputs; choose another {oflag}")
                    if _within(o, i):
                        raise UserError(f"{oflag} {out} is inside the input {iflag} {inp}: a stage never writes "
                                        f"into its inputs; choose an {oflag} outside it")
                    if _within(i, o) and not (o.exists() and o.is_file()):
                        raise UserError(f"{oflag} {out} holds the input {iflag} {inp}: writing there could replace "
                                        f"it; choose an {oflag} that does not contain the inputs")
