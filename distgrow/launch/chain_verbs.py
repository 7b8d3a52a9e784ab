"""``distgrow chain status|cancel RUN_DIR``: what a run's SLURM jobs did, and stopping a chain."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from distgrow.exits import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from distgrow.held import held_from_slurm
from distgrow.launch.slurm_jobs import Runner, run_slurm_command, updating
from distgrow.rundir import RunDir, read_json

_ALIVE = ("submitted", "running")


def _no_chain(run: RunDir) -> int:
    """Exit 2 with the line that says why ``run`` shows no chain: no record, or a bad one."""
    problem = f"{run.slurm_jobs} does not exist: {run.path} holds no SLURM run"
    fix = "give the run directory of a launch.slurm=chain run (run.output_dir)"
    if run.slurm_jobs.is_file():
        try:
            json.loads(run.slurm_jobs.read_text(encoding="utf-8"))
            problem = f"{run.slurm_jobs} lists no SLURM jobs of a chain"
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problem = f"{run.slurm_jobs} is not valid JSON ({' '.join(str(err).split())})"
        fix = (
            "the chain's record is damaged: see its jobs with `squeue --name=<run.name>` "
            "(scancel them there), then move the file aside and relaunch with run.resume=true"
        )
    print(f"distgrow chain: error: {problem}. Fix: {fix}.", file=sys.stderr)
    return EXIT_USAGE


def cancel_chain(
    run_dir: Path, runner: Runner = run_slurm_command, log: Callable[[str], None] = print
) -> int:
    """Stop a chain: no pending span starts; the running one checkpoints and stops.

    Marks the chain cancelled first (a span ending meanwhile then submits no next one), then
    ``scancel``s its pending jobs, then the rest: SLURM sends SIGTERM to the running span's
    processes, its workers checkpoint within ``KillWait`` and exit, and a resume continues.

    Returns:
        0, or 2 when the directory holds no chain.
    """
    run = RunDir(run_dir)
    jobs = run.read_slurm_jobs()
    if jobs is None or not jobs.jobs:
        return _no_chain(run)
    with updating(run, jobs.mode, jobs.name) as current:
        current.cancel_requested = True
        ids = [j.job_id for j in current.jobs]
    env = dict(os.environ)
    pending = runner(["scancel", "--state=PENDING", f"--name={jobs.name}"], env)
    everything = runner(["scancel", f"--name={jobs.name}", *ids], env)
    for done in (pending, everything):
        if done.returncode != 0 and done.stderr.strip():
            log(f"distgrow chain: scancel: {done.stderr.strip()}")
    with updating(run, jobs.mode, jobs.name) as current:
        for job in current.jobs:
            if job.state == "submitted":
                job.state = "cancelled"
                job.message = "cancelled by distgrow chain cancel before it ran"
    log(
        f"distgrow chain: cancelled {jobs.name} (jobs {', '.join(ids)}); the running span's "
        "workers checkpoint and stop. Resume: distgrow launch CONFIG launch.slurm=chain "
        "run.resume=true"
    )
    return EXIT_OK


def chain_status(run_dir: Path, log: Callable[[str], None] = print) -> int:
    """Print the run's SLURM jobs: size, distgrow's state, what each held; the fix if failed.

    Returns:
        0 while the chain runs or after it completed, 1 when a span failed, 2 without a chain.
    """
    run = RunDir(run_dir)
    jobs = run.read_slurm_jobs()
    if jobs is None or not jobs.jobs:
        return _no_chain(run)
    summary = read_json(run.summary) if run.summary.is_file() else {}
    held = held_from_slurm(run, summary)
    log(f"{jobs.mode} {jobs.name}{' (cancel requested)' if jobs.cancel_requested else ''}")
    for job, row in zip(jobs.jobs, held["jobs"], strict=True):
        what = "span" if jobs.mode == "chain" else "allocation"
        log(
            f"  {what} {job.index}: job {job.job_id}, {job.workers} worker(s), {job.state}"
            + (f" (SLURM: {row['slurm_state']})" if row.get("slurm_state") else "")
            + f", held {row['cpu_hours']:.4f} CPU-h {row['gpu_hours']:.4f} GPU-h "
            f"[{row['source']}]" + (f" -> next job {job.next_job_id}" if job.next_job_id else "")
        )
        if job.message and job.state in ("failed", "stopped", "requeued"):
            log(f"    {job.message}")
        if job.fix:
            log(f"    fix: {job.fix}")
    failed = [j for j in jobs.jobs if j.state == "failed"]
    return EXIT_FAILURE if failed else EXIT_OK


def main_chain(action: str, run_dir: str) -> int:
    """``distgrow chain status|cancel RUN_DIR``."""
    if action == "cancel":
        return cancel_chain(Path(run_dir))
    return chain_status(Path(run_dir))
