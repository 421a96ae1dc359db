"""Launchers for the runs of a sweep: processes on this machine, or jobs on a cluster.

A launch is a list of `Launch` items (a run's name, its command line, its run folder and the
runs it starts from); each launcher yields ``(name, exit status)`` as runs finish, in whatever
order they finish, and starts a run only once the runs it names in ``after`` have finished (a
run started ``--init-from`` another run's checkpoint). The command's output goes to
``<folder>/train.log``.

- `run_local(launches, jobs, threads)`: ``jobs`` runs at once as subprocesses, each with
  ``threads`` CPU threads (OMP_NUM_THREADS / MKL_NUM_THREADS; `threads_per_run` divides the
  machine's CPUs between the jobs).
- `run_submitit(launches, folder, cluster)`: one job per run through submitit (Slurm, or its
  ``local`` / ``debug`` executors on this machine); with more than one GPU in a job the command
  runs under torchrun (``python -m torch.distributed.run``), one process per GPU and node.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class Launch:
    """One run to start: its name, its command line, its run folder and the names of the
    launches that must finish before it starts."""

    name: str
    line: list[str]
    folder: Path
    after: tuple[str, ...] = ()


def _ready(waiting: list[Launch], pending: set[str]) -> list[Launch]:
    """The launches of ``waiting`` that wait for none of ``pending`` (in order)."""
    return [item for item in waiting if not pending.intersection(item.after)]


@dataclass
class ClusterConfig:
    """What each job of a submitit sweep asks for (one job per run)."""

    cluster: str = "slurm"  # slurm, or submitit's local / debug executors (this machine)
    partition: str | None = None  # Slurm partition
    nodes: int = 1  # nodes per run (torchrun across them when > 1)
    gpus_per_node: int = 0  # GPUs per node; > 1 (or nodes > 1) starts the run under torchrun
    cpus_per_task: int = 8  # CPU cores per node (data loading workers live here)
    mem_gb: float | None = None  # memory per node
    timeout_min: int = 60 * 24  # wall-clock limit per run
    slurm_args: dict[str, str] = field(default_factory=dict)  # extra sbatch options, e.g. account
    poll_seconds: float = 10.0  # how often finished jobs are collected

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"unknown cluster {self.cluster!r} (known: {', '.join(CLUSTERS)})")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpus_per_task < 1:
            raise ValueError("need nodes >= 1, gpus_per_node >= 0 and cpus_per_task >= 1")


def execute(
    line: Sequence[str],
    folder: Path,
    env: dict[str, str] | None = None,
    log_name: str = "train.log",
) -> int:
    """Run ``line`` with stdout and stderr appended to ``folder/log_name``; its exit status."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / log_name, "a") as log:
        log.write("$ " + shlex.join(line) + "\n")
        log.flush()
        run_env = {**os.environ, **(env or {})}
        return subprocess.run(
            list(line), stdout=log, stderr=subprocess.STDOUT, env=run_env
        ).returncode


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_run(jobs: int) -> int:
    """The machine's CPUs divided between ``jobs`` concurrent runs (at least 1), at most
    $OMP_NUM_THREADS when that is set."""
    threads = max(1, available_cpus() // max(jobs, 1))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(cap)) if cap.isdigit() and int(cap) > 0 else threads


def run_local(
    launches: Sequence[Launch], jobs: int = 1, threads: int | None = None
) -> Iterator[tuple[str, int]]:
    """Run ``jobs`` launches at once on this machine, each with ``threads`` CPU threads (default
    `threads_per_run(jobs)`); yield (name, exit status) as each finishes."""
    n, slots = threads or threads_per_run(jobs), max(jobs, 1)
    env = {"OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
    waiting, pending = list(launches), {item.name for item in launches}
    with ThreadPoolExecutor(max_workers=slots) as pool:
        running = {}
        while waiting or running:
            for item in _ready(waiting, pending)[: slots - len(running)]:
                waiting.remove(item)
                running[pool.submit(execute, item.line, item.folder, env)] = item
            if not running:
                raise ValueError(f"launches wait for each other: {[i.name for i in waiting]}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                item = running.pop(future)
                pending.discard(item.name)
                yield item.name, future.result()


@dataclass
class ClusterJob:
    """The function a submitit job runs: the run's command (under torchrun when the job has
    more than one GPU), output appended to the run folder's train.log (train.node<k>.log on the
    other nodes). Returns the command's exit status."""

    line: list[str]
    folder: Path
    nodes: int = 1
    gpus_per_node: int = 0

    def __call__(self) -> int:
        line, log_name = self.line, "train.log"
        if self.nodes * self.gpus_per_node > 1:
            import submitit

            job = submitit.JobEnvironment()
            line = torchrun_line(
                self.line,
                self.gpus_per_node,
                self.nodes,
                job.node,
                job.hostnames[0],
                str(job.job_id),
            )
            log_name = "train.log" if job.node == 0 else f"train.node{job.node}.log"
        return execute(line, self.folder, log_name=log_name)


def torchrun_line(
    line: Sequence[str],
    nproc: int,
    nodes: int = 1,
    node_rank: int = 0,
    master: str = "localhost",
    job_id: str = "0",
) -> list[str]:
    """``python script args`` -> ``python -m torch.distributed.run ... script args``: nproc
    processes on this node; one node is standalone, several meet at master on a port drawn from
    the job id."""
    python, *rest = line
    if nodes == 1:
        where = ["--standalone"]
    else:
        port = 20000 + int(hashlib.sha1(job_id.encode()).hexdigest(), 16) % 20000
        where = [
            f"--nnodes={nodes}",
            f"--node_rank={node_rank}",
            f"--master_addr={master}",
            f"--master_port={port}",
        ]
    return [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where, *rest]


def executor(folder: Path, cfg: ClusterConfig):
    """A submitit AutoExecutor for ``cfg`` writing its own logs under ``folder``."""
    import submitit  # optional dependency: pip install strlowrank[cluster]

    ex = submitit.AutoExecutor(folder=str(folder), cluster=cfg.cluster)
    params = {
        "timeout_min": cfg.timeout_min,
        "nodes": cfg.nodes,
        "tasks_per_node": 1,
        "cpus_per_task": cfg.cpus_per_task,
        "gpus_per_node": cfg.gpus_per_node,
    }
    if cfg.mem_gb is not None:
        params["mem_gb"] = cfg.mem_gb
    if cfg.cluster == "slurm":
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.slurm_args:
            params["slurm_additional_parameters"] = dict(cfg.slurm_args)
    ex.update_parameters(**params)
    return ex


def run_submitit(
    launches: Sequence[Launch], folder: Path, cfg: ClusterConfig
) -> Iterator[tuple[str, int]]:
    """Submit one job per launch (job logs under ``folder``); yield (name, exit status) as jobs
    finish. A job that fails outside the command (killed, timed out) counts as status -1 and
    its reason is appended to the run's train.log."""
    ex = executor(folder, cfg)
    jobs = {}
    waiting, pending = list(launches), {item.name for item in launches}
    while waiting or jobs:
        for item in _ready(waiting, pending):
            waiting.remove(item)
            ex.update_parameters(name=item.name[:64])
            jobs[item.name] = (
                item,
                ex.submit(ClusterJob(item.line, item.folder, cfg.nodes, cfg.gpus_per_node)),
            )
        if not jobs:
            raise ValueError(f"launches wait for each other: {[i.name for i in waiting]}")
        for name, (item, job) in list(jobs.items()):
            if not job.done():
                continue
            del jobs[name]
            try:
                status = int(job.result())
            except Exception as exc:  # the job itself failed: node failure, timeout, cancel
                item.folder.mkdir(parents=True, exist_ok=True)
                with open(item.folder / "train.log", "a") as log:
                    log.write(f"job {job.job_id} failed: {str(exc).strip()[-2000:]}\n")
                status = -1
            pending.discard(name)
            yield name, status
        if jobs and not _ready(waiting, pending):
            time.sleep(cfg.poll_seconds)
