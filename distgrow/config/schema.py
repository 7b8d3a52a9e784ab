"""The typed config tree: :class:`Config`, one section per concern, and the rules between them.

Every setting lives once, in its section, with its default, its documentation (the field's
``description``, which also lands in the JSON Schema of ``distgrow config --schema``) and its
range. The sections are pydantic dataclasses, so attribute access, ``dataclasses.replace`` and
``dataclasses.asdict`` work as on plain dataclasses, and building one, replacing or assigning a
field checks it (types, ranges, rules: a :class:`ConfigError` naming the key, the value and the
fix). Where they live:

* :mod:`distgrow.config.fields`: the strict scalar types, :class:`Range`, the section base;
* :mod:`distgrow.config.task`: ``run``, ``data``, ``model``, ``loss``;
* :mod:`distgrow.config.optim`: ``optim``, ``schedule``;
* :mod:`distgrow.config.growth`: ``growth`` (``adaptive``), ``noise``;
* :mod:`distgrow.config.launching`: ``backend``, ``launch`` (``chain``), ``logging`` (``wandb``);
* here: :class:`Config` and the rules that span sections.

Everything is also importable from here, as before the split. This module imports neither torch
nor anything distributed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic.dataclasses import dataclass

from distgrow.config.fields import (
    MAX_EPOCHS,
    MAX_LR_SCALE,
    MAX_SYNTHETIC_VALUES,
    MAX_WORKERS,
    MIN_STEP_SIZE,
    STRICT,
    Bool,
    ConfigError,
    Float,
    Int,
    Range,
    Section,
    Str,
    constraint,
    fail,
    raises_config_errors,
    section,
)
from distgrow.config.growth import AdaptiveConfig, GrowthConfig, GrowthMode, GrowthRule, NoiseConfig
from distgrow.config.launching import (
    BackendConfig,
    ChainConfig,
    LaunchConfig,
    LoggingConfig,
    WandbConfig,
)
from distgrow.config.optim import (
    FLOORED,
    NOT_DECAYS,
    OptimConfig,
    OptimName,
    ScheduleConfig,
    ScheduleType,
)
from distgrow.config.task import (
    LOSS_NAMES,
    METRIC_NAMES,
    VAL_PATH_NAMES,
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
)

__all__ = [
    "FLOORED",
    "LOSS_NAMES",
    "MAX_EPOCHS",
    "MAX_LR_SCALE",
    "MAX_SYNTHETIC_VALUES",
    "MAX_WORKERS",
    "METRIC_NAMES",
    "MIN_STEP_SIZE",
    "NOT_DECAYS",
    "VAL_PATH_NAMES",
    "AdaptiveConfig",
    "BackendConfig",
    "Bool",
    "ChainConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "Float",
    "GrowthConfig",
    "GrowthMode",
    "GrowthRule",
    "Int",
    "LaunchConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "NoiseConfig",
    "OptimConfig",
    "OptimName",
    "Range",
    "RunConfig",
    "ScheduleConfig",
    "ScheduleType",
    "Str",
    "WandbConfig",
]


@raises_config_errors
@dataclass(config=STRICT)
class Config(Section):
    """The whole run: one section per concern."""

    run: RunConfig = section(RunConfig, "Run settings.")
    data: DataConfig = section(DataConfig, "Data settings.")
    model: ModelConfig = section(ModelConfig, "Model settings.")
    loss: LossConfig = section(LossConfig, "Loss and validation metric.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    schedule: ScheduleConfig = section(ScheduleConfig, "The LR schedule to convert.")
    growth: GrowthConfig = section(GrowthConfig, "Batch growth and its limits.")
    noise: NoiseConfig = section(NoiseConfig, "Measuring the gradient noise scale.")
    backend: BackendConfig = section(BackendConfig, "Engine.")
    launch: LaunchConfig = section(LaunchConfig, "Launching.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")

    @constraint
    def _between_sections(self) -> None:
        """The rules that span sections (each section checked its own when it was built)."""
        self.schedule.check_with(self.run)
        self.growth.check_with(self.optim)
        self.noise.check_with(self.growth)
        if self.schedule.type in FLOORED and self.schedule.eta_min > self.optim.lr:
            raise fail(
                "schedule.eta_min",
                self.schedule.eta_min,
                f"is above optim.lr ({self.optim.lr}): a {self.schedule.type} from lr0 to "
                "eta_min must decay",
                "set schedule.eta_min below optim.lr",
            )
        if self.schedule.interval == "tokens" and self.data.seq_len is None:
            raise fail(
                "schedule.interval",
                self.schedule.interval,
                "counting t in tokens needs the tokens per sample",
                "set data.seq_len (the fixed sequence length), or use interval=samples",
            )
        g = self.model.ghost_batch
        if g is not None:
            # The planner's rule for the micro-batch workers are added at (one rule, one place);
            # imported at check time: distgrow.core imports the config.
            from distgrow.core.split import preferred_micro_batch

            micro = preferred_micro_batch(self.growth)
            if micro % g:
                raise fail(
                    "growth.micro_batch",
                    micro,
                    f"must be a multiple of model.ghost_batch ({g}) so every ghost batch is whole",
                    f"use {max(g, micro // g * g)} or {(micro // g + 1) * g}",
                )

    def expected_train_size(self) -> int:
        """N for planning without loading the data (:meth:`DataConfig.expected_train_size`
        with ``run.seed``, which picks the blocks token and text data hold out)."""
        return self.data.expected_train_size(self.run.seed)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (what ``config.yaml`` in a run directory holds)."""
        return dataclasses.asdict(self)
