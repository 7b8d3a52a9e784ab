"""The run's SLURM jobs: ``slurm_jobs.json`` under a lock, the size of the job this process
runs in, and the one way a SLURM command (``sbatch``, ``scancel``, ``scontrol``) is run.

Shared by the chain (:mod:`distgrow.launch.slurm_chain`), its verbs
(:mod:`distgrow.launch.chain_verbs`) and the controller in allocation mode.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence

from distgrow.rundir import RunDir, SlurmJob, SlurmJobs
from distgrow.runtime import slurm_counts

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_slurm_command(
    argv: Sequence[str], env: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a SLURM command, its output captured (two minutes at most)."""
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, check=False, env=dict(env)
    )


@contextlib.contextmanager
def updating(run: RunDir, mode: str, name: str) -> Iterator[SlurmJobs]:
    """``slurm_jobs.json`` under a lock, written back on leaving (a span and ``chain cancel``
    may change it at the same time)."""
    run.path.mkdir(parents=True, exist_ok=True)
    lock = run.path / f".{run.slurm_jobs.name}.lock"
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        jobs = run.read_slurm_jobs() or SlurmJobs(mode=mode, name=name)
        yield jobs
        run.write_slurm_jobs(jobs)


def _leading(text: str | None) -> int | None:
    match = re.match(r"\s*(\d+)", text or "")
    return int(match.group(1)) if match else None


def allocation_size(env: Mapping[str, str]) -> tuple[int, int, int, int]:
    """``(nodes, tasks, cpus, gpus)`` of the job this process runs in, from SLURM's variables.

    ``SLURM_JOB_CPUS_PER_NODE`` reads like ``4(x2),2``; GPUs are ``SLURM_GPUS_ON_NODE`` per
    node (the same on every node of a job that asked per node).
    """
    nodes = _leading(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or 1
    tasks = _leading(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")) or 1
    cpus = sum(slurm_counts(env.get("SLURM_JOB_CPUS_PER_NODE") or "") or [])
    gpus = (_leading(env.get("SLURM_GPUS_ON_NODE")) or 0) * nodes
    return nodes, tasks, cpus or tasks, gpus


def record_start(run: RunDir, mode: str, name: str, env: Mapping[str, str], now: float) -> SlurmJob:
    """Record that this job (``SLURM_JOB_ID``) started running: its size and start time."""
    job_id = str(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))
    nodes, tasks, cpus, gpus = allocation_size(env)
    with updating(run, mode, name) as jobs:
        job = jobs.job(job_id)
        if job is None:
            job = SlurmJob(index=len(jobs.jobs) + 1, job_id=job_id, workers=tasks)
            jobs.jobs.append(job)
        job.state = "running"
        job.nodes, job.tasks, job.cpus, job.gpus = nodes, tasks, cpus, gpus
        job.partition = env.get("SLURM_JOB_PARTITION") or job.partition
        job.restarts = _leading(env.get("SLURM_RESTART_COUNT")) or 0
        job.runs.append([now, None])
        # A requeued job runs again: how its earlier run ended no longer describes it.
        job.exit_code = job.message = job.fix = None
        return job


def record_end(run: RunDir, job: SlurmJob, now: float, **changes: object) -> SlurmJobs:
    """Record how this job's run ended (``state``, ``exit_code``, ``message``, ``fix`` ...)."""
    with updating(run, "", "") as jobs:
        mine = jobs.job(job.job_id)
        if mine is None:  # the file was replaced meanwhile: record the job again
            mine = job
            jobs.jobs.append(mine)
        if mine.runs and mine.runs[-1][1] is None:
            mine.runs[-1][1] = now
        for key, value in changes.items():
            setattr(mine, key, value)
        return jobs
