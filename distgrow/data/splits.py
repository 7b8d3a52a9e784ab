"""From what a reader read to a :class:`DataBundle`: the seeded split, normalisation and limits.

Readers return either :class:`ImageSplits` (images with their official test split, kept
``uint8`` and normalised per batch) or a :class:`Table` (features and labels, split here with
``data.val_fraction`` and standardised with the training split's statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distgrow.config import DataConfig, held_out
from distgrow.data.containers import ArrayDataset, BatchTransform, DataBundle
from distgrow.data.order import STREAM_SPLIT, stream_seed
from distgrow.data.transforms import (
    AUGMENTATION,
    Compose,
    NormalizeImages,
    RandomCropFlip,
    image_stats,
)

__all__ = [
    "ImageSplits",
    "Table",
    "image_bundle",
    "seeded_split",
    "tabular_bundle",
]


@dataclass(frozen=True)
class ImageSplits:
    """Images with their official split: ``uint8 (N, C, H, W)`` pixels, ``int64`` labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class Table:
    """Samples without an official split: features ``(N, ...)``, labels ``(N,)``.

    ``num_classes`` is 0 for regression (labels are then float targets).
    """

    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    val_features: np.ndarray | None = None
    """A separate validation set (``data.val_path``): then nothing is split off ``features``."""
    val_labels: np.ndarray | None = None


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices: a seeded random split of ``range(n)``.

    The validation set gets ``round(n * val_fraction)`` samples, at least 1 and at most
    ``n - 1``. Both index sets are in the (random) permutation order, so "the first k" of
    either is a random subset, not the head of the file (covtype's file is sorted by region).
    """
    if n < 2:
        raise ValueError(f"cannot split {n} sample(s) into train and validation; need >= 2.")
    n_val = held_out(n, val_fraction)  # the same count distgrow plan assumes
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, STREAM_SPLIT))
    perm = torch.randperm(n, generator=generator, dtype=torch.long)
    return perm[n_val:], perm[:n_val]


def standardize(train: np.ndarray, val: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits with the training split's mean and std (float64 maths).

    A constant column (std 0) is only centred, not divided by zero.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return to_tensor(train), to_tensor(val)


def limit(x: torch.Tensor, y: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` samples (all of them when ``k`` is None or larger than the set)."""
    if k is None:
        return x, y
    # Clone so a small quick-run subset does not keep the whole data set alive.
    return x[:k].clone(), y[:k].clone()


def tabular_bundle(name: str, table: Table, cfg: DataConfig, seed: int) -> DataBundle:
    """Seeded split with ``cfg.val_fraction``, standardisation with train statistics, float32.

    Args:
        name: The data set's canonical name.
        table: What the reader read.
        cfg: The data section (``val_fraction``, ``limit_train``, ``limit_val``).
        seed: The run seed, which seeds the split.

    Returns:
        The bundle.
    """
    features = np.asarray(table.features, dtype=np.float64)
    dtype = np.int64 if table.num_classes > 0 else np.float32
    if table.val_features is not None and table.val_labels is not None:
        train_x, val_x = standardize(features, np.asarray(table.val_features, dtype=np.float64))
        train_y = torch.from_numpy(np.asarray(table.labels, dtype=dtype))
        val_y = torch.from_numpy(np.asarray(table.val_labels, dtype=dtype))
    else:
        train_idx, val_idx = seeded_split(features.shape[0], cfg.val_fraction, seed)
        train_np, val_np = train_idx.numpy(), val_idx.numpy()
        train_x, val_x = standardize(features[train_np], features[val_np])
        y_all = torch.from_numpy(np.asarray(table.labels, dtype=dtype))
        train_y, val_y = y_all[train_idx], y_all[val_idx]
    train_x, train_y = limit(train_x, train_y, cfg.limit_train)
    val_x, val_y = limit(val_x, val_y, cfg.limit_val)
    return DataBundle(
        name=name,
        train=ArrayDataset(train_x, train_y),
        val=ArrayDataset(val_x, val_y),
        input_shape=tuple(int(d) for d in features.shape[1:]),
        num_classes=table.num_classes,
        task="classification" if table.num_classes > 0 else "regression",
    )


def image_bundle(name: str, images: ImageSplits, cfg: DataConfig, seed: int) -> DataBundle:
    """Bundle ``uint8`` images: normalise with the training set's own statistics.

    Args:
        name: The data set's canonical name (a key of :data:`AUGMENTATION` if
            ``cfg.augment``).
        images: What the reader read.
        cfg: The data section (``augment``, ``limit_train``, ``limit_val``).
        seed: The run seed, which seeds the augmentation.

    Returns:
        The bundle; only its training split is augmented.
    """
    # Statistics of the whole training set (before any limit), so a quick run with
    # limit_train normalises exactly like the full run.
    mean, std = image_stats(images.train_x)
    normalize = NormalizeImages(mean, std)
    train_transform: BatchTransform = normalize
    if cfg.augment:
        padding, flip = AUGMENTATION[name]
        train_transform = Compose(RandomCropFlip(seed, padding, flip), normalize)
    train_x, train_y = limit(images.train_x, images.train_y, cfg.limit_train)
    val_x, val_y = limit(images.val_x, images.val_y, cfg.limit_val)
    return DataBundle(
        name=name,
        train=ArrayDataset(train_x, train_y, train_transform),
        val=ArrayDataset(val_x, val_y, normalize),
        input_shape=tuple(int(d) for d in train_x.shape[1:]),
        num_classes=images.num_classes,
        task="classification",
    )
