"""Batch splits and the limits that realise a wanted batch (``workers × micro × accum``).

See :mod:`distgrow.planner` for the rules; pure Python, no torch import.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from distgrow.config import ConfigError, GrowthConfig, ModelConfig

# B0 / r(t) computed in floating point can land a hair below an integer (128 / 0.2**3 =
# 15999.999999999996); this relative slack keeps exact decays exact.
_FLOAT_SLACK = 1e-9

ACCUM_WINDOW = 32
"""Accumulation counts tried beyond the fewest that fit: more steps are smaller micro-batches
(less efficient), so the realiser only looks a little further for an exact split."""

NEAR_IDEAL = 0.05
"""How far below the target a realisation may stay at the previous phase's worker count: beyond
this the worker count may change (fall) to a split that comes closer, so the LR is not cut by
the rounding of a coarse split (the noise identity holds either way)."""


@dataclass(frozen=True)
class Split:
    """One way to run a global batch: ``workers × micro_batch × accum_steps == global_batch``.

    The one record of a batch split: the plan's settings and phases, the trainer's phases and
    its metrics records hold it, and two splits are the same when the records are equal. In
    JSON (``metrics.jsonl``, ``summary.json``, ``distgrow plan --json``) its four fields are
    written flat, beside the record's other keys.
    """

    global_batch: int
    workers: int
    micro_batch: int
    accum_steps: int

    def __str__(self) -> str:
        return f"{self.workers}×{self.micro_batch}×{self.accum_steps}"

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> Split:
        """The split whose four fields are keys of ``record`` (a JSON record, a checkpoint)."""
        return cls(*(int(record[name]) for name in SPLIT_FIELDS))


Realisation = Split
"""The realiser's name for a split (:meth:`Limits.realise` returns one)."""

SPLIT_FIELDS = ("global_batch", "workers", "micro_batch", "accum_steps")
"""A split's keys, as JSON records write them flat."""


def preferred_micro_batch(growth: GrowthConfig) -> int:
    """The per-device batch workers are added at: ``growth.micro_batch``, else the base batch."""
    return growth.micro_batch or growth.base_batch


def micro_batch_multiple(model: ModelConfig) -> int:
    """What every micro-batch is a whole multiple of: the ghost batch (so batch-norm statistics
    do not depend on the split), else 1. The one rule for the plan, the trainer and own loops."""
    return model.ghost_batch or 1


def flatten_split(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` (a dataclass as a dict) with its ``split`` dict written flat in its place."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "split":
            out.update(value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Limits:
    """What stops the batch: hardware, workers, and the caps of the config."""

    cap: int
    """Largest global batch allowed: min(max_global_batch, ⌊fraction·N⌋, N, hardware)."""
    max_workers: int
    micro_batch: int
    """Preferred per-device batch: workers are added at this size first."""
    max_micro_batch: int | None
    max_accum_steps: int | None
    multiple: int
    """Micro-batches are multiples of this (the ghost batch-norm size)."""
    min_workers: int = 1

    @classmethod
    def from_config(
        cls, growth: GrowthConfig, model: ModelConfig, dataset_size: int, min_workers: int = 1
    ) -> Limits:
        """Limits for a data set of ``dataset_size`` training samples on ``min_workers`` ranks.

        An unset ``growth.max_workers`` is the job's world size (``min_workers``): the workers
        the user started are the ones used (``distgrow launch`` sets it to the allocation).
        """
        max_workers = min_workers if growth.max_workers is None else growth.max_workers
        if min_workers > max_workers:
            raise ConfigError(
                f"the job has {min_workers} workers but growth.max_workers is "
                f"{max_workers}. Fix: set growth.max_workers={min_workers} (or leave it unset: "
                "the job's world size), or launch fewer."
            )
        caps = [dataset_size]
        if growth.max_global_batch is not None:
            caps.append(growth.max_global_batch)
        if growth.max_dataset_fraction is not None:
            caps.append(math.floor(growth.max_dataset_fraction * dataset_size + _FLOAT_SLACK))
        # An unresolved "auto" (no probe of the training device at hand) is no limit here;
        # `distgrow train` resolves it before planning (distgrow.probe.resolve_auto).
        max_micro = growth.max_micro_batch if isinstance(growth.max_micro_batch, int) else None
        if max_micro is not None and growth.max_accum_steps is not None:
            caps.append(max_workers * max_micro * growth.max_accum_steps)
        # The batch never has to shrink below the baseline's: a cap under B0 stops growth only.
        cap = max(min(caps), growth.base_batch)
        return cls(
            cap=cap,
            max_workers=max_workers,
            micro_batch=preferred_micro_batch(growth),
            max_micro_batch=max_micro,
            max_accum_steps=growth.max_accum_steps,
            multiple=micro_batch_multiple(model),
            min_workers=min_workers,
        )

    def realise(self, target: int, floor_workers: int = 1) -> Realisation | None:
        """The realisation of ``target`` (clipped to ``cap``): its largest split, or None.

        Realisable: ``workers × micro_batch × accum_steps`` with ``min_workers <= workers <=
        max_workers``, micro-batches multiples of ``multiple`` and at most ``max_micro_batch``,
        and accumulation only when the target exceeds what all workers hold at their memory
        limit in one pass (then at most ``ACCUM_WINDOW`` steps more than the fewest that
        reach the target). The search keeps ``workers >= floor_workers`` (the previous
        phase's count) unless that leaves the batch more than ``NEAR_IDEAL`` below the target:
        then it takes the largest split at any worker count (ghost batches over many workers
        make coarse steps: 8 workers × 32 reach only multiples of 256). Among splits of the
        largest size: fewest accumulation steps, then the fewest workers that keep the
        micro-batch at or under the preferred ``micro_batch`` (else the most workers).

        Args:
            target: the wanted global batch (already an integer).
            floor_workers: the workers of the previous phase; kept unless too coarse.
        """
        return _realise(self, min(target, self.cap), max(floor_workers, self.min_workers))

    def _realise(self, target: int, floor: int) -> Realisation | None:
        best = self._largest(target, floor)
        if floor > self.min_workers and (
            best is None or best.global_batch < (1.0 - NEAR_IDEAL) * target
        ):
            wider = self._largest(target, self.min_workers)
            if wider is not None and (best is None or wider.global_batch > best.global_batch):
                best = wider
        return best

    def _largest(self, target: int, w_lo: int) -> Realisation | None:
        """The largest split of at most ``target`` with ``w_lo <= workers`` (see realise)."""
        u = self.multiple
        top_micro = None if self.max_micro_batch is None else self.max_micro_batch // u * u
        if top_micro == 0 or target < w_lo * u:
            return None
        one_pass = top_micro is None or target <= self.max_workers * top_micro
        best: Realisation | None = None
        best_key: tuple[int, int, int, int] | None = None
        # beyond target // u workers every micro-batch would be 0
        for w in range(w_lo, min(self.max_workers, target // u) + 1):
            if one_pass:
                steps = [1]
            else:
                assert top_micro is not None
                # From the count that fills memory exactly (a_full) to the fewest that reach the
                # target (a_min), and up to ACCUM_WINDOW more in case one divides more exactly.
                a_full = max(1, target // (w * top_micro))
                a_min = math.ceil(target / (w * top_micro))
                a_max = self.max_accum_steps or a_min + ACCUM_WINDOW
                a_hi = min(a_max, a_min + ACCUM_WINDOW)
                steps = [1, *range(max(2, min(a_full, a_max)), a_hi + 1)]
            for a in steps:
                if best_key is not None and best_key[0] == target and -a < best_key[1]:
                    break  # no split is above the target, nor this one at fewer steps
                micro = target // (w * a * u) * u
                if top_micro is not None and micro > top_micro:
                    micro = top_micro
                if micro == 0:
                    continue
                busy = micro <= self.micro_batch
                key = (w * a * micro, -a, int(busy), -w if busy else w)
                if best_key is None or key > best_key:
                    best_key, best = key, Realisation(w * a * micro, w, micro, a)
            if best_key is not None and best_key[:3] == (target, -1, 1):
                break  # exact, in one pass, busy, at the fewest workers: nothing beats it
        return best


@functools.lru_cache(maxsize=4096)
def _realise(limits: Limits, target: int, floor: int) -> Realisation | None:
    """:meth:`Limits.realise`, remembered: a plan asks the same question at a phase's end and
    at the next one's start, and a realisation is a frozen record (safe to share)."""
    return limits._realise(target, floor)
