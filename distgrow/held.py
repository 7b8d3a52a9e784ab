"""What a run's SLURM jobs *held*: allocated CPU-, GPU- and task-hours per job, beside the
worker-hours the run used.

A cluster bills the allocation, not the workers that use it. In ``launch.slurm=allocation``
mode one job holds the widest phase's nodes from the first update to the last (idle early);
with ``launch.slurm=chain`` each span of the plan is its own job, sized to its workers. The
jobs are listed in the run directory's ``slurm_jobs.json`` (:class:`distgrow.rundir.SlurmJobs`);
this module reads what SLURM says each held, from the best source there is, and says which:

* ``sacct`` — SLURM's accounting database (a cluster with slurmdbd);
* ``jobcomp`` — SLURM's job completion records (``JobCompType=jobcomp/filetxt``, the file
  ``JobCompLoc``; slurm/local_cluster.sh enables it);
* ``scontrol`` — ``scontrol show job`` while the controller still knows the job (``MinJobAge``);
* ``computed`` — the allocation's size (read from the job's environment when it started) × the
  times the controller recorded; the few seconds before the controller started and after it
  ended are not in it.

Held hours are ``allocated CPUs (GPUs, tasks) × (end − start)``, as the scheduler accounts them
(``CPUTimeRAW``), summed over every time a job ran (a requeued job runs again). The parsers are
pure; :func:`query_slurm` runs the SLURM commands.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from distgrow.rundir import RunDir, SlurmJob, SlurmJobs

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

SOURCES = ("sacct", "jobcomp", "scontrol", "computed")
"""Where a job's held hours came from, best first."""


@dataclass(frozen=True)
class JobRecord:
    """One run of a job as SLURM recorded it (a requeued job has one per run)."""

    job_id: str
    state: str
    start: float | None
    end: float | None
    nodes: int | None
    cpus: int | None
    gpus: int | None
    source: str


# --------------------------------------------------------------------------------------------
# Parsing SLURM's records (pure)
# --------------------------------------------------------------------------------------------


def parse_time(text: str | None) -> float | None:
    """SLURM's ``2026-11-29T03:39:34`` (local time) as a Unix time; None for Unknown/None."""
    if not text or not text[0].isdigit():
        return None
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def parse_tres(text: str | None) -> dict[str, int]:
    """``cpu=2,mem=1M,node=1,billing=2,gres/gpu=4`` → ``{"cpu": 2, "node": 1, "gpu": 4}``.

    A typed GPU count (``gres/gpu:a100=4``) counts when the plain one is absent."""
    out: dict[str, int] = {}
    typed_gpus = 0
    for item in (text or "").split(","):
        name, _, value = item.partition("=")
        if not value or not value.isdigit():
            continue
        if name in ("cpu", "node"):
            out[name] = int(value)
        elif name == "gres/gpu":
            out["gpu"] = int(value)
        elif name.startswith("gres/gpu:"):
            typed_gpus += int(value)
    if "gpu" not in out and typed_gpus:
        out["gpu"] = typed_gpus
    return out


def _fields(line: str) -> dict[str, str]:
    """``Key=value Key2=value2`` (values without spaces, as jobcomp and ``scontrol -o`` write)."""
    return {m.group(1): m.group(2) for m in re.finditer(r"(\w+)=(\S*)", line)}


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def parse_jobcomp(text: str, job_ids: Iterable[str]) -> dict[str, list[JobRecord]]:
    """The completion records of ``job_ids`` in a ``jobcomp/filetxt`` file, oldest first."""
    wanted = set(job_ids)
    found: dict[str, list[JobRecord]] = {}
    for line in text.splitlines():
        f = _fields(line)
        job_id = f.get("JobId", "")
        if job_id not in wanted:
            continue
        tres = parse_tres(f.get("Tres"))
        # A job cancelled while pending is recorded with no nodes (NodeCnt=0): it held nothing.
        # A requeued job's run is recorded with JobState=PENDING (it waits to run again).
        ran = f.get("NodeCnt") != "0"
        found.setdefault(job_id, []).append(
            JobRecord(
                job_id=job_id,
                state=f.get("JobState", "?"),
                start=parse_time(f.get("StartTime")) if ran else None,
                end=parse_time(f.get("EndTime")),
                nodes=_int(f.get("NodeCnt")) or tres.get("node"),
                cpus=tres.get("cpu") or _int(f.get("ProcCnt")),
                gpus=tres.get("gpu", 0),
                source="jobcomp",
            )
        )
    return found


def parse_scontrol_job(text: str) -> JobRecord | None:
    """``scontrol show job -o ID``: the job's latest run (None when SLURM no longer knows it)."""
    f = _fields(text)
    if "JobId" not in f:
        return None
    tres = parse_tres(f.get("AllocTRES") or f.get("TRES"))
    # A pending job's StartTime is when SLURM expects to start it (a requeued one's too).
    pending = f.get("JobState") == "PENDING"
    return JobRecord(
        job_id=f["JobId"],
        state=f.get("JobState", "?"),
        start=None if pending else parse_time(f.get("StartTime")),
        end=parse_time(f.get("EndTime")),
        nodes=_int(f.get("NumNodes")) or tres.get("node"),
        cpus=tres.get("cpu") or _int(f.get("NumCPUs")),
        gpus=tres.get("gpu", 0),
        source="scontrol",
    )


SACCT_FORMAT = "JobIDRaw,State,Start,End,NNodes,AllocCPUS,AllocTRES"


def parse_sacct(text: str) -> dict[str, list[JobRecord]]:
    """``sacct -n -P -X -D -o SACCT_FORMAT``: every run of each job (``-D``: requeues too)."""
    found: dict[str, list[JobRecord]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 7:
            continue
        job_id, state, start, end, nodes, cpus, tres_text = parts[:7]
        tres = parse_tres(tres_text)
        found.setdefault(job_id, []).append(
            JobRecord(
                job_id=job_id,
                state=state.split()[0] if state else "?",
                start=parse_time(start),
                end=parse_time(end),
                nodes=_int(nodes),
                cpus=_int(cpus) or tres.get("cpu"),
                gpus=tres.get("gpu", 0),
                source="sacct",
            )
        )
    return found


# --------------------------------------------------------------------------------------------
# Asking SLURM
# --------------------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)


def _config_value(config: str, key: str) -> str | None:
    match = re.search(rf"^{key}\s*=\s*(\S.*?)\s*$", config, re.MULTILINE)
    return match.group(1) if match else None


def query_slurm(job_ids: Sequence[str], run: Runner = _run) -> dict[str, list[JobRecord]]:
    """SLURM's records of ``job_ids``: from sacct, else the jobcomp file, else scontrol.

    Jobs no source knows are left out (the caller computes them). Never raises: a missing
    command or an unreachable controller just leaves the jobs to the next source.
    """
    ids = [j for j in job_ids if j]
    found: dict[str, list[JobRecord]] = {}
    if not ids:
        return found

    def ask(argv: Sequence[str]) -> str | None:
        try:
            done = run(argv)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    config = ask(["scontrol", "show", "config"]) or ""
    if not config:
        return found  # no SLURM here, or its controller does not answer: ask nothing more
    storage = _config_value(config, "AccountingStorageType") or ""
    if "none" not in storage:
        out = ask(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(ids), "-o", SACCT_FORMAT])
        if out:
            found.update(parse_sacct(out))
    if "filetxt" in (_config_value(config, "JobCompType") or ""):
        location = _config_value(config, "JobCompLoc")
        if location and Path(location).is_file():
            try:
                text = Path(location).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            missing = [j for j in ids if j not in found]
            found.update(parse_jobcomp(text, missing))
    for job_id in ids:
        if job_id in found:
            continue
        out = ask(["scontrol", "show", "job", "-o", job_id])
        record = parse_scontrol_job(out or "")
        if record is not None and record.start is not None:
            found[job_id] = [record]
    return found


# --------------------------------------------------------------------------------------------
# Held hours
# --------------------------------------------------------------------------------------------


def _held_from_records(job: SlurmJob, records: Sequence[JobRecord], now: float) -> dict[str, Any]:
    seconds = cpu_s = gpu_s = 0.0
    cpus = gpus = nodes = 0
    for r in records:
        if r.start is None:
            continue  # never started (cancelled while pending): held nothing
        end = r.end if r.end is not None else now
        span = max(0.0, end - r.start)
        seconds += span
        cpu_s += span * (r.cpus or 0)
        gpu_s += span * (r.gpus or 0)
        cpus, gpus, nodes = max(cpus, r.cpus or 0), max(gpus, r.gpus or 0), max(nodes, r.nodes or 0)
    return {
        "held_s": seconds,
        "cpus": cpus or job.cpus,
        "gpus": gpus if records else job.gpus,
        "nodes": nodes or job.nodes,
        "cpu_hours": cpu_s / 3600,
        "gpu_hours": gpu_s / 3600,
        "task_hours": seconds * (job.tasks or job.workers) / 3600,
        "slurm_state": records[-1].state,
        "source": records[-1].source,
    }


def _held_computed(job: SlurmJob, now: float) -> dict[str, Any]:
    seconds = 0.0
    for index, (start, end) in enumerate(job.runs):
        if start is None:
            continue
        if end is None:
            # Still running (this is the job asking), else killed before it could record.
            if index != len(job.runs) - 1 or job.state != "running":
                continue
            end = now
        seconds += max(0.0, end - start)
    return {
        "held_s": seconds,
        "cpus": job.cpus,
        "gpus": job.gpus,
        "nodes": job.nodes,
        "cpu_hours": seconds * (job.cpus or 0) / 3600,
        "gpu_hours": seconds * (job.gpus or 0) / 3600,
        "task_hours": seconds * (job.tasks or job.workers) / 3600,
        "source": "computed",
    }


METHOD = {
    "sacct": "SLURM's accounting (sacct): allocated TRES × elapsed, every run of each job",
    "jobcomp": "SLURM's job completion records (jobcomp/filetxt): allocated TRES × (end − start)",
    "scontrol": "scontrol show job: allocated TRES × (end − start) of the job's latest run",
    "computed": "the allocation's size (SLURM_* variables when the job started) × the "
    "start and end times distgrow's controller recorded (the seconds before it started and "
    "after it ended are missing)",
}


def held_hours(
    jobs: SlurmJobs, records: Mapping[str, Sequence[JobRecord]], now: float
) -> dict[str, Any]:
    """What each job held, and the run's totals.

    Args:
        jobs: The run's ``slurm_jobs.json``.
        records: SLURM's records by job id (:func:`query_slurm`; {} to compute every job).
        now: The time that ends a job still running (the caller's clock).

    Returns:
        ``mode``, ``jobs`` (each: index, job_id, workers, state, held_s, cpus, gpus, nodes,
        cpu_hours, gpu_hours, task_hours, source), the totals ``held_s``, ``cpu_hours``,
        ``gpu_hours``, ``task_hours``, the ``source`` (one, or ``mixed``) and its ``method``.
    """
    rows: list[dict[str, Any]] = []
    for job in jobs.jobs:
        known = records.get(job.job_id)
        held = _held_from_records(job, known, now) if known else _held_computed(job, now)
        rows.append(
            {"index": job.index, "job_id": job.job_id, "workers": job.workers, "state": job.state}
            | held
        )
    sources = sorted({r["source"] for r in rows}, key=SOURCES.index)
    source = sources[0] if len(sources) == 1 else "mixed"
    method = "; ".join(f"{s}: {METHOD[s]}" for s in sources) if sources else "no jobs"
    if jobs.mode == "allocation":
        method += (
            "; allocation mode: the whole allocation (the widest phase's workers) is held from "
            "the first update to the last, idle while the plan runs narrower"
        )
    return {
        "mode": jobs.mode,
        "jobs": rows,
        "held_s": sum(r["held_s"] for r in rows),
        "cpu_hours": sum(r["cpu_hours"] for r in rows),
        "gpu_hours": sum(r["gpu_hours"] for r in rows),
        "task_hours": sum(r["task_hours"] for r in rows),
        "source": source,
        "method": method,
    }


def baseline_held(
    held: Mapping[str, Any],
    baseline_wall_s: float | None,
    base_workers: int,
    how: str,
    startup_s: float | None = None,
) -> dict[str, Any] | None:
    """What a ``decay_lr`` baseline would hold at the base width, against what the run held.

    The baseline holds ``base_workers`` workers, each with the CPUs and GPUs a worker of the
    run's first job had, for its wall-clock plus one start-up (``startup_s``: the baseline's
    own when it was run, else this run's; ``how`` says where the wall-clock comes from). The
    few seconds SLURM and the controller take around the workers are not counted for the
    baseline, while the run's held hours include them for every job: the saving is, if
    anything, understated.

    Returns:
        None when there is no baseline wall-clock or no job to take a worker's size from.
    """
    rows = held.get("jobs") or []
    if baseline_wall_s is None or not rows:
        return None
    first = rows[0]
    per_worker = max(1, int(first.get("workers") or 1))
    cpus = (first.get("cpus") or 0) / per_worker * base_workers
    gpus = (first.get("gpus") or 0) / per_worker * base_workers
    startup = startup_s or 0.0
    hours = (baseline_wall_s + startup) / 3600
    out: dict[str, Any] = {
        "workers": base_workers,
        "wall_s": baseline_wall_s,
        "startup_s": startup,
        "cpus": cpus,
        "gpus": gpus,
        "cpu_hours": cpus * hours,
        "gpu_hours": gpus * hours,
        "task_hours": base_workers * hours,
        "method": f"{base_workers} worker(s) × the CPUs/GPUs of one worker of the first job × "
        f"(the baseline's wall-clock, {how}, + one start-up of {startup:.1f} s); the seconds "
        "SLURM and the controller add around a job are not counted for it",
    }
    for key in ("cpu_hours", "gpu_hours", "task_hours"):
        run, base = float(held.get(key) or 0.0), float(out[key])
        out[f"{key}_ratio"] = base / run if run > 0 and base > 0 else None
    return out


def with_baseline(held: dict[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """``held`` with ``baseline`` from the summary's estimated savings (if it has a wall-clock)."""
    estimated = (summary.get("savings") or {}).get("estimated") or {}
    details = estimated.get("details") or {}
    phases = summary.get("phases") or [{}]
    base_workers = int(details.get("reference_world_size") or phases[0].get("workers") or 1)
    baseline = baseline_held(
        held,
        estimated.get("baseline_wall_s"),
        base_workers,
        "estimated, as the savings",
        summary.get("startup_s"),  # this run's last start-up stands for the baseline's
    )
    if baseline is not None:
        held = {**held, "baseline": baseline}
    return held


def held_so_far(
    run_dir: RunDir, summary: Mapping[str, Any], now: float | None = None
) -> dict[str, Any]:
    """What the run's jobs held up to ``now``, computed from ``slurm_jobs.json`` alone (the
    trainer's summary: SLURM has no record of a job still running); {} outside SLURM."""
    jobs = run_dir.read_slurm_jobs()
    if jobs is None or not jobs.jobs:
        return {}
    return with_baseline(held_hours(jobs, {}, time.time() if now is None else now), summary)


def held_from_slurm(
    run_dir: RunDir, summary: Mapping[str, Any], run: Runner = _run, now: float | None = None
) -> dict[str, Any]:
    """What the run's jobs held, from SLURM's records where it keeps them (the report's view);
    {} when the run has no ``slurm_jobs.json``."""
    jobs = run_dir.read_slurm_jobs()
    if jobs is None or not jobs.jobs:
        return {}
    records = query_slurm([j.job_id for j in jobs.jobs], run)
    return with_baseline(held_hours(jobs, records, time.time() if now is None else now), summary)
