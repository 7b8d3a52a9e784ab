"""The tabular model: a two-hidden-layer MLP, as your own model file.

distgrow builds it from the config with ``model.name: "examples/tabular/model.py:build"`` and
``model.kwargs`` (the entry-point form; until that lands the config uses the same network built
in, ``model.name: mlp`` with ``model.hidden: [64, 64]``). Any function that returns a
``torch.nn.Module`` will do.
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
