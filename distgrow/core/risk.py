"""Where a growth plan leaves the region where batch growth matched ``decay_lr`` in the
multi-seed evidence (docs/noise.md, "When growth stops paying"; benchmarks/growth_evidence.py).

Why the batch against the data set's size. The conversion keeps the approximate SGD noise
``ε·N/(B(1−m))``; the exact one is ``ε·(N/B − 1)/(1−m)`` (Smith et al. 2018, eq. 2). Keeping
``ε/B`` on the schedule's path therefore leaves a grown phase with ``(N − B)/(N − B0)`` of the
baseline's noise at the same point of the schedule: about 8% less at ``B = N/10`` from
``B0 = N/40``, half at ``B = N/2``, none at ``B = N`` (full-batch descent). The further the
grown batch comes towards ``N``, the less the run is the schedule the user wrote, and the fewer
updates each epoch has (``N/B``). How far is too far: :data:`MAX_BATCH_FRACTION`.

The measured noise scale ``B_simple`` is not known before the run, so the plan cannot test the
batch against it; it names ``growth.noise_cap`` as the measured alternative.

Pure Python: no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # plan.py calls this module: no import at run time
    from distgrow.core.plan import Phase

__all__ = ["MAX_BATCH_FRACTION", "growth_warnings", "noise_kept"]

MAX_BATCH_FRACTION = 0.1
"""A grown phase whose batch is above this fraction of N is warned about: the paper's guide and
issue #26's losing case (a tabular set of 5,140 that lost at and past N/10). In the three-seed
evidence (docs/noise.md) every grown phase at or below it was within the baseline's seed
spread on the classification sets; past it nothing lost there (6,000 images at 0.53 N), while
digits at B = N could not tell (a ±1 point interval)."""


def noise_kept(batch: int, base_batch: int, dataset_size: int) -> float:
    """The fraction of the baseline's exact SGD noise ``ε(N/B − 1)`` that a grown phase at
    ``batch`` keeps when ``ε/B`` follows the schedule: ``(N − B)/(N − B0)``."""
    if dataset_size <= base_batch:
        return 1.0
    return max(0.0, (dataset_size - batch) / (dataset_size - base_batch))


def growth_warnings(
    phases: Sequence[Phase],
    *,
    mode: str,
    base_batch: int,
    dataset_size: int,
    max_fraction: float = MAX_BATCH_FRACTION,
) -> list[str]:
    """One warning per grown phase whose batch is above ``max_fraction × N``, saying what to do.

    Args:
        phases: The plan's phases (epoch ranges, or the rungs of a ladder).
        mode: ``growth.mode``; ``decay_lr`` never grows and gets no warning.
        base_batch: B0.
        dataset_size: N, the training samples.
        max_fraction: The largest safe ``B/N``.
    """
    if mode == "decay_lr" or dataset_size <= 0:
        return []
    safe = max(base_batch, int(max_fraction * dataset_size))
    out = []
    for phase in phases:
        batch = phase.global_batch
        if batch <= base_batch or batch <= max_fraction * dataset_size:
            continue
        where = (
            f"rung {phase.rung}"
            if phase.start_epoch != phase.start_epoch  # NaN: a ladder's rung has no epochs
            else f"epochs {phase.start_epoch:g}–{phase.end_epoch:g}"
        )
        kept = noise_kept(batch, base_batch, dataset_size)
        out.append(
            f"{where}: batch {batch:,} is {batch / dataset_size:.2f} N (N = {dataset_size:,}), "
            f"above {max_fraction:g} N (the paper's N/10 guide): its SGD noise ε(N/B−1) is "
            f"{kept:.0%} of the baseline's; growth lost there on issue #26's tabular set, not "
            "on the sets of docs/noise.md: check with distgrow compare --seeds 0,1,2. If it "
            "loses: cap "
            f"the batch at {safe:,} (growth.max_dataset_fraction={max_fraction:g} or "
            f"growth.max_global_batch={safe}: the hybrid from there), or growth.noise_cap=1 "
            "(stop at the measured noise scale)"
        )
    return out
