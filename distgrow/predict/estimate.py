"""Predicted wall-clock, worker-hours and SLURM node-hours of a plan, before it runs.

:func:`predict_plan` walks a :class:`~distgrow.planner.Plan` phase by phase with the fitted
:class:`~distgrow.predict.profile.Throughput`: each phase costs its updates × the time of one
update at its split, a validation and a checkpoint at every epoch end inside it, a checkpoint at
its growth, and a relaunch where the worker count changes (``distgrow launch`` starts a new job
step or, under ``launch.slurm: chain``, a new SLURM job). :func:`predict_phase_times` does the
same for the phases a finished run measured (the report's predicted-against-measured plot).

Node-hours: under ``chain`` each span (phases with one worker count) is its own job of
``ceil(W / per_node)`` nodes, billed from its start-up to its last update; under ``allocation``
one job holds the widest span's nodes from the first start-up to the last update. Queue waits
are not billed and not predicted.

Pure Python: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from distgrow.planner import Plan
from distgrow.predict.profile import Throughput

EPS = 1e-9


@dataclass(frozen=True)
class PhaseTime:
    """One phase's predicted cost."""

    start_epoch: float
    end_epoch: float
    global_batch: int
    workers: int
    micro_batch: int
    accum_steps: int
    updates: int
    update_s: float
    train_s: float
    """Inside updates: ``updates × update_s``."""
    validations: int
    overhead_s: float
    """Validations, checkpoints (epoch ends and the growth) and the relaunch before it."""
    relaunch_s: float

    @property
    def wall_s(self) -> float:
        return self.train_s + self.overhead_s


@dataclass
class RunPrediction:
    """A variant's predicted run (see the module's docstring)."""

    variant: str
    phases: list[PhaseTime]
    startup_s: float
    per_node: int
    notes: list[str] = field(default_factory=list)

    @property
    def updates(self) -> int:
        return sum(p.updates for p in self.phases)

    @property
    def train_s(self) -> float:
        """Inside updates (a run's ``train_s``; with ``clock="cpu"`` its ``train_cpu_s``)."""
        return sum(p.train_s for p in self.phases)

    @property
    def wall_s(self) -> float:
        """Training wall-clock, from the first update to the last (relaunches included): what a
        run's ``summary.json`` calls ``wall_s``."""
        return sum(p.wall_s for p in self.phases)

    @property
    def worker_hours(self) -> float:
        """Each span's workers × its wall-clock and start-up (``distgrow launch`` sizes them)."""
        seconds = sum(p.wall_s * p.workers for p in self.phases)
        first = self.phases[0].workers if self.phases else 1
        return (seconds + self.startup_s * first) / 3600.0

    def spans(self) -> list[tuple[int, float]]:
        """``(workers, seconds)`` of each span: its start-up (or relaunch) and its phases."""
        spans: list[tuple[int, float]] = []
        for i, p in enumerate(self.phases):
            if i == 0 or p.workers != self.phases[i - 1].workers:
                spans.append((p.workers, (self.startup_s if i == 0 else 0.0) + p.wall_s))
            else:
                workers, seconds = spans[-1]
                spans[-1] = (workers, seconds + p.wall_s)
        return spans

    def nodes(self, workers: int) -> int:
        return math.ceil(workers / max(1, self.per_node))

    @property
    def chain_node_hours(self) -> float:
        """``launch.slurm: chain``: each span's nodes × its job's time."""
        return sum(self.nodes(w) * s for w, s in self.spans()) / 3600.0

    @property
    def allocation_node_hours(self) -> float:
        """``launch.slurm: allocation``: the widest span's nodes × the whole run."""
        widest = max((p.workers for p in self.phases), default=1)
        return self.nodes(widest) * (self.startup_s + self.wall_s) / 3600.0

    def to_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "updates": self.updates,
            "wall_s": self.wall_s,
            "train_s": self.train_s,
            "startup_s": self.startup_s,
            "worker_hours": self.worker_hours,
            "chain_node_hours": self.chain_node_hours,
            "allocation_node_hours": self.allocation_node_hours,
            "per_node": self.per_node,
            "phases": [{**asdict(p), "wall_s": p.wall_s} for p in self.phases],
            "notes": list(self.notes),
        }


def epoch_ends(start: float, end: float, epochs: int) -> int:
    """Epoch ends ``k`` (1 … ``epochs``) with ``start < k <= end``: validations in a phase."""
    first = math.floor(start + EPS) + 1
    last = min(epochs, math.floor(end + EPS))
    return max(0, last - first + 1)


def predict_plan(
    plan: Plan,
    model: Throughput,
    *,
    variant: str,
    val_size: int,
    per_node: int,
    piece_cap: int,
    relaunch: bool = True,
) -> RunPrediction:
    """The predicted cost of ``plan`` (see the module's docstring).

    Args:
        plan: A plan with epoch phases; a plateau *ladder* of one rung (``decay_lr``) counts as
            one phase of ``updates × epochs``.
        model: The fitted throughput model.
        variant: The name the prediction is printed under.
        val_size: Validation samples (a pass at every epoch end).
        per_node: Workers a node holds.
        piece_cap: The largest validation piece (the micro-batch limit).
        relaunch: Whether a change of worker count starts a new job (``distgrow launch``);
            False for a job of fixed size (torchrun with ``--nproc_per_node``).

    Raises:
        ValueError: a plateau ladder with growth (when it grows is only known while training).
    """
    phases = list(plan.phases)
    if plan.ladder:
        if len(phases) != 1:
            raise ValueError(
                "a plateau schedule grows when the validation plateaus, which is only known "
                "while training: its wall-clock cannot be predicted. Fix: predict growth.mode="
                "decay_lr, or a step/multistep schedule with the epochs the plateaus come at."
            )
        only = phases[0]
        spans = [(0.0, float(plan.epochs), only, only.updates * plan.epochs)]
    else:
        spans = [(p.start_epoch, p.end_epoch, p, p.updates) for p in phases]
    out: list[PhaseTime] = []
    ckpt = model.profile.checkpoint_s
    for start, end, p, updates in spans:
        w = p.workers
        update_s = model.update_s(p.micro_batch, p.accum_steps, w, per_node)
        vals = epoch_ends(start, end, plan.epochs)
        val_s = model.validation_s(val_size, w, per_node, piece_cap)
        previous = out[-1] if out else None
        grew = previous is not None and (
            (previous.global_batch, previous.workers, previous.micro_batch, previous.accum_steps)
            != (p.global_batch, w, p.micro_batch, p.accum_steps)
        )
        relaunch_s = model.relaunch_s(w) if relaunch and previous and previous.workers != w else 0.0
        overhead = vals * (val_s + ckpt) + (ckpt if grew else 0.0) + relaunch_s
        out.append(
            PhaseTime(
                start, end, p.global_batch, w, p.micro_batch, p.accum_steps, updates,
                update_s, updates * update_s, vals, overhead, relaunch_s,
            )
        )  # fmt: skip
    first = out[0].workers if out else 1
    return RunPrediction(variant, out, model.startup_s(first), per_node)


def predict_phase_times(
    phases: Sequence[Mapping[str, Any]],
    model: Throughput,
    *,
    epochs: int,
    dataset_size: int,
    val_size: int,
    per_node: int,
    piece_cap: int,
) -> list[float]:
    """Predicted ``wall_s`` of each phase a run measured (``summary.json``'s ``phases``): the
    same arithmetic as :func:`predict_plan` for the updates and the epochs each phase ran."""
    out = []
    for i, ph in enumerate(phases):
        start = float(ph.get("start_epoch", 0.0))
        if i + 1 < len(phases):
            end = float(phases[i + 1].get("start_epoch", epochs))
        else:
            end = float(epochs)
        w = int(ph["workers"])
        update_s = model.update_s(int(ph["micro_batch"]), int(ph["accum_steps"]), w, per_node)
        vals = epoch_ends(start, end, epochs)
        val_s = model.validation_s(val_size, w, per_node, piece_cap)
        ckpt = model.profile.checkpoint_s
        grew = ckpt if i > 0 else 0.0
        out.append(int(ph["updates"]) * update_s + vals * (val_s + ckpt) + grew)
    del dataset_size  # the phases carry their updates
    return out


def ratio_words(baseline: float, other: float) -> str:
    """``2.10× faster`` / ``1.30× slower`` (other against baseline)."""
    if other <= 0 or baseline <= 0:
        return "-"
    r = baseline / other
    return f"{r:.2f}× faster" if r >= 1 else f"{1 / r:.2f}× slower"


def format_seconds(seconds: float) -> str:
    """Seconds as ``12.3 s``, ``4.5 min`` or ``6.7 h``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_predictions(preds: Sequence[RunPrediction]) -> list[str]:
    """The table ``distgrow estimate`` prints, and each variant against ``decay_lr``."""
    head = (
        f"{'variant':<12} {'updates':>9} {'train wall':>11} {'start-up':>9} "
        f"{'worker-h':>9} {'chain node-h':>13} {'allocation node-h':>18}"
    )
    lines = [head]
    for p in preds:
        lines.append(
            f"{p.variant:<12} {p.updates:>9,} {format_seconds(p.wall_s):>11} "
            f"{format_seconds(p.startup_s):>9} {p.worker_hours:>9.4g} "
            f"{p.chain_node_hours:>13.4g} {p.allocation_node_hours:>18.4g}"
        )
    base = next((p for p in preds if p.variant == "decay_lr"), None)
    if base is not None:
        for p in preds:
            if p is base:
                continue
            lines.append(
                f"{p.variant} vs decay_lr: wall-clock {ratio_words(base.wall_s, p.wall_s)}, "
                f"worker-hours {ratio_words(base.worker_hours, p.worker_hours)}, updates "
                f"{base.updates / max(1, p.updates):.2f}× fewer; chain bills "
                f"{p.chain_node_hours:.4g} node-h against {p.allocation_node_hours:.4g} for one "
                "allocation held throughout"
            )
    for p in preds:
        lines += [f"note ({p.variant}): {n}" for n in p.notes]
    return lines
