"""The sections of the growth policy: ``growth`` (with its ``adaptive`` decisions) and ``noise``.

Each field carries its range (:mod:`distgrow.config.fields`); each section's ``@constraint``
methods check what spans its fields. Rules that need another section (the optimizer a growth
mode needs, the noise measurement a decision needs) are ``check_with`` methods, run by the whole
config (:mod:`distgrow.config.schema`). Neither torch nor anything distributed is imported here.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic.dataclasses import dataclass

from distgrow.config.fields import (
    MAX_LR_SCALE,
    MAX_WORKERS,
    STRICT,
    Bool,
    Float,
    Int,
    Range,
    Section,
    constraint,
    fail,
    raises_config_errors,
    section,
    setting,
)
from distgrow.config.optim import OptimConfig

GrowthMode = Literal["decay_lr", "grow_batch", "grow_batch_lr", "grow_momentum", "adaptive"]
GrowthRule = Literal["auto", "linear", "sqrt"]

_POSITIVE_OR_NULL = Range(ge=1, problem="must be positive or null", fix="e.g. 64 or null")


@raises_config_errors
@dataclass(config=STRICT)
class AdaptiveConfig(Section):
    """When the measured noise scale lets the batch grow (``growth.mode=adaptive``, and the
    evaluations of ``growth.noise_cap``); see docs/noise.md."""

    KEY: ClassVar[str] = "growth.adaptive"

    ratio: Float = setting(
        1.0,
        "adaptive: grow when the smoothed B_simple exceeds ratio × the current global batch "
        "(1.0: McCandlish et al.'s critical batch, where a step costs as much in samples as in "
        "updates).",
        Range(gt=0, fix="e.g. 1.0"),
    )
    patience: Int = setting(
        3,
        "adaptive: consecutive evaluations above the ratio before the batch grows.",
        Range(ge=1, fix="e.g. 3"),
    )
    every: Int = setting(
        50,
        "Updates between two evaluations of the measured noise scale (adaptive and noise_cap).",
        Range(ge=1, fix="e.g. 50"),
    )
    min_updates: Int = setting(
        20,
        "Measured updates before the first evaluation counts (the moving average settles).",
        Range(ge=0, fix="e.g. 20"),
    )


@raises_config_errors
@dataclass(config=STRICT)
class GrowthConfig(Section):
    """How the LR schedule becomes a batch schedule, and the limits that stop the batch."""

    KEY: ClassVar[str] = "growth"

    mode: GrowthMode = setting(
        "grow_batch",
        "decay_lr: the plain baseline (fixed batch, LR decays); grow_batch: the batch grows "
        "instead, LR takes the rest at the caps (hybrid); grow_batch_lr: also start with LR and "
        "batch × lr_scale; grow_momentum: also raise momentum to growth.momentum; adaptive: "
        "the batch grows × growth.factor when the measured noise scale says so (growth.adaptive), "
        "the LR follows the schedule, never above it (docs/noise.md).",
    )
    base_batch: Int = setting(
        128,
        "B0: the global batch of the baseline run.",
        Range(ge=1, problem="must be positive", fix="e.g. 128"),
    )
    max_global_batch: Int | None = setting(None, "Hard cap on the global batch (null: none).")
    max_dataset_fraction: Float | None = setting(
        0.1,
        "Cap the batch at this fraction of N (the paper's N/10 rule; null: off).",
        Range(gt=0, le=1, fix="0.1 or null"),
    )
    max_workers: Int | None = setting(
        None,
        "Most data-parallel workers the job may use (null: the job's world size under "
        "`distgrow train`/torchrun, the allocation under `distgrow launch`).",
        Range(ge=1, problem="must be at least 1 or null", fix="e.g. 8"),
        Range(le=MAX_WORKERS, problem=f"must be at most {MAX_WORKERS:,}", fix="e.g. 8"),
    )
    micro_batch: Int | None = setting(
        None, "Per-device batch that keeps one device busy (null: base_batch).", _POSITIVE_OR_NULL
    )
    max_micro_batch: Int | Literal["auto"] | None = setting(
        None,
        "Largest per-device batch that fits in memory (null: no limit; auto: what `distgrow "
        "probe` measured on the training device, cached per model and device, probed at the "
        "start of training when not cached yet).",
        _POSITIVE_OR_NULL,
    )
    max_accum_steps: Int | None = setting(
        None, "Most gradient-accumulation steps per update (null: no limit).", _POSITIVE_OR_NULL
    )
    lr_scale: Float = setting(
        5.0,
        "grow_batch_lr / grow_momentum: initial LR and batch × this.",
        Range(gt=0, fix="e.g. 5"),
        # It multiplies the LR and the batch: beyond this neither is a number to train with.
        Range(le=MAX_LR_SCALE, problem=f"must be at most {MAX_LR_SCALE:,}", fix="e.g. 5"),
    )
    momentum: Float = setting(
        0.98, "grow_momentum: the raised momentum.", Range(ge=0, lt=1, fix="e.g. 0.98")
    )
    rule: GrowthRule = setting(
        "auto",
        "How a decay becomes batch growth. linear (Smith et al. 2018): LR kept, batch × 1/α, "
        "so ε/B follows the schedule; sqrt (Malladi et al. 2022, Seesaw 2025): LR × √α, "
        "batch × 1/α, so ε/√B follows it (adaptive updates); auto: linear for sgd and adamw, "
        "sqrt for adam and rmsprop. adamw is linear from docs/lm.md's language models: on the "
        "5.3 M GPT-2 (configs/lm_small.yaml) linear ended 0.038 (code) and 0.027 (prose) "
        "nats/token below decay_lr, sqrt +0.003 and -0.006; on its shorter budget (2 corpora x "
        "2 seeds) the two tied (+0.067 / +0.068); on lm_tiny linear was lower at B0 = 8 and 32 "
        "(-0.008 / +0.016, +0.053 / +0.094). adam stays sqrt (Fashion-MNIST: +0.017 linear, "
        "+0.010 sqrt).",
    )
    beta2_half_life: Bool = setting(
        False,
        "adam/adamw: keep β₂'s half-life constant in samples as the batch grows, β₂ = "
        "β₂0^(B/B0) (Busbridge et al. 2023; Malladi et al. 2022 to first order). Off: β₂ fixed.",
    )
    weight_decay_timescale: Bool = setting(
        False,
        "adamw: keep the decoupled weight decay's timescale B/(ε·λ) in samples equal to the "
        "baseline's at every t (Wang & Aitchison 2024). Off: λ fixed.",
    )
    rampup_start_batch: Int | None = setting(
        None,
        "Batch warm-up: start at this global batch and ramp to base_batch (Megatron's "
        "--rampup-batch-size; null: no ramp). The LR meanwhile is the one at base_batch.",
    )
    rampup_increment: Int | None = setting(
        None, "Batch warm-up: the batch grows by this much at a time (null: in one step)."
    )
    rampup_samples: Int = setting(
        0,
        "Batch warm-up: samples over which the batch reaches base_batch.",
        Range(ge=0, fix="e.g. 10 × growth.base_batch"),
    )
    factor: Float = setting(
        2.0,
        "adaptive: the global batch × this at each growth.",
        Range(gt=1, le=MAX_LR_SCALE, fix="e.g. 2"),
    )
    noise_cap: Float | None = setting(
        None,
        "grow_batch: stop growing once the batch would exceed this × the measured noise scale "
        "B_simple (past the critical batch extra samples buy little progress); the LR takes the "
        "rest of the decay, as in the hybrid (null: off).",
        Range(gt=0, fix="e.g. 2.0"),
    )
    adaptive: AdaptiveConfig = section(AdaptiveConfig, "Noise-scale decisions.")

    def resolved_rule(self, optim_name: str) -> str:
        """``linear`` or ``sqrt``: ``auto`` picks linear for sgd and adamw, sqrt for adam and
        rmsprop.

        AdamW is linear because the language models measured with it ended lower under linear
        in 8 of 10 (run, seed) pairs and below decay_lr at full size (docs/lm.md, "What
        growth.rule: auto does for AdamW"): those runs are limited by their number of updates,
        where the LR that linear keeps is worth more than the gradient noise sqrt removes.
        Adam's one measured task (Fashion-MNIST) was closer under sqrt; RMSprop is unmeasured
        and keeps the square-root rule of Malladi et al. (2022).
        """
        if self.rule != "auto":
            return self.rule
        return "linear" if optim_name in ("sgd", "adamw") else "sqrt"

    def rampup_sizes(self) -> list[int]:
        """The batches of the batch warm-up, smallest first, base_batch excluded ([] if none)."""
        if self.rampup_start_batch is None:
            return []
        step = self.rampup_increment or self.base_batch - self.rampup_start_batch
        return list(range(self.rampup_start_batch, self.base_batch, step))

    def measures_noise(self) -> bool:
        """Whether growth decisions need the measured noise scale."""
        return self.mode == "adaptive" or self.noise_cap is not None

    @constraint
    def _limits(self) -> None:
        """The caps lie above the base batch; the micro-batch fits under its own cap."""
        b0 = self.base_batch
        if self.max_global_batch is not None and self.max_global_batch < b0:
            raise fail(
                "growth.max_global_batch",
                self.max_global_batch,
                f"is below growth.base_batch ({b0})",
                f"use {b0} or more, or null for no cap",
            )
        if (
            self.micro_batch is not None
            and isinstance(self.max_micro_batch, int)
            and self.micro_batch > self.max_micro_batch
        ):
            raise fail(
                "growth.micro_batch",
                self.micro_batch,
                f"exceeds growth.max_micro_batch ({self.max_micro_batch})",
                f"use at most {self.max_micro_batch}",
            )

    @constraint
    def _mode_settings(self) -> None:
        """What a mode needs of lr_scale."""
        if self.mode in ("grow_batch_lr", "grow_momentum") and self.lr_scale < 1.0:
            raise fail("growth.lr_scale", self.lr_scale, "must be >= 1", "e.g. 5")

    @constraint(written_only=True)
    def _noise_cap_grows(self) -> None:
        """A noise cap caps growth: refused in a mode without it (the planner's baseline of a
        capped run is such a variant, and may carry it)."""
        if self.noise_cap is not None and self.mode not in ("grow_batch", "adaptive"):
            raise fail(
                "growth.noise_cap",
                self.noise_cap,
                f"caps grow_batch (and adaptive), not growth.mode={self.mode}",
                "set growth.mode=grow_batch, or growth.noise_cap=null",
            )

    @constraint
    def _rampup(self) -> None:
        """The batch warm-up: a start below base_batch, whole increments, some samples."""
        start, inc = self.rampup_start_batch, self.rampup_increment
        if start is None:
            if inc is not None or self.rampup_samples:
                raise fail(
                    "growth.rampup_start_batch",
                    start,
                    "the batch warm-up needs a start batch",
                    f"e.g. growth.rampup_start_batch={max(1, self.base_batch // 4)}",
                )
            return
        if not 1 <= start < self.base_batch:
            raise fail(
                "growth.rampup_start_batch",
                start,
                f"must be between 1 and growth.base_batch ({self.base_batch}) exclusive",
                f"e.g. {max(1, self.base_batch // 4)}",
            )
        if self.mode in ("grow_batch_lr", "grow_momentum"):
            raise fail(
                "growth.rampup_start_batch",
                start,
                f"growth.mode={self.mode} already starts with a larger batch",
                "use growth.mode=grow_batch or decay_lr with a batch warm-up",
            )
        if inc is not None and (inc < 1 or (self.base_batch - start) % inc):
            raise fail(
                "growth.rampup_increment",
                inc,
                f"must divide base_batch − rampup_start_batch ({self.base_batch - start})",
                "use a divisor of it, or null for one step",
            )
        if self.rampup_samples < 1:
            raise fail(
                "growth.rampup_samples",
                self.rampup_samples,
                "the batch warm-up needs a positive number of samples",
                "e.g. 10 × growth.base_batch",
            )

    def check_with(self, optim: OptimConfig) -> None:
        """The rules that need the optimizer: Adam's adjustments, the momentum variant."""
        if self.beta2_half_life and optim.name not in ("adam", "adamw"):
            raise fail(
                "growth.beta2_half_life",
                self.beta2_half_life,
                f"needs an optimizer with betas, not {optim.name}",
                "set optim.name=adam or adamw, or growth.beta2_half_life=false",
            )
        if self.weight_decay_timescale and optim.name != "adamw":
            raise fail(
                "growth.weight_decay_timescale",
                self.weight_decay_timescale,
                f"needs decoupled weight decay (adamw), not {optim.name}",
                "set optim.name=adamw, or growth.weight_decay_timescale=false",
            )
        if self.mode != "grow_momentum":
            return
        if self.resolved_rule(optim.name) == "sqrt":
            raise fail(
                "growth.mode",
                self.mode,
                "the momentum variant is the paper's SGD rule: it has no square-root form",
                "set growth.rule=linear, or another growth.mode",
            )
        if optim.name not in ("sgd", "rmsprop") or optim.momentum == 0:
            raise fail(
                "growth.mode",
                self.mode,
                "the momentum variant needs an optimizer with momentum",
                "set optim.name=sgd and optim.momentum=0.9, or another growth.mode",
            )
        if not optim.momentum < self.momentum < 1.0:
            raise fail(
                "growth.momentum",
                self.momentum,
                f"must lie between optim.momentum ({optim.momentum}) and 1",
                "e.g. 0.98",
            )


@raises_config_errors
@dataclass(config=STRICT)
class NoiseConfig(Section):
    """Measuring the gradient noise scale B_simple = tr(Σ)/|G|² during training
    (McCandlish et al. 2018; ``distgrow.noise``, docs/noise.md)."""

    KEY: ClassVar[str] = "noise"

    measure: Literal["auto", "on", "off"] = setting(
        "auto",
        "auto: on when growth.mode=adaptive or growth.noise_cap is set, off otherwise; on: "
        "always (logged as noise/* in metrics.jsonl and W&B); off: never (adaptive and "
        "noise_cap need it).",
    )
    ema_decay: Float = setting(
        0.95,
        "Weight of the past in the moving averages of |G|² and tr(Σ), in [0, 1).",
        Range(ge=0, lt=1, fix="e.g. 0.95"),
    )
    every: Int = setting(
        1,
        "Measure every this many updates (1: each; the rest cost nothing).",
        Range(ge=1, fix="e.g. 1"),
    )

    def check_with(self, growth: GrowthConfig) -> None:
        """The rule that needs the growth: its noise decisions need the measurement."""
        if self.measure == "off" and growth.measures_noise():
            what = "growth.mode=adaptive" if growth.mode == "adaptive" else "growth.noise_cap"
            raise fail(
                "noise.measure",
                self.measure,
                f"{what} decides from the measured noise scale",
                "set noise.measure=auto",
            )

    def enabled(self, growth: GrowthConfig) -> bool:
        """Whether the run measures the noise scale."""
        return self.measure == "on" or (self.measure == "auto" and growth.measures_noise())
