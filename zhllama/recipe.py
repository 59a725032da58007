"""Recipes: one typed config for every stage, loaded from recipes/NAME.yaml (or a path), overridable field by field.

A recipe has one section per stage: `model` (the shape the recipe is for), `vocab`, `pretrain` (with `phase1` and
`phase2`), `sft`, `corpora` (`corpora prepare`). Every field is a dataclass field with a one-line doc and, where it
has one, its allowed range or choices (`setting(...)`), so the YAML files, the generated CLI flags (zhllama.cli)
and `--help` cannot disagree.
A later stage adds its section as a dataclass here and a field on `Recipe`.

Public API (stable; every stage uses it):
    load_recipe(name_or_path) -> Recipe              name = file stem under recipes/, or a .yaml path; validated
    recipe_path(name_or_path) -> Path
    recipe_names() -> list[str]                      the recipes shipped in recipes/
    apply_overrides(obj, {field: value}, where, problems=None) -> obj
        set dataclass fields from a nested mapping, coerced to the field's type; unknown keys and bad values are
        appended to `problems` (a list) or, when it is None, raised at once as UserError
    set_path(recipe, "section.key", value, problems)  one `--set section.key=value`
    problems(obj, prefix="") -> list[str]           every range/choice/consistency problem, one line each
    validate(recipe, where="recipe")                 UserError listing every problem (one per line)
    field_doc(cls, name) -> str                      the one-line doc of a field
    shape_differences(recipe_model, model_config: dict) -> list[str]   "hidden_size 4096 (model) vs 64 (recipe)"
    Recipe.to_dict() -> plain dict for manifests
    context_problem(length, config, what) -> str | None   a sequence length beyond a model's context (config.json)
    Sections: ModelShape, VocabConfig, PhaseConfig, PretrainConfig, SFTConfig, CorporaConfig; ALL_PROJ (LLaMA's 7 projections)
    Optimisation: the fields PhaseConfig and SFTConfig share, read by zhllama.trainer from the section object itself
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRECISIONS = ("fp32", "fp16", "bf16")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")
# the fields of `model:` that must agree with a model's config.json (vocabulary size is what resizing changes)
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def setting(default=None, doc: str = "", *, factory=None, choices=None, ge=None, gt=None, le=None, lt=None,
            flag: str | None = None, cli: bool = True, only: str | None = None):
    """A recipe field: default, one-line doc, allowed values (choices, or bounds ge/gt/le/lt), extra CLI alias;
    cli=False: settable in the recipe or with --set only; only="phase2": a flag of that section only."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag, "cli": cli,
            "only": only}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Sizes above these are typos (1e12), not models: refused before anything allocates them (a 1e12-piece vocabulary
# asked for 931 GiB). No LLaMA-family model comes near either bound.
MAX_DIM = 1 << 24
MAX_VOCAB = 1_000_000


def dim(default: int, doc: str):
    """A model dimension: a whole number of at least 1."""
    return setting(default, doc, ge=1, le=MAX_DIM)


@dataclass
class ModelShape:
    hidden_size: int = dim(4096, "width of the residual stream")
    intermediate_size: int = dim(11008, "width of the MLP")
    num_hidden_layers: int = dim(32, "transformer layers")
    num_attention_heads: int = dim(32, "attention heads")
    num_key_value_heads: int = dim(32, "key/value heads (fewer than attention heads: grouped-query attention)")
    max_position_embeddings: int = setting(2048, "context length in tokens", ge=2)
    base_vocab_size: int = dim(32000, "pieces of the base tokenizer the model was trained with")
    tie_word_embeddings: bool = setting(False, "LM head shares the input embedding matrix")
    rms_norm_eps: float = setting(1e-6, "RMSNorm epsilon", gt=0)
    initializer_range: float = setting(0.02, "std of the random init (`pretrain init`)", gt=0)
    check: bool = setting(True, "refuse a --model whose config.json contradicts this shape (false: I mean it)")


@dataclass
class VocabConfig:
    model_type: str = setting("extend", "extend: continued BPE over the base's segmentation; bpe/unigram: a standalone "
                                        "SentencePiece model like the reference", choices=("extend", "bpe", "unigram"))
    num_added: int = setting(17953, "extend: pieces appended to the base (32,000 + 17,953 = 49,953)", ge=1,
                             le=MAX_VOCAB)
    vocab_size: int = setting(20000, "bpe/unigram: size of the Chinese SentencePiece model", ge=100,
                              le=MAX_VOCAB)
    character_coverage: float = setting(0.9995, "share of characters the model must cover", gt=0, le=1)
    max_chars: int = setting(200_000_000, "sample larger corpora down to about this many characters", ge=1)
    word_aware: bool = setting(False, "jieba word boundaries: no piece spans two words")
    encoding: str = setting("auto", "corpus encoding; auto: UTF-8, else GB18030/Big5 detected per file like "
                                    "`corpora prepare` (binary files are dropped and reported)",
                            choices=("auto", "utf-8", "gb18030", "big5"))
    max_piece_chars: int = setting(4, "extend: longest appended piece in characters, a leading '▁' not counted; "
                                      "0 = no cap (4 was chosen on held-out text, see README)", ge=0)
    max_piece_bytes: int = setting(32, "extend: longest appended piece in UTF-8 bytes; 32 keeps every piece "
                                       "decodable by llama-cpp-python, whose detokenizer drops longer ones; 0 = no cap",
                                   ge=0)
    pad: bool = setting(False, "append the Alpaca [PAD] piece (49,954 in the reference)")
    seed: int = setting(0, "seed of the corpus sample", ge=0)
    max_spans: int = setting(2_000_000, "extend: most distinct Chinese spans kept for the merges (rarest pruned "
                                        "first; counting holds at most twice this); 0 = no limit", ge=0)
    num_proc: int = setting(0, "extend: processes counting spans, 0 = all cores; the result is the same for any "
                               "value", ge=0)


def redefault(cls, name: str, default):
    """The field `name` of dataclass `cls` with another default (same doc and range) for a subclass."""
    return field(default=default, metadata=cls.__dataclass_fields__[name].metadata)


@dataclass
class Steps:
    """How often a training stage logs, evaluates and checkpoints (fields shared by every training section)."""

    save_steps: int = setting(500, "checkpoint every N steps (a rerun resumes from the last one)", ge=1)
    eval_steps: int = setting(500, "held-out loss every N steps", ge=1)
    logging_steps: int = setting(10, "log the training loss every N steps", ge=1)
    save_total_limit: int = setting(3, "checkpoints kept", ge=1)


@dataclass
class Optimisation(Steps):
    """What a training section hands the Trainer (zhllama.trainer): the section object itself reaches it, so these
    defaults are the only ones (a section with other defaults redefines the field, see SFTConfig)."""

    learning_rate: float = setting(2e-4, "peak learning rate", gt=0)
    global_batch_size: int = setting(1024, "sequences per optimizer step, reached by gradient accumulation", ge=1,
                                     flag="--batch-size")
    per_device_batch_size: int = setting(4, "sequences per forward pass on one device", ge=1)
    max_steps: int = setting(3000, "optimizer steps", ge=1)
    lr_scheduler: str = setting("cosine", "learning-rate schedule (transformers' names)", choices=SCHEDULERS)
    warmup_ratio: float = setting(0.05, "share of the optimizer steps spent warming up", ge=0, lt=1)
    weight_decay: float = setting(0.01, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", ge=0)


@dataclass
class PhaseConfig(Optimisation):
    enabled: bool = setting(True, "run this phase (llama-13b skips phase 1)", cli=False)
    lora_r: int = setting(8, "phase 2: LoRA rank", ge=1, only="phase2")
    lora_alpha: int = setting(32, "phase 2: LoRA alpha (scaling alpha/r)", gt=0, only="phase2")
    lora_dropout: float = setting(0.05, "phase 2: dropout on the LoRA input", ge=0, lt=1, only="phase2")
    lora_targets: list = setting(doc="phase 2: module names that get LoRA, e.g. q_proj,k_proj,v_proj,o_proj",
                                 factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], only="phase2")
    modules_to_save: list = setting(doc="phase 2: modules trained in full and saved with the adapter",
                                    factory=lambda: ["embed_tokens", "lm_head"], only="phase2")
    new_rows_only: bool = setting(False, "phase 1: train only the appended rows of embed_tokens", only="phase1")


@dataclass
class PretrainConfig:
    block_size: int = setting(512, "tokens per training sequence (documents are packed)", ge=2)
    precision: str = setting("fp16", "fp32 | fp16 | bf16 (CPU runs always use fp32)", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass (less memory)")
    zero_stage: int = setting(2, "what `plan` assumes; the accelerate/DeepSpeed config decides the real one",
                              choices=(0, 1, 2, 3), cli=False)
    init: str = setting("subword-mean", "`resize`: how new embedding rows start", choices=("subword-mean", "mean", "normal"),
                       cli=False)
    eval_ratio: float = setting(0.01, "share of documents held out for the eval loss", ge=0, lt=1)
    max_eval_blocks: int = setting(1000, "cap on held-out blocks", ge=1)
    seed: int = setting(42, "seed of initialisation, data order and dropout", ge=0)
    streaming: bool = setting(False, "tokenize on the fly instead of caching (corpora larger than the disk cache)")
    shuffle_buffer: int = setting(10000, "streaming: blocks in the seeded shuffle buffer (unit order is shuffled too)", ge=1)
    num_proc: int = setting(0, "tokenization/packing worker processes (0 = all CPU cores; under torchrun rank 0 builds, the other ranks wait)", ge=0)
    num_gpus: int = setting(8, "what `plan` assumes for per-GPU memory", ge=1, cli=False)
    phase1: PhaseConfig = field(default_factory=PhaseConfig)
    phase2: PhaseConfig = field(default_factory=lambda: PhaseConfig(learning_rate=1e-4, max_steps=6000))


@dataclass
class SFTConfig(Optimisation):
    template: str = setting("chinese-alpaca", "prompt template (zhllama.chat registry)")
    max_length: int = setting(512, "tokens per example (prompt + answer)", ge=8)
    learning_rate: float = redefault(Optimisation, "learning_rate", 1e-4)
    global_batch_size: int = redefault(Optimisation, "global_batch_size", 512)
    max_steps: int = setting(6000, "optimizer steps (ignored when num_epochs > 0)", ge=1)
    num_epochs: float = setting(0.0, "> 0: train this many epochs instead of max_steps", ge=0)
    warmup_ratio: float = redefault(Optimisation, "warmup_ratio", 0.03)
    weight_decay: float = redefault(Optimisation, "weight_decay", 0.0)
    lora_r: int = setting(8, "LoRA rank", ge=1)
    lora_alpha: int = setting(32, "LoRA alpha (scaling alpha/r)", gt=0)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list = setting(doc="module names that get LoRA", factory=lambda: list(ALL_PROJ))
    modules_to_save: list = setting(doc="modules trained in full and saved with the adapter",
                                    factory=lambda: ["embed_tokens", "lm_head"])
    precision: str = setting("fp16", "fp32 | fp16 | bf16 (CPU runs always use fp32)", choices=PRECISIONS)
    gradient_checkpointing: bool = setting(True, "recompute activations in the backward pass (less memory)")
    eval_ratio: float = setting(0.05, "records held out for the eval loss when no --eval-data is given", ge=0, lt=1)
    max_eval_examples: int = setting(500, "cap on held-out records", ge=0)
    reference_tokenization: bool = setting(False, "tokenize the answer separately like Chinese-LLaMA-Alpaca "
                                                  "(extra '▁' at the boundary); default: as serving tokenizes")
    packing: bool = setting(True, "padding-free batches, per-example attention, LM head only on trained tokens")
    fast_lora_dropout: bool = setting(True, "LoRA dropout masks from 16-bit uniforms (same Bernoulli, cheaper)")
    loss_chunk_tokens: int = setting(1024, "packed batches: LM head + cross-entropy over this many trained rows at a "
                                           "time (0: the whole batch at once)", ge=0)
    overlong: str = setting("truncate", "examples longer than max_length", choices=("truncate", "drop", "error"))
    seed: int = setting(42, "seed of LoRA init, data order and dropout", ge=0)
    eval_steps: int = redefault(Steps, "eval_steps", 200)
    save_steps: int = redefault(Steps, "save_steps", 200)


@dataclass
class CorporaConfig:
    """`corpora prepare`: cleaning, dedup, held-out split and shards (section `corpora:`)."""
    heldout_fraction: float = setting(0.01, "share of documents held out, chosen by content hash", ge=0, lt=1)
    min_chars: int = setting(10, "drop documents shorter than this many characters after cleaning", ge=0)
    min_cjk_ratio: float = setting(0.3, "drop documents whose non-space characters are less than this share Han",
                                   ge=0, le=1)
    # near by default: on real text with injected near-copies it finds 97-99% of them and dropped nothing that was
    # not a near duplicate (bench/near_dedup.py, bench/RESULTS.md)
    dedup: str = setting("near", "exact: identical documents only; near (default): also MinHash-LSH near duplicates "
                                 "(datasketch)", choices=("exact", "near"))
    near_threshold: float = setting(0.7, "dedup near: Jaccard similarity of character 5-grams (punctuation and "
                                         "spaces left out) above which a document is dropped", gt=0, le=1)
    encoding: str = setting("auto", "auto: UTF-8 if the file decodes as UTF-8, else the best of GB18030 (covers GBK) "
                                    "and Big5, per file", choices=("auto", "utf-8", "gb18030", "big5"))
    field: str = setting("text", "record field / parquet column holding the text")
    fullwidth_ascii: bool = setting(False, "turn full-width letters, digits and symbols into ASCII; Chinese "
                                           "punctuation stays")
    max_chars: int = setting(100_000, "split longer documents at sentence ends into pieces of at most this many "
                                      "characters", ge=1)
    shard_docs: int = setting(100_000, "documents per shard (at most; each work unit has its own shards)", ge=1)
    num_proc: int = setting(0, "worker processes for cleaning, dedup and writing shards; 0: all CPU cores "
                               "(the output is the same for any number)", ge=0)


@dataclass
class Recipe:
    name: str = "custom"
    model: ModelShape = field(default_factory=ModelShape)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    corpora: CorporaConfig = field(default_factory=CorporaConfig)
    source: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = ("model", "vocab", "pretrain", "sft", "corpora")


def field_doc(cls, name: str) -> str:
    return next(f.metadata.get("doc", "") for f in dataclasses.fields(cls) if f.name == name)


def recipe_names() -> list[str]:
    return sorted(f.stem for f in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"{p}: no such recipe file")
        return p
    cand = RECIPES_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise UserError(f"unknown recipe {name_or_path!r}: no {cand}; known recipes: {', '.join(recipe_names())} "
                        "(or pass a .yaml path)")
    return cand


def _type_name(f) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def coerce(f, value, where: str):
    """value (from YAML or the command line) as the field's type; ValueError with a readable message otherwise."""
    t = _type_name(f)
    if t == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{where}: {value!r} is not true or false")
    if t == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{where}: {value!r} is not a whole number")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a whole number") from None
    if t == "float":
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a number") from None
        if isinstance(value, bool) or not math.isfinite(v):
            raise ValueError(f"{where}: {value!r} is not a finite number")
        return v
    if t == "str":
        if isinstance(value, (dict, list)):
            raise ValueError(f"{where}: {value!r} is not a single value")
        return str(value)
    if t == "list":
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1]
            return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise ValueError(f"{where}: {value!r} is not a list (write [a, b] or a,b)")
    return value


def _fail(problems, msg):
    if problems is None:
        raise UserError(msg)
    problems.append(msg)


def apply_overrides(obj, values: dict, where: str = "recipe", problems: list | None = None):
    """Set dataclass fields from a mapping; nested dataclasses take nested mappings. Unknown keys are errors."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for k, v in (values or {}).items():
        key = str(k).replace("-", "_")
        if key not in fields or key == "source":
            known = ", ".join(n for n in fields if n != "source")
            _fail(problems, f"{where}: unknown setting {k!r}; known: {known}")
            continue
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                _fail(problems, f"{where}.{k}: expected a mapping of settings, got {v!r}")
                continue
            apply_overrides(cur, v, f"{where}.{k}", problems)
        else:
            try:
                setattr(obj, key, coerce(fields[key], v, f"{where}.{k}"))
            except ValueError as e:
                _fail(problems, str(e))
    return obj


def parse_value(text: str):
    """A command-line value read as YAML (1e-4, true, [q_proj, v_proj]); plain text stays text."""
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_path(recipe: Recipe, key: str, value, problems: list | None = None) -> None:
    """One `--set section.key=value` (section.sub.key for pretrain phases)."""
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        sec = next((s for s in SECTIONS if any(f.name == parts[-1].replace("-", "_")
                                               for f in dataclasses.fields(getattr(recipe, s)))), None)
        hint = f", e.g. --set {sec}.{parts[-1]}=..." if sec else ""
        _fail(problems, f"--set {key}: name the section ({', '.join(SECTIONS)}) and the field{hint}")
        return
    nested: dict = {}
    cur = nested
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
    apply_overrides(recipe, nested, "--set", problems)


def problems(obj, prefix: str = "") -> list[str]:
    """Every field outside its range or choices, and the cross-field rules, one line each."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out += problems(v, name + ".")
            continue
        m = f.metadata
        if m.get("choices") is not None and v not in m["choices"]:
            out.append(f"{name}: {v!r} is not one of {', '.join(map(str, m['choices']))}")
        for key, ok, words in (("ge", lambda a, b: a >= b, "at least"), ("gt", lambda a, b: a > b, "greater than"),
                               ("le", lambda a, b: a <= b, "at most"), ("lt", lambda a, b: a < b, "less than")):
            if m.get(key) is not None and isinstance(v, (int, float)) and not ok(v, m[key]):
                out.append(f"{name}: {v!r} must be {words} {m[key]}")
    if hasattr(obj, "global_batch_size") and hasattr(obj, "per_device_batch_size"):
        g, p = obj.global_batch_size, obj.per_device_batch_size
        if g >= 1 and p >= 1 and g % p:
            out.append(f"{prefix}global_batch_size {g} is not a multiple of per_device_batch_size {p}")
    if hasattr(obj, "lora_targets") and not obj.lora_targets:
        out.append(f"{prefix}lora_targets: empty; name at least one module (e.g. q_proj)")
    if isinstance(obj, ModelShape) and obj.num_attention_heads >= 1 and obj.num_key_value_heads >= 1:
        if obj.hidden_size % obj.num_attention_heads or obj.num_attention_heads % obj.num_key_value_heads:
            out.append(f"{prefix}num_attention_heads {obj.num_attention_heads} must divide hidden_size "
                       f"{obj.hidden_size} and be a multiple of num_key_value_heads {obj.num_key_value_heads}")
    return out


def validate(r: Recipe, where: str = "recipe") -> None:
    found = problems(r)
    if found:
        raise UserError("\n".join(f"{where}: {p}" for p in found))


def load_recipe(name_or_path: str | Path, check: bool = True) -> Recipe:
    """The recipe as written (validated unless check=False, for callers that apply overrides first)."""
    import yaml

    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    r = Recipe(name=path.stem)
    found: list[str] = []
    apply_overrides(r, data, str(path), found)
    if found:
        raise UserError("\n".join(found))
    r.source = str(path)
    if check:
        validate(r, str(path))
    return r


def context_problem(length: int, config: dict, what: str) -> str | None:
    """`what` (e.g. "--block-size 4096") longer than the context of the model whose config.json is `config`."""
    cfg = config.get("text_config", config) if "max_position_embeddings" not in config else config
    ctx = cfg.get("max_position_embeddings")
    if isinstance(ctx, int) and length > ctx:
        return f"{what} is longer than the model's context (max_position_embeddings {ctx}); use {ctx} or less"
    return None


def shape_differences(shape: ModelShape, config: dict) -> list[str]:
    """The SHAPE_FIELDS where a model's config.json and the recipe's model: section disagree."""
    cfg = config.get("text_config", config) if "hidden_size" not in config else config
    out = []
    for k in SHAPE_FIELDS:
        have = cfg.get(k, cfg.get("num_attention_heads") if k == "num_key_value_heads" else None)
        if have is not None and have != getattr(shape, k):
            out.append(f"{k} {have} (model) vs {getattr(shape, k)} (recipe)")
    return out
