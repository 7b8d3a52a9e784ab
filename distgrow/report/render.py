"""The report of finished runs: ``report.md`` (tables), ``summary.json`` (the same numbers),
the PNG plots (drawn by :mod:`distgrow.plots`), and the sweep's ``sweep.md``/``sweep.json``.

Takes :class:`~distgrow.report.runs.RunData`; runs nothing, imports matplotlib only to draw.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from distgrow.held import baseline_held, held_from_slurm
from distgrow.report.markdown import render_markdown
from distgrow.report.runs import (
    ReportError,
    RunData,
    config_differences,
    noise_decisions,
    noise_path,
    schedule_path,
    validation_points,
)
from distgrow.report.seeds import seed_section
from distgrow.rundir import (
    atomic_write_bytes,
    is_disk_error,
    write_failure,
    write_json,
)
from distgrow.savings import (
    CUDA_MEMORY,
    PHASE_MEASURES,
    PHASE_SPLIT,
    SUMMARY_MEASURES,
    Reference,
    SavingsError,
    format_ratio,
    measured_savings,
    quality_metric,
    reference_throughput,
    try_estimated_savings,
)

REPORT_FILE = "report.md"
REPORT_SUMMARY_FILE = "summary.json"
"""The report directory's numbers (not a run's ``summary.json``: the same name, another file)."""

SEED_PLOT_FILE = "seeds.png"
"""Written when ``compare`` trained several seeds: the spread of the final metric."""

NOISE_PLOT_FILE = "noise_scale.png"
"""Written when a run measured the noise scale (``noise.measure``)."""

PLOT_FILES = {
    "val_vs_epochs": "val_vs_epochs.png",
    "val_vs_updates": "val_vs_updates.png",
    "val_vs_wall": "val_vs_wall.png",
    "schedules": "schedules.png",
}


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
    cap = run.config.get("growth", {}).get("max_global_batch")
    return {
        "label": run.label,
        "run_dir": str(run.path),
        "growth_mode": run.growth_mode,
        "max_global_batch": cap,
        "val_acc": s.val_acc,
        "val_loss": s.val_loss,
        "train_loss": s.train_loss,
        **{key: getattr(s, key) for key in SUMMARY_MEASURES},
        "final_batch": (s.final_setting or {}).get("global_batch"),
        "phases": [
            {
                **{
                    key: p.get(key)
                    for key in ("index", "start_epoch", *PHASE_SPLIT, *PHASE_MEASURES)
                },
                # Only CUDA runs measured memory: absent (not zero, not null) on the CPU.
                **{key: p[key] for key in CUDA_MEMORY if p.get(key) is not None},
            }
            for p in s.phases
        ],
    }


def _update_spread(ref: Reference) -> float | None:
    """The standard deviation of the reference's update times over their mean (None: unknown)."""
    if ref.update_s_m2 is None or ref.updates < 2 or ref.train_s <= 0:
        return None
    std = math.sqrt(max(0.0, ref.update_s_m2) / (ref.updates - 1))
    return std / (ref.train_s / ref.updates)


def throughput_drift(run: RunData, base: RunData, tolerance: float = 0.2) -> str | None:
    """Why the measured wall-clock is not comparable, when the two runs measured different
    throughputs at the same batch B0 (None when they agree).

    Both trained at B0 first with the same code, so a gap beyond ``tolerance`` and beyond
    twice either run's own spread of update times means the machine changed (other jobs,
    clocks, another node): the measured wall-clock ratio then mixes that in, while the
    estimate compares the run with its own B0 phase, and the CPU-seconds inside updates
    (recorded by both) are far less disturbed by the load.
    """
    b0 = run.summary.base_batch
    if not isinstance(b0, int):
        return None
    try:
        ref_r = reference_throughput(run.summary.phases, b0)
        ref_b = reference_throughput(base.summary.phases, b0)
    except SavingsError:
        return None
    batch, rate_r, rate_b = ref_r.batch, ref_r.samples_per_s, ref_b.samples_per_s
    spreads = [x for x in (_update_spread(ref_r), _update_spread(ref_b)) if x is not None]
    spread = max(spreads, default=0.0)
    if not (ref_r.is_base_batch and ref_b.is_base_batch):
        return None
    if abs(rate_r / rate_b - 1.0) <= max(tolerance, 2 * spread):
        return None
    within = f", beyond either run's own spread (±{spread:.0%} per update)" if spreads else ""
    cpu_r, cpu_b = run.summary.train_cpu_s, base.summary.train_cpu_s
    cpu = (
        f"; CPU-seconds inside updates, which the load disturbs far less: {cpu_r:,.1f} s against "
        f"the baseline's {cpu_b:,.1f} s ({format_ratio(cpu_b / cpu_r, 'less', 'more')})"
        if cpu_r and cpu_b
        else "; no CPU-seconds were recorded to compare"
    )
    return (
        f"at the same batch B0={batch} it trained at {rate_r:,.0f} samples/s and the baseline "
        f"at {rate_b:,.0f} samples/s ({rate_r / rate_b - 1:+.0%}){within}: the machine was not "
        "equally loaded, so the measured wall-clock is not comparable. Trust the estimated "
        f"wall-clock (the run against its own B0 phase){cpu}."
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


def _held(
    run: RunData,
    summary: Mapping[str, Any],
    measured: Mapping[str, Any] | None,
    base: RunData | None,
) -> dict[str, Any]:
    """What the run's SLURM jobs held, from SLURM's own records where it keeps them ({} for a
    run outside SLURM); against a measured baseline, that baseline's wall-clock."""
    held = held_from_slurm(run.run_dir, summary)
    if held and measured and base is not None:
        baseline = baseline_held(
            held,
            measured.get("baseline_wall_s"),
            int(base.summary.world_size or 1),
            f"measured: the {base.label} run",
            base.summary.startup_s,
        )
        if baseline is not None:
            held["baseline"] = baseline
    return held


def build_report(
    runs: Sequence[RunData],
    out_dir: str | Path,
    *,
    baseline: str | None = None,
    title: str | None = None,
    command: str | None = None,
    notes: Sequence[str] = (),
    seed_runs: Mapping[str, Mapping[int, RunData]] | None = None,
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
        seed_runs: With several seeds: variant label → seed → its run (``runs`` are then
            one seed's); adds the ``seeds`` section (:func:`distgrow.report.seeds.seed_section`:
            mean, spread, the paired 95% interval and the verdict) and ``seeds.png``.

    Returns:
        What ``summary.json`` holds.

    Raises:
        ReportError: no runs, duplicate labels, an ambiguous baseline (nothing is written),
            or ``out_dir`` cannot be written (a full or read-only disk, a file in the way:
            the files this call created are removed again).
    """
    if not runs:
        raise ReportError("no runs to report. Fix: give at least one finished run directory.")
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        raise ReportError(f"two runs share a label ({labels}). Fix: give distinct directories.")
    out = Path(out_dir)
    base = _pick_baseline(runs, baseline)
    # The savings arithmetic (distgrow.savings, shared with the trainer) reads the summary's
    # JSON object; the report reads the typed fields.
    as_json = {id(r): r.summary.to_dict() for r in runs}
    quality = {quality_metric(as_json[id(r)]) for r in runs}
    metric = "val_acc" if quality == {"val_acc"} else "val_loss"
    notes = list(notes)

    rows = [_report_row(run, base, as_json, notes) for run in runs]

    seeds = None
    if seed_runs:
        seeds = seed_section(seed_runs, None if base is None else base.label, metric)
    with all_or_nothing(out):
        return _write_report(runs, out, rows, notes, metric, base, title, command, seeds)


def _report_row(
    run: RunData,
    base: RunData | None,
    as_json: Mapping[int, dict[str, Any]],
    notes: list[str],
) -> dict[str, Any]:
    """A run's row of ``summary.json``: its numbers, the measured savings against ``base``
    (with a drift or config difference added to ``notes``), the estimate, what SLURM held."""
    row = _run_numbers(run)
    row["is_baseline"] = run is base
    row["measured"] = None
    if base is not None and run is not base:
        try:
            row["measured"] = measured_savings(
                as_json[id(run)], as_json[id(base)], f"the {base.label} run in {base.path}"
            ).to_dict()
        except SavingsError as err:
            row["measured_unavailable"] = str(err)
            notes.append(f"{run.label}: no measured savings: {err}")
        drift = throughput_drift(run, base)
        if drift:
            row["throughput_drift"] = drift
            row["wall_comparable"] = False
            row["train_cpu_s"] = {
                "run": run.summary.train_cpu_s,
                "baseline": base.summary.train_cpu_s,
            }
            notes.append(f"{run.label}: {drift}")
        diffs = config_differences(run.config, base.config)
        if diffs:
            row["config_differences"] = diffs
            notes.append(
                f"{run.label} differs from the baseline in more than the growth settings: "
                + "; ".join(diffs)
            )
    row["estimated"] = None if run is base else try_estimated_savings(as_json[id(run)])
    row["held"] = _held(run, as_json[id(run)], row["measured"], base)
    return row


def _write_report(
    runs: Sequence[RunData],
    out: Path,
    rows: list[dict[str, Any]],
    notes: list[str],
    metric: str,
    base: RunData | None,
    title: str | None,
    command: str | None,
    seeds: dict[str, Any] | None = None,
) -> dict[str, Any]:
    plots = _write_plots(runs, out, metric)
    if seeds is not None:
        plots["seeds"] = _write_seed_plot(seeds, out)
    summary = {
        "title": title or report_title(runs),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command,
        "metric": metric,
        "baseline": None if base is None else base.label,
        "savings_kind": "measured" if base is not None else "estimated",
        "runs": rows,
        "plots": plots,
        "notes": notes,
        "noise": _noise_rows(runs),
    }
    if seeds is not None:
        summary["seeds"] = seeds
    write_json(out / REPORT_SUMMARY_FILE, summary)
    atomic_write_bytes(out / REPORT_FILE, render_markdown(summary).encode("utf-8"))
    return summary


def cannot_write(err: OSError, out: Path) -> ReportError:
    """The one line for an output that cannot be written under ``--out``: errno, path, fix."""
    return ReportError(write_failure(err, "output", out, setting="--out"))


@contextlib.contextmanager
def all_or_nothing(out: Path) -> Iterator[None]:
    """Create ``out`` and write into it; when that fails, remove the files written in the
    block that were not there before (each written whole, by an atomic write, or not at all),
    and the directories it created if they are empty.

    Raises:
        ReportError: a write failed on a full or read-only disk or met a file in the way
            (one line: the errno, the path and the fix); other errors pass as they are.
    """
    missing = [p for p in (out, *out.parents) if not p.exists()]
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        out.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException as err:
        if out.is_dir():
            for path in set(out.iterdir()) - before:
                if path.is_file():
                    with contextlib.suppress(OSError):
                        path.unlink()
        for directory in missing:  # out first, then the parents it needed
            with contextlib.suppress(OSError):
                directory.rmdir()
        if isinstance(err, OSError) and is_disk_error(err):
            raise cannot_write(err, out) from None
        raise


def report_title(runs: Sequence[RunData]) -> str:
    names = sorted({str(r.config.get("run", {}).get("name") or r.label) for r in runs})
    first, last = names[0], names[-1]  # the common prefix of a sorted list is theirs
    size = next(
        (i for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b), len(first)
    )
    return first[:size].rstrip("-_") or runs[0].label


def _write_plots(runs: Sequence[RunData], out: Path, metric: str) -> dict[str, str]:
    from distgrow import plots

    colours = _colours(runs)
    curves = [run_curve(r, metric, c) for r, c in zip(runs, colours, strict=True)]
    plots.plot_metric(curves, "epochs", metric, out / PLOT_FILES["val_vs_epochs"])
    plots.plot_metric(curves, "updates", metric, out / PLOT_FILES["val_vs_updates"])
    plots.plot_metric(curves, "wall_s", metric, out / PLOT_FILES["val_vs_wall"])
    plots.plot_schedules(curves, out / PLOT_FILES["schedules"])
    written = dict(PLOT_FILES)
    noise = []
    for run, colour in zip(runs, colours, strict=True):
        xs, b_simple = noise_path(run)
        if xs:
            batch_xs, batch, _ = schedule_path(run)
            noise.append(plots.NoiseCurve(run.label, xs, b_simple, batch_xs, batch, colour))
    if noise:  # only runs that measured it (noise.measure)
        plots.plot_noise(noise, out / NOISE_PLOT_FILE)
        written["noise_scale"] = NOISE_PLOT_FILE
    from distgrow.report.predicted import write_predicted_plot

    predicted = write_predicted_plot(runs, out, colours)  # only beside a timing.json
    if predicted is not None:
        written["predicted_vs_measured"] = predicted
    # batch, LR and B_simple on one axis of samples seen (distgrow/report/schedule_plot.py)
    from distgrow.report import schedule_plot

    if (drawn := schedule_plot.write(runs, colours, out)) is not None:
        written["schedule_noise"] = drawn
    return written


def _write_seed_plot(seeds: Mapping[str, Any], out: Path) -> str:
    """``seeds.png``: each variant's final metric per seed, its mean and spread."""
    from distgrow import plots

    points = [
        plots.SeedPoints(
            v["label"],
            [r["seed"] for r in v["per_seed"] if r[seeds["metric"]] is not None],
            [r[seeds["metric"]] for r in v["per_seed"] if r[seeds["metric"]] is not None],
            plots.colour_for(v["label"], i),
        )
        for i, v in enumerate(seeds["variants"])
    ]
    plots.plot_seeds(points, seeds["metric"], out / SEED_PLOT_FILE)
    return SEED_PLOT_FILE


def _noise_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """Per run that measured the noise scale: the last value and the decisions taken."""
    rows = []
    for run in runs:
        measured = run.summary.extra.get("noise")
        decisions = noise_decisions(run)
        if not isinstance(measured, dict) and not decisions:
            continue
        rows.append(
            {
                "label": run.label,
                "measured": measured if isinstance(measured, dict) else None,
                "decisions": [
                    {
                        key: d.get(key)
                        for key in (
                            "event",
                            "epoch",
                            "step",
                            "b_simple",
                            "batch",
                            "realised",
                            "cap_batch",
                            "schedule_batch",
                            "limit",
                            "global_batch",
                        )
                        if d.get(key) is not None
                    }
                    for d in decisions
                ],
            }
        )
    return rows
