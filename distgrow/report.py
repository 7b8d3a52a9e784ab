"""``distgrow compare``, ``distgrow report`` and ``distgrow sweep``: runs side by side.

* :func:`compare` trains the ``decay_lr`` baseline, ``grow_batch`` and the ``hybrid`` (a batch
  cap that forces the fall-back to LR decay), optionally ``grow_batch_lr`` and
  ``grow_momentum``, each as a real ``distgrow train`` process on the same config, data and
  seed, then calls :func:`build_report`.
* :func:`build_report` turns finished run directories into a report directory: ``report.md``
  (final quality, updates, wall-clock, start-up, worker-seconds, ratios against the baseline,
  savings labelled *measured* or *estimated* with their method, per-phase throughput), PNG
  plots, and ``summary.json`` with the same numbers.
* :func:`sweep` trains a grid of batch sizes × learning rates at a fixed batch (``decay_lr``)
  and writes the final losses as ``sweep.png``, ``sweep.md`` and ``sweep.json``.

This module imports neither torch nor matplotlib at import time; runs are separate processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distgrow.config import Config, ConfigError, config_from_dict, load_config
from distgrow.exits import EXIT_NONFINITE
from distgrow.metrics import write_json
from distgrow.planner import make_plan
from distgrow.savings import (
    PHASE_MEASURES,
    PHASE_SPLIT,
    SUMMARY_MEASURES,
    SavingsError,
    format_ratio,
    format_seconds,
    measured_savings,
    quality_metric,
    reference_throughput,
    try_estimated_savings,
)

VARIANTS = ("decay_lr", "grow_batch", "hybrid", "grow_batch_lr", "grow_momentum")
"""What ``compare`` can train; ``hybrid`` is ``grow_batch`` with a cap that binds."""
DEFAULT_VARIANTS = ("decay_lr", "grow_batch", "hybrid")


PLOT_FILES = {
    "val_vs_epochs": "val_vs_epochs.png",
    "val_vs_updates": "val_vs_updates.png",
    "val_vs_wall": "val_vs_wall.png",
    "schedules": "schedules.png",
}

Echo = Callable[[str], None]


class ReportError(RuntimeError):
    """A report cannot be made as asked; the message says why and how to fix it.

    Args:
        message: What went wrong, the value and the fix.
        exit_code: The CLI's exit status: 2 for bad input, 1 for a training that failed.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------
# Finished runs
# --------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A finished run directory: its summary, its metric records and its config."""

    label: str
    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def growth_mode(self) -> str:
        return str(self.summary.get("growth_mode") or self.config.get("growth", {}).get("mode"))

    @property
    def dataset_size(self) -> int:
        """N: from the summary, else samples seen per epoch."""
        n = self.summary.get("dataset_size")
        if n:
            return int(n)
        epochs = int(self.summary.get("epochs") or 1)
        return max(1, int(self.summary.get("samples_seen") or 0) // max(1, epochs))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read as JSON ({err}).") from err
    if not isinstance(data, dict):
        raise ReportError(f"{path} holds {type(data).__name__}, not a JSON object.")
    return data


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                # The last line of a killed run can be cut short; anything else is damage.
                if f.readline():
                    raise ReportError(
                        f"{path}:{number} is not a JSON line. Fix: repair or remove that line."
                    ) from None
    return records


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read a finished run directory (``summary.json``, ``metrics.jsonl``, ``config.yaml``).

    Raises:
        ReportError: the directory is missing or the run has not finished.
    """
    run_dir = Path(path)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist.")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ReportError(
            f"{run_dir} has no summary.json: the run has not finished (or is not a distgrow "
            "run). Fix: finish it with `distgrow train CONFIG run.output_dir=... --resume`, "
            "or leave it out of the report."
        )
    metrics_path = run_dir / "metrics.jsonl"
    records = _read_jsonl(metrics_path) if metrics_path.is_file() else []
    config: dict[str, Any] = {}
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        config = loaded if isinstance(loaded, dict) else {}
    return RunData(label or run_dir.name, run_dir, _read_json(summary_path), records, config)


# --------------------------------------------------------------------------------------------
# Curves for the plots
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

    From the plan of the run's own ``config.yaml`` when its schedule is known in advance (the
    trainer follows it exactly); for plateau schedules, or without a readable config, from the
    logged records (growth events, step and epoch records).
    """
    n, epochs_total = run.dataset_size, int(run.summary.get("epochs") or 0)
    if run.config and run.config.get("schedule", {}).get("type") != "plateau":
        try:
            cfg = config_from_dict(run.config, source=f"{run.path / 'config.yaml'}")
            plan = make_plan(cfg, n, min_workers=int(run.summary.get("world_size") or 1))
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


def run_curve(run: RunData, metric: str, colour: str | None = None) -> Any:
    """The :class:`distgrow.plots.Curve` of a run."""
    from distgrow.plots import Curve

    points = validation_points(run, metric)
    xs, batch, lr = schedule_path(run)
    return Curve(
        label=run.label,
        epochs=[float(r["epoch"]) for r in points],
        updates=[int(r["step"]) for r in points],
        wall_s=[float(r["wall_s"]) for r in points],
        metric=[float(r[metric]) for r in points],
        schedule_epochs=xs,
        batch=batch,
        lr=lr,
        colour=colour,
    )


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


_IGNORED_CONFIG = ("run.name", "run.output_dir", "run.resume", "growth.", "logging.", "launch.")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(run: Mapping[str, Any], baseline: Mapping[str, Any]) -> list[str]:
    """Settings (outside growth, logging, launch and the run's name/folder) that differ."""
    a, b = _flat(run), _flat(baseline)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(_IGNORED_CONFIG) or key in _IGNORED_CONFIG:
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key} ({a.get(key)!r} here, {b.get(key)!r} in the baseline)")
    return diffs


def _colours(runs: Sequence[RunData]) -> list[str]:
    """A colour per run: its label's if it names a variant, else its growth mode's if no
    other run has that mode, else a spare one."""
    from distgrow.plots import COLOURS, colour_for

    modes = [r.growth_mode for r in runs]
    out = []
    for i, run in enumerate(runs):
        if run.label in COLOURS:
            out.append(COLOURS[run.label])
        elif modes.count(run.growth_mode) == 1 and run.growth_mode in COLOURS:
            out.append(COLOURS[run.growth_mode])
        else:
            out.append(colour_for(run.label, i))
    return out


def _run_numbers(run: RunData) -> dict[str, Any]:
    s = run.summary
    phases = s.get("phases") or []
    cap = run.config.get("growth", {}).get("max_global_batch")
    return {
        "label": run.label,
        "run_dir": str(run.path),
        "growth_mode": run.growth_mode,
        "max_global_batch": cap,
        "val_acc": s.get("val_acc"),
        "val_loss": s.get("val_loss"),
        "train_loss": s.get("train_loss"),
        **{key: s.get(key) for key in SUMMARY_MEASURES},
        "final_batch": (s.get("final_setting") or {}).get("global_batch"),
        "phases": [
            {key: p.get(key) for key in ("index", "start_epoch", *PHASE_SPLIT, *PHASE_MEASURES)}
            for p in phases
        ],
    }


def throughput_drift(run: RunData, base: RunData, tolerance: float = 0.2) -> str | None:
    """A warning when the two runs measured different throughputs at the same batch B0.

    Both trained at B0 first with the same code, so a gap means the machine changed (other
    jobs, clocks, another node): the measured wall-clock ratio then mixes that in, while the
    estimate compares the run with its own B0 phase.
    """
    b0 = run.summary.get("base_batch")
    if not isinstance(b0, int):
        return None
    try:
        batch, rate_r, _, exact_r = reference_throughput(run.summary.get("phases") or [], b0)
        _, rate_b, _, exact_b = reference_throughput(base.summary.get("phases") or [], b0)
    except SavingsError:
        return None
    if not (exact_r and exact_b) or abs(rate_r / rate_b - 1.0) <= tolerance:
        return None
    return (
        f"at the same batch B0={batch} it trained at {rate_r:,.0f} samples/s and the baseline "
        f"at {rate_b:,.0f} samples/s ({rate_r / rate_b - 1:+.0%}): the machine was not equally "
        "loaded, so the measured wall-clock ratio mixes that in; the estimated one compares the "
        "run with its own B0 phase."
    )


def _pick_baseline(runs: Sequence[RunData], baseline: str | None) -> RunData | None:
    if baseline is not None:
        for run in runs:
            if baseline in (run.label, str(run.path)) or Path(baseline) == run.path:
                return run
        raise ReportError(
            f"the baseline {baseline!r} is none of the runs given "
            f"({', '.join(r.label for r in runs)}). Fix: name one of them."
        )
    found = [r for r in runs if r.growth_mode == "decay_lr"]
    if len(found) > 1:
        raise ReportError(
            f"{len(found)} runs are decay_lr baselines ({', '.join(str(r.path) for r in found)}). "
            "Fix: choose one with --baseline RUN_DIR."
        )
    return found[0] if found else None


def build_report(
    runs: Sequence[RunData],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    title: str | None = None,
    command: str | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Write ``report.md``, the PNG plots and ``summary.json`` for finished runs.

    Args:
        runs: The runs, in the order of the table (labels must differ).
        out_dir: The report directory (created).
        baseline: Label or directory of the ``decay_lr`` run to measure against; by default
            the one run whose ``growth_mode`` is ``decay_lr``. Without one, savings are
            *estimated* from each run's own throughput at B0.
        title: The report's heading (default: the runs' ``run.name``).
        command: The command that produced the runs, shown in the report.
        notes: Extra lines for the report.

    Returns:
        What ``summary.json`` holds.

    Raises:
        ReportError: no runs, duplicate labels, or an ambiguous baseline.
    """
    if not runs:
        raise ReportError("no runs to report. Fix: give at least one finished run directory.")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ReportError(f"two runs share a label ({labels}). Fix: give distinct directories.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = _pick_baseline(runs, baseline)
    metric = "val_acc" if all(quality_metric(r.summary) == "val_acc" for r in runs) else "val_loss"
    notes = list(notes)

    rows = []
    for run in runs:
        row = _run_numbers(run)
        row["is_baseline"] = run is base
        row["measured"] = None
        if base is not None and run is not base:
            try:
                row["measured"] = measured_savings(
                    run.summary, base.summary, f"the {base.label} run in {base.path}"
                ).to_dict()
            except SavingsError as err:
                row["measured_unavailable"] = str(err)
                notes.append(f"{run.label}: no measured savings: {err}")
            drift = throughput_drift(run, base)
            if drift:
                row["throughput_drift"] = drift
                notes.append(f"{run.label}: {drift}")
            diffs = config_differences(run.config, base.config)
            if diffs:
                row["config_differences"] = diffs
                notes.append(
                    f"{run.label} differs from the baseline in more than the growth settings: "
                    + "; ".join(diffs)
                )
        row["estimated"] = None if run is base else try_estimated_savings(run.summary)
        rows.append(row)

    plots = _write_plots(runs, out, metric)
    summary = {
        "title": title or _title(runs),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "metric": metric,
        "baseline": None if base is None else base.label,
        "savings_kind": "measured" if base is not None else "estimated",
        "runs": rows,
        "plots": plots,
        "notes": notes,
    }
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(render_markdown(summary), encoding="utf-8")
    return summary


def _title(runs: Sequence[RunData]) -> str:
    names = sorted({str(r.config.get("run", {}).get("name") or r.label) for r in runs})
    first, last = names[0], names[-1]  # the common prefix of a sorted list is theirs
    size = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
    )
    return first[:size].rstrip("-_") or runs[0].label


def _write_plots(runs: Sequence[RunData], out: Path, metric: str) -> dict[str, str]:
    from distgrow import plots

    curves = [run_curve(r, metric, c) for r, c in zip(runs, _colours(runs), strict=True)]
    plots.plot_metric(curves, "epochs", metric, out / PLOT_FILES["val_vs_epochs"])
    plots.plot_metric(curves, "updates", metric, out / PLOT_FILES["val_vs_updates"])
    plots.plot_metric(curves, "wall_s", metric, out / PLOT_FILES["val_vs_wall"])
    plots.plot_schedules(curves, out / PLOT_FILES["schedules"])
    return dict(PLOT_FILES)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, fmt)


def _metric_text(metric: str, value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if metric == "val_acc" else f"{value:.4f}"


def _delta_text(metric: str, delta: float | None) -> str:
    if delta is None:
        return "-"
    return f"{delta * 100:+.2f} pp" if metric == "val_acc" else f"{delta:+.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    """``report.md`` from the report's summary (the numbers are exactly those of the JSON)."""
    metric = summary["metric"]
    metric_name = "val acc" if metric == "val_acc" else "val loss"
    rows = summary["runs"]
    base = summary["baseline"]
    lines = [f"# distgrow report: {summary['title']}", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    if base is not None:
        lines += [
            f"Baseline: **{base}** (growth.mode=decay_lr, same config, data and seed). "
            "Savings against it are **measured**: both runs were trained.",
            "",
        ]
    else:
        lines += [
            "No decay_lr baseline run was given: savings are **estimated** from each run's own "
            "throughput at the base batch (method written next to each number).",
            "",
        ]
    header = [
        "run",
        "growth.mode",
        f"final {metric_name}",
        "updates",
        "wall-clock",
        "start-up",
        "worker-s",
        "updates vs baseline",
        "wall-clock vs baseline",
        "worker-s vs baseline",
        f"Δ {metric_name}",
    ]
    table = []
    for row in rows:
        m = row["measured"] if row["measured"] else None
        if row["is_baseline"]:
            vs = ["1.00× (baseline)"] * 3 + ["-"]
        elif m:
            vs = [
                format_ratio(m["updates_ratio"], "fewer", "more"),
                format_ratio(m["wall_ratio"], "faster", "slower"),
                format_ratio(m["worker_seconds_ratio"], "less", "more"),
                _delta_text(metric, m["metric_delta"]),
            ]
        else:
            vs = ["-"] * 4
        mode = row["growth_mode"] + (
            f" (cap {row['max_global_batch']})" if row.get("max_global_batch") else ""
        )
        table.append(
            [
                row["label"],
                mode,
                _metric_text(metric, row.get(metric)),
                _num(row["total_updates"]),
                format_seconds(row["wall_s"]),
                format_seconds(row["startup_s"]),
                _num(row["worker_seconds"], ",.1f"),
                *vs,
            ]
        )
    lines += _table(header, table)
    lines += [
        "",
        "Wall-clock is training time from the first update to the end (validation and "
        "checkpoints included), start-up excluded and shown apart. Worker-seconds = wall-clock × "
        "the job's workers (GPU-seconds on GPUs). Ratios are baseline ÷ run.",
        "",
        "## Savings",
        "",
    ]
    for row in rows:
        if row["is_baseline"]:
            continue
        lines.append(f"### {row['label']}")
        lines.append("")
        if row["measured"]:
            lines.append(_savings_line(row["measured"], metric))
        elif row.get("measured_unavailable"):
            lines.append(f"- measured: not available: {row['measured_unavailable']}")
        est = row["estimated"] or {}
        if est.get("unavailable"):
            lines.append(f"- estimated: not available: {est['unavailable']}")
        elif est:
            lines.append(_savings_line(est, metric))
        lines.append("")
    lines += ["## Throughput per phase", ""]
    for row in rows:
        lines.append(f"### {row['label']}")
        lines.append("")
        if not row["phases"]:
            lines += ["No per-phase measurements in this run's summary.json.", ""]
            continue
        lines += _table(
            [
                "phase",
                "from epoch",
                "batch",
                "workers × micro × accum",
                "lr",
                "updates",
                "train s",
                "wall s",
                "samples/s",
                "samples/s/worker",
            ],
            [
                [
                    str(int(p["index"] or 0) + 1),
                    _num(p["start_epoch"], ".2f"),
                    _num(p["global_batch"]),
                    f"{p['workers']} × {p['micro_batch']} × {p['accum_steps']}",
                    _num(p["lr"], ".4g"),
                    _num(p["updates"]),
                    _num(p["train_s"], ",.1f"),
                    _num(p["wall_s"], ",.1f"),
                    _num(p["samples_per_s"]),
                    _num(p["samples_per_s_per_worker"]),
                ]
                for p in row["phases"]
            ],
        )
        lines.append("")
    plots = summary.get("plots") or {}
    if plots:
        lines += ["## Plots", ""]
        captions = {
            "val_vs_epochs": f"{metric_name} against epochs",
            "val_vs_updates": f"{metric_name} against parameter updates",
            "val_vs_wall": f"{metric_name} against wall-clock",
            "schedules": "global batch and learning rate against epochs",
        }
        for key, file in plots.items():
            lines += [f"![{captions.get(key, key)}]({file})", ""]
    if summary.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def _savings_line(s: Mapping[str, Any], metric: str) -> str:
    words = [
        f"{format_ratio(s['updates_ratio'], 'fewer', 'more')} updates "
        f"({_num(s['baseline_updates'])} → {_num(s['run_updates'])})",
        f"{format_ratio(s['wall_ratio'], 'faster', 'slower')} "
        f"({format_seconds(s['baseline_wall_s'])} → {format_seconds(s['run_wall_s'])}, "
        f"{format_seconds(s['wall_saved_s'])} saved)",
        f"worker-seconds {format_ratio(s['worker_seconds_ratio'], 'less', 'more')} "
        f"({_num(s['baseline_worker_seconds'], ',.1f')} → {_num(s['run_worker_seconds'], ',.1f')})",
    ]
    if s.get("metric_delta") is not None:
        words.append(f"Δ {metric.replace('_', ' ')} {_delta_text(metric, s['metric_delta'])}")
    method = str(s["method"]).removeprefix(f"{s['kind']}: ")
    return f"- **{s['kind']}**: " + "; ".join(words) + f". Method: {method}."


# --------------------------------------------------------------------------------------------
# Running trainings
# --------------------------------------------------------------------------------------------


def default_report_dir(name: str, kind: str = "") -> Path:
    """``reports/<name>[-<kind>]-<YYYYmmdd-HHMMSS>`` under the current directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("reports") / "-".join(part for part in (name, kind, stamp) if part)


def hybrid_cap(cfg: Config, dataset_size: int) -> int:
    """A ``growth.max_global_batch`` that makes ``grow_batch`` fall back to LR decay.

    Piecewise schedules: the first grown batch of the uncapped plan when the plan grows at
    least twice (the paper's hybrid: 128 → 640, then the LR); with a single growth, a cap
    between the two batches. Continuous schedules (exponential, time-based, cosine), whose
    batch grows a little at many updates: the grown batch nearest the geometric middle of the
    uncapped path, so the batch carries about half the decay (in log scale) and the LR the rest.

    Raises:
        ReportError: the plan never grows (a constant schedule), so there is no hybrid.
    """
    from dataclasses import replace

    from distgrow.planner import GrowthPolicy

    grow = replace(cfg, growth=replace(cfg.growth, mode="grow_batch"))
    plan = make_plan(grow, dataset_size)
    batches = sorted({p.global_batch for p in plan.phases})
    if len(batches) < 2:
        raise ReportError(
            f"the grow_batch plan of this config never grows the batch (it stays at "
            f"{batches[0] if batches else '?'}), so a hybrid cannot be formed. Fix: use a "
            "decaying schedule, or leave hybrid out of --variants."
        )
    schedule = GrowthPolicy(grow, dataset_size).schedule
    candidates = []
    if schedule is not None and schedule.continuous and len(batches) >= 3:
        middle = math.sqrt(batches[0] * batches[-1])
        candidates.append(min(batches[1:-1], key=lambda b: abs(math.log(b / middle))))
    elif len(batches) >= 3:
        candidates.append(batches[1])
    candidates.append((batches[0] + batches[1]) // 2)
    for cap in candidates:
        capped = replace(grow, growth=replace(grow.growth, max_global_batch=cap))
        if any(p.capped for p in make_plan(capped, dataset_size).phases):
            return cap
    raise ReportError(
        f"no cap between {batches[0]} and {batches[1]} forces the fall-back to LR decay for "
        "this config. Fix: leave hybrid out of --variants."
    )


def variant_overrides(cfg: Config, variant: str, dataset_size: int) -> list[str]:
    """The dotted overrides that turn the base config into ``variant``.

    Raises:
        ReportError: an unknown variant, or a hybrid the plan cannot form.
    """
    if variant not in VARIANTS:
        raise ReportError(
            f"unknown variant {variant!r}. Fix: use some of {', '.join(VARIANTS)} "
            "(comma-separated)."
        )
    if variant == "hybrid":
        return [
            "growth.mode=grow_batch",
            f"growth.max_global_batch={hybrid_cap(cfg, dataset_size)}",
        ]
    return [f"growth.mode={variant}"]


def parse_list(text: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    """``"32,64,128"`` → ``[32, 64, 128]``; errors name the bad item.

    Raises:
        ReportError: an empty list or an item that does not parse.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ReportError(f"{what} is empty. Fix: give a comma-separated list, e.g. 32,64,128.")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            raise ReportError(
                f"{what}: {item!r} is not a {kind.__name__}. Fix: e.g. 32,64,128 or 0.01,0.1."
            ) from None
    return out


def _child_env() -> dict[str, str]:
    """The environment of a training process: this one's, with this distgrow importable."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def train_process(
    config: str | Path,
    overrides: Sequence[str],
    run_dir: Path,
    log_path: Path,
    *,
    prefix: str,
    echo: Echo,
    python: str = sys.executable,
) -> int:
    """Run ``distgrow train CONFIG OVERRIDES run.output_dir=RUN_DIR`` to its end.

    The output is echoed line by line (prefixed) and kept in ``log_path``. A run directory
    with checkpoints but no summary is resumed; one with a finished summary is not rerun.

    Returns:
        The process's exit status (0 also when the run had already finished).
    """
    if (run_dir / "summary.json").is_file():
        echo(f"{prefix} already finished in {run_dir}: reusing it")
        return 0
    argv = [python, "-m", "distgrow", "train", str(config), *overrides]
    argv.append(f"run.output_dir={run_dir}")
    if any(run_dir.glob("ckpt-*.pt")):
        argv.append("--resume")
        echo(f"{prefix} resuming the unfinished run in {run_dir}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    echo(f"{prefix} $ distgrow {shlex.join(argv[3:])}")
    with log_path.open("a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_child_env(),
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(f"{prefix} {line.rstrip()}")
            return proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: do not leave the training behind
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def compare(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    out_dir: str | Path | None = None,
    echo: Echo = print,
    python: str = sys.executable,
) -> Path:
    """Train each variant on the same config, data and seed, then write the report.

    Args:
        config: The YAML config.
        overrides: Dotted overrides applied to every variant.
        variants: Some of :data:`VARIANTS`, in table order.
        out_dir: The report directory (default :func:`default_report_dir`); runs go to
            ``OUT/runs/<variant>``, their output to ``OUT/logs/<variant>.log``. Running again
            with the same directory reuses finished runs and resumes unfinished ones.
        echo: Where progress lines go.
        python: The interpreter that runs ``-m distgrow train``.

    Returns:
        The report directory.

    Raises:
        ConfigError: the config or a variant's config is invalid (before anything runs).
        ReportError: a bad variant list, or a training that failed (exit_code 1).
    """
    cfg = load_config(config, overrides)
    if not variants:
        raise ReportError(f"no variants given. Fix: e.g. --variants {','.join(DEFAULT_VARIANTS)}.")
    if len(set(variants)) != len(variants):
        raise ReportError(f"--variants lists one twice ({','.join(variants)}). Fix: once each.")
    n = cfg.data.expected_train_size()
    plan_overrides = {v: variant_overrides(cfg, v, n) for v in variants}
    for variant, extra in plan_overrides.items():  # every variant is valid before any runs
        try:
            load_config(config, [*overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"variant {variant} ({' '.join(extra)}): {err}") from err
    out = Path(out_dir) if out_dir is not None else default_report_dir(cfg.run.name)
    out.mkdir(parents=True, exist_ok=True)
    echo(f"distgrow compare: {', '.join(variants)} on {config}; report in {out}")
    for variant in variants:
        extra = [*plan_overrides[variant], f"run.name={cfg.run.name}-{variant}"]
        code = train_process(
            config,
            [*overrides, *extra],
            out / "runs" / variant,
            out / "logs" / f"{variant}.log",
            prefix=f"[{variant}]",
            echo=echo,
            python=python,
        )
        if code != 0:
            raise ReportError(
                f"the {variant} run failed with exit status {code}; its output is in "
                f"{out / 'logs' / f'{variant}.log'}. Fix the cause, then rerun the same "
                f"command with --out {out}: finished runs are reused, this one resumes.",
                exit_code=1,
            )
    runs = [load_run(out / "runs" / v, v) for v in variants]
    command = shlex.join(
        ["distgrow", "compare", str(config), *overrides, "--variants", ",".join(variants)]
    )
    notes = []
    if "hybrid" in variants:
        cap = plan_overrides["hybrid"][1].split("=", 1)[1]
        notes.append(
            f"hybrid = grow_batch with growth.max_global_batch={cap}: the batch stops there and "
            "the learning rate carries the rest of the decay"
        )
    build_report(runs, out, title=cfg.run.name, command=command, notes=notes)
    echo(f"distgrow compare: report written to {out / 'report.md'}")
    return out


def report(
    run_dirs: Sequence[str | Path],
    *,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    echo: Echo = print,
) -> Path:
    """Rebuild a report from finished run directories (``distgrow report``).

    Raises:
        ReportError: a directory is not a finished run, or the baseline is ambiguous.
    """
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name for p in paths]
    # Two runs named alike (two "grow_batch" folders of different reports) get their parent's
    # name in front so that the table and the legends tell them apart.
    labels = [
        n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}"
        for p, n in zip(paths, names, strict=True)
    ]
    runs = [load_run(p, label) for p, label in zip(paths, labels, strict=True)]
    base_label = None
    if baseline is not None:
        wanted = Path(baseline).resolve()
        match = [r.label for r in runs if r.path.resolve() == wanted]
        base_label = match[0] if match else baseline
    out = Path(out_dir) if out_dir is not None else default_report_dir(_title(runs), "report")
    command = shlex.join(["distgrow", "report", *map(str, run_dirs)])
    build_report(runs, out, baseline=base_label, command=command)
    echo(f"distgrow report: written to {out / 'report.md'}")
    return out


# --------------------------------------------------------------------------------------------
# Sweep: batch size × learning rate
# --------------------------------------------------------------------------------------------


def _sweep_name(batch: int, lr: float) -> str:
    return "b{}_lr{}".format(batch, re.sub(r"[^0-9a-zA-Z.-]", "_", f"{lr:g}"))


def sweep(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out_dir: str | Path | None = None,
    echo: Echo = print,
    python: str = sys.executable,
) -> Path:
    """Train every (batch size, LR) pair at a fixed batch and plot the final losses.

    Each run is ``distgrow train CONFIG OVERRIDES growth.mode=decay_lr growth.base_batch=B
    optim.lr=LR growth.max_global_batch=null`` (the config's schedule is kept: add
    ``schedule.type=constant`` for seed 003's constant-LR question, and ``run.epochs=...`` to
    keep it short). A run whose loss diverges is recorded as diverged, not as a failure.

    Returns:
        The sweep directory (``sweep.png``, ``sweep.md``, ``sweep.json``, ``runs/``, ``logs/``).

    Raises:
        ConfigError: a pair's config is invalid (checked for all before anything runs).
        ReportError: empty grids, or runs that failed for another reason than divergence.
    """
    if not batch_sizes or not lrs:
        raise ReportError("the sweep needs --batch-sizes and --lrs. Fix: e.g. 32,64 and 0.01,0.1.")
    cfg = load_config(config, overrides)
    pairs = [(b, lr) for b in batch_sizes for lr in lrs]
    pair_overrides = {
        (b, lr): [
            "growth.mode=decay_lr",
            f"growth.base_batch={b}",
            f"optim.lr={lr!r}",
            "growth.max_global_batch=null",
        ]
        for b, lr in pairs
    }
    for (b, lr), extra in pair_overrides.items():
        try:
            load_config(config, [*overrides, *extra])
        except ConfigError as err:
            raise ConfigError(f"sweep point batch {b}, lr {lr:g}: {err}") from err
    out = Path(out_dir) if out_dir is not None else default_report_dir(cfg.run.name, "sweep")
    out.mkdir(parents=True, exist_ok=True)
    echo(f"distgrow sweep: {len(pairs)} runs ({len(batch_sizes)} batch sizes × {len(lrs)} LRs)")
    results = []
    failed = []
    for b, lr in pairs:
        name = _sweep_name(b, lr)
        run_dir = out / "runs" / name
        code = train_process(
            config,
            [*overrides, *pair_overrides[(b, lr)], f"run.name={cfg.run.name}-{name}"],
            run_dir,
            out / "logs" / f"{name}.log",
            prefix=f"[{name}]",
            echo=echo,
            python=python,
        )
        row: dict[str, Any] = {"batch": b, "lr": lr, "run_dir": str(run_dir), "exit_code": code}
        if code == 0:
            s = _read_json(run_dir / "summary.json")
            row.update(
                status="completed",
                **{k: s.get(k) for k in ("train_loss", "val_loss", "val_acc", "total_updates")},
                wall_s=s.get("wall_s"),
            )
        elif code == EXIT_NONFINITE:
            row.update(status="diverged", train_loss=None, val_loss=None, val_acc=None)
        else:
            row.update(status="failed", train_loss=None, val_loss=None, val_acc=None)
            failed.append(f"batch {b}, lr {lr:g} (exit {code}, log {out / 'logs'}/{name}.log)")
        results.append(row)
    write_sweep(results, batch_sizes, lrs, out, command=shlex.join(
        ["distgrow", "sweep", str(config), *overrides,
         "--batch-sizes", ",".join(map(str, batch_sizes)),
         "--lrs", ",".join(f"{lr:g}" for lr in lrs)]
    ))  # fmt: skip
    echo(f"distgrow sweep: written to {out / 'sweep.md'}")
    if failed:
        raise ReportError(
            f"{len(failed)} sweep run(s) failed: {'; '.join(failed)}. The sweep files show the "
            f"others. Fix the cause and rerun with --out {out}: finished runs are reused.",
            exit_code=1,
        )
    return out


def write_sweep(
    results: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out: Path,
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` from the sweep's result rows."""
    from distgrow import plots

    final = {(int(r["batch"]), float(r["lr"])): r for r in results}
    plots.plot_sweep(final, batch_sizes, lrs, out / "sweep.png")
    finite = [r for r in results if isinstance(r.get("val_loss"), int | float)]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    data = {
        "command": command,
        "batch_sizes": list(batch_sizes),
        "lrs": list(lrs),
        "results": [dict(r) for r in results],
        "best": None if best is None else {k: best[k] for k in ("batch", "lr", "val_loss")},
        "plot": "sweep.png",
    }
    write_json(out / "sweep.json", data)

    def cell(r: Mapping[str, Any] | None, key: str) -> str:
        if r is None:
            return "-"
        if r.get("status") != "completed":
            return str(r.get("status"))
        return _num(r.get(key), ".4f")

    lines = ["# distgrow sweep: final loss by batch size × learning rate", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    for key, name in (("val_loss", "final validation loss"), ("train_loss", "final train loss")):
        lines += [f"## {name}", ""]
        lines += _table(
            ["batch \\ lr", *(f"{lr:g}" for lr in lrs)],
            [[str(b), *(cell(final.get((b, lr)), key) for lr in lrs)] for b in batch_sizes],
        )
        lines.append("")
    if best is not None:
        lines += [
            f"Lowest validation loss: {best['val_loss']:.4f} at batch {best['batch']}, "
            f"lr {best['lr']:g}.",
            "",
        ]
    lines += ["![final loss against batch size, one line per learning rate](sweep.png)", ""]
    (out / "sweep.md").write_text("\n".join(lines), encoding="utf-8")
    return data
