"""The sections of the optimizer and the LR schedule it follows: ``optim`` and ``schedule``.

Each field carries its range (:mod:`distgrow.config.fields`); each section's ``@constraint``
methods check what spans its fields; the schedule's rule that needs the run (a warm-up leaves
epochs) is its ``check_with``, run by the whole config (:mod:`distgrow.config.schema`).
Neither torch nor anything distributed is imported here.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Literal

from pydantic.dataclasses import dataclass

from distgrow.config.fields import (
    MIN_STEP_SIZE,
    STRICT,
    Bool,
    Float,
    Int,
    Range,
    Section,
    constraint,
    fail,
    raises_config_errors,
    setting,
)
from distgrow.config.task import RunConfig

ScheduleType = Literal[
    "constant",
    "step",
    "multistep",
    "exponential",
    "time_based",
    "cosine",
    "linear",
    "inverse_sqrt",
    "wsd",
    "plateau",
]
# Schedules whose decay may reach zero: B* = B0/r(t) is then unbounded and the cap takes over.
FLOORED = ("cosine", "linear", "wsd")
OptimName = Literal["sgd", "adam", "adamw", "rmsprop"]

# Schedules that are not decays: named so that the error can say why they are refused.
NOT_DECAYS = {
    "cyclic": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "cycliclr": "a cyclic LR rises again, and a batch cannot shrink back without breaking the plan",
    "onecycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "one_cycle": "one-cycle warms the LR up before decaying it; a batch cannot start large",
    "warmup": "a warm-up is not a schedule of its own: set schedule.warmup (in units of t) "
    "before the decay, and it stays an LR warm-up at the base batch",
    "linear_warmup": "a warm-up is not a schedule of its own: set schedule.warmup (in units of t) "
    "before the decay, and it stays an LR warm-up at the base batch",
    "cosine_warm_restarts": "warm restarts raise the LR again; only monotone decays convert",
}


@raises_config_errors
@dataclass(config=STRICT)
class OptimConfig(Section):
    """The optimizer. ``lr`` and ``momentum`` are the values at the start of training."""

    KEY: ClassVar[str] = "optim"

    name: OptimName = setting("sgd", "Optimizer: sgd, adam, adamw, rmsprop.")
    lr: Float = setting(0.1, "Initial learning rate ε (lr0).", Range(gt=0, fix="e.g. optim.lr=0.1"))
    momentum: Float = setting(
        0.0,
        "Momentum m for sgd and rmsprop; enters the noise scale as 1/(1-m).",
        Range(ge=0, lt=1, fix="e.g. 0.9"),
    )
    nesterov: Bool = setting(False, "Nesterov momentum (sgd; needs momentum > 0).")
    weight_decay: Float = setting(
        0.0,
        "Weight decay (L2 for sgd/adam/rmsprop, decoupled for adamw).",
        Range(ge=0, fix="e.g. 5e-4"),
    )
    betas: list[Float] = setting([0.9, 0.999], "Adam/AdamW betas.")
    eps: Float = setting(1e-8, "Adam/AdamW/RMSprop epsilon.", Range(gt=0, fix="e.g. 1e-8"))
    grad_clip: Float | None = setting(
        None,
        "Clip the global gradient norm to this value (null: off).",
        Range(gt=0, fix="e.g. 1.0 or null"),
    )

    @constraint
    def _fits_the_optimizer(self) -> None:
        """Momentum and Nesterov only where the optimizer has them; two betas in [0, 1)."""
        if self.momentum and self.name in ("adam", "adamw"):
            raise fail(
                "optim.momentum",
                self.momentum,
                f"{self.name} has no momentum setting (it uses betas)",
                "set optim.momentum=0 and use optim.betas",
            )
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise fail(
                "optim.nesterov",
                self.nesterov,
                "Nesterov needs optim.name=sgd and optim.momentum > 0",
                "set optim.momentum=0.9 or optim.nesterov=false",
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise fail("optim.betas", self.betas, "must be two numbers in [0, 1)", "[0.9, 0.999]")


@raises_config_errors
@dataclass(config=STRICT)
class ScheduleConfig(Section):
    """The learning-rate schedule the user would run; distgrow converts it (see planner)."""

    KEY: ClassVar[str] = "schedule"

    type: ScheduleType = setting(
        "constant",
        "constant (nothing to convert), step, multistep, exponential, time_based "
        "(lr0/(1+decay·t)), cosine, linear (linear decay to eta_min), inverse_sqrt "
        "(1/sqrt(1+t/timescale)), wsd (warmup-stable-decay), plateau. Cyclic and one-cycle "
        "schedules are refused: they raise the LR again.",
    )
    interval: Literal["epoch", "step", "samples", "tokens"] = setting(
        "epoch",
        "Time unit t of the schedule: 'epoch'; 'step' = the baseline's updates at base_batch "
        "(samples seen / growth.base_batch); 'samples' = samples seen; 'tokens' = samples "
        "seen × data.seq_len. Counted in data, t follows the same path however the batch grows.",
    )
    warmup: Float = setting(
        0.0,
        "LR warm-up length in units of t, before any schedule type (0: none). It stays an LR "
        "warm-up at the base batch; the schedule's own clock starts when it ends.",
        Range(ge=0, fix="e.g. 5, or 0 for none"),
    )
    warmup_shape: Literal["linear", "exponential"] = setting(
        "linear", "Warm-up shape: linear from warmup_start·lr0, or exponential (geometric)."
    )
    warmup_start: Float = setting(
        0.0,
        "LR at the start of the warm-up, as a fraction of lr0 (exponential needs > 0).",
        Range(ge=0, lt=1, fix="e.g. 0"),
    )
    step_size: Float = setting(
        30,
        "step: decay every step_size units of t.",
        Range(gt=0, fix="e.g. 30"),
        # t / step_size counts the decays: it must stay a number the schedule can floor.
        Range(
            ge=MIN_STEP_SIZE,
            problem=f"must be at least {MIN_STEP_SIZE:g} (a decay every step_size units of t)",
            fix="e.g. 30",
        ),
    )
    milestones: list[Float] = setting([], "multistep: the values of t where the LR is cut.")
    gamma: Float = setting(
        0.1,
        "step/multistep/exponential: the multiplier per decay (< 1).",
        Range(
            gt=0,
            lt=1,
            problem="must be in (0, 1): only decays convert into batch growth",
            fix="e.g. schedule.gamma=0.2 (a cut by 5)",
        ),
    )
    decay: Float = setting(
        0.0,
        "time_based: lr = lr0 / (1 + decay·t) (Keras' SGD decay).",
        Range(ge=0, fix="e.g. lr0/epochs = 0.002"),
    )
    t_max: Float | None = setting(
        None,
        "cosine/linear/wsd: length of the schedule after the warm-up, in units of t (null: to "
        "the end of training); flat at eta_min after it.",
        Range(gt=0, fix="or null for all"),
    )
    eta_min: Float = setting(
        0.0, "cosine/linear/wsd: the final learning rate (0 allowed).", Range(ge=0, fix="e.g. 0")
    )
    timescale: Float | None = setting(
        None,
        "inverse_sqrt: r = 1/sqrt(1 + t/timescale) (null: the warm-up length, else 1).",
        Range(gt=0, fix="e.g. 1000"),
    )
    decay_length: Float | None = setting(
        None,
        "wsd: length of the final decay phase in units of t (it ends at t_max).",
        Range(
            gt=0,
            problem="wsd needs a positive length for its decay phase (units of t)",
            fix="e.g. a fifth of the run",
        ),
    )
    decay_shape: Literal["linear", "cosine", "sqrt"] = setting(
        "linear", "wsd: shape of the decay phase; sqrt is 1 − sqrt(progress)."
    )
    factor: Float = setting(
        0.1,
        "plateau: multiplier at each plateau (ReduceLROnPlateau factor).",
        Range(gt=0, lt=1, fix="e.g. 0.2"),
    )
    patience: Int = setting(
        10, "plateau: epochs without improvement before a cut.", Range(ge=0, fix="e.g. 3")
    )
    threshold: Float = setting(
        1e-4,
        "plateau: minimum change that counts as an improvement.",
        Range(ge=0, fix="e.g. 1e-4"),
    )
    threshold_mode: Literal["rel", "abs"] = setting(
        "rel", "plateau: threshold relative or absolute."
    )
    cooldown: Int = setting(
        0, "plateau: epochs to wait after a cut before counting again.", Range(ge=0, fix="e.g. 0")
    )
    min_lr: Float = setting(
        0.0, "plateau: the LR never goes below this.", Range(ge=0, fix="e.g. 0")
    )
    plateau_eps: Float = setting(1e-8, "plateau: cuts smaller than this are ignored (torch's eps).")
    mode: Literal["min", "max"] = setting(
        "min", "plateau: whether the monitored metric should fall."
    )
    monitor: Literal["val_loss", "val_acc", "train_loss"] = setting(
        "val_loss", "plateau: the metric watched at each epoch end."
    )

    @constraint
    def _shape(self) -> None:
        """Multistep's milestones, wsd's decay phase and an exponential warm-up's start."""
        if self.type == "multistep":
            ms = self.milestones
            if not ms:
                raise fail(
                    "schedule.milestones", ms, "multistep needs milestones", "e.g. [60, 120, 160]"
                )
            if any(b <= a for a, b in itertools.pairwise(ms)) or ms[0] <= 0:
                raise fail(
                    "schedule.milestones",
                    ms,
                    "must be positive and strictly increasing",
                    "e.g. [60, 120, 160]",
                )
        if self.type == "wsd":
            if self.decay_length is None:
                raise fail(
                    "schedule.decay_length",
                    self.decay_length,
                    "wsd needs a positive length for its decay phase (units of t)",
                    "e.g. a fifth of the run",
                )
            if self.t_max is not None and self.decay_length > self.t_max:
                raise fail(
                    "schedule.decay_length",
                    self.decay_length,
                    f"is longer than schedule.t_max ({self.t_max})",
                    f"use at most {self.t_max}",
                )
        if self.warmup and self.warmup_shape == "exponential" and self.warmup_start == 0:
            raise fail(
                "schedule.warmup_start",
                self.warmup_start,
                "an exponential warm-up cannot start from 0",
                "e.g. schedule.warmup_start=0.01",
            )

    def check_with(self, run: RunConfig) -> None:
        """The rule that needs the run: a warm-up in epochs leaves epochs to decay in."""
        if self.interval == "epoch" and self.warmup >= run.epochs:
            raise fail(
                "schedule.warmup",
                self.warmup,
                f"leaves no epoch of the {run.epochs} after the warm-up",
                f"use fewer than {run.epochs} epochs of warm-up",
            )
