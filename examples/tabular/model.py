"""The tabular model: a two-hidden-layer MLP, as your own model file.

distgrow builds it from the config with ``model.name: "model.py:build"`` (a path relative to
the config file) and ``model.kwargs``. Any function that returns a ``torch.nn.Module`` will do.
"""

from __future__ import annotations

from torch import nn


def build(features: int = 12, classes: int = 3, hidden: int = 64) -> nn.Module:
    """An MLP from ``features`` standardised inputs to ``classes`` logits."""
    return nn.Sequential(
        nn.Linear(features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    )
