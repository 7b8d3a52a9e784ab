"""``schedule_noise.png``: the batch, the learning rate and the measured noise scale of each run
on one time axis (samples seen), so a reader sees where the batch crossed ``B_simple`` and what
the LR did there.

Why samples seen and not updates: every variant of a ``compare`` sees the same samples per epoch,
so their schedules line up on this axis (on updates a grown run ends far to the left), and the
noise scale, a number of samples, is read against the batch at the same point of the data.

The series are the run's own logged values (``metrics.jsonl`` step records: ``samples_seen``,
``global_batch``, ``lr``, ``noise/b_simple``), not a re-derived plan: the figure shows what ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgrow.report.runs import RunData

__all__ = ["SCHEDULE_NOISE_FILE", "ScheduleSeries", "plot_schedule_noise", "series_of", "write"]

SCHEDULE_NOISE_FILE = "schedule_noise.png"


@dataclass
class ScheduleSeries:
    """One run's logged schedule and noise scale against samples seen."""

    label: str
    samples: list[int] = field(default_factory=list)
    """``samples_seen`` at each step record."""
    batch: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    noise_samples: list[int] = field(default_factory=list)
    """``samples_seen`` at each step record that carries ``noise/b_simple``."""
    b_simple: list[float] = field(default_factory=list)
    colour: str | None = None


def series_of(run: RunData, colour: str | None = None) -> ScheduleSeries:
    """The step records' batch, LR and smoothed ``B_simple`` of ``run``, in logged order."""
    out = ScheduleSeries(run.label, colour=colour)
    for record in run.records:
        if record.get("kind") != "step":
            continue
        seen, batch, lr = record.get("samples_seen"), record.get("global_batch"), record.get("lr")
        if isinstance(seen, int) and isinstance(batch, int) and isinstance(lr, int | float):
            out.samples.append(seen)
            out.batch.append(batch)
            out.lr.append(float(lr))
            noise = record.get("noise/b_simple")
            if isinstance(noise, int | float):
                out.noise_samples.append(seen)
                out.b_simple.append(float(noise))
    return out


def plot_schedule_noise(series: Sequence[ScheduleSeries], path: Path) -> Any:
    """Two panels over samples seen: the batch (steps) with ``B_simple`` (dotted) above, the
    LR below, one colour per run; returns the figure (tests read its lines back).

    A step record describes the updates that ended at its ``samples_seen``, so the steps are
    drawn ending there (``steps-pre``)."""
    from distgrow.plots import _save, colour_for

    fig, (ax_b, ax_lr) = _two_rows()
    for i, s in enumerate(series):
        colour = s.colour or colour_for(s.label, i)
        ax_b.plot(
            s.samples, s.batch, color=colour, drawstyle="steps-pre", label=f"{s.label}: batch"
        )
        if s.b_simple:
            ax_b.plot(
                s.noise_samples,
                s.b_simple,
                color=colour,
                linestyle=":",
                linewidth=2,
                label=f"{s.label}: B_simple",
            )
        ax_lr.plot(s.samples, s.lr, color=colour, drawstyle="steps-pre", label=s.label)
    ax_b.set_ylabel("samples (log)")
    ax_b.set_title("global batch (solid) and measured noise scale B_simple (dotted)")
    ax_lr.set_ylabel("learning rate (log)")
    ax_lr.set_xlabel("samples seen")
    for ax in (ax_b, ax_lr):
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_b.get_legend_handles_labels()
    if handles:  # two entries per run: two per row keeps long labels inside the figure
        fig.legend(handles, labels, loc="outside lower center", ncols=2)
    return _save(fig, path)


def _two_rows() -> tuple[Any, Any]:
    """A figure with two panels stacked on a shared x axis."""
    from matplotlib.figure import Figure

    from distgrow.plots import DPI

    fig = Figure(figsize=(9, 7), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    return fig, axes


def write(runs: Sequence[RunData], colours: Sequence[str], out: Path) -> str | None:
    """Draw ``schedule_noise.png`` in ``out`` for ``runs``; None (nothing written) when no run
    logged a step record."""
    series = [series_of(r, c) for r, c in zip(runs, colours, strict=True)]
    series = [s for s in series if s.samples]
    if not series:
        return None
    plot_schedule_noise(series, out / SCHEDULE_NOISE_FILE)
    return SCHEDULE_NOISE_FILE
