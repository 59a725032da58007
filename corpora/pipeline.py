"""`corpora prepare` assembled from its datatrove steps (corpora.steps) and run on an executor (zhllama.executors).

The work is cut into units that depend on the corpus alone (one per input; uncompressed .txt/.jsonl inputs larger
than UNIT_BYTES cut into line-aligned byte ranges), and every file a stage writes is named by unit or key range,
never by task, so the output is byte-identical for any number of tasks, workers or machines. Four stages, each a
datatrove pipeline with its own completion markers (OUT/.work/logs/<stage>-t<tasks>/completions):

    clean   (tasks)  read, clean, filter, split, dedup keys -> OUT/.work/units/
    dedup   (tasks)  duplicates per key range               -> OUT/.work/dedup/
    shards  (tasks)  held-out split and shards              -> OUT/{train,heldout}/shard-<unit>-<n>.jsonl.gz
    merge   (1 task) per-file statistics                    -> OUT/.work/merged.json

then the launching process writes OUT/stats.json and the run folder's result and manifest and removes OUT/.work.
A killed run leaves OUT/.work; the same command again skips the finished tasks and redoes the others.
"""
from __future__ import annotations

from pathlib import Path

from zhllama.units import plan_units as plan_work_units

from . import records
from .steps import Clean, DedupKeys, FindDuplicates, MergeStats, UnitReader, UnitWriter, WriteShards

UNIT_BYTES = 32 << 20  # uncompressed .txt/.jsonl inputs are cut into line-aligned work units of this size
FORMAT_VERSION = 7  # bump when the work folder's files change meaning, so old work folders are redone


def plan_units(files: list[Path]):
    return plan_work_units(files, UNIT_BYTES, splittable=_splittable)


def _splittable(path: Path) -> bool:
    return records.kind(path) in ("txt", "jsonl") and not path.name.lower().endswith(".gz")


def default_tasks(ex_cfg, n_units: int) -> int:
    """Explicit --tasks, else up to 4 per worker (smaller tasks even out the load; the output is the same)."""
    if ex_cfg.tasks:
        return ex_cfg.tasks
    w = ex_cfg.resolved_workers()
    return max(1, min(n_units, 4 * w if w > 0 else 256))


def stages(files: list[Path], units, cfg, out: Path, tasks: int, progress: bool) -> list[tuple[str, list, int]]:
    work = out / ".work"
    logs = work / "logs"
    pdir = (lambda name, t: str(logs / f"{name}-t{t}")) if progress else (lambda name, t: None)
    near = cfg.dedup == "near"
    n = len(units)
    return [
        ("clean", [UnitReader(units, cfg), Clean(cfg), DedupKeys(near, cfg.near_threshold),
                   UnitWriter(work, near, pdir("clean", tasks))], tasks),
        ("dedup", [FindDuplicates(work, n, cfg, pdir("dedup", tasks))], tasks),
        ("shards", [WriteShards(work, out, n, cfg, pdir("shards", tasks))], tasks),
        ("merge", [MergeStats(work, [str(f) for f in files], n)], 1),
    ]
