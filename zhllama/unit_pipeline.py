"""A list of work units (zhllama.units) run as one datatrove pipeline step on any executor of zhllama.executors.

The engine schedules, zhllama only describes the work: rank r of T takes units r, r + T, r + 2T, ... (by default
T is the number of units, so a rank is a unit and datatrove's completion marker is that unit's). A unit writes its
output files atomically (temporary name, then rename), and a unit whose output exists is skipped, so a rank that
was killed mid-way redoes only its unfinished units, and a rerun with another --tasks reuses every finished unit.
The caller merges the units' outputs in unit order: its result depends on the corpus, never on T or the workers.

Public API:
    UnitStep(n_units)                     datatrove PipelineStep base; subclasses define unit_done(i), build_unit(i, rank)
    run_units(step, cfg, logging_dir, progress=None) -> int
        runs the step's unfinished units on cfg's executor; returns how many units this call built (0 when every
        unit was already done); raises Submitted after handing the work to Slurm (the job runs later)
    Submitted                             the work was submitted (Slurm): rerun the same command once it has run
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import threading
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from zhllama.errors import UserError
from zhllama.executors import ExecutorConfig, run_pipeline


class Submitted(Exception):
    """The units were handed to a Slurm job array; the message says how to finish (rerun the same command)."""


class UnitStep(PipelineStep):
    name = "work units"
    type = "zhllama"

    def __init__(self, n_units: int):
        super().__init__()
        self.n_units = n_units

    def __deepcopy__(self, memo):
        # datatrove deep-copies the pipeline before each rank it runs in-process (fresh statistics); the unit list
        # is read-only and would be copied once per rank: thousands of units times thousands of ranks
        from datatrove.utils.stats import Stats

        new = copy.copy(self)
        new.stats = Stats(str(self))
        return new

    def unit_done(self, i: int) -> bool:  # pragma: no cover (abstract)
        raise NotImplementedError

    def build_unit(self, i: int, rank: int) -> None:  # pragma: no cover (abstract)
        raise NotImplementedError

    def ranks_units(self, rank: int, world_size: int) -> range:
        return range(rank, self.n_units, world_size)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for i in self.ranks_units(rank, world_size):
            if self.unit_done(i):
                self.stat_update("units_already_done")
                continue
            with self.track_time("unit"):
                self.build_unit(i, rank)
            self.stat_update("units_built")
        if data:
            yield from data


def _repair_completions(step: UnitStep, logging_dir: Path, tasks: int) -> None:
    """Drop the completion marker of a rank whose unit outputs are no longer all there (removed by hand after
    the rank finished): the engine trusts its markers, and would otherwise skip that rank forever."""
    folder = logging_dir / "completions"
    if not folder.is_dir():
        return
    for marker in folder.iterdir():
        if marker.name.isdigit() and int(marker.name) < tasks:
            if not all(step.unit_done(i) for i in step.ranks_units(int(marker.name), tasks)):
                marker.unlink(missing_ok=True)


@contextlib.contextmanager
def _engine_console(path: Path):
    """datatrove logs every task's pipeline and statistics to stderr; the tasks' own logs are kept under
    logging_dir/logs, so the console copy goes to a file and stderr keeps zhllama's progress and errors only.
    Forked workers inherit the redirected sys.stderr, where datatrove's per-task sink is opened."""
    from datatrove.utils.logging import setup_default_logger

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        try:
            with contextlib.redirect_stderr(f):
                setup_default_logger()
                yield
        finally:
            setup_default_logger()  # back on the real stderr


def _poll_progress(step: UnitStep, bar, stop: threading.Event) -> None:
    # wait before the first look: the executor forks its workers in its first moments, and a fork while this
    # thread holds tqdm's or stderr's lock would leave that lock held in the child
    stop.wait(2.0)
    while not stop.is_set():
        bar.n = sum(step.unit_done(i) for i in range(step.n_units))
        bar.refresh()
        stop.wait(1.0)


def run_units(step: UnitStep, cfg: ExecutorConfig, logging_dir, progress: str | None = None) -> int:
    """Run the step's unfinished units; cfg.tasks 0 means one rank per unit. progress: a label for a bar on a
    terminal (stderr), over finished units."""
    todo = [i for i in range(step.n_units) if not step.unit_done(i)]
    if not todo:
        return 0
    tasks = cfg.tasks or step.n_units
    cfg = dataclasses.replace(cfg, tasks=tasks)
    # completion markers mean "rank r of T is done": a run with another T needs its own folder
    logging_dir = Path(logging_dir) / f"tasks-{tasks}"
    _repair_completions(step, logging_dir, tasks)
    bar = stop = poller = None
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=step.n_units, initial=step.n_units - len(todo), unit="unit", desc=progress, file=sys.stderr)
        stop = threading.Event()
        poller = threading.Thread(target=_poll_progress, args=(step, bar, stop), daemon=True)
        poller.start()
    try:
        with _engine_console(logging_dir / "console.log"):
            run_pipeline([step], cfg, logging_dir, job_name=f"zhllama-{step.name}".replace(" ", "-"))
    finally:
        if poller is not None:
            stop.set()
            poller.join()
            bar.n = sum(step.unit_done(i) for i in range(step.n_units))
            bar.close()
    if cfg.executor == "slurm":
        raise Submitted(f"{step.name}: {len(todo)} unit(s) in {tasks} Slurm task(s) submitted (logs: {logging_dir}); "
                        "rerun the same command once the job has finished: finished units are reused")
    missing = [i for i in todo if not step.unit_done(i)]
    if missing:  # every rank reported done, yet a unit has no output: never merge a partial result
        raise UserError(f"{step.name}: {len(missing)} unit(s) have no output after the run (logs: {logging_dir}); "
                        "rerun the same command")
    return len(todo)
