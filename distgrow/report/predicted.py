"""The report's predicted-against-measured plot: each phase's wall-clock, as predicted by the
throughput model (:mod:`distgrow.predict`) and as the run measured it.

The model comes from a timing profile beside the runs: ``timing.json`` in the report directory
(``benchmarks/predict_accuracy.py`` and ``distgrow estimate --save`` write one), else in a run
directory. Each phase of each run is predicted from what it did (its updates, split and epochs),
with the same arithmetic ``distgrow estimate`` applies to a plan, so the plot separates the
model's error from the plan's. Without a profile there is no plot (the report says nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgrow.predict.estimate import predict_phase_times
from distgrow.predict.profile import VAL_CHUNK, ProfileError, Throughput, read_profile
from distgrow.report.runs import RunData

TIMING_FILE = "timing.json"
PLOT_FILE = "predicted_vs_measured.png"
BAND = 0.15
"""The shaded band: within 15 % of the measured time (the prediction's aim)."""


@dataclass
class PhasePoints:
    """One run's phases: measured and predicted wall-clock, and each phase's global batch."""

    label: str
    measured: list[float]
    predicted: list[float]
    batches: list[int]
    colour: str | None = None


def find_profile(out: Path, runs: Sequence[RunData]) -> Path | None:
    """The first ``timing.json`` in the report directory or a run directory."""
    for folder in (out, *(r.path for r in runs)):
        if (folder / TIMING_FILE).is_file():
            return folder / TIMING_FILE
    return None


def phase_points(run: RunData, model: Throughput, colour: str | None = None) -> PhasePoints:
    """``run``'s phases, measured and predicted (one node: its workers share it)."""
    phases = run.summary.to_dict().get("phases") or []
    cap = run.config.get("growth", {}).get("max_micro_batch")
    piece = min(VAL_CHUNK, cap) if isinstance(cap, int) else VAL_CHUNK
    predicted = predict_phase_times(
        phases,
        model,
        epochs=run.summary.epochs,
        dataset_size=run.dataset_size,
        val_size=model.profile.val_size,
        per_node=max(1, run.summary.world_size),
        piece_cap=piece,
    )
    return PhasePoints(
        run.label,
        [float(p["wall_s"]) for p in phases],
        predicted,
        [int(p["global_batch"]) for p in phases],
        colour,
    )


def plot_predicted(points: Sequence[PhasePoints], path: Path, source: str) -> Any:
    """Predicted against measured seconds per phase, one colour per run, the diagonal and the
    ±15 % band; each point labelled with its phase's global batch."""
    from distgrow.plots import _figure, _save, colour_for

    fig, ax = _figure(width=7.5, height=6)
    top = max([1e-3, *(v for p in points for v in (*p.measured, *p.predicted))]) * 1.1
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="predicted = measured")
    ax.fill_between(
        [0, top],
        [0, top * (1 - BAND)],
        [0, top * (1 + BAND)],
        color="grey",
        alpha=0.15,
        label=f"within {BAND:.0%}",
    )
    for i, p in enumerate(points):
        colour = p.colour or colour_for(p.label, i)
        ax.scatter(p.measured, p.predicted, color=colour, s=40, label=p.label, zorder=3)
        for x, y, batch in zip(p.measured, p.predicted, p.batches, strict=True):
            ax.annotate(str(batch), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured wall-clock of the phase (s)")
    ax.set_ylabel("predicted (s)")
    ax.set_title(f"time per phase, predicted against measured\n(model: {source})", fontsize=10)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8)
    return _save(fig, path)


def write_predicted_plot(
    runs: Sequence[RunData], out: Path, colours: Sequence[str | None]
) -> str | None:
    """Draw :data:`PLOT_FILE` when a timing profile is found; its file name, else None."""
    found = find_profile(out, runs)
    if found is None:
        return None
    try:
        profile = read_profile(found)
        model = Throughput.fit(profile)
    except ProfileError:
        return None  # an unreadable profile: the report goes on without the plot
    points = [
        phase_points(run, model, colour)
        for run, colour in zip(runs, colours, strict=True)
        if run.summary.to_dict().get("phases")
    ]
    if not points:
        return None
    plot_predicted(points, out / PLOT_FILE, f"{profile.device}, {found.name}")
    return PLOT_FILE
