"""The growth policy: what each update uses (batch, split, LR, momentum) as training goes.

:class:`GrowthPolicy` is the stateful object a training loop asks "what now?" (it replays
exactly after ``load_state_dict``); see :mod:`distgrow.planner` for the rules. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, NoReturn

from distgrow.adaptive import NoiseRule
from distgrow.config import Config, ConfigError
from distgrow.core.split import _FLOAT_SLACK, Limits, Split
from distgrow.schedules import PlateauTrigger, Schedule, build_user_schedule, plateau_ratio_after


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

    def schedule_target(self, decay: float) -> tuple[float, bool, int]:
        """(B*, whether the cap binds, the batch to realise) for the decay ``d(t)``."""
        ideal = self.start_batch / decay if decay > 0 else math.inf  # may also overflow to inf
        # The cap binds when B* (rounded down, as it would be realised) is above it.
        binds = math.isinf(ideal) or math.floor(ideal * (1 + _FLOAT_SLACK)) > self.limits.cap
        target = self.limits.cap if binds else math.floor(ideal * (1 + _FLOAT_SLACK))
        return ideal, binds, target

    def _settle(self, decay: float, warm: float = 1.0) -> Setting:
        ideal, binds, target = self.schedule_target(decay)
        if self._current.global_batch < self._start.global_batch:
            self._current = self._start  # the batch warm-up is over
        if self.adaptive:
            # The measured noise scale sets the batch (NoiseRule), not the schedule.
            assert self.noise_rule is not None
            target = self.noise_rule.target or self._current.global_batch
            binds = self._at_limit
        target = self._noise_cap(target, ideal)
        # A realisation is at most its target: one at or under the current batch cannot grow it.
        if self.grows and target > self._current.global_batch:
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
