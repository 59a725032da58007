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
    add_executor_args(parser) / executor_config_from_args(args) -> ExecutorConfig
"""
from __future__ import annotations

import argparse
import dataclasses
import os
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


def run_pipeline(pipeline: list, cfg: ExecutorConfig, logging_dir, job_name: str = "zhllama") -> None:
    ex = make_executor(pipeline, cfg, logging_dir, job_name=job_name)
    if cfg.executor == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=cfg.ray_address or None, log_to_driver=False)
    ex.run()
    if cfg.executor == "slurm":
        return
    done = {int(p.name) for p in (Path(logging_dir) / "completions").glob("*") if p.name.isdigit()}
    missing = sorted(set(range(cfg.resolved_tasks())) - done)
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"{len(missing)} of {cfg.resolved_tasks()} task(s) failed ({shown}); their logs are in "
                        f"{Path(logging_dir) / 'logs'}; rerun the same command to redo only those")


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("where the work runs (datatrove executors; a rerun skips finished tasks)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local processes (default), a Slurm job array, or a Ray cluster")
    g.add_argument("--tasks", type=int, default=0, help="ranks the work is cut into (0: one per worker); "
                                                       "the output is identical for any value")
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
