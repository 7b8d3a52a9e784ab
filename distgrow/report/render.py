"""The report of finished runs: ``report.md`` (tables), ``summary.json`` (the same numbers),
the PNG plots (drawn by :mod:`distgrow.plots`), and the sweep's ``sweep.md``/``sweep.json``.

Takes :class:`~distgrow.report.runs.RunData`; runs nothing, imports matplotlib only to draw.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from distgrow.held import baseline_held, held_from_slurm
from distgrow.report.runs import (
    ReportError,
    RunData,
    config_differences,
    noise_decisions,
    noise_path,
    schedule_path,
    validation_points,
)
from distgrow.report.seeds import seed_markdown, seed_section
from distgrow.rundir import (
    SUMMARY_FILE,
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
    format_seconds,
    measured_savings,
    quality_metric,
    reference_throughput,
    try_estimated_savings,
)

REPORT_FILE = "report.md"
REPORT_SUMMARY_FILE = "summary.json"
"""The report directory's numbers (not a run's ``summary.json``: the same name, another file)."""
SWEEP_FILES = {"json": "sweep.json", "markdown": "sweep.md", "plot": "sweep.png"}

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


def _noise_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Noise scale",
        "",
        "B_simple = tr(Σ)/|G|², measured during training (docs/noise.md): the batch above which "
        "more samples per update buy little progress.",
        "",
    ]
    for row in rows:
        m = row.get("measured") or {}
        b = m.get("b_simple")
        lines.append(
            f"- **{row['label']}**: {m.get('measured_updates', 0):,} updates measured "
            f"({m.get('source', '?')}); last smoothed B_simple "
            + (f"{b:,.0f}" if isinstance(b, int | float) else "n/a")
        )
        for d in row["decisions"]:
            at = f"epoch {d.get('epoch')}, update {d.get('step', 0):,}"
            value = d.get("b_simple")
            said = f"B_simple {value:,.1f}" if isinstance(value, int | float) else "B_simple n/a"
            if d["event"] == "adaptive_growth":
                what = f"grew {d.get('batch')} → {d.get('realised')} ({said})"
            elif d["event"] == "adaptive_at_limit":
                what = f"asked to grow past the limit {d.get('limit')} ({said}): the LR decays"
            elif d["event"] == "noise_cap":
                what = (
                    f"noise cap fired: batch held at ≤ {d.get('cap_batch')} instead of "
                    f"{d.get('schedule_batch')} ({said}); the LR takes the rest"
                )
            else:
                what = f"noise cap lifted at {d.get('cap_batch')} ({said})"
            lines.append(f"  - {at}: {what}")
    return [*lines, ""]


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _gib(value: Any) -> float | None:
    return None if value is None else float(value) / 2**30


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
    rows = summary["runs"]
    lines = _intro_lines(summary)
    lines += _run_table(rows, metric)
    if summary.get("seeds"):
        lines += seed_markdown(summary["seeds"])
    lines += _savings_section(rows, metric)
    lines += _phase_section(rows)
    lines += _held_lines(rows)
    if summary.get("noise"):
        lines += _noise_markdown(summary["noise"])
    lines += _plot_lines(summary.get("plots") or {}, metric)
    if summary.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def _metric_name(metric: str) -> str:
    return "val acc" if metric == "val_acc" else "val loss"


def _intro_lines(summary: Mapping[str, Any]) -> list[str]:
    """The heading, the command and what the savings are measured against."""
    base = summary["baseline"]
    lines = [f"# distgrow report: {summary['title']}", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    seeds = (summary.get("seeds") or {}).get("seeds") or []
    if base is not None:
        same = "same config, data and seed" if len(seeds) < 2 else "same config and data"
        lines.append(
            f"Baseline: **{base}** (growth.mode=decay_lr, {same}). "
            "Savings against it are **measured**: both runs were trained."
        )
    else:
        lines.append(
            "No decay_lr baseline run was given: savings are **estimated** from each run's own "
            "throughput at the base batch (method written next to each number)."
        )
    if len(seeds) > 1:
        lines.append(
            f"The tables below are one run per variant (seed {seeds[0]}); the **Seeds** section "
            f"gives all {len(seeds)} seeds."
        )
    return [*lines, ""]


def _run_table(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """One row per run: quality, updates, times and the ratios against the baseline."""
    metric_name = _metric_name(metric)
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
                *_versus(row, metric),
            ]
        )
    return [
        *_table(header, table),
        "",
        "Wall-clock is training time from the first update to the end (validation and "
        "checkpoints included), start-up excluded and shown apart. Worker-seconds = wall-clock × "
        "the job's workers (GPU-seconds on GPUs). Ratios are baseline ÷ run.",
        "",
    ]


def _versus(row: Mapping[str, Any], metric: str) -> list[str]:
    """The four "vs baseline" cells of a run's row."""
    m = row["measured"] if row["measured"] else None
    if row["is_baseline"]:
        return ["1.00× (baseline)"] * 3 + ["-"]
    if not m:
        return ["-"] * 4
    return [
        format_ratio(m["updates_ratio"], "fewer", "more"),
        format_ratio(m["wall_ratio"], "faster", "slower")
        + (" (not comparable)" if row.get("throughput_drift") else ""),
        format_ratio(m["worker_seconds_ratio"], "less", "more"),
        _delta_text(metric, m["metric_delta"]),
    ]


def _savings_section(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """Each run's measured and estimated savings, with their methods."""
    lines = ["## Savings", ""]
    for row in rows:
        if row["is_baseline"]:
            continue
        lines += [f"### {row['label']}", ""]
        if row["measured"]:
            lines.append(_savings_line(row["measured"], metric))
            if row.get("throughput_drift"):
                lines.append(f"- **wall-clock not comparable**: {row['throughput_drift']}")
        elif row.get("measured_unavailable"):
            lines.append(f"- measured: not available: {row['measured_unavailable']}")
        est = row["estimated"] or {}
        if est.get("unavailable"):
            lines.append(f"- estimated: not available: {est['unavailable']}")
        elif est:
            lines.append(_savings_line(est, metric))
        lines.append("")
    return lines


def _phase_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each run's per-phase split, throughput and (CUDA runs) peak memory."""
    lines = ["## Throughput per phase", ""]
    for row in rows:
        lines += [f"### {row['label']}", ""]
        if not row["phases"]:
            lines += [f"No per-phase measurements in this run's {SUMMARY_FILE}.", ""]
            continue
        # CUDA runs measured each phase's peak memory; CPU runs have no such column.
        cuda = any(p.get(CUDA_MEMORY[0]) is not None for p in row["phases"])
        header = [
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
            *(["CUDA peak allocated GiB", "CUDA peak reserved GiB"] if cuda else []),
        ]
        lines += _table(header, [_phase_cells(p, cuda) for p in row["phases"]])
        lines.append("")
    return lines


def _phase_cells(p: Mapping[str, Any], cuda: bool) -> list[str]:
    return [
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
        *([_num(_gib(p.get(k)), ".2f") for k in CUDA_MEMORY] if cuda else []),
    ]


def _plot_lines(plots: Mapping[str, str], metric: str) -> list[str]:
    if not plots:
        return []
    metric_name = _metric_name(metric)
    captions = {
        "val_vs_epochs": f"{metric_name} against epochs",
        "val_vs_updates": f"{metric_name} against parameter updates",
        "val_vs_wall": f"{metric_name} against wall-clock",
        "schedules": "global batch and learning rate against epochs",
        "noise_scale": "measured noise scale B_simple against the global batch",
        "seeds": f"final {metric_name} of each seed, the mean and ± one standard deviation",
    }
    lines = ["## Plots", ""]
    for key, file in plots.items():
        lines += [f"![{captions.get(key, key)}]({file})", ""]
    return lines


def _wall_words(s: Mapping[str, Any]) -> str:
    """The wall-clock part of a savings line: the ratio, its 95% interval when the estimate
    has one (saying so when it spans 1.0), or why it was not estimated."""
    if s.get("wall_unavailable"):
        return (
            "wall-clock and worker-seconds not estimated (too little measured at the reference "
            "batch)"
        )
    low, high = s.get("wall_ratio_low"), s.get("wall_ratio_high")
    interval = ""
    if low is not None and high is not None:
        either = ": faster or slower, the measurements cannot tell" if low < 1.0 < high else ""
        interval = f", 95% interval {low:.2f}–{high:.2f}×{either}"
    return (
        f"{format_ratio(s['wall_ratio'], 'faster', 'slower')} "
        f"({format_seconds(s['baseline_wall_s'])} → {format_seconds(s['run_wall_s'])}, "
        f"{format_seconds(s['wall_saved_s'])} saved{interval})"
    )


def _savings_line(s: Mapping[str, Any], metric: str) -> str:
    words = [
        f"{format_ratio(s['updates_ratio'], 'fewer', 'more')} updates "
        f"({_num(s['baseline_updates'])} → {_num(s['run_updates'])})",
        _wall_words(s),
    ]
    if not s.get("wall_unavailable"):
        words.append(
            f"worker-seconds {format_ratio(s['worker_seconds_ratio'], 'less', 'more')} "
            f"({_num(s['baseline_worker_seconds'], ',.1f')} → "
            f"{_num(s['run_worker_seconds'], ',.1f')})"
        )
    if s.get("metric_delta") is not None:
        words.append(f"Δ {metric.replace('_', ' ')} {_delta_text(metric, s['metric_delta'])}")
    method = str(s["method"]).removeprefix(f"{s['kind']}: ")
    return f"- **{s['kind']}**: " + "; ".join(words) + f". Method: {method}."


def write_sweep(
    results: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out: Path,
    *,
    command: str | None = None,
) -> dict[str, Any]:
    """``sweep.json``, ``sweep.md`` and ``sweep.png`` from the sweep's result rows.

    Raises:
        ReportError: ``out`` cannot be written (see :func:`all_or_nothing`).
    """
    with all_or_nothing(out):
        return _write_sweep(results, batch_sizes, lrs, out, command)


def _write_sweep(
    results: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out: Path,
    command: str | None,
) -> dict[str, Any]:
    from distgrow import plots

    final = sweep_points(results)
    plots.plot_sweep(final, batch_sizes, lrs, out / SWEEP_FILES["plot"])
    finite = [r for r in final.values() if isinstance(r.get("val_loss"), int | float)]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    seeded = any("seed" in r for r in results)
    data = {
        "command": command,
        "batch_sizes": list(batch_sizes),
        "lrs": list(lrs),
        "results": [dict(r) for r in results],
        "best": None if best is None else {k: best[k] for k in ("batch", "lr", "val_loss")},
        "plot": SWEEP_FILES["plot"],
    }
    if seeded:
        data["means"] = list(final.values())
    write_json(out / SWEEP_FILES["json"], data)

    def cell(r: Mapping[str, Any] | None, key: str) -> str:
        if r is None:
            return "-"
        if r.get("status") != "completed":
            return str(r.get("status"))
        text = _num(r.get(key), ".4f")
        if seeded:
            text += f" ± {_num(r.get(f'{key}_std'), '.4f')}"
            if r["completed"] < r["seeds"]:
                text += f" ({r['completed']} of {r['seeds']} seeds; the others diverged or failed)"
        return text

    lines = ["# distgrow sweep: final loss by batch size × learning rate", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if seeded:
        seeds = sorted({r["seed"] for r in results if "seed" in r})
        lines += [
            f"Each cell: mean ± standard deviation over seeds {', '.join(map(str, seeds))} "
            "(the seeds whose run completed).",
            "",
        ]
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
    caption = "final loss against batch size, one line per learning rate"
    lines += [f"![{caption}]({SWEEP_FILES['plot']})", ""]
    atomic_write_bytes(out / SWEEP_FILES["markdown"], "\n".join(lines).encode("utf-8"))
    return data


def sweep_points(results: Sequence[Mapping[str, Any]]) -> dict[tuple[int, float], dict[str, Any]]:
    """(batch, lr) → its result; with several seeds per pair, the mean and standard deviation
    of each loss over the seeds that completed (``train_loss_std``, ``seeds``, ``completed``;
    the status of the first seed when none completed)."""
    by_pair: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    for r in results:
        by_pair.setdefault((int(r["batch"]), float(r["lr"])), []).append(r)
    out: dict[tuple[int, float], dict[str, Any]] = {}
    for (b, lr), rows in by_pair.items():
        if not any("seed" in r for r in rows):
            out[(b, lr)] = dict(rows[-1])
            continue
        done = [r for r in rows if r.get("status") == "completed"]
        point: dict[str, Any] = {
            "batch": b,
            "lr": lr,
            "seeds": len(rows),
            "completed": len(done),
            "status": "completed" if done else rows[0].get("status"),
        }
        for key in ("train_loss", "val_loss", "val_acc"):
            values = [float(r[key]) for r in done if isinstance(r.get(key), int | float)]
            point[key] = statistics.fmean(values) if values else None
            point[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        out[(b, lr)] = point
    return out


def _held_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The section on what the SLURM jobs held (none when no run ran under SLURM)."""
    held_rows = [r for r in rows if r.get("held")]
    if not held_rows:
        return []
    lines = [
        "## What the SLURM jobs held",
        "",
        "A cluster bills what a job holds (allocated CPUs/GPUs × time, start-up and idle "
        "workers included), not the worker-hours the run used (training wall-clock × workers). "
        "`allocation` mode holds the widest phase's workers from the first update to the last; "
        "`chain` mode holds each span's own workers.",
        "",
    ]
    table = []
    for row in held_rows:
        h = row["held"]
        b = h.get("baseline") or {}
        used = row.get("worker_hours") or 0.0
        table.append(
            [
                row["label"],
                h["mode"],
                str(len(h["jobs"])),
                _num(used, ",.4f"),
                _num(h["task_hours"], ",.4f"),
                "-" if not h["task_hours"] else f"{used / h['task_hours']:.0%}",
                _num(h["cpu_hours"], ",.4f"),
                _num(h["gpu_hours"], ",.4f"),
                _num(b.get("cpu_hours"), ",.4f"),
                format_ratio(b.get("cpu_hours_ratio"), "less", "more"),
                h["source"],
            ]
        )
    lines += _table(
        [
            "run",
            "mode",
            "jobs",
            "worker-h used",
            "worker-h held",
            "used/held",
            "CPU-h held",
            "GPU-h held",
            "baseline CPU-h held",
            "CPU-h vs baseline",
            "source",
        ],
        table,
    )
    lines.append("")
    for row in held_rows:
        h = row["held"]
        lines += [f"### {row['label']}: jobs", ""]
        lines += _table(
            ["span", "job", "workers", "nodes", "CPUs", "GPUs", "state", "held", "CPU-h", "GPU-h"],
            [
                [
                    str(j["index"]),
                    str(j["job_id"]),
                    str(j["workers"]),
                    str(j.get("nodes") or "-"),
                    str(j.get("cpus") or "-"),
                    str(j.get("gpus") or 0),
                    j["state"],
                    format_seconds(j["held_s"]),
                    _num(j["cpu_hours"], ",.4f"),
                    _num(j["gpu_hours"], ",.4f"),
                ]
                for j in h["jobs"]
            ],
        )
        lines += ["", f"- held: {h['method']}"]
        if h.get("baseline"):
            lines.append(f"- decay_lr baseline at the base width: {h['baseline']['method']}")
        lines.append("")
    return lines
