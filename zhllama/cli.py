"""The recipe part of every stage's command line: --recipe, --config, --set section.key=value and one flag per field.

Flags are generated from the recipe's dataclass fields (help text = the field's doc), so README, --help and the
recipe cannot disagree. Everything is checked before any weights load, and every problem is reported at once,
one line each (UserError -> exit 2).

Public API:
    add_recipe_args(parser, sections, recipe_help=None)
        sections: [("pretrain.phase1", PhaseConfig), ("pretrain", PretrainConfig), ...]; adds --recipe, --config,
        --set and --field-name for every field of each section (dest "recipe:<section>.<field>")
    resolve_recipe(args, model_dir=None, lora_sections=(), extra=None, default=None) -> Recipe
        recipe (--recipe, else `default`, else the one whose model: shape matches --model's config.json, else refuse)
        <- --config YAML <- --set <- flags; validated; with model_dir also the shape agreement and the
        LoRA target / modules_to_save names of each section in lora_sections against the model's modules;
        extra(recipe) -> [problem, ...] adds a stage's own checks (e.g. sft's template registry)
    overrides_from_flags(args) -> {"section.field": value}
    model_config(model_dir) -> dict | None         config.json of a model folder
    module_names(model_dir) -> set[str]            last name component of every module: known for the LLaMA layout
                                                   (llama, mistral, qwen2) without torch, else built on the meta device
    built_module_names(model_dir) -> set[str]      the same, always built on the meta device
    pick_recipe(model_dir) -> Recipe               the shipped recipe matching the model's shape, or UserError
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from zhllama.errors import UserError
from zhllama.recipe import (
    SHAPE_FIELDS, Recipe, apply_overrides, load_recipe, parse_value, problems, recipe_names, set_path,
    shape_differences,
)

PREFIX = "recipe:"


def add_recipe_args(parser: argparse.ArgumentParser, sections, recipe_help: str | None = None) -> None:
    parser.add_argument("--recipe", metavar="NAME|PATH", help=recipe_help or (
        "recipe name under recipes/ or a .yaml path (default: the recipe whose model: shape matches --model; "
        "refused when none or several match)"))
    parser.add_argument("--config", metavar="YAML", help="YAML file of overrides in the recipe's format")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any recipe field, e.g. --set sft.learning_rate=2e-4 or "
                             "--set pretrain.phase2.lora_targets=[q_proj,v_proj] (repeatable)")
    taken = {s for a in parser._actions for s in a.option_strings}
    g = parser.add_argument_group("recipe settings (each overrides the recipe's value; see recipes/*.yaml)")
    for path, cls in sections:
        for f in dataclasses.fields(cls):
            # nested sections (pretrain.phase1) are plain fields without a doc: they get their own flags by path
            if "doc" not in f.metadata or f.metadata["cli"] is False:
                continue
            if f.metadata["only"] and f.metadata["only"] != path.split(".")[-1]:
                continue
            flags = [f"--{f.name.replace('_', '-')}"] + ([f.metadata["flag"]] if f.metadata.get("flag") else [])
            flags = [x for x in flags if x not in taken]
            if not flags:
                continue
            taken.update(flags)
            t = f.type if isinstance(f.type, str) else f.type.__name__
            doc = f.metadata.get("doc", "")
            choices = f.metadata.get("choices")
            helptext = f"{doc} [{path}.{f.name}" + (f"; {'|'.join(map(str, choices))}" if choices else "") + "]"
            if t == "bool":
                g.add_argument(*flags, dest=PREFIX + f"{path}.{f.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=helptext)
            else:
                g.add_argument(*flags, dest=PREFIX + f"{path}.{f.name}", default=None,
                               metavar="A,B" if t == "list" else t.upper(), help=helptext)


def overrides_from_flags(args) -> dict:
    return {k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX) and v is not None}


def model_config(model_dir) -> dict | None:
    from zhllama.modelfiles import read_config

    if not (Path(model_dir) / "config.json").is_file():
        return None
    return read_config(model_dir)  # a config.json that is not a JSON object of sane sizes is named here


# Module names of the architectures whose layout is the LLaMA decoder (embed_tokens, layers of self_attn q/k/v/o_proj +
# mlp gate/up/down_proj, norm, lm_head). Known names spare every CLI check the ~5 s import of torch + transformers;
# tests/test_cli_modules.py pins them against a model built on the meta device.
LLAMA_LAYOUT = frozenset({
    "model", "embed_tokens", "layers", "self_attn", "q_proj", "k_proj", "v_proj", "o_proj", "rotary_emb", "mlp",
    "gate_proj", "up_proj", "down_proj", "act_fn", "input_layernorm", "post_attention_layernorm", "norm", "lm_head",
})
KNOWN_MODULES = {"llama": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT}


def module_names(model_dir) -> set[str]:
    """Names the model's modules answer to (q_proj, embed_tokens, ...), from config.json alone.

    Known model types (KNOWN_MODULES) are answered without importing torch; any other is built on the meta device.
    Layer indices ("0", "1", ...) are left out: they are not names a LoRA target or modules_to_save can mean."""
    cfg = model_config(model_dir)
    known = KNOWN_MODULES.get((cfg or {}).get("model_type"))
    if known is not None and "text_config" not in cfg:
        return set(known)
    return built_module_names(model_dir)


def built_module_names(model_dir) -> set[str]:
    """module_names by building the model of config.json on the meta device (one layer: every layer is alike)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(model_dir))
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text, "num_hidden_layers", None):
            text.num_hidden_layers = 1
            if getattr(text, "layer_types", None):
                text.layer_types = text.layer_types[:1]
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{model_dir}/config.json: cannot build the model it describes ({str(e).splitlines()[0]})") from None
    return {n for n in (name.split(".")[-1] for name, _ in model.named_modules() if name) if not n.isdigit()}


def _shape(cfg: dict) -> str:
    return ", ".join(f"{k} {cfg.get(k)}" for k in SHAPE_FIELDS if k in cfg)


def pick_recipe(model_dir) -> Recipe:
    cfg = model_config(model_dir)
    if cfg is None:
        raise UserError(f"--model {model_dir}: no config.json to choose a recipe by; pass --recipe NAME|PATH "
                        f"(known: {', '.join(recipe_names())})")
    recipes = [load_recipe(n, check=False) for n in recipe_names()]
    match = [r for r in recipes if not shape_differences(r.model, cfg)]
    if len(match) == 1:
        print(f"recipe: {match[0].name} (its model: section matches {model_dir}/config.json)", file=sys.stderr)
        return match[0]
    listing = "; ".join(f"{r.name} ({', '.join(f'{k} {getattr(r.model, k)}' for k in SHAPE_FIELDS)})" for r in recipes)
    what = "several recipes match" if match else "no recipe matches"
    raise UserError(f"--model {model_dir} ({_shape(cfg)}): {what} its shape; pass --recipe NAME|PATH. Recipes: {listing}")


def resolve_recipe(args, model_dir=None, lora_sections=(), extra=None, default: Recipe | None = None) -> Recipe:
    import yaml

    name = getattr(args, "recipe", None)
    if name:
        recipe = load_recipe(name, check=False)
    elif default is not None:
        recipe = default
    elif model_dir is None:
        raise UserError(f"--recipe NAME|PATH is required (known: {', '.join(recipe_names())})")
    else:
        recipe = pick_recipe(model_dir)
    found: list[str] = []
    cfg_yaml = getattr(args, "config", None)
    if cfg_yaml:
        path = Path(cfg_yaml)
        if not path.is_file():
            found.append(f"--config {path}: no such file")
        else:
            try:
                apply_overrides(recipe, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path), found)
            except yaml.YAMLError as e:
                found.append(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    for item in getattr(args, "sets", None) or []:
        if "=" not in item:
            found.append(f"--set takes SECTION.KEY=VALUE, got {item!r}")
            continue
        key, value = item.split("=", 1)
        set_path(recipe, key, parse_value(value), found)
    for key, value in overrides_from_flags(args).items():
        flag = "--" + key.split(".")[-1].replace("_", "-")
        before = len(found)
        set_path(recipe, key, value, found)
        found[before:] = [f.replace("--set", flag, 1) for f in found[before:]]
    found += problems(recipe)
    if extra is not None:
        found += extra(recipe)
    if model_dir is not None:
        found += model_problems(recipe, model_dir, lora_sections)
    if found:
        raise UserError("\n".join(dict.fromkeys(found)))
    return recipe


def model_problems(recipe: Recipe, model_dir, lora_sections=()) -> list[str]:
    cfg = model_config(model_dir)
    if cfg is None:
        return []  # the stage reports a folder that is not a model in its own words
    out = []
    diff = shape_differences(recipe.model, cfg)
    if diff and recipe.model.check:
        others = [n for n in recipe_names() if not shape_differences(load_recipe(n, check=False).model, cfg)]
        hint = f" (--recipe {others[0]} matches it)" if len(others) == 1 else ""
        out.append(f"--model {model_dir} is not the shape recipe {recipe.name} is for: {'; '.join(diff)}; pass the "
                   f"recipe for this model{hint}, or --set model.check=false if you mean it")
    if lora_sections:
        names = module_names(model_dir)
        for sec in lora_sections:
            obj = recipe
            for part in sec.split("."):
                obj = getattr(obj, part)
            for fld in ("lora_targets", "modules_to_save"):
                bad = [t for t in getattr(obj, fld) if t not in names]
                if bad:
                    linear = sorted(n for n in names if n.endswith("_proj") or n in ("embed_tokens", "lm_head"))
                    out.append(f"{sec}.{fld}: {', '.join(map(repr, bad))} {'is' if len(bad) == 1 else 'are'} not a "
                               f"module of {model_dir} (it has {', '.join(linear)})")
    return out
