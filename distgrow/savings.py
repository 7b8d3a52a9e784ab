"""What a run saved against the ``decay_lr`` baseline, from its phases' throughput.

A *phase* is a stretch of training with one batch realisation; :class:`PhaseTracker`
(:mod:`distgrow.phases`, re-exported here) measures each as the trainer runs it.

Savings are always labelled with how they were obtained:

* ``measured`` (:func:`measured_savings`): a ``decay_lr`` run of the same config was trained
  (``distgrow compare`` runs it), and its ``summary.json`` is compared with the run's;
* ``estimated`` (:func:`estimated_savings`): no baseline run exists; its training time is the
  samples it would process divided by the throughput *this* run measured at the base batch B0
  (the baseline trains at B0 throughout), plus this run's non-training time (validation,
  checkpoints), assumed equal. Its update count is exact: it comes from the plan.
  The ``method`` string written next to the numbers says this, with the figures used. The
  wall-clock estimate carries a 95% interval from the spread of the update times it used
  (each phase keeps a running sum of squared deviations, Welford's), and is refused, with the
  reason, when those updates are too few or too short to extrapolate from.

Pure Python: no torch, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from distgrow.phases import (
    CUDA_MEMORY,
    PHASE_MEASURES,
    PHASE_SPLIT,
    SUMMARY_MEASURES,
    PhaseStats,
    PhaseTracker,
    process_age_s,
)
from distgrow.rundir import SUMMARY_FILE

# The phases live in distgrow.phases; importers find them here too.
__all__ = [
    "CONFIDENCE_Z",
    "CUDA_MEMORY",
    "MIN_REFERENCE_SECONDS",
    "MIN_REFERENCE_UPDATES",
    "PHASE_MEASURES",
    "PHASE_SPLIT",
    "SUMMARY_MEASURES",
    "PhaseStats",
    "PhaseTracker",
    "Reference",
    "Savings",
    "SavingsError",
    "estimated_savings",
    "format_ratio",
    "format_seconds",
    "measured_savings",
    "process_age_s",
    "quality_metric",
    "reference_throughput",
    "try_estimated_savings",
]


class SavingsError(ValueError):
    """Savings cannot be computed from what is given; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Savings
# --------------------------------------------------------------------------------------------


def _ratio(baseline: float | None, run: float | None) -> float | None:
    """baseline / run, or None when either is missing or the run's value is not positive."""
    if baseline is None or run is None or run <= 0:
        return None
    return baseline / run


@dataclass(frozen=True)
class Savings:
    """A run against its ``decay_lr`` baseline; ``kind`` says whether the baseline was run.

    Ratios are baseline / run: ``updates_ratio`` 2.2 reads "2.2× fewer updates",
    ``wall_ratio`` 1.5 reads "1.5× faster".
    """

    kind: Literal["measured", "estimated"]
    method: str
    """How the baseline's numbers were obtained, with the figures used."""
    run_updates: int
    run_wall_s: float
    run_worker_seconds: float
    baseline_updates: int | None
    baseline_wall_s: float | None
    baseline_worker_seconds: float | None
    metric: str | None = None
    """``val_acc`` (classification) or ``val_loss``: the quality compared (measured only)."""
    run_metric: float | None = None
    baseline_metric: float | None = None
    baseline_wall_s_low: float | None = None
    """Lower end of the estimated baseline wall-clock's 95% interval (estimated only)."""
    baseline_wall_s_high: float | None = None
    """Upper end of that interval."""
    wall_unavailable: str | None = None
    """Why the baseline wall-clock was not estimated (too little to extrapolate from)."""
    details: dict[str, Any] = field(default_factory=dict)
    """The inputs of an estimate (reference batch, throughput, its updates and relative error,
    overhead, samples)."""

    @property
    def updates_ratio(self) -> float | None:
        return _ratio(self.baseline_updates, self.run_updates)

    @property
    def wall_ratio(self) -> float | None:
        return _ratio(self.baseline_wall_s, self.run_wall_s)

    @property
    def wall_ratio_low(self) -> float | None:
        """:attr:`wall_ratio` at the low end of the baseline's interval (estimated only)."""
        return _ratio(self.baseline_wall_s_low, self.run_wall_s)

    @property
    def wall_ratio_high(self) -> float | None:
        return _ratio(self.baseline_wall_s_high, self.run_wall_s)

    @property
    def worker_seconds_ratio(self) -> float | None:
        return _ratio(self.baseline_worker_seconds, self.run_worker_seconds)

    @property
    def wall_saved_s(self) -> float | None:
        return None if self.baseline_wall_s is None else self.baseline_wall_s - self.run_wall_s

    @property
    def wall_saved_fraction(self) -> float | None:
        if not self.baseline_wall_s:
            return None
        return 1.0 - self.run_wall_s / self.baseline_wall_s

    @property
    def worker_seconds_saved(self) -> float | None:
        if self.baseline_worker_seconds is None:
            return None
        return self.baseline_worker_seconds - self.run_worker_seconds

    @property
    def metric_delta(self) -> float | None:
        """run − baseline of :attr:`metric` (positive is better for accuracy, worse for loss)."""
        if self.run_metric is None or self.baseline_metric is None:
            return None
        return self.run_metric - self.baseline_metric

    def to_dict(self) -> dict[str, Any]:
        """Every field and ratio, JSON-ready."""
        out = asdict(self)
        for name in (
            "updates_ratio",
            "wall_ratio",
            "wall_ratio_low",
            "wall_ratio_high",
            "worker_seconds_ratio",
            "wall_saved_s",
            "wall_saved_fraction",
            "worker_seconds_saved",
            "metric_delta",
        ):
            out[name] = getattr(self, name)
        return out


def quality_metric(summary: Mapping[str, Any]) -> str:
    """``val_acc`` when the run measured accuracy (classification), else ``val_loss``."""
    return "val_acc" if summary.get("val_acc") is not None else "val_loss"


def _need(summary: Mapping[str, Any], key: str, who: str) -> Any:
    value = summary.get(key)
    if value is None:
        raise SavingsError(
            f"{who} {SUMMARY_FILE} has no {key!r}. Fix: use a run finished by this version "
            f"of distgrow (its {SUMMARY_FILE} holds it)."
        )
    return value


def measured_savings(
    run: Mapping[str, Any], baseline: Mapping[str, Any], baseline_name: str = "the baseline"
) -> Savings:
    """Savings of ``run`` against a ``decay_lr`` run of the same config (both ``summary.json``).

    Args:
        run: The run's summary.
        baseline: The baseline run's summary (``growth_mode`` must be ``decay_lr``).
        baseline_name: How to name the baseline in the method string (its run directory).

    Raises:
        SavingsError: the baseline is not a finished ``decay_lr`` run over the same samples.
    """
    if baseline.get("growth_mode") != "decay_lr":
        raise SavingsError(
            f"{baseline_name} has growth_mode={baseline.get('growth_mode')!r}, but measured "
            "savings compare against the decay_lr baseline. Fix: give a run trained with "
            "growth.mode=decay_lr on the same config."
        )
    for who, summary in (("the run", run), (baseline_name, baseline)):
        if summary.get("status") != "completed":
            raise SavingsError(
                f"{who} has status {summary.get('status')!r}, not 'completed': its totals are "
                "partial. Fix: finish it with `distgrow train CONFIG --resume`."
            )
    if run.get("samples_seen") != baseline.get("samples_seen"):
        raise SavingsError(
            f"the run saw {run.get('samples_seen')} samples and {baseline_name} "
            f"{baseline.get('samples_seen')}: they did not train on the same data for the same "
            "epochs. Fix: compare runs of the same config (distgrow compare does this)."
        )
    metric = quality_metric(run)
    return Savings(
        kind="measured",
        method=(
            f"measured: {baseline_name}, trained with growth.mode=decay_lr on the same config, "
            f"data and seed; its {SUMMARY_FILE} is compared with this run's"
        ),
        run_updates=int(_need(run, "total_updates", "the run's")),
        run_wall_s=float(_need(run, "wall_s", "the run's")),
        run_worker_seconds=float(_need(run, "worker_seconds", "the run's")),
        baseline_updates=int(_need(baseline, "total_updates", "the baseline's")),
        baseline_wall_s=float(_need(baseline, "wall_s", "the baseline's")),
        baseline_worker_seconds=float(_need(baseline, "worker_seconds", "the baseline's")),
        metric=metric,
        run_metric=run.get(metric),
        baseline_metric=baseline.get(metric),
    )


MIN_REFERENCE_UPDATES = 30
"""Fewest updates at the reference batch from which a baseline wall-clock is extrapolated."""
MIN_REFERENCE_SECONDS = 1.0
"""Fewest seconds inside those updates: shorter, and start-of-phase effects (warm-up, the
first all-reduce buckets) and timer noise dominate the throughput."""
CONFIDENCE_Z = 1.96
"""Normal quantile of the two-sided 95% interval (the reference has at least
:data:`MIN_REFERENCE_UPDATES` updates, where Student's t is within 5% of it)."""


@dataclass(frozen=True)
class Reference:
    """The updates whose throughput stands for the baseline's (see :func:`reference_throughput`)."""

    batch: int
    """Global batch of the chosen phases."""
    is_base_batch: bool
    """True when they ran at B0 (else the smallest batch the run used)."""
    world_size: int
    """Processes the job held during the first of them."""
    updates: int
    samples: int
    train_s: float
    update_s_m2: float | None
    """Sum of squared deviations of their update times from the mean (None: a phase of the
    summary did not record it)."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s

    @property
    def relative_error(self) -> float | None:
        """Standard error of the mean update time over the mean (so also that of the
        extrapolated training time); None without a recorded spread or with one update.

        It treats update times as independent: slow drifts of the machine's load widen the
        true error beyond it, which is why too short a reference is refused outright.
        """
        if self.update_s_m2 is None or self.updates < 2 or self.train_s <= 0:
            return None
        std = math.sqrt(max(0.0, self.update_s_m2) / (self.updates - 1))
        return std / math.sqrt(self.updates) / (self.train_s / self.updates)

    def too_little(self) -> str | None:
        """Why these updates are too few to extrapolate from, or None when they suffice."""
        if self.updates >= MIN_REFERENCE_UPDATES and self.train_s >= MIN_REFERENCE_SECONDS:
            return None
        return (
            f"the throughput at B={self.batch} comes from {self.updates:,} update(s) in "
            f"{self.train_s:,.2f} s, too little to extrapolate a baseline's wall-clock from "
            f"(at least {MIN_REFERENCE_UPDATES} updates and {MIN_REFERENCE_SECONDS:g} s are "
            "needed). Fix: train longer at B0 (more epochs before the first growth), or run the "
            "baseline (distgrow compare) to measure it"
        )


def _combined_m2(chosen: Sequence[Mapping[str, Any]]) -> float | None:
    """The phases' sums of squared deviations pooled around their common mean (Chan et al.)."""
    updates = sum(int(p.get("updates") or 0) for p in chosen)
    if updates == 0 or any(p.get("update_s_m2") is None for p in chosen):
        return None
    mean = sum(float(p["train_s"]) for p in chosen) / updates
    total = 0.0
    for p in chosen:
        n = int(p.get("updates") or 0)
        if n:
            total += float(p["update_s_m2"]) + n * (float(p["train_s"]) / n - mean) ** 2
    return total


def reference_throughput(phases: Sequence[Mapping[str, Any]], base_batch: int) -> Reference:
    """The measured throughput the baseline would run at: that of the phases at B0.

    Falls back to the smallest batch the run used when it never trained at B0 (the
    ``grow_batch_lr`` and ``grow_momentum`` variants start larger); a smaller batch is rarely
    faster per sample, so the estimate then errs on the side of smaller savings.

    Raises:
        SavingsError: no phase has measured time.
    """
    timed = [p for p in phases if p.get("train_s") and p.get("samples")]
    if not timed:
        raise SavingsError(
            "no phase of the run has measured training time, so there is no throughput to "
            "estimate the baseline from. Fix: train for at least one update."
        )
    at_b0 = [p for p in timed if p["global_batch"] == base_batch]
    chosen = at_b0 or [
        p for p in timed if p["global_batch"] == min(q["global_batch"] for q in timed)
    ]
    return Reference(
        batch=int(chosen[0]["global_batch"]),
        is_base_batch=bool(at_b0),
        world_size=int(chosen[0].get("world_size") or chosen[0]["workers"]),
        updates=sum(int(p.get("updates") or 0) for p in chosen),
        samples=sum(int(p["samples"]) for p in chosen),
        train_s=sum(float(p["train_s"]) for p in chosen),
        update_s_m2=_combined_m2(chosen),
    )


def estimated_savings(summary: Mapping[str, Any]) -> Savings:
    """Savings of a run against a baseline that was not run, from the run's own measurements.

    Baseline updates: ``baseline_total_updates`` from the plan (exact). Baseline wall-clock:
    ``samples_seen / throughput at B0`` (see :func:`reference_throughput`) plus the run's
    non-training time (``wall_s − train_s``: validation and checkpoints, assumed the same),
    with a 95% interval from the spread of the B0 update times. Baseline worker-seconds: that
    wall-clock × the job's workers during the B0 phase. When the B0 updates are too few or
    too short (:meth:`Reference.too_little`) the wall-clock and worker-seconds are not
    estimated: they are None and ``wall_unavailable`` says why; the update count still is.

    Args:
        summary: The run's ``summary.json`` (needs ``phases``, ``base_batch``, ``wall_s``,
            ``total_updates``, ``samples_seen``, ``worker_seconds``).

    Raises:
        SavingsError: the run is the baseline itself, or the summary lacks the measurements.
    """
    if summary.get("growth_mode") == "decay_lr":
        raise SavingsError(
            "this run is the decay_lr baseline: there is nothing to save against itself"
        )
    phases = summary.get("phases")
    if not phases:
        raise SavingsError(
            f"{SUMMARY_FILE} has no per-phase throughput ('phases'). Fix: use a run finished "
            "by this version of distgrow."
        )
    base_batch = int(_need(summary, "base_batch", "the run's"))
    samples = int(_need(summary, "samples_seen", "the run's"))
    wall = float(_need(summary, "wall_s", "the run's"))
    train_s = sum(float(p.get("train_s") or 0.0) for p in phases)
    overhead = max(0.0, wall - train_s)
    ref = reference_throughput(phases, base_batch)
    baseline_updates = summary.get("baseline_total_updates")
    updates_words = (
        f"updates {baseline_updates:,} counted from the decay_lr plan (exact)"
        if baseline_updates is not None
        else "updates unknown (plateau schedule: they depend on when the plateaus come)"
    )
    details: dict[str, Any] = {
        "reference_batch": ref.batch,
        "reference_is_base_batch": ref.is_base_batch,
        "reference_samples_per_s": ref.samples_per_s,
        "reference_world_size": ref.world_size,
        "reference_updates": ref.updates,
        "reference_train_s": ref.train_s,
        "reference_relative_error": ref.relative_error,
        "baseline_samples": samples,
        "non_training_s": overhead,
    }
    refused = ref.too_little()
    if refused is not None:
        method = f"estimated: baseline wall-clock not estimated: {refused}; {updates_words}"
        wall_s: tuple[float | None, float | None, float | None] = (None, None, None)
    else:
        wall_s, method = _estimated_wall(ref, base_batch, samples, overhead, details)
        method += f"; {updates_words}"
    baseline_wall, low, high = wall_s
    return Savings(
        kind="estimated",
        method=method,
        run_updates=int(_need(summary, "total_updates", "the run's")),
        run_wall_s=wall,
        run_worker_seconds=float(_need(summary, "worker_seconds", "the run's")),
        baseline_updates=None if baseline_updates is None else int(baseline_updates),
        baseline_wall_s=baseline_wall,
        baseline_worker_seconds=None if baseline_wall is None else baseline_wall * ref.world_size,
        baseline_wall_s_low=low,
        baseline_wall_s_high=high,
        wall_unavailable=refused,
        details=details,
    )


def _estimated_wall(
    ref: Reference, base_batch: int, samples: int, overhead: float, details: dict[str, Any]
) -> tuple[tuple[float, float | None, float | None], str]:
    """The baseline's wall-clock extrapolated from the reference throughput, its 95% interval
    (None, None without a recorded spread), and the method in words (``details`` gains
    ``baseline_train_s``)."""
    batch, rate, world = ref.batch, ref.samples_per_s, ref.world_size
    where = (
        f"measured at B0={base_batch} in this run's first phase(s)"
        if ref.is_base_batch
        else (
            f"measured at B={batch}, the smallest batch this run used (it never ran at "
            f"B0={base_batch}; a smaller batch is rarely faster per sample, so the saving is "
            "likely larger)"
        )
    )
    baseline_train_s = samples / rate
    baseline_wall = baseline_train_s + overhead
    details["baseline_train_s"] = baseline_train_s
    error = ref.relative_error
    low: float | None = None
    high: float | None = None
    if error is None:
        spread = "the spread of its update times was not recorded, so no interval"
    else:
        # The non-training time is this run's own, measured once: only the extrapolated
        # training time is uncertain.
        half = CONFIDENCE_Z * error * baseline_train_s
        low, high = max(overhead, baseline_wall - half), baseline_wall + half
        spread = (
            f"95% interval {low:,.1f}–{high:,.1f} s from the spread of those update times "
            f"(±{CONFIDENCE_Z * error:.1%} on the training time)"
        )
    method = (
        f"estimated: baseline training time = {samples:,} samples ÷ {rate:,.0f} samples/s "
        f"({where}, {world} worker(s), {ref.updates:,} updates in {ref.train_s:,.1f} s) "
        f"= {baseline_train_s:,.1f} s, plus this run's non-training time (validation, "
        f"checkpoints) {overhead:,.1f} s, assumed equal; {spread}; worker-seconds = that "
        f"× {world} worker(s)"
    )
    return (baseline_wall, low, high), method


def try_estimated_savings(summary: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`estimated_savings` as a dict, or ``{"kind": "estimated", "unavailable": why}``."""
    try:
        return estimated_savings(summary).to_dict()
    except SavingsError as err:
        return {"kind": "estimated", "unavailable": str(err)}


# --------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------


def format_ratio(ratio: float | None, better: str, worse: str) -> str:
    """``2.17× fewer`` / ``0.91× (1.10× more)``; ``-`` when unknown."""
    if ratio is None or not math.isfinite(ratio):
        return "-"
    if ratio >= 1.0:
        return f"{ratio:.2f}× {better}"
    return f"{ratio:.2f}× ({1 / ratio:.2f}× {worse})"


def format_seconds(seconds: float | None) -> str:
    """``42.1 s``, ``12 min 05 s``, ``3 h 04 min``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
