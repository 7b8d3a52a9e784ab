"""The run directory: the one contract between the trainer, the launch controller, the report
and the W&B logger. Pure: imports neither torch nor anything of distgrow's but :mod:`atomic`.

A run directory (``run.output_dir/run.name``) holds:

=======================  ==========================================================  ==========
file                     what                                                        written by
=======================  ==========================================================  ==========
``config.yaml``          the resolved config the run trains (relaunch, resume,        trainer
                         ``compare`` and ``report`` rebuild everything from it)
``metrics.jsonl``        one JSON record a line: ``kind`` step, epoch or event        trainer
``summary.json``         :class:`Summary`, written once the run completed             trainer
``resize.json``          :class:`ResizeRequest`: the workers the plan needs (exit    trainer
                         75, or an elastic request while training goes on)
``ckpt-<step:09d>.pt``   atomic, world-size-independent checkpoints                   trainer
``wandb_run_id.txt``     the W&B run id, so relaunches continue one W&B run           W&B logger
``slurm_jobs.json``      :class:`SlurmJobs`: the SLURM jobs that held the run (one    controller
                         per span with ``launch.slurm=chain``, else the allocation),
                         their ids, sizes, states and times; what they held
``launch/``              the controller's logs and the resize requests it consumed    controller
                         (below)
=======================  ==========================================================  ==========

``launch/`` holds, per launch NN (01 for the first):

==================================  ======================================================
``attempt-NN-<W>w.log``             the launcher's output (``-node<K>``: node K's torchrun)
``attempt-NN-<W>w.error.json``      torchrun's error file (``TORCHELASTIC_ERROR_FILE``): the
                                    first failed worker's error and exit status
``attempt-NN-agent-<K>.log``        elastic agent K's output (``.error.json``: its error file)
``attempt-NN.resize.json``          the resize request the launch ended with, set aside
``attempt-NN-ask-<N>.resize.json``  an elastic request for N workers, set aside
``stale-<time>.resize.json``        a request an earlier launch left, set aside at the start
``span-NN.sbatch``, ``span-NN-<job>.out``  a SLURM chain's span NN: its script and output
``discover_hosts``, ``horovod_slots``      Horovod Elastic's discovery script and its count
==================================  ======================================================

Every name is spelled here and nowhere else; every JSON file is written with
:func:`write_json` (temporary file, fsync, rename), so a crash leaves the old or the new file,
never a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from distgrow.atomic import (
    IN_THE_WAY,
    NO_PERMISSION,
    NO_SPACE,
    TEMPORARY_SUFFIX,
    WRITE_FAILURE,
    atomic_write,
    atomic_write_bytes,
    is_disk_error,
    os_error_within,
    plain,
    to_json,
    write_failure,
    write_json,
)

# The atomic writes live in distgrow.atomic; importers find them here too.
__all__ = [
    "CHECKPOINT_GLOB",
    "CONFIG_FILE",
    "DISCOVERY_SCRIPT",
    "ERROR_FILE_SUFFIX",
    "IN_THE_WAY",
    "LAUNCH_DIR",
    "METRICS_FILE",
    "NO_PERMISSION",
    "NO_SPACE",
    "RESIZE_FILE",
    "RESIZE_VERSION",
    "SLOTS_FILE",
    "SLURM_JOBS_FILE",
    "SLURM_JOBS_VERSION",
    "SUMMARY_FILE",
    "SUMMARY_VERSION",
    "TEMPORARY_SUFFIX",
    "WANDB_RUN_ID_FILE",
    "WRITE_FAILURE",
    "ResizeRequest",
    "RunDir",
    "RunDirError",
    "SlurmJob",
    "SlurmJobs",
    "Summary",
    "atomic_write",
    "atomic_write_bytes",
    "is_disk_error",
    "os_error_within",
    "plain",
    "read_json",
    "read_jsonl",
    "to_json",
    "write_failure",
    "write_json",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESIZE_FILE = "resize.json"
WANDB_RUN_ID_FILE = "wandb_run_id.txt"
SLURM_JOBS_FILE = "slurm_jobs.json"
LAUNCH_DIR = "launch"
DISCOVERY_SCRIPT = "discover_hosts"
"""Horovod Elastic's host discovery script, in the launch folder."""
SLOTS_FILE = "horovod_slots"
"""The slot count the discovery script offered last, in the launch folder: it never shrinks,
and a resumed run removes ``resize.json``."""
ERROR_FILE_SUFFIX = ".error.json"
CHECKPOINT_GLOB = "ckpt-*.pt"
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{9,})\.pt$")

SUMMARY_VERSION = 1
RESIZE_VERSION = 1
SLURM_JOBS_VERSION = 1


class RunDirError(ValueError):
    """A run-directory file is missing or unreadable; the message names the file and the fix."""


# -- atomic writes (distgrow.atomic; re-exported here) ----------------------------------------

# The temporary files only the trainer writes (rank 0, one process per run directory): those
# a kill mid-write leaves are removed at the next start (:meth:`RunDir.remove_temporaries`).
_TRAINER_FILES = "|".join(map(re.escape, (CONFIG_FILE, SUMMARY_FILE, RESIZE_FILE)))
_TRAINER_TEMPORARY = re.compile(rf"^\.(ckpt-\d{{9,}}\.pt|{_TRAINER_FILES})\.[^/]+\.tmp$")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``.

    Raises:
        RunDirError: the file is missing, unreadable, not JSON or not an object.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{p} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{p} holds {type(data).__name__}, not a JSON object")
    return data


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file; a line cut by a crash (the last) is skipped."""
    out: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out


# -- typed records ---------------------------------------------------------------------------

R = TypeVar("R")


def _from_mapping(cls: type[R], data: Mapping[str, Any], source: str) -> R:
    """Build dataclass ``cls`` from ``data``: unknown keys go to ``extra`` (when the class has
    it), a missing required key is a :class:`RunDirError` naming ``source``."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    known = {k: v for k, v in data.items() if k in names and k != "extra"}
    if "extra" in names:
        known["extra"] = {k: v for k, v in data.items() if k not in names}
    try:
        return cls(**known)
    except TypeError as err:
        raise RunDirError(
            f"{source} is not a distgrow record of this version ({err}). Fix: use a run "
            "written by this version of distgrow."
        ) from None


@dataclass(frozen=True)
class ResizeRequest:
    """``resize.json``: the workers the plan needs, and where the run stands.

    Written by rank 0 with exit 75 (``checkpoint`` and ``exit_code`` set), or while training
    goes on under ``launch.elastic`` (``elastic`` true: the controller starts the new workers).
    """

    need_workers: int
    have_workers: int
    epoch: int
    position: int
    step: int
    samples_seen: int
    global_batch: int
    time: float
    micro_batch: int | None = None
    accum_steps: int | None = None
    checkpoint: str | None = None
    exit_code: int | None = None
    elastic: bool = False
    version: int = RESIZE_VERSION

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = RESIZE_FILE) -> ResizeRequest:
        """Rebuild from the JSON object (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return _from_mapping(cls, {k: v for k, v in data.items() if k in names}, source)


@dataclass
class Summary:
    """``summary.json``: what a completed run did, measured and saved.

    ``extra`` holds what this version does not name (``val_*`` metrics of other tasks, keys of
    a newer distgrow); :meth:`to_dict` writes it back at the top level.
    """

    status: str
    epochs: int
    total_updates: int
    samples_seen: int
    wall_s: float
    worker_seconds: float
    world_size: int
    growth_mode: str
    base_batch: int
    dataset_size: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    growth_events: int = 0
    final_setting: dict[str, Any] | None = None
    planned_total_updates: int | None = None
    baseline_total_updates: int | None = None
    update_ratio_vs_baseline: float | None = None
    distgrow_version: str | None = None
    startup_s: float | None = None
    train_s: float | None = None
    train_cpu_s: float | None = None
    samples_per_s: float | None = None
    worker_hours: float | None = None
    gpu_hours: float | None = None
    device: str | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    savings: dict[str, Any] = field(default_factory=dict)
    held: dict[str, Any] = field(default_factory=dict)
    """What the SLURM job(s) held up to the summary (``distgrow.held``); {} outside SLURM."""
    version: int = SUMMARY_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``extra`` merged at the top level)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = SUMMARY_FILE) -> Summary:
        """Rebuild from the JSON object; a file without ``version`` is version 0 (round 1)."""
        return _from_mapping(cls, {"version": 0, **data}, source)


@dataclass
class SlurmJob:
    """One SLURM job that held the run: a span of a chain, or the whole allocation.

    ``state`` is distgrow's word for where it stands: ``submitted`` (pending in the queue),
    ``running``, ``grown`` (its workers asked for more; the next span is ``next_job_id``),
    ``completed`` (the plan ran to its end), ``stopped`` (a signal: scancel, pre-emption, the
    time limit; ``requeued`` when the job requeued itself), ``failed`` (``message`` and
    ``fix`` say why and how to resume), ``cancelled`` (by ``distgrow chain cancel`` before
    it ran). Sizes are what the job was given: ``cpus`` and ``gpus`` over all its nodes.
    """

    index: int
    job_id: str
    workers: int
    state: str = "submitted"
    nodes: int | None = None
    tasks: int | None = None
    cpus: int | None = None
    gpus: int | None = None
    partition: str | None = None
    time_limit: str | None = None
    submitted: float | None = None
    runs: list[list[float | None]] = field(default_factory=list)
    """``[start, end]`` (Unix times) of each time the job ran, as its controller saw them (a
    requeued job runs again); ``end`` is None while it runs, or when it was killed first."""
    restarts: int = 0
    exit_code: int | None = None
    next_job_id: str | None = None
    message: str | None = None
    fix: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SlurmJobs:
    """``slurm_jobs.json``: the jobs that held the run, in order, and how the chain stands.

    ``mode`` is ``launch.slurm`` (``chain`` or ``allocation``); ``name`` the job name every
    span of a chain shares (``scancel --name=NAME`` stops them all); ``cancel_requested`` is
    set by ``distgrow chain cancel`` so that a span ending meanwhile submits no next one.
    """

    mode: str
    name: str
    jobs: list[SlurmJob] = field(default_factory=list)
    cancel_requested: bool = False
    version: int = SLURM_JOBS_VERSION

    def job(self, job_id: str) -> SlurmJob | None:
        """The record of ``job_id`` (None when the run has none)."""
        return next((j for j in self.jobs if j.job_id == job_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "mode": self.mode,
            "name": self.name,
            "cancel_requested": self.cancel_requested,
            "jobs": [
                {**{k: v for k, v in dataclasses.asdict(j).items() if k != "extra"}, **j.extra}
                for j in self.jobs
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = SLURM_JOBS_FILE) -> SlurmJobs:
        jobs = [_from_mapping(SlurmJob, j, source) for j in data.get("jobs") or []]
        top = {k: v for k, v in data.items() if k != "jobs"}
        return _from_mapping(cls, {**top, "jobs": jobs}, source)


# -- the directory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (nothing is created until written)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def resize(self) -> Path:
        return self.path / RESIZE_FILE

    @property
    def wandb_run_id(self) -> Path:
        return self.path / WANDB_RUN_ID_FILE

    @property
    def launch_dir(self) -> Path:
        return self.path / LAUNCH_DIR

    @property
    def slurm_jobs(self) -> Path:
        return self.path / SLURM_JOBS_FILE

    # the launch folder

    def attempt_log(self, number: int, workers: int, node: int | None = None) -> Path:
        """The output of launch ``number`` of ``workers`` workers (on node ``node`` of a
        multi-node torchrun job that node 0 leads)."""
        on_node = "" if node is None else f"-node{node}"
        return self.launch_dir / f"attempt-{number:02d}-{workers}w{on_node}.log"

    def agent_log(self, number: int, index: int) -> Path:
        """The output of elastic torchrun agent ``index`` of launch ``number``."""
        return self.launch_dir / f"attempt-{number:02d}-agent-{index}.log"

    def agent_logs(self, number: int) -> str:
        """Every agent log of launch ``number``, as a pattern (for the messages)."""
        return str(self.launch_dir / f"attempt-{number:02d}-agent-*.log")

    @staticmethod
    def error_file(log: Path) -> Path:
        """The torchelastic error file (``TORCHELASTIC_ERROR_FILE``) next to launch log ``log``."""
        return log.with_name(log.name.removesuffix(".log") + ERROR_FILE_SUFFIX)

    @staticmethod
    def resize_set_aside(
        number: int | None = None, *, need: int | None = None, now: float | None = None
    ) -> str:
        """The name under ``launch/`` of a set-aside ``resize.json``: the one launch ``number``
        ended with, its elastic request for ``need`` workers, or one found at start-up (``now``)."""
        if now is not None:
            return f"stale-{int(now)}.{RESIZE_FILE}"
        ask = "" if need is None else f"-ask-{need}"
        return f"attempt-{number or 0:02d}{ask}.{RESIZE_FILE}"

    def span_script(self, index: int) -> Path:
        """The batch script of span ``index`` of a SLURM chain."""
        return self.launch_dir / f"span-{index:02d}.sbatch"

    def span_output(self, index: int) -> Path:
        """Where SLURM writes span ``index``'s output (``%j``: its job id)."""
        return self.launch_dir / f"span-{index:02d}-%j.out"

    @property
    def discovery_script(self) -> Path:
        return self.launch_dir / DISCOVERY_SCRIPT

    @property
    def horovod_slots(self) -> Path:
        return self.launch_dir / SLOTS_FILE

    # checkpoints

    def checkpoint(self, step: int) -> Path:
        """The file of the checkpoint after ``step`` updates."""
        return self.path / f"ckpt-{step:09d}.pt"

    def checkpoints(self) -> list[Path]:
        """Checkpoints, oldest first (by step; temporary files are ignored)."""
        if not self.path.is_dir():
            return []
        names = ((p, _CHECKPOINT_NAME.match(p.name)) for p in self.path.iterdir())
        return [p for _, p in sorted((int(m.group(1)), p) for p, m in names if m)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def remove_temporaries(self) -> list[Path]:
        """Remove the temporary files a killed trainer left (a checkpoint cut mid-write can be
        as large as the model); the trainer calls this as it starts, when no other process
        writes them. The controller's files (``slurm_jobs.json``) are left alone.

        Returns:
            The files removed.
        """
        if not self.path.is_dir():
            return []
        removed = []
        for p in self.path.iterdir():
            if _TRAINER_TEMPORARY.match(p.name) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
        return removed

    def holds_a_run(self) -> bool:
        """True when a run wrote here (a checkpoint, metrics or a summary)."""
        return bool(self.checkpoints()) or self.metrics.exists() or self.summary.exists()

    # metrics

    def records(self) -> list[dict[str, Any]]:
        """Every record of ``metrics.jsonl`` ([] when there is none)."""
        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def tail_records(self, size: int = 65536) -> Iterator[dict[str, Any]]:
        """The records in the last ``size`` bytes of ``metrics.jsonl``, newest first (a long
        run costs nothing; a cut first line or one being written is skipped)."""
        try:
            with self.metrics.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return
        for line in reversed(text.splitlines()):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record

    def last_record(self, key: str) -> dict[str, Any] | None:
        """The newest record of ``metrics.jsonl`` that has ``key``."""
        return next((r for r in self.tail_records() if key in r), None)

    # resize.json

    def read_resize(self) -> ResizeRequest | None:
        """The resize request, or None when there is none or it cannot be read."""
        if not self.resize.is_file():
            return None
        try:
            return ResizeRequest.from_dict(read_json(self.resize), str(self.resize))
        except RunDirError:
            return None

    def write_resize(self, request: ResizeRequest) -> None:
        write_json(self.resize, request)

    def clear_resize(self) -> None:
        self.resize.unlink(missing_ok=True)

    def set_aside_resize(self, name: str) -> Path | None:
        """Move ``resize.json`` into ``launch/NAME`` so that the next launch starts without it."""
        if not self.resize.exists():
            return None
        target = self.launch_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.resize, target)
        return target

    # summary.json

    def read_summary(self) -> Summary:
        """The run's summary.

        Raises:
            RunDirError: there is none (the run has not finished) or it cannot be read.
        """
        if not self.summary.is_file():
            raise RunDirError(
                f"{self.path} has no {SUMMARY_FILE}: the run has not finished (or is not a "
                "distgrow run directory). Fix: finish it with `distgrow train CONFIG "
                "run.output_dir=... --resume`."
            )
        return Summary.from_dict(read_json(self.summary), str(self.summary))

    def write_summary(self, summary: Summary) -> None:
        write_json(self.summary, summary.to_dict())

    # slurm_jobs.json

    def read_slurm_jobs(self) -> SlurmJobs | None:
        """The SLURM jobs of the run (None when it ran outside SLURM or the file is unreadable)."""
        if not self.slurm_jobs.is_file():
            return None
        try:
            return SlurmJobs.from_dict(read_json(self.slurm_jobs), str(self.slurm_jobs))
        except RunDirError:
            return None

    def write_slurm_jobs(self, jobs: SlurmJobs) -> None:
        write_json(self.slurm_jobs, jobs.to_dict())
