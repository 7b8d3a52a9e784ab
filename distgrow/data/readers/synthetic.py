"""Generated data sets, a pure function of the run seed: synthetic_classification and
synthetic_regression (sizes from ``data.synthetic_samples`` and ``data.synthetic_features``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from distgrow.config import DataConfig
from distgrow.data.order import STREAM_SYNTHETIC, stream_seed
from distgrow.data.splits import Table

__all__ = ["SYNTHETIC_CLASSES", "read"]

# Number of classes of the synthetic classification set (Gaussian clusters).
SYNTHETIC_CLASSES = 10
# Norm of each synthetic cluster centre, in units of the (unit) within-cluster noise: centres
# ~4.2 apart in high dimension, so nearest class mean scores ~87% at 20 features: learnable
# but not trivially perfect.
_SYNTHETIC_CENTRE_NORM = 3.0
# Standard deviation of the label noise of the synthetic regression set (targets have ~unit
# variance), so the best achievable MSE is 0.01.
_SYNTHETIC_NOISE_STD = 0.1


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """The synthetic set ``name``, ``cfg.synthetic_samples`` × ``cfg.synthetic_features``.

    Args:
        name: ``"synthetic_classification"`` or ``"synthetic_regression"``.
        cfg: The data section (the two sizes).
        seed: Seeds the generator.

    Returns:
        The table: :data:`SYNTHETIC_CLASSES` classes, or 0 (regression).
    """
    task = "classification" if name == "synthetic_classification" else "regression"
    features, labels = _synthetic(task, cfg.synthetic_samples, cfg.synthetic_features, seed)
    return Table(features, labels, SYNTHETIC_CLASSES if task == "classification" else 0)


def _synthetic(task: str, samples: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated data, a pure function of the arguments (torch CPU generator).

    Classification: :data:`SYNTHETIC_CLASSES` Gaussian clusters with unit noise around
    random centres of norm 3, classes balanced (``i % 10`` shuffled). Regression: ``x`` ~
    N(0, I), target ``x @ w + 0.1 * noise`` with a random linear teacher ``w`` ~ N(0, I/d)
    (targets of ~unit variance).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, STREAM_SYNTHETIC))
    if task == "classification":
        centres = torch.randn(SYNTHETIC_CLASSES, features, generator=generator, dtype=torch.float64)
        centres *= _SYNTHETIC_CENTRE_NORM / centres.norm(dim=1, keepdim=True)
        labels = torch.randperm(samples, generator=generator) % SYNTHETIC_CLASSES
        noise = torch.randn(samples, features, generator=generator, dtype=torch.float64)
        x = centres[labels] + noise
        return x.numpy(), labels.numpy()
    teacher = torch.randn(features, generator=generator, dtype=torch.float64) / math.sqrt(features)
    x = torch.randn(samples, features, generator=generator, dtype=torch.float64)
    noise = torch.randn(samples, generator=generator, dtype=torch.float64)
    y = x @ teacher + _SYNTHETIC_NOISE_STD * noise
    return x.numpy(), y.numpy()
