"""The pipeline's stage graph, declared once: every step's command, what it reads and what it writes.

    prepare -> vocab -> pretrain -> sft -> eval -> report

A stage is a few steps (pretrain: init, resize, phase 1, phase 2); a step is one stage command writing one output.
Whether a step is up to date is decided by zhllama.runstate from what the step wrote (result.json, the published
files' record) and what `zhllama run` recorded when it last ran or checked it (RUN/stages.json); `zhllama run`
(zhllama.pipeline) runs the steps that are not.

Public API:
    Options                     the run's settings (the Makefile's variables: RUN, RECIPE, CORPUS, ...)
    Step                        name, argv (after `python -m`), outputs, after, recipe sections, inputs
    Stage                       name, timing key, steps
    STAGE_NAMES                 ("prepare", "vocab", "pretrain", "sft", "eval", "report")
    stages(options, recipe) -> [Stage]   the graph for these options (pretrain without phase 1 when the recipe
                                         disables it; no init step when BASE_MODEL is given)
"""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE = Path(".cache/zhllama")
STAGE_NAMES = ("prepare", "vocab", "pretrain", "sft", "eval", "report")
SMALL_RECIPES = ("tiny", "llama3-tiny")  # merged in float32: half precision would round a random tiny model away


@dataclass
class Options:
    """What `zhllama run` is asked (the Makefile's variables of the same names)."""
    run: str = "runs/default"
    recipe: str = "tiny"
    sets: list = field(default_factory=list)          # --set SECTION.KEY=VALUE for every stage that takes a recipe
    base_tokenizer: str = str(SAMPLE / "base" / "tokenizer.model")
    corpus: str = str(SAMPLE / "zh")
    base_model: str = ""
    sft_data: str = "corpora/instructions_zh.json"
    sft_prompts: str = "corpora/instructions_zh_heldout.txt"
    sft_preset: str = "greedy"
    sft_dtype: str = ""                                # empty: float32 for the tiny recipes, else float16
    eval_text: str = ""                                # empty: RUN/corpus/heldout
    prepare_args: str = ""
    vocab_args: str = ""
    pretrain_args: str = ""
    sft_args: str = ""
    eval_args: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Step:
    name: str                      # RUN-relative output, e.g. "pretrain/phase1"
    argv: list                     # after `python -m`
    outputs: tuple = ()            # RUN-relative: a run folder (finished when it holds result.json) or a file
    artefacts: tuple = ()          # files a run folder output must hold besides result.json
    after: tuple = ()              # steps (names) whose outputs this one reads
    sections: tuple = ()           # recipe sections it reads ("pretrain" minus "-pretrain.phase2": see runstate)
    inputs: tuple = ()             # files/folders from outside the run folder it reads
    stdout_to: str | None = None   # RUN-relative file the command's standard output is written to
    checked: bool = True           # False: prints only (the answers after SFT), runs whenever its stage runs
    recipe_args: tuple = ()        # the --recipe/--set part of argv: judged by the recipe values it gives, not as text

    def key(self) -> list:
        """argv without its recipe_args: what must be unchanged for the output to stay valid."""
        a, r = list(self.argv), list(self.recipe_args)
        for i in range(len(a) - len(r) + 1):
            if r and a[i:i + len(r)] == r:
                return a[:i] + a[i + len(r):]
        return a


@dataclass
class Stage:
    name: str
    timing: str                    # its key in RUN/report/timings.json
    steps: list


def _split(args: str) -> list:
    return shlex.split(args or "")


def sft_base(run: Path, recipe) -> Path:
    """The model the phase-2 and SFT adapters sit on: phase 1's output, or the resized model when phase 1 is off."""
    return run / "pretrain" / ("phase1" if recipe.pretrain.phase1.enabled else "resized")


def stages(o: Options, recipe) -> list[Stage]:
    run = Path(o.run)
    r = lambda *p: str(run.joinpath(*p))  # noqa: E731
    rec = ["--recipe", o.recipe] + [x for s in o.sets for x in ("--set", s)]
    corpus = r("corpus", "train")
    base = o.base_model or r("pretrain", "base")
    p1 = recipe.pretrain.phase1.enabled
    sftb = str(sft_base(run, recipe))
    dtype = o.sft_dtype or ("float32" if recipe.name in SMALL_RECIPES else "float16")
    eval_text = _split_paths(o.eval_text) if o.eval_text else [r("corpus", "heldout")]
    phase2_after = ("pretrain/phase1",) if p1 else ("pretrain/resized",)

    prepare = Stage("prepare", "prepare", [
        Step("corpus", ["corpora", "prepare", "--input", *_split_paths(o.corpus), "--out", r("corpus"),
                        *_split(o.prepare_args)],
             outputs=("corpus",), artefacts=("stats.json",), inputs=tuple(_split_paths(o.corpus))),
    ])
    vocab = Stage("vocab", "vocab", [
        Step("vocab", ["vocab", "build", *rec, "--base", o.base_tokenizer, "--corpus", corpus, "--out", r("vocab"),
                       *_split(o.vocab_args)],
             outputs=("vocab",), artefacts=("tokenizer.json",), after=("corpus",), sections=("vocab",),
             inputs=(o.base_tokenizer,), recipe_args=tuple(rec)),
    ])
    pre = []
    if not o.base_model:
        pre.append(Step("pretrain/base", ["pretrain", "init", *rec, "--tokenizer", o.base_tokenizer, "--out", base],
                        outputs=("pretrain/base",), artefacts=("config.json",), sections=("model",),
                        inputs=(o.base_tokenizer,), recipe_args=tuple(rec)))
    pre.append(Step("pretrain/resized", ["pretrain", "resize", "--model", base, "--tokenizer", r("vocab"),
                                         "--out", r("pretrain", "resized")],
                    outputs=("pretrain/resized",), artefacts=("config.json",),
                    after=("vocab",) + (() if o.base_model else ("pretrain/base",)),
                    inputs=(o.base_model,) if o.base_model else ()))
    train = ["--corpus", corpus, "--restart-if-changed", *_split(o.pretrain_args)]
    if p1:
        pre.append(Step("pretrain/phase1", ["pretrain", "phase1", *rec, "--model", r("pretrain", "resized"),
                                            "--out", r("pretrain", "phase1"), *train],
                        outputs=("pretrain/phase1",), artefacts=("config.json",),
                        after=("corpus", "pretrain/resized"), sections=("model", "pretrain", "-pretrain.phase2"),
                        recipe_args=tuple(rec)))
    pre.append(Step("pretrain/phase2", ["pretrain", "phase2", *rec, "--model", sftb, "--out", r("pretrain", "phase2"),
                                        *train],
                    outputs=("pretrain/phase2",), artefacts=("adapter_model.safetensors",),
                    after=("corpus",) + phase2_after, sections=("model", "pretrain", "-pretrain.phase1"),
                    recipe_args=tuple(rec)))
    sft = Stage("sft", "sft (convert, train, merge, answers)", [
        Step("sft/data.json", ["corpora", "instructions", "--input", *_split_paths(o.sft_data),
                               "--out", r("sft", "data.json")],
             outputs=("sft/data.json",), inputs=tuple(_split_paths(o.sft_data))),
        Step("sft/adapter", ["sft", "train", *rec, "--model", sftb, "--adapter", r("pretrain", "phase2"),
                             "--data", r("sft", "data.json"), "--out", r("sft", "adapter"), "--restart-if-changed",
                             *_split(o.sft_args)],
             outputs=("sft/adapter",), artefacts=("adapter_model.safetensors",),
             after=("sft/data.json", "pretrain/phase2"), sections=("model", "sft"), recipe_args=tuple(rec)),
        Step("sft/merged", ["sft", "merge", "--base", sftb, "--adapter", r("pretrain", "phase2"),
                            "--adapter", r("sft", "adapter"), "--out", r("sft", "merged"), "--dtype", dtype],
             outputs=("sft/merged",), artefacts=("config.json",), after=("sft/adapter",)),
        Step("sft answers", ["sft", "generate", "--model", r("sft", "merged"), "--prompts-file", o.sft_prompts,
                             "--preset", o.sft_preset, "--max-new-tokens", "48"],
             after=("sft/merged",), checked=False),
    ])
    models = ["--model", base, "--label", "base", "--model", r("pretrain", "resized"), "--label", "resized"]
    if p1:
        models += ["--model", r("pretrain", "phase1"), "--label", "phase1"]
    models += ["--model", sftb, "--adapter", r("pretrain", "phase2"), "--label", "phase2",
               "--model", r("sft", "merged"), "--label", "sft-merged"]
    pre_names = tuple(s.name for s in pre)
    ev = Stage("eval", "eval (bits per character)", [
        Step("eval/bpc.json", ["evaluation", "bpc", *models, "--text", *eval_text, "--json", r("eval", "bpc.json"),
                               "--chart", r("eval", "bpc.png"), *_split(o.eval_args)],
             outputs=("eval/bpc.json",), after=("corpus", *pre_names, "sft/merged"),
             inputs=tuple(eval_text) if o.eval_text else ()),
    ])
    gen = ["--prompts-file", o.sft_prompts, "--preset", "greedy", "--max-new-tokens", "48", "--json"]
    report = Stage("report", "report", [
        Step("report/generations_before.json", ["sft", "generate", "--model", r("pretrain", "phase2"), "--base", sftb,
                                                *gen],
             outputs=("report/generations_before.json",), after=("pretrain/phase2",), inputs=(o.sft_prompts,),
             stdout_to="report/generations_before.json"),
        Step("report/generations_after.json", ["sft", "generate", "--model", r("sft", "merged"), *gen],
             outputs=("report/generations_after.json",), after=("sft/merged",), inputs=(o.sft_prompts,),
             stdout_to="report/generations_after.json"),
        # the report reads what every step wrote (and the timings, which change only when a stage ran)
        Step("report.md", ["zhllama.run_report", "--run", str(run)], outputs=("report.md", "report.html"),
             after=("corpus", "vocab", *pre_names, "sft/data.json", "sft/adapter", "sft/merged", "eval/bpc.json",
                    "report/generations_before.json", "report/generations_after.json")),
    ])
    return [prepare, vocab, Stage("pretrain", "pretrain", pre), sft, ev, report]


def _split_paths(paths: str) -> list:
    """CORPUS, SFT_DATA and EVAL_TEXT may name several files or folders (space-separated, as the Makefile passed
    them; quote a path with spaces)."""
    return _split(paths) or [paths]
