"""report.md as text: the sections, tables and words of a compare's report (no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from distgrow.report.seeds import delta_text, metric_text, seed_markdown
from distgrow.rundir import (
    SUMMARY_FILE,
)
from distgrow.savings import (
    CUDA_MEMORY,
    format_ratio,
    format_seconds,
)


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
                metric_text(metric, row.get(metric)),
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
        delta_text(metric, m["metric_delta"]),
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
        "schedule_noise": "global batch, learning rate and measured B_simple against samples seen",
        "predicted_vs_measured": (
            "each phase's wall-clock: predicted (distgrow estimate) and measured"
        ),
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
        words.append(f"Δ {metric.replace('_', ' ')} {delta_text(metric, s['metric_delta'])}")
    method = str(s["method"]).removeprefix(f"{s['kind']}: ")
    return f"- **{s['kind']}**: " + "; ".join(words) + f". Method: {method}."


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
