"""distgrow: don't decay the learning rate, increase the batch size.

The converter is usable on its own, from any training loop (no torch.distributed needed)::

    import distgrow

    policy = distgrow.convert(
        50_000,                                    # N, training samples
        run={"epochs": 200},
        optim={"lr": 0.1, "momentum": 0.9},
        schedule={"type": "multistep", "milestones": [60, 120, 160], "gamma": 0.2},
        growth={"base_batch": 128, "max_global_batch": 640},
    )
    s = policy.setting(epoch=130)                  # batch, split, LR, momentum for this epoch
    s.global_batch, s.lr, s.momentum               # (640, 0.02, 0.9): the hybrid

Importing this package imports neither torch nor any backend.
"""

from __future__ import annotations

from typing import Any

from distgrow.config import Config, ConfigError, config_from_dict, load_config
from distgrow.planner import GrowthPolicy, Plan, Setting, make_plan

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "GrowthBatchSampler",
    "GrowthPolicy",
    "GrowthSchedule",
    "Plan",
    "Setting",
    "__version__",
    "convert",
    "load_config",
    "make_plan",
]


# Growth inside your own loop (distgrow.loop) needs torch: imported on first use.
_LOOP_NAMES = ("GrowthSchedule", "GrowthBatchSampler")


def __getattr__(name: str) -> Any:
    if name in _LOOP_NAMES:
        from distgrow import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'distgrow' has no attribute {name!r}")


def convert(dataset_size: int, *, min_workers: int = 1, **sections: dict[str, Any]) -> GrowthPolicy:
    """A :class:`GrowthPolicy` from config sections given as keyword arguments.

    Args:
        dataset_size: N, the number of training samples.
        min_workers: the world size the loop runs with (the plan never uses fewer workers).
        **sections: config sections by name (``run``, ``optim``, ``schedule``, ``growth``, ...),
            each a dict of that section's keys; anything left out takes its default.

    Raises:
        ConfigError: an unknown key, a wrong type or an impossible value, named.
    """
    cfg = config_from_dict(sections, source="distgrow.convert(...)")
    return GrowthPolicy(cfg, dataset_size, min_workers)
