"""Adapter lineage: which weights an adapter was trained on, so that merges and loaders apply the right chain.

Every adapter zhllama trains (pretrain phase 2, SFT) writes ``lineage.json`` beside its weights:

    {"base": {"path": "/abs/phase1", "weights_sha256": "..."},          # the model folder it was trained on
     "parent_adapter": {"path": "/abs/phase2", "relpath": "../../pretrain/phase2",
                        "sha256": "..."} | null}                        # applied to the base before training

An adapter is trained on base + parent (merged), so its chain is its parent's chain followed by itself,
on its parent's base. ``derive_chain(adapter)`` follows the records and checks every hash;
``resolve_chain(base, adapters)`` checks an explicitly given base/adapter list against them and says which
chain it expected when they disagree (wrong order, gaps, duplicates, a foreign base of the same shape).
Adapters without a record (made elsewhere) are applied as given, marked unverified.

Public names (stable): LINEAGE_FILE, weights_sha256, adapter_sha256, record_lineage, read_lineage,
derive_chain, resolve_chain, Chain.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import UserError
from zhllama.hashing import sha256_file, sha256_files

LINEAGE_FILE = "lineage.json"
_WEIGHT_GLOBS = ("*.safetensors", "*.bin")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_cache: dict = {}


def _cached(key_files: list[Path], fn) -> str:
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in key_files)
    if key not in _cache:
        _cache[key] = fn()
    return _cache[key]


def weights_sha256(model_dir: str | Path) -> str:
    """One hash over a model folder's weight files (names and contents); safetensors preferred over .bin."""
    d = Path(model_dir)
    for pattern in _WEIGHT_GLOBS:
        files = sorted(p for p in d.glob(pattern) if not p.name.startswith("adapter_model"))
        if files:
            return _cached(files, lambda: sha256_files(files))
    raise UserError(f"{d}: no model weights (*.safetensors or *.bin) to identify it by")


def adapter_sha256(adapter_dir: str | Path) -> str:
    d = Path(adapter_dir)
    for name in _ADAPTER_FILES:
        if (d / name).is_file():
            return _cached([d / name], lambda: sha256_file(d / name))
    raise UserError(f"{d}: not an adapter folder (no adapter_model.safetensors or adapter_model.bin)")


def record_lineage(adapter_dir: str | Path, base_dir: str | Path, parent_adapter: str | Path | None = None,
                   final_dir: str | Path | None = None) -> dict:
    """Write ADAPTER/lineage.json: the base folder's weight hash and the parent adapter's hash (call after training).

    final_dir: where the adapter folder ends up when it is written in a staging folder first (relative paths
    are taken from there)."""
    from zhllama.manifest import write_json

    d = Path(adapter_dir)
    where = Path(final_dir) if final_dir is not None else d
    rec = {"base": {"path": str(Path(base_dir).resolve()), "weights_sha256": weights_sha256(base_dir)},
           "parent_adapter": None}
    if parent_adapter:
        p = Path(parent_adapter)
        rec["parent_adapter"] = {"path": str(p.resolve()), "relpath": os.path.relpath(p.resolve(), where.resolve()),
                                 "sha256": adapter_sha256(p)}
    write_json(d / LINEAGE_FILE, rec)
    return rec


def read_lineage(adapter_dir: str | Path) -> dict | None:
    p = Path(adapter_dir) / LINEAGE_FILE
    if not p.is_file():
        return None
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        rec["base"]["weights_sha256"], rec["base"]["path"]  # noqa: B018 - shape check
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p}: unreadable lineage record ({e}); retrain the adapter or delete the file to merge it unverified") from None
    return rec


@dataclass
class Chain:
    """Base folder + adapters in the order they must be applied."""
    base: Path | None
    base_sha256: str | None
    adapters: list[Path]
    adapter_sha256: list[str]
    verified: bool  # every adapter had a record and every hash matched
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        base = str(self.base) if self.base else "(base unknown)"
        return " -> ".join([base, *map(str, self.adapters)])

    def cli(self) -> str:
        return " ".join(([f"--base {self.base}"] if self.base else []) + [f"--adapter {a}" for a in self.adapters])

    def to_json(self) -> dict:
        return {"verified": self.verified, "base": {"path": str(self.base) if self.base else None,
                                                     "weights_sha256": self.base_sha256},
                "adapters": [{"path": str(a), "sha256": h} for a, h in zip(self.adapters, self.adapter_sha256)],
                "notes": self.notes}


def _find_parent(adapter: Path, parent: dict) -> Path:
    candidates = [adapter / parent["relpath"]] if parent.get("relpath") else []
    candidates.append(Path(parent["path"]))
    for c in candidates:
        try:
            if c.is_dir() and adapter_sha256(c) == parent["sha256"]:
                return c.resolve()
        except UserError:
            continue
    where = " or ".join(str(c) for c in candidates)
    raise UserError(
        f"{adapter} was trained on top of the adapter {parent['path']} (sha256 {parent['sha256'][:12]}), which is "
        f"missing or changed (looked at {where}); expected chain: base -> {parent['path']} -> {adapter}. "
        "Restore that adapter, or retrain"
    )


def derive_chain(adapter: str | Path) -> Chain:
    """The chain that ends with `adapter`, from the lineage records (parents first)."""
    cur = Path(adapter).resolve()
    adapters, hashes, records = [], [], []
    while True:
        if cur in adapters:
            raise UserError(f"{cur}: its lineage records form a cycle")
        rec = read_lineage(cur)
        adapters.insert(0, cur)
        hashes.insert(0, adapter_sha256(cur))
        records.insert(0, rec)
        if rec is None or not rec.get("parent_adapter"):
            break
        cur = _find_parent(cur, rec["parent_adapter"])
    if records[0] is None:
        notes = [f"{adapters[0]} has no {LINEAGE_FILE}: made outside zhllama or before lineage records; order not verified"]
        return Chain(None, None, adapters, hashes, verified=False, notes=notes)
    base = records[0]["base"]
    for a, rec in zip(adapters[1:], records[1:]):
        if rec["base"]["weights_sha256"] != base["weights_sha256"]:
            raise UserError(f"{a} was trained on {rec['base']['path']} but its parent {adapters[0]} on {base['path']} "
                            "(different weights): the records contradict each other; retrain it on the right base")
    return Chain(Path(base["path"]), base["weights_sha256"], adapters, hashes, verified=True)


def resolve_chain(base: str | Path | None, adapters: list[str | Path], log=print) -> Chain:
    """Check a base and adapters against the lineage records; one adapter alone brings its whole chain.

    Raises UserError naming the expected chain for: adapters out of order, a gap, the same adapter twice,
    a base whose weights are not the ones the chain was trained on (same shape or not).
    """
    if not adapters:
        raise UserError("give at least one --adapter")
    given = []
    for a in adapters:
        p = Path(a)
        if not (p / "adapter_config.json").is_file():
            raise UserError(f"{p}: not a PEFT adapter folder (no adapter_config.json)")
        given.append(p.resolve())
    given_sha = [adapter_sha256(p) for p in given]
    chains = [derive_chain(p) for p in given]
    expected = max(chains, key=lambda c: len(c.adapters))
    if len(set(given_sha)) < len(given_sha):
        dup = next(p for p, h in zip(given, given_sha) if given_sha.count(h) > 1)
        raise UserError(f"the same adapter is given twice ({dup}); expected chain: {expected.describe()}  "
                        f"(pass {expected.cli()}, or just --adapter {expected.adapters[-1]})")
    if len(given) == 1:
        chain = expected
        if len(chain.adapters) > 1:
            log(f"lineage: {given[0]} was trained on top of {', '.join(map(str, chain.adapters[:-1]))}; "
                f"applying the chain {chain.describe()}")
    elif all(c.verified for c in chains):
        if given_sha != expected.adapter_sha256:
            raise UserError(
                f"adapters given as {' -> '.join(map(str, given))} do not match their lineage records (order, gap "
                f"or an adapter from another run); expected chain: {expected.describe()}; pass {expected.cli()}, "
                f"or just --adapter {expected.adapters[-1]}")
        chain = expected
    else:
        # some adapters have no record: applied as given, but every recorded one must follow its recorded parents
        for i, c in enumerate(chains):
            if c.verified and given_sha[: i + 1][-len(c.adapters):] != c.adapter_sha256:
                raise UserError(f"{given[i]} must be applied right after "
                                f"{' -> '.join(map(str, c.adapters[:-1])) or 'its base'}; expected chain: {c.describe()}")
        first = chains[0]
        base_sha = first.base_sha256 if first.verified and len(first.adapters) == 1 else None
        notes = [n for c in chains for n in c.notes]
        chain = Chain(first.base if base_sha else None, base_sha, given, given_sha, verified=False, notes=notes)
    if base is not None:
        b = Path(base)
        if not (b / "config.json").is_file():
            raise UserError(f"{b}: not a Hugging Face model folder (no config.json)")
        if chain.base_sha256 is not None:
            got = weights_sha256(b)
            if got != chain.base_sha256:
                raise UserError(
                    f"--base {b}: its weights (sha256 {got[:12]}) are not the ones the adapters were trained on "
                    f"(sha256 {chain.base_sha256[:12]}, {chain.base}); expected chain: {chain.describe()}")
        chain.base = b.resolve()
    elif chain.base is None:
        raise UserError(f"{chain.adapters[-1]} has no lineage record naming its base model; pass --base MODEL_DIR")
    elif not (chain.base / "config.json").is_file() or weights_sha256(chain.base) != chain.base_sha256:
        raise UserError(f"the base model recorded for {chain.adapters[-1]}, {chain.base}, is missing or its weights "
                        f"changed (recorded sha256 {chain.base_sha256[:12]}); pass --base with the model it was trained on")
    for n in chain.notes:
        log(f"warning: {n}")
    return chain
