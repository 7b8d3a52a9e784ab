"""The typed config tree, its loader and the data-set size catalogue.

* :mod:`distgrow.config.schema`: :class:`Config`, the rules between its sections, and every
  section re-exported; the sections themselves (pydantic dataclasses whose fields carry their
  documentation, ranges and rules) live in :mod:`~distgrow.config.task` (run, data, model,
  loss), :mod:`~distgrow.config.optim` (optim, schedule), :mod:`~distgrow.config.growth`
  (growth, noise) and :mod:`~distgrow.config.launching` (backend, launch, logging), built from
  :mod:`~distgrow.config.fields`;
* :mod:`distgrow.config.loader`: YAML + dotted overrides -> a checked :class:`Config`, the key
  listing of ``distgrow config`` and the JSON Schema of ``distgrow config --schema``;
* :mod:`distgrow.config.datasets`: training-set sizes known without loading the data.

Everything is importable from here (``from distgrow.config import Config, load_config``).
This package imports neither torch nor anything distributed: ``distgrow plan`` and the planner
work from it alone.
"""

from distgrow.config.datasets import DATA_NAMES, OFFICIAL_TRAIN, SPLIT_TOTAL, held_out
from distgrow.config.loader import (
    config_from_dict,
    describe_fields,
    dump_config,
    json_schema,
    load_config,
    parse_overrides,
)
from distgrow.config.schema import (
    FLOORED,
    NOT_DECAYS,
    AdaptiveConfig,
    BackendConfig,
    ChainConfig,
    Config,
    ConfigError,
    DataConfig,
    GrowthConfig,
    GrowthMode,
    GrowthRule,
    LaunchConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    NoiseConfig,
    OptimConfig,
    OptimName,
    RunConfig,
    ScheduleConfig,
    ScheduleType,
    WandbConfig,
)

__all__ = [
    "DATA_NAMES",
    "FLOORED",
    "NOT_DECAYS",
    "OFFICIAL_TRAIN",
    "SPLIT_TOTAL",
    "AdaptiveConfig",
    "BackendConfig",
    "ChainConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "GrowthConfig",
    "GrowthMode",
    "GrowthRule",
    "LaunchConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "NoiseConfig",
    "OptimConfig",
    "OptimName",
    "RunConfig",
    "ScheduleConfig",
    "ScheduleType",
    "WandbConfig",
    "config_from_dict",
    "describe_fields",
    "dump_config",
    "held_out",
    "json_schema",
    "load_config",
    "parse_overrides",
]
