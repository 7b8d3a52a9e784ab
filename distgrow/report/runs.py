"""Finished runs as the report reads them: the run directory (through :mod:`distgrow.rundir`),
the curves drawn from its records, and how two resolved configs differ."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgrow.config import ConfigError, config_from_dict
from distgrow.config.loader import read_yaml_file
from distgrow.planner import make_plan
from distgrow.rundir import RunDir, RunDirError, Summary


class ReportError(RuntimeError):
    """A report cannot be made as asked; the message says why and how to fix it.

    Args:
        message: What went wrong, the value and the fix.
        exit_code: The CLI's exit status: 2 for bad input, 1 for a training that failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class RunData:
    """A finished run directory: its summary, its metric records and its config."""

    label: str
    path: Path
    summary: Summary
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.path)

    @property
    def growth_mode(self) -> str:
        return self.summary.growth_mode or str(self.config.get("growth", {}).get("mode"))

    @property
    def dataset_size(self) -> int:
        """N: from the summary, else samples seen per epoch."""
        if self.summary.dataset_size:
            return int(self.summary.dataset_size)
        return max(1, self.summary.samples_seen // max(1, self.summary.epochs or 1))


def _read_records(path: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``, strictly: only the last line may be cut (a killed run); a damaged
    line anywhere else is an error, so a report never silently drops epochs."""
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if f.readline():
                    raise ReportError(
                        f"{path}:{number} is not a JSON line. Fix: repair or remove that line."
                    ) from None
    return records


def read_summary(run_dir: RunDir) -> Summary:
    """The run's :class:`~distgrow.rundir.Summary`.

    Raises:
        ReportError: there is none (the run has not finished) or it cannot be read.
    """
    try:
        return run_dir.read_summary()
    except RunDirError as err:
        raise ReportError(f"{err} Or leave it out of the report.") from None


def read_config(run_dir: RunDir) -> dict[str, Any]:
    """The run's ``config.yaml`` as a tree ({} when there is none or it is not a mapping).

    Raises:
        ReportError: it cannot be read, is not valid YAML, is an alias bomb or is empty.
    """
    path = run_dir.config
    if not path.is_file():
        return {}
    loaded, problem = read_yaml_file(path)
    if problem is None:
        return loaded if isinstance(loaded, dict) else {}
    raise ReportError(
        f"{path} is {problem}; its checkpoints and metrics were left as they are. Fix: restore "
        "it from the job's YAML the run was trained with, or leave the run out of the report."
    )


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read a finished run directory: its summary, metric records and config.

    Raises:
        ReportError: the directory is missing or the run has not finished.
    """
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist.")
    summary = read_summary(run_dir)
    records = _read_records(run_dir.metrics) if run_dir.metrics.is_file() else []
    return RunData(label or run_dir.path.name, run_dir.path, summary, records, read_config(run_dir))


# --------------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------------


def validation_points(run: RunData, metric: str) -> list[dict[str, Any]]:
    """The run's epoch records, one per epoch (a resume may have logged one twice: the later
    record wins), in epoch order, with a finite ``metric``."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in run.records:
        if record.get("kind") == "epoch" and isinstance(record.get(metric), int | float):
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch) if math.isfinite(by_epoch[e][metric])]


def schedule_path(run: RunData) -> tuple[list[float], list[int], list[float]]:
    """(epochs, global batch, lr) where the run's schedule changes, for a step plot.

    From the plan of the run's own config when its schedule is known in advance (the trainer
    follows it exactly); for plateau schedules, adaptive growth, the noise cap, or without a
    readable config, from the logged records (growth events, step and epoch records).
    """
    n, epochs_total = run.dataset_size, run.summary.epochs or 0
    growth = run.config.get("growth", {}) if run.config else {}
    # Adaptive growth and the noise cap decide from measurements: only the records know.
    measured = growth.get("mode") == "adaptive" or growth.get("noise_cap") is not None
    if run.config and run.config.get("schedule", {}).get("type") != "plateau" and not measured:
        try:
            cfg = config_from_dict(run.config, source=str(run.run_dir.config))
            plan = make_plan(cfg, n, min_workers=run.summary.world_size or 1)
        except (ConfigError, ValueError):
            plan = None
        if plan is not None and plan.phases:
            xs: list[float] = []
            batch: list[int] = []
            lr: list[float] = []
            for phase in plan.phases:
                xs.append(phase.start_epoch)
                batch.append(phase.global_batch)
                lr.append(phase.lr)
                if not math.isclose(phase.lr, phase.lr_end, rel_tol=1e-9):
                    xs.append(phase.end_epoch)  # a continuous decay inside the phase
                    batch.append(phase.global_batch)
                    lr.append(phase.lr_end)
            xs.append(float(plan.epochs))
            batch.append(batch[-1])
            lr.append(lr[-1])
            return xs, batch, lr
    points: list[tuple[float, int, float]] = []
    for record in run.records:
        if isinstance(record.get("global_batch"), int) and isinstance(
            record.get("lr"), int | float
        ):
            # The record describes the update that ended at samples_seen (growth events: the
            # update that starts there), so it is placed at the start of that update.
            start = int(record.get("samples_seen") or 0)
            if record.get("kind") != "event":
                start = max(0, start - int(record["global_batch"]))
            points.append((start / n, int(record["global_batch"]), float(record["lr"])))
    points.sort(key=lambda p: p[0])
    if points:
        points.insert(0, (0.0, points[0][1], points[0][2]))
        points.append((float(epochs_total or points[-1][0]), points[-1][1], points[-1][2]))
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


NOISE_EVENTS = ("adaptive_growth", "adaptive_at_limit", "noise_cap", "noise_cap_lifted")
"""The decisions taken from the measured noise scale (events of ``metrics.jsonl``)."""


def noise_path(run: RunData) -> tuple[list[float], list[float]]:
    """(epochs, smoothed B_simple) at each record that carries a measurement: the step
    records' ``noise/b_simple`` and the decisions' ``b_simple``; empty when the run did not
    measure the noise scale."""
    n = run.dataset_size
    points: list[tuple[float, float]] = []
    for record in run.records:
        if record.get("kind") == "step":
            value = record.get("noise/b_simple")
        elif record.get("kind") == "event" and record.get("event") in NOISE_EVENTS:
            value = record.get("b_simple")
        else:
            continue
        if isinstance(value, int | float):
            points.append((int(record.get("samples_seen") or 0) / n, float(value)))
    points.sort(key=lambda p: p[0])
    return [p[0] for p in points], [p[1] for p in points]


def noise_decisions(run: RunData) -> list[dict[str, Any]]:
    """The run's noise-scale decisions (:data:`NOISE_EVENTS`), in order."""
    return [r for r in run.records if r.get("kind") == "event" and r.get("event") in NOISE_EVENTS]


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat(value, name + "."))
        else:
            out[name] = value
    return out


def differences(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    ignore: tuple[str, ...] = (),
    names: tuple[str, str] = ("here", "in the baseline"),
) -> list[str]:
    """The dotted keys whose values differ, each as ``key (A here, B in the baseline)``.

    Args:
        a: One config tree.
        b: The other.
        ignore: Prefixes of the keys to leave out (``"growth."``, ``"run.name"``).
        names: How the two sides are named in the text.
    """
    fa, fb = flat(a), flat(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key.startswith(ignore):
            continue
        if fa.get(key) != fb.get(key):
            out.append(f"{key} ({fa.get(key)!r} {names[0]}, {fb.get(key)!r} {names[1]})")
    return out


_IGNORED_CONFIG = ("run.name", "run.output_dir", "run.resume", "growth.", "logging.", "launch.")


def config_differences(run: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Settings (outside growth, logging, launch and the run's name/folder) that differ."""
    return differences(run, baseline, ignore=_IGNORED_CONFIG)
