"""The report's figures, as PNG files (matplotlib, Agg, imported only when a figure is drawn).

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no
global state, no GUI backend, safe in a headless job. Each schedule keeps one colour in every
figure (:data:`COLOURS`) so the plots read together.

Inputs are plain data (:class:`Curve`), built by :mod:`distgrow.report` from ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distgrow.rundir import atomic_write

COLOURS: dict[str, str] = {
    "decay_lr": "#1f77b4",  # blue: the baseline
    "grow_batch": "#d62728",  # red
    "hybrid": "#2ca02c",  # green
    "grow_batch_lr": "#ff7f0e",  # orange
    "grow_momentum": "#9467bd",  # purple
    "adaptive": "#8c564b",  # brown
}
_SPARE = ["#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000"]

DPI = 100


def colour_for(label: str, index: int) -> str:
    """The colour of a schedule: fixed for the known variants, else from a spare list."""
    return COLOURS.get(label, _SPARE[index % len(_SPARE)])


@dataclass
class Curve:
    """One run's series, all against the same validation points, plus its schedule path."""

    label: str
    epochs: list[float] = field(default_factory=list)
    """Completed epochs at each validation."""
    updates: list[int] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)
    """The validation metric (accuracy or loss) at each validation."""
    schedule_epochs: list[float] = field(default_factory=list)
    """Fractional epochs where the schedule is known (start, growths, logged steps, epochs)."""
    batch: list[int] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    colour: str | None = None
    """Overrides the colour of :func:`colour_for` (the report picks one per run)."""


def _figure(width: float = 7.5, height: float = 4.5, ncols: int = 1) -> tuple[Any, Any]:
    # Imported here: the rest of distgrow works without matplotlib (pip install distgrow[report]).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _legend(fig: Any, ax: Any) -> None:
    """One legend under the axes, where it never covers a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5))


def _save(fig: Any, path: Path) -> Any:
    """Write the PNG; returns the figure (its transforms place data in the PNG's pixels)."""
    # Atomic: a full disk leaves the old PNG or none, never a cut one.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    return fig


_X_AXES = {
    "epochs": ("epochs", "epoch"),
    "updates": ("updates", "parameter updates"),
    "wall_s": ("wall_s", "wall-clock (s, start-up excluded)"),
}


def plot_metric(curves: Sequence[Curve], x: str, metric_name: str, path: Path) -> Any:
    """The validation metric against ``x`` (``epochs``, ``updates`` or ``wall_s``), one line
    per schedule.

    Returns:
        The figure, after writing ``path`` (the plots below return theirs too).

    Raises:
        ValueError: an unknown ``x``.
    """
    if x not in _X_AXES:
        raise ValueError(f"x = {x!r}: expected one of {', '.join(_X_AXES)}")
    attr, xlabel = _X_AXES[x]
    fig, ax = _figure()
    for i, curve in enumerate(curves):
        xs = getattr(curve, attr)
        if not xs:
            continue
        ax.plot(
            xs,
            curve.metric,
            marker="o",
            markersize=3,
            linewidth=2,
            color=curve.colour or colour_for(curve.label, i),
            label=curve.label,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_name.replace("_", " "))
    if x == "updates":
        ax.set_xscale("log")  # the baseline takes several times more updates
    ax.set_title(f"{metric_name.replace('_', ' ')} against {xlabel.split(' (')[0]}")
    ax.grid(True, alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


def plot_schedules(curves: Sequence[Curve], path: Path) -> Any:
    """The global batch and the learning rate against epochs, one line per schedule."""
    fig, (ax_b, ax_lr) = _figure(width=11, height=4.5, ncols=2)
    for i, curve in enumerate(curves):
        if not curve.schedule_epochs:
            continue
        style = {
            "color": curve.colour or colour_for(curve.label, i),
            "label": curve.label,
            # Schedules often coincide for a while: earlier lines are wider, so that a line
            # drawn over another leaves it visible on both sides.
            "linewidth": 1.5 + 1.0 * (len(curves) - 1 - i),
            "drawstyle": "steps-post",
        }
        ax_b.plot(curve.schedule_epochs, curve.batch, **style)
        ax_lr.plot(curve.schedule_epochs, curve.lr, **style)
    for ax, name, values in (
        (ax_b, "global batch", sorted({b for c in curves for b in c.batch})),
        (ax_lr, "learning rate", sorted({lr for c in curves for lr in c.lr})),
    ):
        ax.set_yscale("log")
        if 0 < len(values) <= 8:  # label the values the schedules take, not powers of ten
            ax.set_yticks(
                values, [f"{v:,}" if name == "global batch" else f"{v:.3g}" for v in values]
            )
            ax.minorticks_off()
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name} against epochs")
        ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax_b)
    return _save(fig, path)


@dataclass
class NoiseCurve:
    """One run's measured noise scale and its batch schedule, against epochs."""

    label: str
    epochs: list[float]
    b_simple: list[float]
    """The smoothed B_simple at each logged measurement."""
    batch_epochs: list[float]
    batch: list[int]
    """The global batch from each of ``batch_epochs`` on (a step plot)."""
    colour: str | None = None


def plot_noise(curves: Sequence[NoiseCurve], path: Path) -> Any:
    """The measured noise scale B_simple (solid) against the global batch (dashed), per run,
    on one log axis in samples: the batch below the curve is below the critical batch."""
    fig, ax = _figure(width=9, height=4.5)
    for i, curve in enumerate(curves):
        colour = curve.colour or colour_for(curve.label, i)
        ax.plot(
            curve.epochs,
            curve.b_simple,
            color=colour,
            linewidth=2,
            label=f"{curve.label}: B_simple",
        )
        ax.plot(
            curve.batch_epochs,
            curve.batch,
            color=colour,
            linewidth=1.5,
            linestyle="--",
            drawstyle="steps-post",
            label=f"{curve.label}: batch",
        )
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("samples")
    ax.set_title("measured noise scale B_simple (solid) and global batch (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(fig, ax)
    return _save(fig, path)


@dataclass
class SeedPoints:
    """One variant's final metric on each seed."""

    label: str
    seeds: list[int]
    values: list[float]
    colour: str | None = None


def plot_seeds(points: Sequence[SeedPoints], metric_name: str, path: Path) -> Any:
    """Each variant's final metric on every seed (dots, seed numbers beside them), its mean
    (a bar) and ± one standard deviation (whiskers): the spread the seeds show."""
    import statistics

    fig, ax = _figure(width=max(5.0, 1.6 * len(points) + 2), height=4.5)
    for i, p in enumerate(points):
        colour = p.colour or colour_for(p.label, i)
        ax.scatter([i] * len(p.values), p.values, color=colour, s=30, zorder=3, label=p.label)
        for seed, value in zip(p.seeds, p.values, strict=True):
            ax.annotate(str(seed), (i, value), xytext=(6, 0), textcoords="offset points",
                        fontsize=7, va="center")  # fmt: skip
        if p.values:
            mean = statistics.fmean(p.values)
            std = statistics.stdev(p.values) if len(p.values) > 1 else 0.0
            ax.errorbar([i], [mean], yerr=[std], color=colour, capsize=8, linewidth=1.5)
            ax.hlines(mean, i - 0.25, i + 0.25, color=colour, linewidth=2.5)
    ax.set_xticks(range(len(points)), [p.label for p in points])
    ax.set_xlim(-0.6, len(points) - 0.4)
    name = metric_name.replace("_", " ")
    ax.set_ylabel(f"final {name}")
    ax.set_title(f"final {name} per seed: mean ± one standard deviation")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_sweep(
    final: Mapping[tuple[int, float], Mapping[str, float | None]],
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    path: Path,
) -> Any:
    """Final loss against batch size, one line per learning rate (seed 003's figure).

    Args:
        final: ``(batch, lr) -> {"train_loss": ..., "val_loss": ...}``; a missing or
            non-finite value (a diverged run) leaves a gap. With several seeds, the means,
            and ``train_loss_std``/``val_loss_std`` draw ± one standard deviation.
        batch_sizes: The x values, in order.
        lrs: One line each.
        path: The PNG to write.
    """
    fig, axes = _figure(width=11, height=4.5, ncols=2)
    for ax, key in zip(axes, ("train_loss", "val_loss"), strict=True):
        for i, lr in enumerate(lrs):
            ys = []
            for b in batch_sizes:
                value = final.get((b, lr), {}).get(key)
                ys.append(value if value is not None and math.isfinite(value) else math.nan)
            spread = [final.get((b, lr), {}).get(f"{key}_std") for b in batch_sizes]
            ax.errorbar(
                list(batch_sizes),
                ys,
                # Several seeds: ± one standard deviation of the final loss over them.
                yerr=[v if v is not None and math.isfinite(v) else 0.0 for v in spread]
                if any(v is not None for v in spread)
                else None,
                marker="o",
                linewidth=2,
                capsize=4,
                color=_SWEEP_COLOURS[i % len(_SWEEP_COLOURS)],
                label=f"lr {lr:g}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"final {key.replace('_', ' ')}")
        ax.set_title(f"final {key.replace('_', ' ')}: batch size × learning rate")
        ax.grid(True, which="both", alpha=0.3)
    _legend(fig, axes[0])
    return _save(fig, path)


_SWEEP_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
