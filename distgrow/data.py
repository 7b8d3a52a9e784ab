"""Real data sets as in-memory tensors, and how one global batch is cut across ranks.

Every data set is held whole in memory (Fashion-MNIST as ``uint8``: 47 MB) and batched by
tensor indexing, so no ``DataLoader`` and no worker processes are involved: a batch is
``dataset.batch(indices, epoch)``.

The order in which samples are consumed never depends on how a global batch is realised
(METHOD.md §6): :func:`epoch_permutation` gives one permutation per epoch from ``(seed,
epoch)`` alone, the trainer cuts it into global batches, and :func:`shard_global_batch` cuts a
global batch into the micro-batches of one rank, strided over ranks. Random augmentation is a
pure function of ``(seed, epoch, sample index)``, so the same sample is augmented the same way
whether it lands on rank 0 or rank 7, in micro-batch 1 or 3.

Data sets (:data:`DATASETS`):

* ``fashion_mnist``, ``mnist``: IDX files (``.gz`` or raw); validation = the official t10k set.
* ``cifar10``: the python pickle batches, read with a restricted unpickler (no code runs).
* ``covtype``: a local UCI CSV / NPZ file, or scikit-learn's ``fetch_covtype`` cache.
* ``ionosphere``: the UCI ``ionosphere.data`` file.
* ``digits``, ``breast_cancer``, ``wine``, ``iris``: scikit-learn's bundled copies.
* ``synthetic_classification``, ``synthetic_regression``: generated from the seed.

This module does not import ``torch.distributed``.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from distgrow.config import held_out

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchTransform",
    "DataBundle",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "epoch_permutation",
    "load_dataset",
    "shard_global_batch",
]

DATASETS: tuple[str, ...] = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "covtype",
    "ionosphere",
    "digits",
    "breast_cancer",
    "wine",
    "iris",
    "synthetic_classification",
    "synthetic_regression",
)

# Where Debian's `dataset-fashion-mnist` package puts the IDX files.
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# No package ships MNIST here; this is only the place looked at when data.root is unset
# (the layout Debian uses for Fashion-MNIST).
MNIST_DEFAULT_ROOT = "/usr/share/datasets/mnist"

_FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
_MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"
)
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_COVTYPE_URL = "https://archive.ics.uci.edu/dataset/31/covertype (file covtype.data.gz)"
_IONOSPHERE_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/ionosphere/ionosphere.data"
)

# Number of classes of the synthetic classification set (Gaussian clusters).
SYNTHETIC_CLASSES = 10
# Norm of each synthetic cluster centre, in units of the (unit) within-cluster noise: centres
# ~4.2 apart in high dimension, so nearest class mean scores ~87% at 20 features: learnable
# but not trivially perfect.
_SYNTHETIC_CENTRE_NORM = 3.0
# Standard deviation of the label noise of the synthetic regression set (targets have ~unit
# variance), so the best achievable MSE is 0.01.
_SYNTHETIC_NOISE_STD = 0.1

_MASK64 = (1 << 64) - 1


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where they were looked for.

    The message names every path looked at and how to get the data (Debian package, URL to
    download by hand, or ``data.download=true`` for covtype).
    """


class DatasetFormatError(ValueError):
    """A data file exists but is not in the expected format (truncated, wrong shape, ...).

    The message names the file, what was expected and what was found.
    """


# ----------------------------------------------------------------------------- datasets


class BatchTransform(Protocol):
    """A per-batch transform of the stored features.

    It receives the stored rows, the sample indices they came from and the epoch, so that any
    randomness can be a pure function of ``(seed, epoch, index)``.
    """

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Transform the rows ``x`` of samples ``indices`` in ``epoch``."""
        ...


@dataclass
class ArrayDataset:
    """Samples held as two tensors, batched by indexing.

    Attributes:
        x: Features, first dimension = sample. Images stay ``uint8`` ``(N, C, H, W)`` to save
            memory; ``transform`` turns them into normalised ``float32``.
        y: ``int64`` class labels ``(N,)``, or ``float32`` regression targets ``(N,)`` /
            ``(N, k)``.
        transform: Applied to each batch of ``x`` (see :class:`BatchTransform`); ``None``
            returns the stored rows as they are.
    """

    x: torch.Tensor
    y: torch.Tensor
    transform: BatchTransform | None = None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayDataset: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}; "
                "they must match (one label per sample)."
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and labels of some samples, transformed.

        Any random augmentation is a pure function of (seed, epoch, sample index), so the same
        sample in the same epoch is augmented identically however the batch is split across
        ranks or micro-batches (``batch([i, j])`` equals ``batch([i])`` stacked on
        ``batch([j])``).

        Args:
            indices: 1-D integer tensor of sample indices (may be empty: an empty trailing
                micro-batch of a partial global batch gives empty ``x`` and ``y``).
            epoch: The epoch, which seeds the augmentation.

        Returns:
            ``(x, y)`` for these samples, in the order of ``indices``.

        Raises:
            ValueError: ``indices`` is not a 1-D integer tensor.
        """
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"indices must be a 1-D integer tensor, got dtype {indices.dtype} and shape "
                f"{tuple(indices.shape)}; pass e.g. torch.tensor([0, 5, 7])."
            )
        idx = indices.to(device=self.x.device, dtype=torch.long)
        # Negative indices count from the end; make them absolute so that sample n-1 is
        # augmented the same way whether it is asked for as n-1 or as -1.
        idx = torch.where(idx < 0, idx + len(self), idx)
        x = self.x[idx]
        if self.transform is not None:
            x = self.transform(x, idx, epoch)
        return x, self.y[idx.to(self.y.device)]


@dataclass
class DataBundle:
    """A data set ready for training: its splits and what a model needs to know about it.

    Attributes:
        name: Canonical name (one of :data:`DATASETS`).
        train: Training split (augmented if requested).
        val: Validation split (the official test set where one exists); never augmented.
        input_shape: Per-sample shape the model sees, e.g. ``(1, 28, 28)`` or ``(54,)``.
        num_classes: Number of classes; 0 for regression.
        task: ``"classification"`` or ``"regression"``.
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int
    task: str


# ----------------------------------------------------------------------------- sample order


def _seed64(seed: int) -> int:
    """An arbitrary Python int as an unsigned 64-bit seed (negative seeds wrap, as in C)."""
    return seed & _MASK64


def _splitmix64(value: int) -> int:
    """The splitmix64 finaliser: a well-mixed 64-bit hash of one 64-bit integer."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _stream_seed(seed: int, stream: int) -> int:
    """A generator seed for one purpose (split, synthetic data), decorrelated from the others.

    Without this, seed 0's validation split and epoch 0's permutation would both come from
    ``manual_seed(0)``; hashing in a per-purpose constant keeps the streams independent.
    """
    return _splitmix64(_seed64(seed) ^ _splitmix64(stream)) & ((1 << 63) - 1)


_STREAM_SPLIT = 1
_STREAM_SYNTHETIC = 2


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of one epoch.

    A permutation of ``range(n)`` drawn by a CPU ``torch.Generator`` seeded with
    ``seed * 1_000_003 + epoch`` (taken modulo 2**64), so it depends only on ``(seed, epoch)``
    and is the same on every rank and in every process, whatever the world size.

    Args:
        n: Number of samples (>= 0).
        seed: Run seed.
        epoch: Epoch number.

    Returns:
        ``int64`` tensor of shape ``(n,)`` holding each of ``0 .. n-1`` once.

    Raises:
        ValueError: ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"epoch_permutation: n = {n} must be >= 0 (the number of samples).")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_seed64(seed * 1_000_003 + epoch))
    return torch.randperm(n, generator=generator, dtype=torch.long)


def shard_global_batch(
    indices: torch.Tensor,
    *,
    workers: int,
    micro_batch: int,
    accum_steps: int,
    rank: int,
    align: int = 1,
) -> list[torch.Tensor]:
    """The ``accum_steps`` micro-batches that ``rank`` processes for one global batch.

    The global batch is cut into ``workers * accum_steps`` consecutive chunks; chunk ``k``
    goes to rank ``k % workers`` at accumulation step ``k // workers`` (strided over ranks).
    The chunks depend only on ``workers * accum_steps``, so 1×4, 2×2 and 4×1 see the same
    micro-batches (and the same ghost-batch statistics), as METHOD.md §6 requires.

    * Full batch (``len == workers * micro_batch * accum_steps``): chunk ``k`` is
      ``indices[k*micro_batch:(k+1)*micro_batch]``.
    * Partial final batch of an epoch (``0 < len < full``): chunk size
      ``c = ceil(len / (workers * accum_steps))`` rounded up to a multiple of ``align``; chunk
      ``k`` is ``indices[k*c:(k+1)*c]`` (clipped), so trailing chunks may be empty. They are
      returned anyway so that every rank still does ``accum_steps`` micro-steps (and joins
      every collective). ``c <= micro_batch`` always, since ``micro_batch`` is a multiple of
      ``align``.

    Args:
        indices: 1-D tensor of sample indices, in global order.
        workers: Number of data-parallel ranks (>= 1).
        micro_batch: Per-rank micro-batch size of a full global batch (>= 1, multiple of
            ``align``).
        accum_steps: Gradient-accumulation steps per update (>= 1).
        rank: This rank, ``0 <= rank < workers``.
        align: Chunk sizes of a partial batch are rounded up to a multiple of this (e.g. to
            keep ghost batches or tensor-core shapes whole).

    Returns:
        ``accum_steps`` tensors (views of ``indices``), in accumulation order; some may have
        length 0 for a partial batch.

    Raises:
        ValueError: A size is < 1, ``rank`` is out of range, ``micro_batch`` is not a multiple
            of ``align``, or ``indices`` is empty, not 1-D, or longer than a full batch.
    """
    for label, value in (
        ("workers", workers),
        ("micro_batch", micro_batch),
        ("accum_steps", accum_steps),
        ("align", align),
    ):
        if value < 1:
            raise ValueError(f"shard_global_batch: {label} = {value} must be >= 1.")
    if not 0 <= rank < workers:
        raise ValueError(
            f"shard_global_batch: rank = {rank} is out of range for workers = {workers}; "
            f"ranks are 0 .. {workers - 1}."
        )
    if micro_batch % align != 0:
        raise ValueError(
            f"shard_global_batch: micro_batch = {micro_batch} is not a multiple of "
            f"align = {align}; choose micro_batch = {math.ceil(micro_batch / align) * align} "
            "or a smaller align."
        )
    if indices.dim() != 1:
        raise ValueError(
            f"shard_global_batch: indices must be 1-D, got shape {tuple(indices.shape)}."
        )
    chunks = workers * accum_steps
    full = chunks * micro_batch
    n = int(indices.shape[0])
    if n > full:
        raise ValueError(
            f"shard_global_batch: global batch of {n} samples exceeds workers × micro_batch × "
            f"accum_steps = {workers} × {micro_batch} × {accum_steps} = {full}; cut the epoch "
            f"into batches of at most {full}."
        )
    if n == 0:
        raise ValueError(
            "shard_global_batch: empty global batch (0 samples); the last batch of an epoch "
            "must hold at least one sample, so stop the epoch instead of asking for it."
        )
    # For a full batch this gives c == micro_batch exactly, so one rule serves both cases.
    size = math.ceil(math.ceil(n / chunks) / align) * align
    return [indices[k * size : (k + 1) * size] for k in range(rank, chunks, workers)]


# ----------------------------------------------------------------------------- transforms


def _image_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (of pixel / 255) of ``uint8`` images ``(N, C, H, W)``.

    Computed from a 256-bin histogram per channel: exact, and no float copy of the images.
    """
    arr = x.numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for channel in range(arr.shape[1]):
        counts = np.bincount(arr[:, channel].reshape(-1), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        # A constant channel would divide by zero; scaling by 1 leaves it centred at 0.
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


class _NormalizeImages:
    """``uint8`` images -> ``float32`` ``(pixel / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return (x.to(torch.float32) / 255.0 - mean) / std

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"_NormalizeImages(mean={mean}, std={std})"


def _hash_samples(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """A 64-bit hash per sample of ``(seed, epoch, index)`` (splitmix64, vectorised).

    numpy ``uint64`` arrays wrap on overflow and shift logically, which is what the hash
    needs (torch ``int64`` would shift arithmetically).
    """
    key = _splitmix64(_splitmix64(_seed64(seed)) ^ _seed64(epoch))
    z = indices.astype(np.uint64) ^ np.uint64(key)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _crop_flip_params(
    seed: int, epoch: int, indices: torch.Tensor, padding: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``(dy, dx)`` in ``0 .. 2*padding`` and a flip flag.

    Each is drawn from a different bit range of the per-sample hash, so it depends only on
    ``(seed, epoch, index)``.
    """
    h = _hash_samples(seed, epoch, indices.cpu().numpy())
    span = np.uint64(2 * padding + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(16)) % span).astype(np.int64)
    flip = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool)
    device = indices.device
    return (
        torch.from_numpy(dy).to(device),
        torch.from_numpy(dx).to(device),
        torch.from_numpy(flip).to(device),
    )


class _RandomCropFlip:
    """Random crop after zero-padding, and optional horizontal flip, per sample.

    The standard CIFAR augmentation (pad 4, crop back to 32×32, flip with probability 1/2),
    with each sample's draw a pure function of ``(seed, epoch, index)``. Works on any dtype;
    it runs on the stored ``uint8`` pixels, so the padding is black (0) as in torchvision.
    """

    def __init__(self, seed: int, padding: int, flip: bool) -> None:
        self.seed = seed
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        n, _, height, width = x.shape
        pad = self.padding
        dy, dx, flip = _crop_flip_params(self.seed, epoch, indices, pad)
        if not self.flip:
            flip = torch.zeros_like(flip)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = dy[:, None] + torch.arange(height, device=x.device)  # (n, H)
        cols = torch.arange(width, device=x.device)
        # A flip reads the crop's columns right to left: one gather does crop and flip.
        cols = torch.where(flip[:, None], width - 1 - cols, cols) + dx[:, None]  # (n, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        channels_last = padded.permute(0, 2, 3, 1)
        out = channels_last[batch, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"_RandomCropFlip(seed={self.seed}, padding={self.padding}, flip={self.flip})"


class _Compose:
    """Apply transforms in order."""

    def __init__(self, *transforms: BatchTransform) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x, indices, epoch)
        return x

    def __repr__(self) -> str:
        return f"_Compose{self.transforms!r}"


# Augmentation per image set: (padding, horizontal flip). A mirrored digit is not the same
# digit, so MNIST is only shifted; clothes and CIFAR objects keep their class when mirrored.
_AUGMENTATION: dict[str, tuple[int, bool]] = {
    "cifar10": (4, True),
    "fashion_mnist": (2, True),
    "mnist": (2, False),
}


def _image_bundle(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    num_classes: int,
    augment: bool,
    seed: int,
    limit_train: int | None,
    limit_val: int | None,
) -> DataBundle:
    """Bundle ``uint8`` images: normalise with the training set's own statistics."""
    # Statistics of the whole training set (before any limit), so a quick run with
    # limit_train normalises exactly like the full run.
    mean, std = _image_stats(train_x)
    normalize = _NormalizeImages(mean, std)
    train_transform: BatchTransform = normalize
    if augment:
        padding, flip = _AUGMENTATION[name]
        train_transform = _Compose(_RandomCropFlip(seed, padding, flip), normalize)
    train_x, train_y = _limit(train_x, train_y, limit_train)
    val_x, val_y = _limit(val_x, val_y, limit_val)
    return DataBundle(
        name=name,
        train=ArrayDataset(train_x, train_y, train_transform),
        val=ArrayDataset(val_x, val_y, normalize),
        input_shape=tuple(int(d) for d in train_x.shape[1:]),
        num_classes=num_classes,
        task="classification",
    )


# ----------------------------------------------------------------------------- IDX (MNIST)

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE
# FORMAT").
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of a file, gunzipped if it is gzip (by its magic bytes, not its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, ValueError) as exc:
        raise DatasetFormatError(
            f"{path}: corrupt or truncated gzip file ({exc}); download it again."
        ) from exc


def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian numpy array.

    Header: two zero bytes, a type byte, the number of dimensions, then each dimension as a
    big-endian ``uint32``; the data follow, big-endian, and must fill the dimensions exactly.

    Raises:
        DatasetFormatError: Bad magic, unknown type, or a size that does not match the header.
    """
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetFormatError(
            f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes at least)."
        )
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: bad IDX magic {data[:4].hex()} (expected 0000 then a type byte in "
            f"{sorted(f'{t:#04x}' for t in _IDX_DTYPES)} and the number of dimensions); "
            "is this an IDX file?"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetFormatError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the file has {len(data)}."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says shape {dims} of {dtype.name} = {expected} data bytes, "
            f"but the file holds {actual} ({'truncated' if actual < expected else 'extra'}"
            " data); download the file again."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable copy: torch.from_numpy needs both.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _idx_candidates(split: str, kind: str, ndim: int) -> list[str]:
    """File names an IDX file goes by (raw or gz; the dot variant of some MNIST mirrors)."""
    stems = [f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"]
    return [name for stem in stems for name in (stem, stem + ".gz")]


_IDX_FILES = {
    "train_images": ("train", "images", 3),
    "train_labels": ("train", "labels", 1),
    "val_images": ("t10k", "images", 3),
    "val_labels": ("t10k", "labels", 1),
}


def _find_idx_files(directories: Sequence[Path]) -> dict[str, Path] | None:
    """The four IDX files, all from the first directory that holds all of them."""
    for directory in directories:
        found: dict[str, Path] = {}
        for key, (split, kind, ndim) in _IDX_FILES.items():
            for name in _idx_candidates(split, kind, ndim):
                if (directory / name).is_file():
                    found[key] = directory / name
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 (N, 1, H, W)`` and labels ``int64 (N,)`` from two IDX files."""
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{images.shape}."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} "
            f"{labels.shape}."
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same release."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{labels_path}: labels must be 0..9, found {labels.min()}..{labels.max()}."
        )
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _load_idx_dataset(
    name: str, root: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and t10k splits of an MNIST-format data set."""
    if root is not None:
        base = Path(root).expanduser()
        # Also accept the layout torchvision downloads into (root/FashionMNIST/raw).
        sub = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
        directories = [base, base / sub / "raw"]
    elif name == "fashion_mnist":
        directories = [Path(FASHION_MNIST_DEFAULT_ROOT)]
    else:
        directories = [Path(MNIST_DEFAULT_ROOT)]
    files = _find_idx_files(directories)
    if files is None:
        looked = ", ".join(str(d) for d in directories)
        wanted = ", ".join(_idx_candidates(*spec)[1] for spec in _IDX_FILES.values())
        if name == "fashion_mnist":
            how = (
                "install the Debian package `dataset-fashion-mnist` (apt-get install "
                f"dataset-fashion-mnist; it fills {FASHION_MNIST_DEFAULT_ROOT}) or download "
                f"the four files from {_FASHION_MNIST_URL} and set data.root to their folder"
            )
        else:
            how = (
                f"download the four files from the MNIST site {_MNIST_URLS} and set "
                "data.root to their folder"
            )
        raise DatasetNotFoundError(
            f"{name}: IDX files not found; looked in {looked} for {wanted} (raw or .gz). "
            f"To get them: {how}."
        )
    train_x, train_y = _load_idx_pair(files["train_images"], files["train_labels"])
    val_x, val_y = _load_idx_pair(files["val_images"], files["val_labels"])
    if train_x.shape[1:] != val_x.shape[1:]:
        raise DatasetFormatError(
            f"{name}: train images are {tuple(train_x.shape[2:])} but test images are "
            f"{tuple(val_x.shape[2:])} ({files['train_images']}, {files['val_images']})."
        )
    return train_x, train_y, val_x, val_y


# ----------------------------------------------------------------------------- CIFAR-10


def _numpy_private(name: str, *modules: str) -> Callable[[], Any]:
    """A lazy getter for a numpy-internal unpickling helper.

    It lives in ``numpy._core`` in numpy 2 and ``numpy.core`` before; importing the
    ``numpy.core`` spelling under numpy 2 warns, so the new place is tried first.
    """

    def get() -> Any:
        for module in modules:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {name} in {' or '.join(modules)}")

    return get


_reconstruct_function = _numpy_private(
    "_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray"
)
_frombuffer_function = _numpy_private("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")


def _safe_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` for plain numeric types only: object arrays could carry anything."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(
            f"refusing to unpickle an object-dtype array ({dtype}); CIFAR-10 holds uint8 data."
        )
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it in protocol-2 pickles to spell ``bytes``.

    Only the latin-1 codec is allowed: other codecs (zlib, base64, ...) are not needed.
    """
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(
            f"refusing _codecs.encode with codec {encoding!r}; only latin1 is needed."
        )
    return text.encode("latin1")


# (module, name) -> the object to hand back. Everything else is refused, so unpickling can
# build arrays, dicts, lists, ints and bytes but never call anything else (os.system, eval,
# subprocess, ...). Both numpy module spellings appear: files pickled under numpy 1 say
# numpy.core, under numpy 2 numpy._core.
_PICKLE_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer_function,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer_function,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few globals numpy arrays need.

    A pickle can call any importable function while loading; CIFAR-10's files only need
    numpy's array reconstruction, so any other global raises ``UnpicklingError`` before it
    is imported, let alone called.
    """

    def find_class(self, module: str, name: str) -> Any:
        factory = _PICKLE_ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array reconstruction "
                "is allowed in CIFAR-10 batch files (is this file really from "
                f"{_CIFAR10_URL}?)."
            )
        return factory()


def _restricted_load(path: Path) -> Any:
    """Unpickle a CIFAR-10 batch file safely (``encoding="bytes"``: the originals are py2)."""
    with path.open("rb") as handle:
        return _RestrictedUnpickler(handle, encoding="bytes").load()


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (N, 3072)`` rows and ``int64 (N,)`` labels of one CIFAR-10 batch file."""
    try:
        content = _restricted_load(path)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except (EOFError, ValueError, TypeError, struct.error) as exc:
        raise DatasetFormatError(
            f"{path}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(content, dict):
        raise DatasetFormatError(
            f"{path}: expected a dict with b'data' and b'labels', got {type(content).__name__}."
        )
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if data is None or labels is None:
        raise DatasetFormatError(
            f"{path}: missing b'data' or b'labels' (keys: {sorted(map(repr, content))})."
        )
    data = np.asarray(data)
    labels_arr = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}."
        )
    if labels_arr.shape != (data.shape[0],) or not np.issubdtype(labels_arr.dtype, np.integer):
        raise DatasetFormatError(
            f"{path}: b'labels' must be {data.shape[0]} integers (one per row of b'data'), "
            f"got {labels_arr.dtype} {labels_arr.shape}."
        )
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise DatasetFormatError(
            f"{path}: labels must be 0..9, found {labels_arr.min()}..{labels_arr.max()}."
        )
    return data, labels_arr.astype(np.int64)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def _load_cifar10(
    root: str | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 50000 training and 10000 test images of CIFAR-10 (python version)."""
    if root is None:
        raise DatasetNotFoundError(
            "cifar10: data.root is not set and no package ships CIFAR-10 here; download "
            f"{_CIFAR10_URL}, extract it (tar xzf) and set data.root to the folder holding "
            "cifar-10-batches-py/."
        )
    base = Path(root).expanduser()
    directories = [base / "cifar-10-batches-py", base]
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    directory = next((d for d in directories if all((d / n).is_file() for n in names)), None)
    if directory is None:
        raise DatasetNotFoundError(
            f"cifar10: looked in {', '.join(map(str, directories))} for {', '.join(names)}; "
            f"not all found. Download {_CIFAR10_URL}, extract it (tar xzf) and set data.root "
            "to the folder holding cifar-10-batches-py/."
        )
    train = [_cifar_batch(directory / n) for n in _CIFAR_TRAIN]
    test_data, test_labels = _cifar_batch(directory / _CIFAR_TEST)
    # Rows are the 1024 red, then green, then blue pixels, each row-major 32×32.
    train_x = torch.from_numpy(np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32))
    train_y = torch.from_numpy(np.concatenate([lab for _, lab in train]))
    val_x = torch.from_numpy(test_data.reshape(-1, 3, 32, 32))
    val_y = torch.from_numpy(test_labels)
    return train_x, train_y, val_x, val_y


# ----------------------------------------------------------------------------- tabular


def _seeded_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation indices: a seeded random split of ``range(n)``.

    The validation set gets ``round(n * val_fraction)`` samples, at least 1 and at most
    ``n - 1``. Both index sets are in the (random) permutation order, so "the first k" of
    either is a random subset, not the head of the file (covtype's file is sorted by region).
    """
    if n < 2:
        raise ValueError(f"cannot split {n} sample(s) into train and validation; need >= 2.")
    n_val = held_out(n, val_fraction)  # the same count distgrow plan assumes
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_stream_seed(seed, _STREAM_SPLIT))
    perm = torch.randperm(n, generator=generator, dtype=torch.long)
    return perm[n_val:], perm[:n_val]


def _standardize(train: np.ndarray, val: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise both splits with the training split's mean and std (float64 maths).

    A constant column (std 0) is only centred, not divided by zero.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)

    def to_tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return to_tensor(train), to_tensor(val)


def _limit(x: torch.Tensor, y: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` samples (all of them when ``k`` is None or larger than the set)."""
    if k is None:
        return x, y
    # Clone so a small quick-run subset does not keep the whole data set alive.
    return x[:k].clone(), y[:k].clone()


def _tabular_bundle(
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    val_fraction: float,
    seed: int,
    limit_train: int | None,
    limit_val: int | None,
) -> DataBundle:
    """Seeded split, standardisation with train statistics, float32 features."""
    features = np.asarray(features, dtype=np.float64)
    train_idx, val_idx = _seeded_split(features.shape[0], val_fraction, seed)
    train_np, val_np = train_idx.numpy(), val_idx.numpy()
    train_x, val_x = _standardize(features[train_np], features[val_np])
    if num_classes > 0:
        y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    else:
        y_all = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    train_y, val_y = y_all[train_idx], y_all[val_idx]
    train_x, train_y = _limit(train_x, train_y, limit_train)
    val_x, val_y = _limit(val_x, val_y, limit_val)
    return DataBundle(
        name=name,
        train=ArrayDataset(train_x, train_y),
        val=ArrayDataset(val_x, val_y),
        input_shape=tuple(int(d) for d in features.shape[1:]),
        num_classes=num_classes,
        task="classification" if num_classes > 0 else "regression",
    )


_COVTYPE_FEATURES = 54
_COVTYPE_SUFFIXES = (".csv", ".csv.gz", ".data", ".data.gz", ".npz")
_COVTYPE_NAMES = tuple(f"covtype{s}" for s in (".data.gz", ".data", ".csv.gz", ".csv", ".npz"))


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return any(path.name.lower().endswith(s) for s in suffixes)


def _open_text(path: Path) -> Any:
    """A text handle on a plain or ``.gz`` file."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _is_header(line: str) -> bool:
    """True if a CSV line is not all numbers (a column-name header)."""
    try:
        [float(token) for token in line.strip().split(",") if token.strip()]
    except ValueError:
        return True
    return False


def _read_covtype_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, 54)`` and labels 1..7 from a UCI covtype CSV or an NPZ file."""
    if path.name.lower().endswith(".npz"):
        # allow_pickle=False: an NPZ of object arrays could run code when loaded.
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise DatasetFormatError(
                    f"{path}: NPZ must hold arrays 'X' (N, 54) and 'y' (N,); missing "
                    f"{missing}, found {archive.files}."
                )
            features = np.asarray(archive["X"], dtype=np.float64)
            labels = np.asarray(archive["y"])
    else:
        try:
            with _open_text(path) as handle:
                first = handle.readline()
            skip = 1 if _is_header(first) else 0
            with _open_text(path) as handle:
                table = np.loadtxt(handle, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
        except (ValueError, EOFError, OSError) as exc:
            raise DatasetFormatError(
                f"{path}: not a covtype CSV (54 numbers then the label 1..7 per line, comma-"
                f"separated, optional header): {exc}"
            ) from exc
        if table.shape[1] != _COVTYPE_FEATURES + 1:
            raise DatasetFormatError(
                f"{path}: {table.shape[1]} columns per line, expected "
                f"{_COVTYPE_FEATURES + 1} (54 features then the label)."
            )
        features, labels = table[:, :-1], table[:, -1]
    if features.ndim != 2 or features.shape[1] != _COVTYPE_FEATURES:
        raise DatasetFormatError(
            f"{path}: features must have shape (N, {_COVTYPE_FEATURES}), got {features.shape}."
        )
    if labels.shape != (features.shape[0],):
        raise DatasetFormatError(
            f"{path}: {labels.shape} labels for {features.shape[0]} samples; need one each."
        )
    return features, labels


def _covtype_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Cover types 1..7 (as in the UCI file and scikit-learn) -> class indices 0..6."""
    values = np.asarray(labels, dtype=np.float64)
    if values.size and (
        not np.all(values == np.round(values)) or values.min() < 1 or values.max() > 7
    ):
        raise DatasetFormatError(
            f"{source}: covtype labels must be the integers 1..7 (UCI convention), found "
            f"{values.min():g}..{values.max():g}; if yours are 0..6, add 1 before saving."
        )
    return values.astype(np.int64) - 1


def _load_covtype(root: str | None, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Covtype features and 0-based labels from a local file or scikit-learn's cache."""
    if root is not None:
        path = Path(root).expanduser()
        if path.is_file():
            if not _has_suffix(path, _COVTYPE_SUFFIXES):
                raise ValueError(
                    f"covtype: data.root = {path} is a file but not one of "
                    f"{', '.join(_COVTYPE_SUFFIXES)}; point it at a UCI covtype CSV or an NPZ "
                    "with arrays X and y."
                )
            features, labels = _read_covtype_file(path)
            return features, _covtype_labels(labels, str(path))
        if _has_suffix(path, _COVTYPE_SUFFIXES):
            # Do not hand a missing file's name to scikit-learn: it would create a folder.
            raise DatasetNotFoundError(
                f"covtype: data.root = {path} does not exist. Point data.root at a local "
                f"covtype CSV/NPZ (UCI file: {_COVTYPE_URL}), or set data.download=true "
                "(needs network) to fetch it through scikit-learn."
            )
        if path.is_dir():
            for name in _COVTYPE_NAMES:
                if (path / name).is_file():
                    features, labels = _read_covtype_file(path / name)
                    return features, _covtype_labels(labels, str(path / name))
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError(
            "covtype without a local file needs scikit-learn: pip install 'distgrow[data]', "
            "or point data.root at a local covtype CSV/NPZ."
        ) from exc
    try:
        features, labels = sklearn.datasets.fetch_covtype(
            data_home=root, download_if_missing=download, return_X_y=True
        )
    except OSError as exc:  # includes URLError (no network) and "Data not found"
        home = sklearn.datasets.get_data_home(root)
        looked = f"{root} (local files {', '.join(_COVTYPE_NAMES)}) and " if root else ""
        raise DatasetNotFoundError(
            f"covtype: not found; looked in {looked}scikit-learn's cache "
            f"{os.path.join(home, 'covertype')} (download={download}: {exc}). Set "
            "data.download=true (needs network) or point data.root at a local covtype "
            f"CSV/NPZ (UCI file: {_COVTYPE_URL})."
        ) from exc
    return np.asarray(features, dtype=np.float64), _covtype_labels(labels, "fetch_covtype")


_IONOSPHERE_FEATURES = 34


def _load_ionosphere(root: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, 34)`` and labels (g -> 1, b -> 0) from UCI ``ionosphere.data``."""
    if root is None:
        raise DatasetNotFoundError(
            "ionosphere: data.root is not set; download ionosphere.data from "
            f"{_IONOSPHERE_URL} and set data.root to the file or its folder."
        )
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / "ionosphere.data"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"ionosphere: {path} not found; download it from {_IONOSPHERE_URL} and set "
            "data.root to the file or its folder."
        )
    rows: list[list[float]] = []
    labels: list[int] = []
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.strip().split(",")]
            if len(fields) != _IONOSPHERE_FEATURES + 1:
                raise DatasetFormatError(
                    f"{path}, line {number}: {len(fields)} fields, expected "
                    f"{_IONOSPHERE_FEATURES + 1} (34 numbers then g or b)."
                )
            label = fields[-1].lower()
            if label not in ("g", "b"):
                raise DatasetFormatError(
                    f"{path}, line {number}: label {fields[-1]!r} is not 'g' or 'b'."
                )
            try:
                rows.append([float(f) for f in fields[:-1]])
            except ValueError as exc:
                raise DatasetFormatError(f"{path}, line {number}: {exc}.") from exc
            labels.append(1 if label == "g" else 0)
    if not rows:
        raise DatasetFormatError(f"{path}: no data lines.")
    return np.asarray(rows, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def _load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One of scikit-learn's bundled sets (no network)."""
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError(f"{name} comes with scikit-learn: pip install 'distgrow[data]'.") from exc
    loader = {
        "digits": sklearn.datasets.load_digits,
        "breast_cancer": sklearn.datasets.load_breast_cancer,
        "wine": sklearn.datasets.load_wine,
        "iris": sklearn.datasets.load_iris,
    }[name]
    features, labels = loader(return_X_y=True)
    return np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)


def _synthetic(task: str, samples: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated data, a pure function of the arguments (torch CPU generator).

    Classification: :data:`SYNTHETIC_CLASSES` Gaussian clusters with unit noise around
    random centres of norm 3, classes balanced (``i % 10`` shuffled). Regression: ``x`` ~
    N(0, I), target ``x @ w + 0.1 * noise`` with a random linear teacher ``w`` ~ N(0, I/d)
    (targets of ~unit variance).
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_stream_seed(seed, _STREAM_SYNTHETIC))
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


# ----------------------------------------------------------------------------- entry point


def _check_positive(label: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{label} = {value} must be >= {minimum} (or None for all).")


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    augment: bool = False,
    limit_train: int | None = None,
    limit_val: int | None = None,
    synthetic_samples: int = 2048,
    synthetic_features: int = 20,
) -> DataBundle:
    """Load a data set into memory, split and ready to batch.

    Image sets keep ``uint8`` pixels and normalise per batch with the exact per-channel mean
    and std of their whole training split (computed, not hard-coded: for the real files this
    gives the familiar Fashion-MNIST 0.2860 / 0.3530, MNIST 0.1307 / 0.3081, CIFAR-10
    (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616)). Tabular sets are ``float32``,
    standardised with the training split's statistics.

    Args:
        name: One of :data:`DATASETS` (``-`` is read as ``_``, case ignored).
        root: Where the files are: a folder, or for covtype / ionosphere also the file itself.
            ``None`` uses the default place (Fashion-MNIST: ``/usr/share/datasets/
            fashion-mnist``; covtype: scikit-learn's cache).
        val_fraction: Held-out fraction for sets without an official test split (ignored by
            fashion_mnist, mnist and cifar10, which validate on their test set).
        seed: Seeds the train/validation split, the synthetic data and the augmentation.
        download: Let scikit-learn download covtype (needs network).
        augment: Random crop and flip on the training split of the image sets (cifar10: pad
            4 + flip; fashion_mnist: pad 2 + flip; mnist: pad 2, no flip), a pure function of
            ``(seed, epoch, index)``. Not defined for tabular sets.
        limit_train: Keep only the first k training samples (after the seeded split).
        limit_val: Keep only the first k validation samples.
        synthetic_samples: Samples (train + val) of the synthetic sets.
        synthetic_features: Features of the synthetic sets.

    Returns:
        The :class:`DataBundle`.

    Raises:
        ValueError: Unknown name or an argument out of range.
        DatasetNotFoundError: The files are not there (the message says how to get them).
        DatasetFormatError: A file is there but malformed.
        pickle.UnpicklingError: A CIFAR-10 file asks to load anything but numpy arrays.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}.")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction} must be in (0, 1), e.g. 0.2.")
    _check_positive("limit_train", limit_train)
    _check_positive("limit_val", limit_val)
    _check_positive("synthetic_samples", synthetic_samples, 2)
    _check_positive("synthetic_features", synthetic_features)
    if augment and key not in _AUGMENTATION:
        raise ValueError(
            f"augment=True: no augmentation is defined for {key!r} (only for the image sets "
            f"{', '.join(_AUGMENTATION)}); set data.augment=false."
        )

    def tabular(features: np.ndarray, labels: np.ndarray, num_classes: int) -> DataBundle:
        return _tabular_bundle(
            key,
            features,
            labels,
            num_classes=num_classes,
            val_fraction=val_fraction,
            seed=seed,
            limit_train=limit_train,
            limit_val=limit_val,
        )

    if key in ("fashion_mnist", "mnist", "cifar10"):
        if key == "cifar10":
            train_x, train_y, val_x, val_y = _load_cifar10(root)
        else:
            train_x, train_y, val_x, val_y = _load_idx_dataset(key, root)
        return _image_bundle(
            key,
            train_x,
            train_y,
            val_x,
            val_y,
            num_classes=10,
            augment=augment,
            seed=seed,
            limit_train=limit_train,
            limit_val=limit_val,
        )
    if key == "covtype":
        return tabular(*_load_covtype(root, download), 7)
    if key == "ionosphere":
        return tabular(*_load_ionosphere(root), 2)
    if key in ("digits", "breast_cancer", "wine", "iris"):
        features, labels = _load_sklearn(key)
        return tabular(features, labels, int(labels.max()) + 1)
    task = "classification" if key == "synthetic_classification" else "regression"
    features, labels = _synthetic(task, synthetic_samples, synthetic_features, seed)
    return tabular(features, labels, SYNTHETIC_CLASSES if task == "classification" else 0)
