"""Turning an LR schedule into a batch schedule with the same SGD noise-scale path.

The noise scale is ``g = ε / (B (1 − m))`` (METHOD.md §1). For a user schedule with decay
ratio ``r(t)``, distgrow keeps ``g(t) = g0 · r(t)`` but moves the decay into the batch:

* ideal batch ``B*(t) = B0 / r(t)``;
* realised batch ``B(t)``: the largest size ``workers × micro_batch × accum_steps`` not above
  ``B*(t)`` or any cap (``max_global_batch``, ``max_dataset_fraction · N``, the hardware);
* learning rate ``ε(t) = g0 · r(t) · B(t) · (1 − m)``, which is ``lr0`` while the batch keeps up
  and takes exactly the residual once it is capped or rounded (the hybrid).

Realisation rules: workers first (up to ``max_workers``, never fewer than before unless that
count leaves the batch more than ``NEAR_IDEAL`` below ``B*``), each at the preferred
``micro_batch``; then a larger micro-batch (up to ``max_micro_batch``); accumulation only once
both are at their limits. The split is exact; where none exists for ``B*`` the batch is rounded
down and the LR absorbs the difference.

:class:`GrowthPolicy` is the stateful object a training loop asks "what now?" (it replays
exactly after ``load_state_dict``); :func:`make_plan` drives the same policy through a whole run
to produce the phases that ``distgrow plan`` prints.

Pure Python: no torch import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from distgrow.config import Config, ConfigError, GrowthConfig, ModelConfig, load_config
from distgrow.schedules import DecaySchedule, PlateauTrigger, build_schedule, plateau_ratio_after

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
        """Limits for a data set of ``dataset_size`` training samples on ``min_workers`` ranks."""
        if min_workers > growth.max_workers:
            raise ConfigError(
                f"the job has {min_workers} workers but growth.max_workers is "
                f"{growth.max_workers}. Fix: set growth.max_workers={min_workers} or launch fewer."
            )
        caps = [dataset_size]
        if growth.max_global_batch is not None:
            caps.append(growth.max_global_batch)
        if growth.max_dataset_fraction is not None:
            caps.append(math.floor(growth.max_dataset_fraction * dataset_size + _FLOAT_SLACK))
        if growth.max_micro_batch is not None and growth.max_accum_steps is not None:
            caps.append(growth.max_workers * growth.max_micro_batch * growth.max_accum_steps)
        # The batch never has to shrink below the baseline's: a cap under B0 stops growth only.
        cap = max(min(caps), growth.base_batch)
        return cls(
            cap=cap,
            max_workers=growth.max_workers,
            micro_batch=preferred_micro_batch(growth),
            max_micro_batch=growth.max_micro_batch,
            max_accum_steps=growth.max_accum_steps,
            multiple=model.ghost_batch or 1,
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
        target = min(target, self.cap)
        floor = max(floor_workers, self.min_workers)
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
        for w in range(w_lo, self.max_workers + 1):
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
                micro = target // (w * a * u) * u
                if top_micro is not None:
                    micro = min(micro, top_micro)
                if micro == 0:
                    continue
                busy = micro <= self.micro_batch
                key = (w * a * micro, -a, int(busy), -w if busy else w)
                if best_key is None or key > best_key:
                    best_key, best = key, Realisation(w * a * micro, w, micro, a)
        return best


@dataclass(frozen=True)
class Setting:
    """What one parameter update uses: the batch, how it is split, the LR and momentum."""

    split: Split
    lr: float
    momentum: float
    ratio: float
    """r(t): the noise scale relative to the start (what the user's schedule asked for)."""
    ideal_batch: float
    """B0 / r(t): the batch that would have carried the whole decay."""
    rung: int = 0
    """Plateau schedules: how many plateau cuts have fired."""
    capped: bool = False
    """The ideal batch is above a cap: the LR carries the rest of the decay (the hybrid)."""

    @property
    def realisation(self) -> Split:
        return self.split

    @property
    def global_batch(self) -> int:
        return self.split.global_batch

    @property
    def workers(self) -> int:
        return self.split.workers

    @property
    def micro_batch(self) -> int:
        return self.split.micro_batch

    @property
    def accum_steps(self) -> int:
        return self.split.accum_steps


def _effective_start(cfg: Config) -> tuple[int, float]:
    """(B0, momentum) the run starts from, after the LR/momentum variants scale them."""
    g, m0 = cfg.growth, cfg.optim.momentum
    if g.mode == "grow_batch_lr":
        return round(g.base_batch * g.lr_scale), m0
    if g.mode == "grow_momentum":
        return round(g.base_batch * g.lr_scale * (1.0 - m0) / (1.0 - g.momentum)), g.momentum
    return g.base_batch, m0


class GrowthPolicy:
    """The growth decisions of one run, for a training loop or for :func:`make_plan`.

    Ask :meth:`setting` before each update (``epoch`` and the sample offset ``position`` in the
    epoch); report each epoch's validation metric to :meth:`end_epoch` (plateau schedules grow
    there). ``state_dict``/``load_state_dict`` make a resume replay the same decisions.

    Args:
        cfg: the validated config.
        dataset_size: N, the number of training samples.
        min_workers: the job's world size; the plan never uses fewer workers than this.
    """

    def __init__(self, cfg: Config, dataset_size: int, min_workers: int = 1) -> None:
        if dataset_size < 1:
            raise ConfigError(f"the training set is empty (N={dataset_size}): nothing to plan.")
        self.cfg = cfg
        self.dataset_size = dataset_size
        self.limits = Limits.from_config(cfg.growth, cfg.model, dataset_size, min_workers)
        self.base_batch = cfg.growth.base_batch
        self.steps_per_epoch0 = math.ceil(dataset_size / self.base_batch)
        self.start_batch, self.momentum = _effective_start(cfg)
        # g0 · (1 − m) folded into one constant: lr = lr_per_sample · r · B.
        # The noise scale of the user's baseline: lr0 / (B0 (1 − m0)).
        self.noise0 = cfg.optim.lr / (self.base_batch * (1.0 - cfg.optim.momentum))
        self.lr_per_sample = self.noise0 * (1.0 - self.momentum)
        self.grows = cfg.growth.mode != "decay_lr"
        self.is_plateau = cfg.schedule.type == "plateau"
        horizon = cfg.run.epochs * (
            1 if cfg.schedule.interval == "epoch" else self.steps_per_epoch0
        )
        self.schedule: DecaySchedule | None = (
            None if self.is_plateau else build_schedule(cfg.schedule, cfg.optim.lr, horizon)
        )
        self.trigger = (
            PlateauTrigger.from_config(cfg.schedule, cfg.optim.lr) if self.is_plateau else None
        )
        self.rung = 0
        start = self.limits.realise(min(self.start_batch, self.limits.cap))
        derived = cfg.growth.mode in ("grow_batch_lr", "grow_momentum")  # may round, LR absorbs
        if start is None or (start.global_batch != self.start_batch and not derived):
            unit = self.limits.min_workers * self.limits.multiple
            lo, hi = self.start_batch // unit * unit, (self.start_batch // unit + 1) * unit
            choices = f"{lo} or {hi}" if lo else str(hi)
            raise ConfigError(
                f"growth.base_batch ({self.start_batch}) cannot be split exactly over "
                f"{self.limits.min_workers} workers in micro-batches that are multiples of "
                f"{self.limits.multiple} (model.ghost_batch) within growth.max_micro_batch="
                f"{self.limits.max_micro_batch} and growth.max_accum_steps="
                f"{self.limits.max_accum_steps}. Fix: use growth.base_batch={choices}, or "
                "raise the limits."
            )
        self._start = start
        self._current = start

    # -- time ---------------------------------------------------------------------------------

    def time(self, epoch: int, position: int = 0) -> float:
        """The schedule's t at sample ``position`` of ``epoch`` (epochs, or baseline updates)."""
        if self.cfg.schedule.interval == "epoch":
            return float(epoch)
        return epoch * self.steps_per_epoch0 + position / self.base_batch

    def ratio(self, epoch: int, position: int = 0) -> float:
        """r(t): the user's LR relative to lr0 at this point of training."""
        if self.is_plateau:
            s = self.cfg.schedule
            return plateau_ratio_after(
                self.rung,
                factor=s.factor,
                lr0=self.cfg.optim.lr,
                min_lr=s.min_lr,
                eps=s.plateau_eps,
            )
        assert self.schedule is not None
        return self.schedule.ratio(self.time(epoch, position))

    # -- decisions ----------------------------------------------------------------------------

    def _settle(self, r: float) -> Setting:
        ideal = self.start_batch / r if r > 0 else math.inf  # may also overflow to inf
        # The cap binds when B* (rounded down, as it would be realised) is above it.
        binds = math.isinf(ideal) or math.floor(ideal * (1 + _FLOAT_SLACK)) > self.limits.cap
        target = self.limits.cap if binds else math.floor(ideal * (1 + _FLOAT_SLACK))
        if self.grows:
            cand = self.limits.realise(target, self._current.workers)
            # The batch never shrinks (a rounding can land below the current size).
            if cand is not None and cand.global_batch > self._current.global_batch:
                self._current = cand
        b = self._current
        return Setting(
            split=b,
            lr=self.lr_per_sample * r * b.global_batch,
            momentum=self.momentum,
            ratio=r,
            ideal_batch=ideal,
            rung=self.rung,
            capped=self.grows and binds,
        )

    def setting(self, epoch: int, position: int = 0) -> Setting:
        """The setting for the update that starts at sample ``position`` of ``epoch``."""
        return self._settle(self.ratio(epoch, position))

    def end_epoch(self, metric: float) -> bool:
        """Report an epoch's monitored metric; True when a plateau cut fired (growth or LR).

        A cut fires exactly where ``ReduceLROnPlateau`` changes the LR: not once ``min_lr`` or
        ``eps`` blocks it, so ``rung`` counts only cuts that move the noise scale.
        """
        if self.trigger is None:
            return False
        if self.trigger.step(metric):
            self.rung += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "rung": self.rung,
            "current": asdict(self._current),
            "trigger": self.trigger.state_dict() if self.trigger else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rung = int(state["rung"])
        self._current = Split(**state["current"])
        if self.trigger is not None and state.get("trigger") is not None:
            self.trigger.load_state_dict(state["trigger"])
            if "lr" not in state["trigger"]:
                # A state saved before the trigger tracked the LR: every rung was a real cut.
                self.trigger.lr = self.cfg.optim.lr * self.ratio(0)


# --------------------------------------------------------------------------------------------
# Plans: the whole run, phase by phase
# --------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """A span of training with one batch realisation (and, for piecewise schedules, one LR)."""

    start_epoch: float
    end_epoch: float
    split: Split
    lr: float
    lr_end: float
    momentum: float
    noise: float
    """The noise scale at the start of the phase, relative to the run's start (= r(t))."""
    updates: int
    samples: int
    capped: bool
    """True when the batch could not follow the schedule (the LR carries part of the decay)."""
    rung: int = 0
    batch_to_ideal: float = 1.0
    """``B / B*`` at the phase's farthest update (1.0: the batch carries the whole decay; the
    LR is ``lr0 · B / B*`` there)."""

    @property
    def global_batch(self) -> int:
        return self.split.global_batch

    @property
    def workers(self) -> int:
        return self.split.workers

    @property
    def micro_batch(self) -> int:
        return self.split.micro_batch

    @property
    def accum_steps(self) -> int:
        return self.split.accum_steps


@dataclass
class Plan:
    """A whole run's phases, totals, and the ``decay_lr`` baseline's totals."""

    mode: str
    schedule: str
    dataset_size: int
    epochs: int
    base_batch: int
    phases: list[Phase]
    total_updates: int | None
    baseline_total_updates: int | None
    total_samples: int
    ladder: bool = False
    """True for plateau schedules: phases are rungs (successive cuts), not epoch ranges."""
    notes: list[str] = field(default_factory=list)

    @property
    def update_ratio(self) -> float | None:
        """Baseline updates / planned updates (how many times fewer updates)."""
        if not self.total_updates or not self.baseline_total_updates:
            return None
        return self.baseline_total_updates / self.total_updates

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; the ladder's rungs have no epochs (null)."""
        out = asdict(self)
        out["phases"] = [flatten_split(phase) for phase in out["phases"]]
        for phase in out["phases"]:
            for key in ("start_epoch", "end_epoch"):
                if isinstance(phase[key], float) and math.isnan(phase[key]):
                    phase[key] = None
        out["update_ratio"] = self.update_ratio
        return out


def _batch_to_ideal(s: Setting) -> float:
    """``B / B*`` of one update, at most 1 (0 when B* is unbounded)."""
    return min(1.0, s.global_batch / s.ideal_batch)


def _simulate(policy: GrowthPolicy, epochs: int) -> tuple[list[Phase], int]:
    n = policy.dataset_size
    per_epoch = policy.cfg.schedule.interval == "epoch"
    continuous = policy.schedule is not None and policy.schedule.continuous
    phases: list[Phase] = []
    total = 0
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            if per_epoch:
                steps = math.ceil(n / s.global_batch)  # the whole epoch, in one go
                samples = n
            else:
                steps, samples = 1, min(s.global_batch, n - position)
            start = epoch + position / n
            last = phases[-1] if phases else None
            same = last is not None and (
                last.split == s.split
                # a phase is capped in all its updates or in none: a continuous decay that
                # reaches the cap inside a split starts a new (capped) phase there
                and last.capped == s.capped
                and (continuous or math.isclose(last.lr_end, s.lr, rel_tol=1e-12))
            )
            share = _batch_to_ideal(s)
            if last is not None and same:
                last.updates += steps
                last.samples += samples
                last.lr_end = s.lr
                last.batch_to_ideal = min(last.batch_to_ideal, share)
            else:
                phases.append(
                    Phase(
                        start_epoch=start,
                        end_epoch=start,
                        split=s.split,
                        lr=s.lr,
                        lr_end=s.lr,
                        momentum=s.momentum,
                        noise=s.ratio,
                        updates=steps,
                        samples=samples,
                        capped=s.capped,
                        batch_to_ideal=share,
                    )
                )
            phases[-1].end_epoch = epoch + (position + samples) / n
            total += steps
            position += samples
    return phases, total


def _ladder(policy: GrowthPolicy, max_rungs: int = 12) -> list[Phase]:
    """Plateau schedules: one row per successive cut, until the LR stops changing."""
    rows: list[Phase] = []
    n = policy.dataset_size
    capped_rows = 0
    for rung in range(max_rungs):
        policy.rung = rung
        s = policy.setting(0)
        if rows and math.isclose(s.ratio, rows[-1].noise, rel_tol=1e-12):
            break  # min_lr reached: further plateaus change nothing
        capped = s.capped
        rows.append(
            Phase(
                start_epoch=math.nan,
                end_epoch=math.nan,
                split=s.split,
                lr=s.lr,
                lr_end=s.lr,
                momentum=s.momentum,
                noise=s.ratio,
                updates=math.ceil(n / s.global_batch),
                samples=n,
                capped=capped,
                rung=rung,
                batch_to_ideal=_batch_to_ideal(s),
            )
        )
        capped_rows += capped
        if capped_rows >= 3:
            break  # the batch has stopped; the LR decays by the same factor from here on
    policy.rung = 0
    return rows


def make_plan(cfg: Config, dataset_size: int, min_workers: int = 1) -> Plan:
    """The phases of a run of ``cfg`` on ``dataset_size`` samples, with the baseline's totals.

    For plateau schedules the phases are the ladder of successive cuts (``updates`` is then
    per epoch) and the totals are None: they depend on when the plateaus come.
    """
    policy = GrowthPolicy(cfg, dataset_size, min_workers)
    baseline_cfg = replace(cfg, growth=replace(cfg.growth, mode="decay_lr"))
    notes = []
    if cfg.schedule.type == "plateau":
        phases = _ladder(policy)
        total: int | None = None
        baseline: int | None = None
        notes.append(
            f"plateau schedule: each row is one more cut (×{cfg.schedule.factor}); updates are "
            "per epoch at that rung; totals depend on when the plateaus come"
        )
    else:
        phases, total = _simulate(policy, cfg.run.epochs)
        _, baseline = _simulate(
            GrowthPolicy(baseline_cfg, dataset_size, min_workers), cfg.run.epochs
        )
    if any(p.capped for p in phases) and cfg.growth.mode != "decay_lr":
        notes.append(
            f"the batch is capped at {policy.limits.cap} (hybrid): the LR carries the rest of the "
            "decay from there"
        )
    return Plan(
        mode=cfg.growth.mode,
        schedule=cfg.schedule.type,
        dataset_size=dataset_size,
        epochs=cfg.run.epochs,
        base_batch=cfg.growth.base_batch,
        phases=phases,
        total_updates=total,
        baseline_total_updates=baseline,
        total_samples=dataset_size * cfg.run.epochs,
        ladder=cfg.schedule.type == "plateau",
        notes=notes,
    )


def plan_from_file(path: str, overrides: list[str] | None = None) -> Plan:
    """Load a config and plan it, with N from ``data.size`` or the known size of the data set."""
    cfg = load_config(path, overrides or [])
    return make_plan(cfg, cfg.data.expected_train_size())
