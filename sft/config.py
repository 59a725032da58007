"""SFT settings: the recipe's typed `sft:` section (zhllama.recipe.SFTConfig), with the SFT stage's own checks.

Public API:
    SFTConfig, ALL_PROJ                     re-exported from zhllama.recipe
    sft_config(section=None, overrides=None, where="recipe sft") -> SFTConfig
        a copy of the section (default: SFTConfig()) with {field: value} overrides, validated (UserError
        listing every problem); the template must be in zhllama.chat's registry
    to_dict(cfg) -> dict
"""
from __future__ import annotations

import copy
import dataclasses

from zhllama.errors import UserError
from zhllama.recipe import ALL_PROJ, SFTConfig, apply_overrides, problems

__all__ = ["ALL_PROJ", "SFTConfig", "sft_config", "template_problems", "to_dict"]


def template_problems(c: SFTConfig, where: str = "sft") -> list[str]:
    from zhllama.chat import REGISTRY

    if c.template not in REGISTRY:
        return [f"{where}.template: {c.template!r} is not one of {', '.join(REGISTRY)}"]
    return []


def sft_config(section: SFTConfig | dict | None = None, overrides: dict | None = None, where: str = "recipe sft") -> SFTConfig:
    cfg = copy.deepcopy(section) if isinstance(section, SFTConfig) else SFTConfig()
    found: list[str] = []
    if isinstance(section, dict):
        apply_overrides(cfg, section, where, found)
    apply_overrides(cfg, overrides or {}, "override", found)
    found += [f"sft.{p}" for p in problems(cfg)] + template_problems(cfg)
    if found:
        raise UserError("\n".join(f"{where}: {p}" if not p.startswith(where) else p for p in found))
    return cfg


def to_dict(c: SFTConfig) -> dict:
    return dataclasses.asdict(c)
