"""Turning an LR schedule into a batch schedule with the same noise-scale path.

For a user schedule with decay ``d(t)`` (after any warm-up, see :mod:`distgrow.schedules`),
distgrow moves the decay into the batch:

* ideal batch ``B*(t) = B0 / d(t)``;
* realised batch ``B(t)``: the largest size ``workers × micro_batch × accum_steps`` not above
  ``B*(t)`` or any cap (``max_global_batch``, ``max_dataset_fraction · N``, the hardware);
* learning rate, by ``growth.rule`` (``p`` its exponent), with ``r(t) = w(t) · d(t)``:
  ``ε(t) = lr0 · r(t) · (B(t)/B0)^p · (1 − m)/(1 − m0)``, which keeps, at every update,

  - ``linear`` (p = 1, Smith et al. 2018; SGD): ``ε/(B(1 − m)) = lr0·r(t)/(B0(1 − m0))``, the
    SGD noise scale; ``ε = lr0`` while the batch keeps up;
  - ``sqrt`` (p = 1/2, Malladi et al. 2022, Seesaw 2025; adaptive updates):
    ``ε/√B = lr0·r(t)/√B0``; ``ε = lr0·√d(t)`` while the batch keeps up.

  Where the batch is capped or rounded below ``B*`` the LR takes exactly the rest (the hybrid),
  under either rule. A decay to 0 asks for ``B* = ∞``: the cap takes over and the LR goes to 0.
* the LR warm-up ``w(t)`` is never converted: the batch stays at B0 and the LR rises;
* a batch warm-up (``growth.rampup_*``, Megatron's ``--rampup-batch-size``) runs first, at the
  LR of the base batch, and is the one span where the identity is not kept, by choice.

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
from typing import Any, NoReturn

from distgrow.adaptive import NoiseRule
from distgrow.config import FLOORED, Config, ConfigError, GrowthConfig, ModelConfig, load_config
from distgrow.schedules import PlateauTrigger, Schedule, build_user_schedule, plateau_ratio_after

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


class _SplitView:
    """The four numbers of a record's ``split``, read as the record's own (flat) attributes."""

    split: Split

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


@dataclass(frozen=True)
class Setting(_SplitView):
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
    warmup: bool = False
    """Inside the LR warm-up: the LR rises at the base batch (not converted)."""
    rampup: bool = False
    """Inside the batch warm-up: the batch ramps to B0 at the LR of B0."""
    beta2: float | None = None
    """Adam's β₂ for this update (``growth.beta2_half_life``); None: as configured."""
    weight_decay: float | None = None
    """The weight decay for this update (``growth.weight_decay_timescale``); None: as configured."""

    @property
    def realisation(self) -> Split:
        return self.split


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
        self.rule = cfg.growth.resolved_rule(cfg.optim.name)
        self.exponent = 1.0 if self.rule == "linear" else 0.5
        # lr = lr_unit · r · B^p. The quantity kept is the baseline's lr0 / (B0^p (1 − m0)):
        # the SGD noise scale for the linear rule, ε/√B for the square-root rule.
        self.noise0 = cfg.optim.lr / (self.base_batch**self.exponent * (1.0 - cfg.optim.momentum))
        self.lr_unit = self.noise0 * (1.0 - self.momentum)
        self.grows = cfg.growth.mode != "decay_lr"
        self.is_plateau = cfg.schedule.type == "plateau"
        self.seq_len = cfg.data.seq_len or 1
        self.schedule: Schedule = build_user_schedule(
            cfg.schedule, cfg.optim.lr, self.time(cfg.run.epochs)
        )
        self.trigger = (
            PlateauTrigger.from_config(cfg.schedule, cfg.optim.lr) if self.is_plateau else None
        )
        self.rung = 0
        g = cfg.growth
        self.adaptive = g.mode == "adaptive"
        self.noise_rule = (
            NoiseRule(
                adaptive=self.adaptive,
                ratio=g.adaptive.ratio,
                patience=g.adaptive.patience,
                factor=g.factor,
                noise_cap=g.noise_cap,
                min_updates=g.adaptive.min_updates,
            )
            if g.measures_noise()
            else None
        )
        self._noise_capped = False  # the noise cap stops the schedule's batch now
        self._at_limit = False  # adaptive: a growth was asked for that the limits refuse
        self.events: list[tuple[str, dict[str, Any]]] = []
        """Decisions to log (name, values), taken by the trainer (:meth:`take_events`)."""
        start = self.limits.realise(min(self.start_batch, self.limits.cap))
        derived = cfg.growth.mode in ("grow_batch_lr", "grow_momentum")  # may round, LR absorbs
        if start is None or (start.global_batch != self.start_batch and not derived):
            self._refuse_base_batch(self.start_batch)
        base = self.limits.realise(self.base_batch)
        if base is None or base.global_batch != self.base_batch:
            self._refuse_base_batch(self.base_batch)  # the baseline of a derived mode runs B0
        self._start = start
        self._current = start
        self.rampup = cfg.growth.rampup_sizes()
        self.rampup_samples = cfg.growth.rampup_samples if self.rampup else 0
        for size in self.rampup:
            split = self.limits.realise(size)
            if split is None or split.global_batch != size:
                raise ConfigError(
                    f"the batch warm-up's batch {size} (growth.rampup_start_batch="
                    f"{cfg.growth.rampup_start_batch}, growth.rampup_increment="
                    f"{cfg.growth.rampup_increment}) cannot be split exactly over "
                    f"{self.limits.min_workers} workers in micro-batches that are multiples of "
                    f"{self.limits.multiple}. Fix: use sizes that are multiples of "
                    f"{self.limits.min_workers * self.limits.multiple}."
                )
        if self.rampup:
            self._current = self._rampup_split(self.rampup[0])

    def _refuse_base_batch(self, batch: int) -> NoReturn:
        lim = self.limits
        unit = lim.min_workers * lim.multiple
        lo, hi = batch // unit * unit, (batch // unit + 1) * unit
        choices = f"{lo} or {hi}" if lo else str(hi)
        fix = (
            "raise the limits"
            if lo == batch
            else f"use growth.base_batch={choices}, or raise the limits"
        )
        raise ConfigError(
            f"growth.base_batch ({batch}) cannot be split exactly over {lim.min_workers} workers "
            f"in micro-batches that are multiples of {lim.multiple} (model.ghost_batch) within "
            f"growth.max_micro_batch={lim.max_micro_batch} and growth.max_accum_steps="
            f"{lim.max_accum_steps}. Fix: {fix}."
        )

    # -- time ---------------------------------------------------------------------------------

    def time(self, epoch: int, position: int = 0) -> float:
        """The schedule's t at sample ``position`` of ``epoch``, in ``schedule.interval``.

        epochs; baseline updates (``step``); samples seen; or tokens seen (samples × seq_len).
        Counted in data, t is the same at a given sample however the batch is realised.
        """
        interval = self.cfg.schedule.interval
        if interval == "epoch":
            return float(epoch)
        if interval == "step":
            return epoch * self.steps_per_epoch0 + position / self.base_batch
        seen = epoch * self.dataset_size + position
        return float(seen * self.seq_len if interval == "tokens" else seen)

    def warmup_factor(self, epoch: int, position: int = 0) -> float:
        """w(t): the LR warm-up's multiplier (1 after it); never converted into batch."""
        return self.schedule.warmup_factor(self.time(epoch, position))

    def decay_ratio(self, epoch: int, position: int = 0) -> float:
        """d(t): the decay after the warm-up (what the batch carries)."""
        if self.is_plateau:
            return self._plateau_ratio()
        return self.schedule.decay_ratio(self.time(epoch, position))

    def _plateau_ratio(self) -> float:
        s = self.cfg.schedule
        return plateau_ratio_after(
            self.rung, factor=s.factor, lr0=self.cfg.optim.lr, min_lr=s.min_lr, eps=s.plateau_eps
        )

    def ratio(self, epoch: int, position: int = 0) -> float:
        """r(t) = w(t) · d(t): the user's LR relative to lr0 at this point of training."""
        return self.warmup_factor(epoch, position) * self.decay_ratio(epoch, position)

    # -- decisions ----------------------------------------------------------------------------

    def _lr(self, r: float, batch: int) -> float:
        """``lr_unit · r · B^p``: the LR that keeps the rule's quantity on the schedule."""
        return self.lr_unit * r * batch**self.exponent

    def _adjust(self, setting: Setting) -> Setting:
        """The optional Adam adjustments for ``setting``'s batch (both off by default)."""
        g, optim = self.cfg.growth, self.cfg.optim
        b, b0 = setting.global_batch, self.base_batch
        beta2 = optim.betas[1] ** (b / b0) if g.beta2_half_life else None
        wd = None
        if g.weight_decay_timescale:
            # AdamW shrinks weights by ε·λ per update: per sample ε·λ/B, the baseline's
            # lr0·r·λ0/B0 at the same t (Wang & Aitchison 2024's timescale, kept in samples).
            baseline = optim.lr * setting.ratio * b / b0
            wd = (
                optim.weight_decay * baseline / setting.lr
                if setting.lr > 0
                else optim.weight_decay * (b / b0) ** (1.0 - self.exponent)
            )
        if beta2 is None and wd is None:
            return setting
        return replace(setting, beta2=beta2, weight_decay=wd)

    def _settle(self, decay: float, warm: float = 1.0) -> Setting:
        ideal = self.start_batch / decay if decay > 0 else math.inf  # may also overflow to inf
        # The cap binds when B* (rounded down, as it would be realised) is above it.
        binds = math.isinf(ideal) or math.floor(ideal * (1 + _FLOAT_SLACK)) > self.limits.cap
        target = self.limits.cap if binds else math.floor(ideal * (1 + _FLOAT_SLACK))
        if self._current.global_batch < self._start.global_batch:
            self._current = self._start  # the batch warm-up is over
        if self.adaptive:
            # The measured noise scale sets the batch (NoiseRule), not the schedule.
            assert self.noise_rule is not None
            target = self.noise_rule.target or self._current.global_batch
            binds = self._at_limit
        target = self._noise_cap(target, ideal)
        if self.grows:
            cand = self.limits.realise(target, self._current.workers)
            # The batch never shrinks (a rounding can land below the current size).
            if cand is not None and cand.global_batch > self._current.global_batch:
                self._current = cand
        b = self._current
        r = warm * decay
        lr = self._lr(r, b.global_batch)
        if self.adaptive:
            # A batch grown past B* = B0/r(t) does not raise the LR above the user's schedule
            # without its decay (lr0·w(t)): the noise scale stays at or below the schedule's.
            lr = min(lr, self._lr(warm, self.start_batch))
        return self._adjust(
            Setting(
                split=b,
                lr=lr,
                momentum=self.momentum,
                ratio=r,
                ideal_batch=ideal,
                rung=self.rung,
                capped=self.grows and (binds or self._noise_capped),
                warmup=warm < 1.0,
            )
        )

    def _noise_cap(self, target: int, ideal: float) -> int:
        """``target`` held at ``growth.noise_cap × B_simple`` (as last evaluated); logs when the
        cap starts or stops holding the batch below the schedule's."""
        rule = self.noise_rule
        if rule is None or rule.noise_cap is None or rule.cap is None:
            return target
        holds = target > max(rule.cap, self._current.global_batch)
        if holds != self._noise_capped:
            self._noise_capped = holds
            self.events.append(
                (
                    "noise_cap" if holds else "noise_cap_lifted",
                    {
                        "b_simple": rule.b_simple,
                        "noise_cap": rule.noise_cap,
                        "cap_batch": rule.cap,
                        "schedule_batch": target,
                        "ideal_batch": ideal,
                    },
                )
            )
        return min(target, max(rule.cap, self._current.global_batch))

    def observe_noise(self, b_simple: float | None, measured: int) -> None:
        """An evaluation of the measured noise scale (the trainer calls it every
        ``growth.adaptive.every`` updates); a growth it decides applies from the next
        :meth:`setting`. Decisions are queued in :attr:`events`.

        Args:
            b_simple: The smoothed ``B_simple`` (None while it cannot be formed).
            measured: Updates the estimator has measured so far.
        """
        if self.noise_rule is None:
            return
        batch = self._current.global_batch
        decision = self.noise_rule.evaluate(b_simple, measured, batch)
        if decision is None:
            return
        wanted = self._noise_cap(decision.target, math.inf)
        cand = self.limits.realise(wanted, self._current.workers)
        grows = cand is not None and cand.global_batch > batch
        values = {**decision.to_dict(), "ratio": self.noise_rule.ratio}
        if grows:
            assert cand is not None
            self.events.append(("adaptive_growth", {**values, "realised": cand.global_batch}))
        elif not self._at_limit:
            # Once: the batch is at its limits; the LR carries the schedule's decay (hybrid).
            self.events.append(("adaptive_at_limit", {**values, "limit": self.limits.cap}))
        self._at_limit = not grows

    def take_events(self) -> list[tuple[str, dict[str, Any]]]:
        """The decisions queued since the last call (and forget them)."""
        events, self.events = self.events, []
        return events

    def _rampup_split(self, size: int) -> Split:
        split = self.limits.realise(size, self._current.workers)
        if split is None or split.global_batch != size:
            split = self.limits.realise(size)  # exact at some worker count (checked at start)
        assert split is not None
        return split

    def rampup_batch(self, epoch: int, position: int = 0) -> int | None:
        """The batch warm-up's batch at this point (Megatron's rule), or None once it is over.

        ``rampup_samples`` are shared equally among the ramp's sizes: the k-th size runs from
        ``k · S / K`` samples on, in integers (no float drift at the boundaries).
        """
        seen = epoch * self.dataset_size + position
        if seen >= self.rampup_samples:
            return None
        return self.rampup[seen * len(self.rampup) // self.rampup_samples]

    def setting(self, epoch: int, position: int = 0) -> Setting:
        """The setting for the update that starts at sample ``position`` of ``epoch``."""
        warm, decay = self.warmup_factor(epoch, position), self.decay_ratio(epoch, position)
        size = self.rampup_batch(epoch, position) if self.rampup else None
        if size is None:
            return self._settle(decay, warm)
        self._current = self._rampup_split(size)
        r = warm * decay
        return self._adjust(
            Setting(
                split=self._current,
                lr=self._lr(r, self.start_batch),  # the LR of B0: the ramp adds noise, by choice
                momentum=self.momentum,
                ratio=r,
                ideal_batch=float(size),
                rung=self.rung,
                warmup=warm < 1.0,
                rampup=True,
            )
        )

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
            "noise": None
            if self.noise_rule is None
            else {
                **self.noise_rule.state_dict(),
                "noise_capped": self._noise_capped,
                "at_limit": self._at_limit,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rung = int(state["rung"])
        self._current = Split(**state["current"])
        noise = state.get("noise")  # absent from checkpoints written before the noise rule
        if self.noise_rule is not None and noise is not None:
            self.noise_rule.load_state_dict(noise)
            self._noise_capped = bool(noise["noise_capped"])
            self._at_limit = bool(noise["at_limit"])
        if self.trigger is not None and state.get("trigger") is not None:
            self.trigger.load_state_dict(state["trigger"])
            if "lr" not in state["trigger"]:
                # A state saved before the trigger tracked the LR: every rung was a real cut.
                self.trigger.lr = self.cfg.optim.lr * self.decay_ratio(0)


# --------------------------------------------------------------------------------------------
# Plans: the whole run, phase by phase
# --------------------------------------------------------------------------------------------


@dataclass
class Phase(_SplitView):
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
    warmup: bool = False
    """The phase is (part of) the LR warm-up: the LR rises at the base batch."""
    rampup: bool = False
    """The phase is a step of the batch warm-up (at the LR of the base batch)."""


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
    rule: str = "linear"
    """``growth.rule`` as resolved for the optimizer: linear (ε/B kept) or sqrt (ε/√B kept)."""
    adjustments: list[str] = field(default_factory=list)
    """The optional Adam adjustments switched on (``beta2_half_life``, ``weight_decay_timescale``).
    """
    cap_from_epoch: float | None = None
    """Where the cap first binds (the hybrid takes over), in epochs; None if it never does."""

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
    continuous = policy.schedule.continuous
    phases: list[Phase] = []
    total = 0
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            if per_epoch and not s.rampup:
                # the rest of the epoch in one go (t is the epoch: nothing changes within it)
                steps = math.ceil((n - position) / s.global_batch)
                samples = n - position
            else:
                steps, samples = 1, min(s.global_batch, n - position)
            start = epoch + position / n
            last = phases[-1] if phases else None
            same = last is not None and (
                last.split == s.split
                # a phase is capped in all its updates or in none: a continuous decay that
                # reaches the cap inside a split starts a new (capped) phase there
                and last.capped == s.capped
                and last.warmup == s.warmup
                and last.rampup == s.rampup
                and (continuous or s.warmup or math.isclose(last.lr_end, s.lr, rel_tol=1e-12))
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
                        warmup=s.warmup,
                        rampup=s.rampup,
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
        s = policy._settle(policy.decay_ratio(0))  # a rung's setting after any warm-up
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


def _adaptive_ladder(policy: GrowthPolicy, max_rungs: int = 24) -> list[Phase]:
    """``growth.mode=adaptive``: the batches the run may grow to (× ``growth.factor`` each, as
    realised), until the limits stop it; when it grows is measured at run time."""
    rows: list[Phase] = []
    n = policy.dataset_size
    split = policy._start
    lr0 = policy._lr(1.0, policy.start_batch)
    for rung in range(max_rungs):
        rows.append(
            Phase(
                start_epoch=math.nan,
                end_epoch=math.nan,
                split=split,
                lr=lr0,  # while the schedule has not decayed below B0/B; min(lr0, lr0·r·B/B0)
                lr_end=lr0,
                momentum=policy.momentum,
                noise=policy.start_batch / split.global_batch,
                updates=math.ceil(n / split.global_batch),
                samples=n,
                capped=False,
                rung=rung,
            )
        )
        wanted = max(
            split.global_batch + 1, math.floor(split.global_batch * policy.cfg.growth.factor)
        )
        cand = policy.limits.realise(wanted, split.workers)
        if cand is None or cand.global_batch <= split.global_batch:
            rows[-1].capped = True  # the limits stop it: the LR carries the decay from here
            break
        split = cand
    return rows


def _noise_notes(cfg: Config) -> list[str]:
    """What the plan says about decisions taken from the measured noise scale."""
    g = cfg.growth
    a = g.adaptive
    notes = []
    if g.mode == "adaptive":
        notes.append(
            f"adaptive: each row is one more growth (× {g.factor:g}); the batch grows when the "
            f"smoothed noise scale B_simple exceeds {a.ratio:g} × the batch for {a.patience} "
            f"evaluations in a row (one every {a.every} updates): growth times are decided at "
            "run time from the measurements, so totals are unknown here"
        )
        notes.append(
            "adaptive: the LR is min(lr0·w(t), lr0·r(t)·(B/B0)^p): the schedule's decay still "
            "applies to the LR the batch has not taken, and the noise scale stays at or below "
            "the schedule's path"
        )
    if g.noise_cap is not None:
        notes.append(
            f"possible cap: growth stops where the batch would exceed {g.noise_cap:g} × the "
            "noise scale B_simple measured during the run (growth.noise_cap); the LR carries "
            "the rest of the decay from there (hybrid); where, is decided at run time"
        )
    return notes


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
    elif cfg.growth.mode == "adaptive":
        phases, total = _adaptive_ladder(policy), None
        _, baseline = _simulate(
            GrowthPolicy(baseline_cfg, dataset_size, min_workers), cfg.run.epochs
        )
    else:
        phases, total = _simulate(policy, cfg.run.epochs)
        _, baseline = _simulate(
            GrowthPolicy(baseline_cfg, dataset_size, min_workers), cfg.run.epochs
        )
    notes += _schedule_notes(cfg, policy) + _noise_notes(cfg)
    if cfg.growth.max_micro_batch == "auto":
        notes.append(
            "growth.max_micro_batch=auto is not resolved here (no probe of the training device "
            "cached): planned without a memory limit; `distgrow probe CONFIG` measures it"
        )
    cap_from = next((p.start_epoch for p in phases if p.capped), None)
    if cap_from is not None and cfg.growth.mode != "decay_lr":
        where = "" if plan_is_ladder(cfg) else f" from epoch {cap_from:.4g}"
        notes.append(
            f"the batch is capped at {policy.limits.cap}{where} (hybrid): the LR carries the rest "
            "of the decay from there"
        )
    adjustments = [
        name
        for name, on in (
            ("beta2_half_life", cfg.growth.beta2_half_life),
            ("weight_decay_timescale", cfg.growth.weight_decay_timescale),
        )
        if on
    ]
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
        ladder=plan_is_ladder(cfg),
        notes=notes,
        rule=policy.rule,
        adjustments=adjustments,
        cap_from_epoch=None if plan_is_ladder(cfg) else cap_from,
    )


def plan_is_ladder(cfg: Config) -> bool:
    """Plateau schedules and adaptive growth plan as a ladder of rungs, not as epoch ranges."""
    return cfg.schedule.type == "plateau" or cfg.growth.mode == "adaptive"


RULE_IDENTITIES = {
    "linear": "ε/B = lr0·r(t)/B0 kept (SGD noise scale; LR fixed, batch × 1/α)",
    "sqrt": "ε/√B = lr0·r(t)/√B0 kept (adaptive updates; LR × √α, batch × 1/α)",
}
"""What each ``growth.rule`` keeps at every update (α: the schedule's factor at a cut)."""

ADJUSTMENT_NOTES = {
    "beta2_half_life": "β₂ = β₂0^(B/B0): its half-life stays constant in samples",
    "weight_decay_timescale": "weight decay λ so that ε·λ/B is the baseline's: the decay's "
    "timescale stays constant in samples",
}


def _amount(x: float) -> str:
    """``x`` for a note: whole numbers with thousands separators (2,000,000 tokens)."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.6g}"


def _schedule_notes(cfg: Config, policy: GrowthPolicy) -> list[str]:
    """What the plan says about the warm-ups and a decay to zero."""
    s, g = cfg.schedule, cfg.growth
    unit = {"epoch": "epochs", "step": "baseline updates"}.get(s.interval, s.interval)
    notes = []
    if s.warmup:
        notes.append(
            f"LR warm-up ({s.warmup_shape}) over the first {_amount(s.warmup)} {unit}: it stays "
            f"an LR warm-up at the base batch (not converted); the {s.type} decay after it is"
        )
    if policy.rampup:
        notes.append(
            f"batch warm-up: {policy.rampup[0]} → {g.base_batch} in steps of "
            f"{g.rampup_increment or g.base_batch - policy.rampup[0]} over the first "
            f"{g.rampup_samples:,} samples, at the LR of the base batch (no conversion there)"
        )
    horizon = policy.time(cfg.run.epochs)
    end = s.warmup + (s.t_max if s.t_max is not None else horizon - s.warmup)
    floored = s.type in FLOORED and s.eta_min == 0
    if floored and end <= horizon and cfg.growth.mode != "decay_lr":
        notes.append(
            f"the {s.type} decay reaches 0 at t = {_amount(end)} {unit}: B* = B0/r(t) is unbounded "
            "there, so the cap takes over before it and the LR carries the decay to 0"
        )
    return notes


def plan_from_file(path: str, overrides: list[str] | None = None) -> Plan:
    """Load a config and plan it, with N from ``data.size`` or the known size of the data set."""
    cfg = load_config(path, overrides or [])
    return make_plan(cfg, cfg.data.expected_train_size())
