"""`corpora prepare`: raw Chinese text in any common shape -> clean, deduplicated, sharded JSONL.gz.

A datatrove pipeline (corpora.pipeline: the stages; corpora.steps: the steps; corpora.records: the input
formats; corpora.stats: the statistics) run locally in --num-proc processes by default, or as a Slurm job array
or on a Ray cluster (zhllama.executors). The output is byte-identical for any number of tasks and however often
the run was killed and rerun.

OUT/{train,heldout}/shard-<unit>-<n>.jsonl.gz: at most shard_docs documents each, {"text": ...} per line, names
sorting in input order; OUT/stats.json: documents and characters in/kept/dropped by reason, per file and in total.
OUT/.work (the stages' files and logs) is removed when the run succeeds (the run folder's recorded fingerprint then
says what it was made from, so an unchanged rerun does nothing); after a failure or kill it stays and the rerun
continues from it.

Load the result with `datasets.load_dataset("json", data_files={"train": "OUT/train/*.jsonl.gz",
"heldout": "OUT/heldout/*.jsonl.gz"}, streaming=True)`; every record is {"text": ...}.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from zhllama.errors import UserError
from zhllama.executors import ExecutorConfig, run_stages
from zhllama.manifest import write_json
from zhllama.recipe import CorporaConfig, problems

from . import pipeline, records
from .stats import REASONS, log_summary, totals  # noqa: F401  (REASONS: the drop reasons stats.json uses)

SUFFIXES = records.SUFFIXES


@dataclass
class PrepareConfig(CorporaConfig):
    """The `corpora:` recipe section (zhllama.recipe.CorporaConfig, where every field is documented)."""

    def validate(self) -> None:
        found = problems(self)
        if found:
            raise UserError("\n".join(f"corpora.{p}" for p in found))

    def public(self) -> dict:
        d = asdict(self)
        d.pop("num_proc")  # does not change the output; keeps stats.json identical across machines
        return d


def list_inputs(paths) -> list[Path]:
    """Files and folders (recursively, known suffixes only) -> unique files in a stable order."""
    return records.list_inputs(paths)


def _names(files, n: int = 3) -> str:
    """The first n file names of a list, and how many more."""
    files = [str(f) for f in files]
    return ", ".join(files[:n]) + (f" (and {len(files) - n} more)" if len(files) > n else "")


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _dedup_library(cfg: PrepareConfig) -> str:
    if cfg.dedup == "near":
        return ("datasketch MinHash (affine32) of character 5-grams, punctuation and spaces left out, batched in numpy; "
                "LSH bands deduplicated on disk by key range")
    return "exact (blake2b-128 keys, deduplicated on disk by key range)"


def _no_text(out: Path, files, units) -> None:
    """After the clean stage: an output of 0 documents with exit 0 would only fail a later stage."""
    work = out / ".work"
    from .steps import load_units

    results = load_units(work, len(units))
    if any(r["stats"]["docs_in"] for r in results):
        return
    shutil.rmtree(work, ignore_errors=True)
    binary = [r["unit"]["path"] for r in results if r["stats"].get("dropped_file")]
    raise UserError(f"{_names(files)}: no text in any input: every file is empty or holds only whitespace"
                    + (f" ({len(binary)} dropped as binary)" if binary else "") + "; nothing was written to "
                    f"{out}. Point the inputs at your text")


def prepare(inputs, out_dir, cfg: PrepareConfig | None = None, progress: bool = True, log=print,
            executor: ExecutorConfig | None = None) -> dict | None:
    """Run the pipeline into out_dir (a zhllama.runfolder run folder: locked while it runs, result.json and
    manifest.json when finished); returns the stats written to out_dir/stats.json, or None when the work was
    submitted to Slurm (the same command, run again once the jobs are done, records the run)."""
    from zhllama import runfolder

    cfg = cfg or PrepareConfig()
    cfg.validate()
    ex = executor or ExecutorConfig(workers=cfg.num_proc)
    ex.validate()
    files = list_inputs(inputs)
    out = Path(out_dir)
    work = out / ".work"
    with runfolder.lock(out, log=lambda m: log(m)):
        plan = {"files": [_fingerprint(f) for f in files], "config": cfg.public(), "format": pipeline.FORMAT_VERSION}
        if (out / "stats.json").is_file() and runfolder.decide(out, plan, "auto", log=lambda m: None,
                                                               partial=True) == "up-to-date":
            shutil.rmtree(work, ignore_errors=True)  # left by a Slurm run recorded since
            log(f"{out} is up to date with its inputs and options; nothing to do")
            return json.loads((out / "stats.json").read_text(encoding="utf-8"))
        # inputs or options differ from the run that left the work folder or shards: start over
        partial = any((out / d).is_dir() for d in ("train", "heldout", ".work")) or (out / "stats.json").is_file()
        if runfolder.decide(out, plan, "auto", log=log, partial=partial) == "start-over":
            for d in ("train", "heldout", ".work"):
                shutil.rmtree(out / d, ignore_errors=True)
            (out / "stats.json").unlink(missing_ok=True)
        runfolder.begin(out, {"stage": "corpora.prepare", "config": cfg.public()}, plan)
        work.mkdir(parents=True, exist_ok=True)
        units = pipeline.plan_units(files)
        tasks = pipeline.default_tasks(ex, len(units))
        steps = pipeline.stages(files, units, cfg, out, tasks, progress)
        say = log if progress else (lambda m: None)
        # Slurm job names name this output folder, so a rerun recognises its own jobs in the queue
        job = "prepare-" + hashlib.blake2b(str(out.resolve()).encode(), digest_size=3).hexdigest()
        t0 = time.time()
        if ex.executor == "slurm":
            if not run_stages(steps, ex, work / "logs", job_name=job, log=log):
                log(f"run the same command again when the jobs are done: it records the run in {out} "
                    "(and redoes only unfinished tasks)")
                return None
        else:
            run_stages(steps[:1], ex, work / "logs", job_name="prepare", log=say)
            _no_text(out, files, units)
            run_stages(steps[1:], ex, work / "logs", job_name="prepare", log=say)
        merged = json.loads((work / "merged.json").read_text(encoding="utf-8"))
        per_file, names = merged["files"], merged["shards"]
        total = totals(per_file)
        stats = {
            "accounting": ("documents are counted as read; a document longer than max_chars is split into pieces "
                           "(split.docs -> split.pieces) and counted as pieces from there on (dedup, kept): "
                           "docs_in - split.docs + split.pieces == docs_kept + sum(dropped.docs); characters: "
                           "chars_in - normalisation.chars_removed == chars_kept + sum(dropped.chars)"),
            "config": cfg.public(),
            "dedup_library": _dedup_library(cfg),
            "shards": names,
            "total": total,
            "files": per_file,
        }
        write_json(out / "stats.json", stats)
        inputs_m = {"raw": [runfolder.input_entry(f) for f in files]}
        runfolder.finish(out, "corpora.prepare", {k: total[k] for k in ("docs_in", "docs_kept", "chars_kept") if k in total}
                         | {"shards": {k: len(v) for k, v in names.items()}}, inputs_m,
                         runfolder.parents_of(files), seed=None, fingerprint=plan)
        # success: the work folder goes; after a failure or kill it stays and the rerun continues from it
        shutil.rmtree(work, ignore_errors=True)
        log_summary(total, per_file, names, out, log)
        log(f"{len(units)} work units in {tasks} task(s), {ex.executor} executor; {time.time() - t0:.1f} s")
        return stats
