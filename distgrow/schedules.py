"""The user's learning-rate schedules, as the decay ratio ``r(t) = lr(t) / lr0``.

A schedule here is what the user would have run with a fixed batch. The planner turns each cut
of ``r`` into batch growth. Time ``t`` is in the schedule's interval: epochs, the baseline's
updates (samples seen / base batch) for ``interval: step``, samples, or tokens.

A schedule has two parts, and the planner treats them differently:

* the **warm-up** (:class:`Warmup`, ``schedule.warmup`` units of t, linear or exponential):
  an LR multiplier ``w(t)`` that rises to 1. It is not a decay, so it is never converted: it
  stays an LR warm-up at the base batch;
* the **decay** (every :class:`DecaySchedule`): ``d(t)`` starts at 1 and never rises. Its clock
  starts when the warm-up ends (as torch's ``SequentialLR`` and the warm-up schedules of
  transformers do), and it is what the planner turns into batch growth.

The user's LR is ``lr0 · r(t)`` with ``r(t) = w(t) · d(t − warmup)``: :class:`Schedule`.
Decays that reach zero (cosine, linear or wsd to ``eta_min = 0``) ask for an unbounded batch:
the planner's cap takes over there and the LR carries the rest.

Plateau schedules are not a function of time: :class:`PlateauTrigger` watches the validation
metric and fires at exactly the epochs where ``torch.optim.lr_scheduler.ReduceLROnPlateau``
changes the LR, also once ``min_lr`` or ``eps`` stops the cuts (tested differentially against
torch).

Pure Python: no torch import.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from distgrow.config import FLOORED, ConfigError, ScheduleConfig


class DecaySchedule(Protocol):
    """A time-based decay: ``ratio(t)`` is non-increasing, starts at 1."""

    @property
    def continuous(self) -> bool:
        """True when r changes at every t (exponential, time-based, cosine), False if piecewise."""
        ...

    def ratio(self, t: float) -> float:
        """``lr(t) / lr0`` at time ``t`` (in the schedule's interval)."""
        ...


@dataclass(frozen=True)
class Constant:
    continuous: bool = False

    def ratio(self, t: float) -> float:
        return 1.0


@dataclass(frozen=True)
class Step:
    """``gamma ** floor(t / step_size)`` (torch ``StepLR``)."""

    step_size: float
    gamma: float
    continuous: bool = False

    def ratio(self, t: float) -> float:
        return self.gamma ** math.floor(t / self.step_size + 1e-12)


@dataclass(frozen=True)
class MultiStep:
    """``gamma ** (number of milestones <= t)`` (torch ``MultiStepLR``)."""

    milestones: tuple[float, ...]
    gamma: float
    continuous: bool = False

    def ratio(self, t: float) -> float:
        return self.gamma ** sum(1 for m in self.milestones if t >= m)


@dataclass(frozen=True)
class Exponential:
    """``gamma ** t`` (torch ``ExponentialLR``)."""

    gamma: float
    continuous: bool = True

    def ratio(self, t: float) -> float:
        return self.gamma**t


@dataclass(frozen=True)
class TimeBased:
    """``1 / (1 + decay · t)`` (Keras' SGD ``decay``; rule of thumb ``decay = lr0 / epochs``)."""

    decay: float
    continuous: bool = True

    def ratio(self, t: float) -> float:
        return 1.0 / (1.0 + self.decay * t)


@dataclass(frozen=True)
class Cosine:
    """``eta_min/lr0 + (1 - eta_min/lr0)(1 + cos(π t / t_max)) / 2`` (torch ``CosineAnnealingLR``
    closed form), flat at ``eta_min`` after ``t_max``: a decay, never a restart."""

    t_max: float
    floor: float  # eta_min / lr0
    continuous: bool = True

    def ratio(self, t: float) -> float:
        t = min(t, self.t_max)
        return self.floor + (1.0 - self.floor) * (1.0 + math.cos(math.pi * t / self.t_max)) / 2.0


@dataclass(frozen=True)
class Linear:
    """``1 − (1 − floor) · t / t_max``, flat at ``floor`` after ``t_max`` (torch ``LinearLR``
    with ``start_factor=1``, ``end_factor=floor``; transformers' linear decay to 0)."""

    t_max: float
    floor: float  # eta_min / lr0
    continuous: bool = True

    def ratio(self, t: float) -> float:
        return 1.0 - (1.0 - self.floor) * min(t, self.t_max) / self.t_max


@dataclass(frozen=True)
class InverseSqrt:
    """``1 / sqrt(1 + t / timescale)`` (transformers' ``get_inverse_sqrt_schedule``; with
    ``timescale`` = the warm-up length it is fairseq's ``inverse_sqrt``, ``sqrt(W / step)``)."""

    timescale: float
    continuous: bool = True

    def ratio(self, t: float) -> float:
        return 1.0 / math.sqrt(1.0 + t / self.timescale)


@dataclass(frozen=True)
class WarmupStableDecay:
    """WSD: 1 until ``t_max − decay_length``, then down to ``floor`` at ``t_max`` in the shape
    ``linear``, ``cosine`` or ``sqrt`` (``1 − sqrt(progress)``, Hägele et al. 2024); the
    warm-up before it is :class:`Warmup`'s."""

    t_max: float
    decay_length: float
    shape: str
    floor: float  # eta_min / lr0
    continuous: bool = True

    def ratio(self, t: float) -> float:
        start = self.t_max - self.decay_length
        if t <= start:
            return 1.0
        x = min(1.0, (t - start) / self.decay_length)
        if self.shape == "cosine":
            left = (1.0 + math.cos(math.pi * x)) / 2.0
        elif self.shape == "sqrt":
            left = 1.0 - math.sqrt(x)
        else:
            left = 1.0 - x
        return self.floor + (1.0 - self.floor) * left


@dataclass(frozen=True)
class Warmup:
    """The LR warm-up ``w(t)``: from ``start`` to 1 over ``length`` units of t, then 1.

    ``linear``: ``start + (1 − start) · t / length`` (torch ``LinearLR``'s ramp);
    ``exponential``: ``start ** (1 − t / length)`` (the same factor every unit of t).
    """

    length: float
    start: float = 0.0
    shape: str = "linear"

    def factor(self, t: float) -> float:
        if t >= self.length:
            return 1.0
        x = max(t, 0.0) / self.length
        if self.shape == "exponential":
            return float(self.start ** (1.0 - x))
        return self.start + (1.0 - self.start) * x


@dataclass(frozen=True)
class Schedule:
    """The user's whole LR schedule: ``r(t) = w(t) · d(t − warmup)``.

    ``warmup_factor`` is the part the planner never converts (LR only, at the base batch);
    ``decay_ratio`` is the part it turns into batch growth.
    """

    decay: DecaySchedule
    warmup: Warmup | None = None

    @property
    def continuous(self) -> bool:
        return self.decay.continuous

    @property
    def warmup_length(self) -> float:
        return self.warmup.length if self.warmup is not None else 0.0

    def warmup_factor(self, t: float) -> float:
        """``w(t)``: the LR warm-up's multiplier (1 once it is over)."""
        return self.warmup.factor(t) if self.warmup is not None else 1.0

    def decay_ratio(self, t: float) -> float:
        """``d(t − warmup)``: the decay, on a clock that starts when the warm-up ends."""
        return self.decay.ratio(max(0.0, t - self.warmup_length))

    def ratio(self, t: float) -> float:
        """``lr(t) / lr0``, warm-up included."""
        return self.warmup_factor(t) * self.decay_ratio(t)


def build_warmup(cfg: ScheduleConfig) -> Warmup | None:
    """The LR warm-up of ``cfg``, or None without one."""
    if cfg.warmup <= 0:
        return None
    return Warmup(cfg.warmup, cfg.warmup_start, cfg.warmup_shape)


def build_user_schedule(cfg: ScheduleConfig, lr0: float, horizon: float) -> Schedule:
    """The whole time-based schedule of ``cfg`` (warm-up, then decay) over ``horizon`` units of t.

    Raises:
        ConfigError: the warm-up leaves no time for the decay, or a floor above lr0.

    A plateau schedule's decay is metric-triggered (:class:`PlateauTrigger`): here it is
    :class:`Constant`, and only its warm-up is a function of time.
    """
    rest = horizon - cfg.warmup
    if rest <= 0 and cfg.type in FLOORED and cfg.t_max is None:
        raise ConfigError(
            f"schedule.warmup ({cfg.warmup:g}) is not shorter than training ({horizon:g} units "
            f"of t): a {cfg.type} decay after it has no time. Fix: shorten schedule.warmup or "
            "set schedule.t_max."
        )
    decay = Constant() if cfg.type == "plateau" else build_schedule(cfg, lr0, max(rest, 0.0))
    return Schedule(decay, build_warmup(cfg))


def build_schedule(cfg: ScheduleConfig, lr0: float, horizon: float) -> DecaySchedule:
    """The decay of ``cfg`` alone (no warm-up); ``horizon`` is its length in ``t``.

    Raises:
        ConfigError: a floor (``eta_min``) above lr0.
        ValueError: for ``plateau`` (use :class:`PlateauTrigger`).
    """
    if cfg.type in FLOORED and cfg.eta_min > lr0:
        raise ConfigError(
            f"schedule.eta_min ({cfg.eta_min}) is above optim.lr ({lr0}): a {cfg.type} from lr0 "
            "down to eta_min must decay. Fix: set schedule.eta_min below optim.lr."
        )
    t_max = cfg.t_max if cfg.t_max is not None else horizon
    if cfg.type == "linear":
        return Linear(t_max, cfg.eta_min / lr0)
    if cfg.type == "inverse_sqrt":
        timescale = cfg.timescale or cfg.warmup or 1.0
        return InverseSqrt(timescale)
    if cfg.type == "wsd":
        assert cfg.decay_length is not None  # ScheduleConfig.validate
        return WarmupStableDecay(t_max, min(cfg.decay_length, t_max), cfg.decay_shape,
                                 cfg.eta_min / lr0)  # fmt: skip
    if cfg.type == "constant":
        return Constant()
    if cfg.type == "step":
        return Step(cfg.step_size, cfg.gamma)
    if cfg.type == "multistep":
        return MultiStep(tuple(cfg.milestones), cfg.gamma)
    if cfg.type == "exponential":
        return Exponential(cfg.gamma)
    if cfg.type == "time_based":
        return TimeBased(cfg.decay)
    if cfg.type == "cosine":
        return Cosine(t_max, cfg.eta_min / lr0)
    raise ValueError(f"schedule.type={cfg.type!r} is metric-triggered: use PlateauTrigger")


@dataclass
class PlateauTrigger:
    """Decides, from one metric value per epoch, when a plateau cut is due.

    Replicates ``torch.optim.lr_scheduler.ReduceLROnPlateau.step`` exactly, LR side included:
    ``patience``, ``threshold``, ``threshold_mode``, ``cooldown`` and ``mode`` decide when a
    reduction is attempted (NaN never counts as improvement), and ``factor``, ``min_lr`` and
    ``eps`` decide whether it changes the LR. :meth:`step` answers True only for a cut that
    changes the LR, so once ``min_lr`` (or ``eps``) blocks the cut it answers False, as torch
    leaves the LR alone; the cooldown still restarts after a blocked attempt, as in torch.

    ``lr`` is the LR the trigger tracks: ``lr0`` from :meth:`from_config`; built directly it
    starts at 1.0, so ``lr`` is then the ratio ``r`` and ``min_lr``/``eps`` are relative to lr0.
    """

    mode: str = "min"
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    factor: float = 0.1
    min_lr: float = 0.0
    eps: float = 1e-8
    lr: float = 1.0
    best: float = field(init=False)
    """The best metric so far; starts at the worst value for ``mode`` (as torch's ``_reset``)."""
    num_bad_epochs: int = 0
    cooldown_counter: int = 0
    last_epoch: int = 0

    def __post_init__(self) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, lr0: float) -> PlateauTrigger:
        """The trigger of a plateau ``cfg`` for a run whose LR starts at ``lr0``."""
        return cls(
            mode=cfg.mode,
            patience=cfg.patience,
            threshold=cfg.threshold,
            threshold_mode=cfg.threshold_mode,
            cooldown=cfg.cooldown,
            factor=cfg.factor,
            min_lr=cfg.min_lr,
            eps=cfg.plateau_eps,
            lr=lr0,
        )

    def _is_better(self, current: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return current < self.best * (1.0 - self.threshold)
        if self.mode == "min":
            return current < self.best - self.threshold
        if self.threshold_mode == "rel":
            return current > self.best * (self.threshold + 1.0)
        return current > self.best + self.threshold

    def step(self, metric: float) -> bool:
        """Feed one epoch's metric; True when torch would change the LR now (a cut is due)."""
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # torch ignores bad epochs during cooldown
        if self.num_bad_epochs > self.patience:
            # torch's _reduce_lr, then the cooldown and the reset, whether or not the LR moved
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
            new = max(self.lr * self.factor, self.min_lr)
            if self.lr - new > self.eps:
                self.lr = new
                return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def plateau_ratio_after(
    cuts: int, *, factor: float, lr0: float, min_lr: float, eps: float
) -> float:
    """``r`` after ``cuts`` plateau cuts, as ReduceLROnPlateau computes the LR.

    torch's rule per cut: ``new = max(old * factor, min_lr)``, applied only when
    ``old - new > eps``. Returns ``lr / lr0``.
    """
    lr = lr0
    for _ in range(cuts):
        new = max(lr * factor, min_lr)
        if lr - new > eps:
            lr = new
    return lr / lr0
