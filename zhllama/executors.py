"""Where corpus pipelines run: datatrove's local, Slurm and Ray executors behind one typed config.

zhllama does not schedule work itself. A corpus step is a list of datatrove pipeline steps cut into `tasks`
independent ranks; the executor runs them (local processes, a Slurm job array, Ray tasks), records each finished
rank in `logging_dir/completions/`, and a rerun skips the finished ranks. That is the whole resume story, so a
step's ranks must write their output atomically (datatrove's writers do) and depend only on (rank, tasks).

Public API:
    ExecutorConfig                       executor, tasks, workers, slurm_* and ray_* settings (CLI flags via
                                         add_executor_args / executor_config_from_args)
    make_executor(pipeline, cfg, logging_dir, depends=None, job_name="zhllama") -> datatrove executor
    run_pipeline(pipeline, cfg, logging_dir, job_name="zhllama") -> None
        runs it; on the local and Ray executors it returns when every rank is done and raises UserError naming the
        failed ranks and their log folder; on Slurm it submits the job array and returns (the job runs later)
    run_stages(stages, cfg, logging_root, job_name="zhllama", log=print) -> bool
        stages [(name, pipeline, tasks)] one after the other, each in logging_root/<name>-t<tasks>; local and Ray:
        runs them and returns True; Slurm: submits them as a chain of dependent job arrays and returns False, or
        True without submitting when every stage has finished (the same command run again after the jobs)
    add_executor_args(parser) / executor_config_from_args(args) -> ExecutorConfig

Logging: datatrove's loguru output (a pipeline banner, per-task statistics tables, exceptions) goes to the logging
folder only (logs/task_NNNNN.log per task, executor.log for the launching process); stderr is left to the caller's
one line per stage. A task's UserError comes back as that error; any other failure as one line naming the log.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from zhllama.errors import UserError

EXECUTORS = ("local", "slurm", "ray")


@dataclasses.dataclass
class ExecutorConfig:
    executor: str = "local"
    # ranks the work is cut into; the output must not depend on it (each step merges deterministically)
    tasks: int = 0              # 0: one per worker
    workers: int = 0            # local: processes at once (0: all cores); slurm/ray: tasks at once (0: no limit)
    slurm_partition: str = ""
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_venv: str = ""        # a venv to activate on the nodes (default: the one running this command)
    slurm_sbatch_args: str = ""  # extra sbatch options, "KEY=VALUE,KEY=VALUE" (e.g. account=abc,constraint=cpu)
    ray_address: str = ""       # "" : ray.init() (a running cluster from RAY_ADDRESS, else a local one)
    ray_cpus_per_task: int = 1

    def validate(self) -> None:
        if self.executor not in EXECUTORS:
            raise UserError(f"--executor {self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        for name in ("tasks", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise UserError(f"--{name} {v!r}: expected a whole number >= 0 (0: automatic)")
        if self.executor == "slurm" and not self.slurm_partition:
            raise UserError("--executor slurm needs --slurm-partition (the partition the job array runs on)")

    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        return (os.cpu_count() or 1) if self.executor == "local" else -1

    def resolved_tasks(self) -> int:
        if self.tasks:
            return self.tasks
        w = self.resolved_workers()
        return w if w > 0 else 1


def _sbatch_args(text: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UserError(f"--slurm-sbatch-args {text!r}: expected KEY=VALUE pairs separated by commas")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _file_only_task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    """datatrove's add_task_logger without its stderr sink (it prints the INFO stream of one task, a multi-line
    pipeline banner and whole tracebacks): the task's log file keeps everything."""
    from datatrove.utils.logging import logger

    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, colorize=False, level="DEBUG",
               format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}")
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile):
    from datatrove.utils.logging import logger

    logger.complete()
    logger.remove()
    if _MAIN_SINK:  # the launching process's own file sink (serial runs execute their tasks in that process)
        logger.add(_MAIN_SINK[0], level="DEBUG")
    logfile.close()


_MAIN_SINK: list = []


def _quiet_datatrove() -> None:
    # datatrove looks these up in its executor module at call time; patched here (not in a subclass) so the Local,
    # Slurm and Ray executors, and the pickled pipelines their workers load, all get the same quiet logging
    import datatrove.executor.base as base

    base.add_task_logger = _file_only_task_logger
    base.close_task_logger = _close_task_logger


_quiet_datatrove()


@contextlib.contextmanager
def _launcher_log(logging_dir):
    """The launching process's datatrove messages go to logging_dir/executor.log while the executor runs."""
    from datatrove.utils.logging import logger, setup_default_logger

    Path(logging_dir).mkdir(parents=True, exist_ok=True)
    _MAIN_SINK[:] = [str(Path(logging_dir) / "executor.log")]
    logger.remove()
    logger.add(_MAIN_SINK[0], level="DEBUG")
    try:
        yield
    finally:
        _MAIN_SINK.clear()
        setup_default_logger()


def make_executor(pipeline: list, cfg: ExecutorConfig, logging_dir, depends=None, job_name: str = "zhllama"):
    cfg.validate()
    logging_dir = str(logging_dir)
    tasks, workers = cfg.resolved_tasks(), cfg.resolved_workers()
    if cfg.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        # fork: the steps are plain Python objects; forkserver would re-import the caller's __main__
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks),
                                     logging_dir=logging_dir, depends=depends, start_method="fork")
    if cfg.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        venv = cfg.slurm_venv or os.environ.get("VIRTUAL_ENV") or str(Path(os.sys.executable).parent.parent)
        return SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, time=cfg.slurm_time,
                                     partition=cfg.slurm_partition, cpus_per_task=cfg.slurm_cpus_per_task,
                                     mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb, job_name=job_name,
                                     venv_path=f"{venv}/bin/activate", sbatch_args=_sbatch_args(cfg.slurm_sbatch_args),
                                     logging_dir=logging_dir, depends=depends)
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'zhllama[ray]'") from None
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=logging_dir,
                               depends=depends, cpus_per_task=cfg.ray_cpus_per_task)


def _ray_init(cfg: ExecutorConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    env = {}
    if address is None:
        # a local Ray instance: its workers import this checkout's code, as the forked local workers do (on a
        # cluster the nodes need zhllama installed, like any Ray job's code)
        root = str(Path(__file__).resolve().parent.parent)
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}}
    ray.init(address=address, log_to_driver=False, include_dashboard=False, runtime_env=env or None,
             logging_level=logging.WARNING)


def run_pipeline(pipeline: list, cfg: ExecutorConfig, logging_dir, job_name: str = "zhllama") -> None:
    logs = Path(logging_dir) / "logs"
    with _launcher_log(logging_dir):
        ex = make_executor(pipeline, cfg, logging_dir, job_name=job_name)
        if cfg.executor == "ray":
            _ray_init(cfg)
        try:
            ex.run()
        except UserError:
            raise
        except Exception as e:  # a task's crash: one line; its traceback is in its log file
            raise UserError(f"{job_name}: a task failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            f"; its log is in {logs}; rerun the same command to redo only the unfinished tasks") from None
    if cfg.executor == "slurm":
        return
    done = {int(p.name) for p in (Path(logging_dir) / "completions").glob("*") if p.name.isdigit()}
    missing = sorted(set(range(cfg.resolved_tasks())) - done)
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"{len(missing)} of {cfg.resolved_tasks()} task(s) failed ({shown}); their logs are in "
                        f"{logs}; rerun the same command to redo only those")


def stage_dir(logging_root, name: str, tasks: int) -> Path:
    """A stage's logging folder; named by its task count, whose completion markers only mean something for it."""
    return Path(logging_root) / f"{name}-t{tasks}"


def _complete(logging_dir: Path, tasks: int) -> bool:
    done = {p.name for p in (logging_dir / "completions").glob("*")}
    return all(f"{r:05d}" in done for r in range(tasks))


def _queued_job_names() -> list[str]:
    import getpass
    import subprocess

    try:
        r = subprocess.run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%j"], capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.SubprocessError):
        return []
    return r.stdout.split() if r.returncode == 0 else []


def _cpu_seconds() -> float:
    """User + system seconds of this process and of its children that have ended (local workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_stages(stages: list, cfg: ExecutorConfig, logging_root, job_name: str = "zhllama", log=print) -> bool:
    """stages: [(name, pipeline, tasks)]. Local/Ray: run in order (a finished stage is skipped whole by its
    completion markers), True. Slurm: one job array per stage, each depending on the previous one, False."""
    if cfg.executor != "slurm":
        for name, pipeline, tasks in stages:
            c = dataclasses.replace(cfg, tasks=tasks)
            log(f"{job_name} {name}: {tasks} task(s), {cfg.executor}")
            t0, cpu0 = time.monotonic(), _cpu_seconds()
            run_pipeline(pipeline, c, stage_dir(logging_root, name, tasks), job_name=f"{job_name} {name}")
            # wall and CPU seconds per stage: where a run's time went, and whether its local workers were busy
            # (a Ray cluster's CPU is not this machine's to count)
            cpu = f" ({_cpu_seconds() - cpu0:.1f} CPU s)" if cfg.executor == "local" else ""
            log(f"{job_name} {name}: done in {time.monotonic() - t0:.1f} s{cpu}")
        return True
    if all(_complete(stage_dir(logging_root, name, tasks), tasks) for name, _, tasks in stages):
        return True  # the submitted chain has finished: the caller records the result
    # datatrove resubmits every rank without a completion marker, running ones included: two copies of a task
    # would write the same files at once, so a chain still in the queue is waited for, never doubled
    busy = sorted({f"{job_name}-{name}" for name, _, _ in stages} & set(_queued_job_names()))
    if busy:
        raise UserError(f"Slurm jobs {', '.join(busy)} of this run are still queued or running (squeue); run the "
                        "same command again when they have finished (it then resubmits only failed tasks), or "
                        "scancel them first")
    with _launcher_log(Path(logging_root)):
        prev = None
        for name, pipeline, tasks in stages:
            prev = make_executor(pipeline, dataclasses.replace(cfg, tasks=tasks), stage_dir(logging_root, name, tasks),
                                 depends=prev, job_name=f"{job_name}-{name}")
        prev.run()  # submits the whole chain (datatrove launches the dependencies first)
    log(f"{job_name}: submitted {len(stages)} dependent Slurm job arrays ({', '.join(s[0] for s in stages)}) to "
        f"partition {cfg.slurm_partition}; logs in {logging_root}")
    return False


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("where the work runs (datatrove executors; a rerun skips finished tasks)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local processes (default), a Slurm job array, or a Ray cluster")
    g.add_argument("--tasks", type=int, default=0, help="ranks the work is cut into (0: automatic, at least one per "
                                                       "worker); the output is identical for any value")
    g.add_argument("--workers", type=int, default=0,
                   help="tasks run at once (local: processes, 0 = all cores; slurm/ray: 0 = no limit)")
    g.add_argument("--slurm-partition", default="", help="Slurm partition (required with --executor slurm)")
    g.add_argument("--slurm-time", default="24:00:00", help="Slurm time limit per task (default 24:00:00)")
    g.add_argument("--slurm-cpus-per-task", type=int, default=1)
    g.add_argument("--slurm-mem-per-cpu-gb", type=int, default=2)
    g.add_argument("--slurm-venv", default="", help="venv activated on the nodes (default: this one)")
    g.add_argument("--slurm-sbatch-args", default="", help="extra sbatch options, KEY=VALUE,... "
                                                           "(e.g. account=abc,qos=high)")
    g.add_argument("--ray-address", default="", help="Ray cluster address (default: RAY_ADDRESS, else local)")
    g.add_argument("--ray-cpus-per-task", type=int, default=1)


def executor_config_from_args(args) -> ExecutorConfig:
    names = {f.name for f in dataclasses.fields(ExecutorConfig)}
    cfg = ExecutorConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.validate()
    return cfg
