"""What the readers hand over and the trainer batches from: the data errors, the in-memory
data set, the data set read sample by sample, and the bundle of their splits."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.data import Dataset

__all__ = [
    "TRANSFORMED_COPY_MAX_BYTES",
    "ArrayDataset",
    "BatchTransform",
    "DataBundle",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "LoaderDataset",
    "TensorSamples",
    "UnsafePickleError",
    "to_device",
]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied from the host without blocking it.

    A host tensor bound for a GPU is pinned first (page-locked, from torch's caching host
    allocator, which reuses a block only after the copy reading it has finished): a copy from
    ordinary memory makes the host wait for it. A tensor already there is returned as it is.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where they were looked for.

    The message names every path looked at and how to get the data (Debian package, URL to
    download by hand, or ``data.download=true`` for covtype).
    """


class DatasetFormatError(ValueError):
    """A data file exists but is not in the expected format (truncated, wrong shape, ...).

    The message names the file, what was expected and what was found.
    """


class UnsafePickleError(DatasetFormatError, pickle.UnpicklingError):
    """A pickled data file asks for something other than plain numeric numpy arrays.

    Refused before anything it names is imported or called. It is a
    :class:`DatasetFormatError` (a data problem: ``distgrow train`` exits 2 with one line)
    and still an ``UnpicklingError`` for callers that catch the pickle family.
    """


class BatchTransform(Protocol):
    """A per-batch transform of the stored features.

    It receives the stored rows, the sample indices they came from and the epoch, so that any
    randomness can be a pure function of ``(seed, epoch, index)``. The indices are on the host
    (where the loop cuts them) whatever device the rows are on: a transform computes what it
    needs from them there and copies it over with :func:`to_device`, so it never waits for a GPU.

    A transform may declare ``pointwise = True`` (a class attribute): each output row is a
    function of its stored row alone, not of the index, the epoch or the other rows (image
    normalisation, not augmentation). :class:`ArrayDataset` may then transform the whole set
    once and batch from that copy (:data:`TRANSFORMED_COPY_MAX_BYTES`): the same values.
    (Not a protocol member: a transform without it is not pointwise.)
    """

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        """Transform the rows ``x`` of samples ``indices`` in ``epoch``."""
        ...


# ArrayDataset keeps its whole set transformed (normalised float32 images: 4 bytes per stored
# uint8 pixel) when the transform is pointwise and the copy takes at most this many bytes: a
# batch is then one gather, as in a hand-written loop over a ready tensor, instead of a gather
# and four passes of normalisation per batch (~7 % of a batch-128 MLP update, docs/speed.md).
# Fashion-MNIST's copy is 188 MB per process; CIFAR-10's would be 614 MB (but augmentation,
# which is not pointwise, usually runs there).
TRANSFORMED_COPY_MAX_BYTES = 1 << 30


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
    # The whole set transformed (a pointwise transform within the budget); False: not kept.
    _transformed: torch.Tensor | bool | None = field(
        default=None, init=False, repr=False, compare=False
    )

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
        # The index arithmetic runs where the indices are (the host, in training), and the
        # result crosses to the data once, pinned and without blocking.
        idx = indices.to(dtype=torch.long)
        # Negative indices count from the end; make them absolute so that sample n-1 is
        # augmented the same way whether it is asked for as n-1 or as -1.
        idx = torch.where(idx < 0, idx + len(self), idx)
        here = to_device(idx, self.x.device)
        transformed = self.transformed()
        if transformed is not None:
            x = transformed[here]
        else:
            x = self.x[here]
            if self.transform is not None:
                x = self.transform(x, idx, epoch)
        return x, self.y[here if self.y.device == self.x.device else to_device(idx, self.y.device)]

    def transformed(self) -> torch.Tensor | None:
        """The whole set transformed, made on first use, or None where it is not kept.

        Kept when the transform is pointwise (see :class:`BatchTransform`) and the copy fits
        :data:`TRANSFORMED_COPY_MAX_BYTES`. It is made in chunks with the same transform, so
        its rows are bit for bit what a per-batch transform gives.
        """
        if self._transformed is None:
            made = self._transform_all()
            self._transformed = False if made is None else made
        return self._transformed if isinstance(self._transformed, torch.Tensor) else None

    def _transform_all(self) -> torch.Tensor | None:
        transform = self.transform
        if transform is None or not getattr(transform, "pointwise", False) or not len(self):
            return None
        first = transform(self.x[:1], torch.zeros(1, dtype=torch.long), 0)
        if len(self) * first[0].numel() * first.element_size() > TRANSFORMED_COPY_MAX_BYTES:
            return None
        out = torch.empty((len(self), *first.shape[1:]), dtype=first.dtype, device=first.device)
        chunk = 4096  # bounds the temporaries of the transform
        for start in range(0, len(self), chunk):
            rows = torch.arange(start, min(start + chunk, len(self)))
            out[start : start + len(rows)] = transform(self.x[start : start + len(rows)], rows, 0)
        return out


class TensorSamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Tensors as a map-style ``Dataset``: ``samples[i]`` is ``(x[i], y[i])``.

    What ``data.feed=loader`` reads an in-memory set through (to check that the loader path
    trains exactly like indexing, and to measure what the loader costs).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


@dataclass
class LoaderDataset:
    """Samples read one at a time: decoded from files on demand, never all in memory.

    Training reads it through a ``torch.utils.data.DataLoader`` with worker processes
    (:mod:`distgrow.data.feed`); :meth:`batch` reads in this process (validation, and the
    micro-batches a loader did not prefetch). The transform runs on whole batches of the
    stored samples, as for :class:`ArrayDataset`, so a sample reads the same either way.

    Attributes:
        samples: Map-style data set: ``samples[i]`` is ``(x, y)`` of sample ``i``, with ``x`` as
            stored (``uint8 (C, H, W)`` pixels for images) and ``y`` a 0-d label tensor.
        y: The labels of all samples (known without decoding: the class folders).
        transform: Applied to each batch of stored ``x`` (see :class:`BatchTransform`).
    """

    samples: Dataset[tuple[torch.Tensor, torch.Tensor]]
    y: torch.Tensor
    transform: BatchTransform | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def read(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(x, y)`` of ``indices``, read here one by one and stacked."""
        idx = [int(i) % len(self) for i in indices.tolist()]
        rows: list[Any] = [self.samples[i] for i in (idx or [0])]
        x = torch.stack([r[0] for r in rows])
        y = torch.stack([torch.as_tensor(r[1]) for r in rows])
        return (x, y) if idx else (x[:0], y[:0])

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`ArrayDataset.batch`, reading the samples in this process."""
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            raise ValueError(
                f"indices must be a 1-D integer tensor, got dtype {indices.dtype} and shape "
                f"{tuple(indices.shape)}; pass e.g. torch.tensor([0, 5, 7])."
            )
        idx = indices.to(torch.long)
        idx = torch.where(idx < 0, idx + len(self), idx)
        x, y = self.read(idx)
        if self.transform is not None:
            x = self.transform(x, idx, epoch)
        return x, y


@dataclass
class DataBundle:
    """A data set ready for training: its splits and what a model needs to know about it.

    Attributes:
        name: Canonical name (one of :data:`distgrow.data.DATASETS`).
        train: Training split (augmented if requested); a :class:`LoaderDataset` when it is read
            through a ``DataLoader`` (``data.feed``).
        val: Validation split (the official test set where one exists); never augmented.
        input_shape: Per-sample shape the model sees, e.g. ``(1, 28, 28)`` or ``(54,)``.
        num_classes: Number of classes; 0 for regression.
        task: ``"classification"`` or ``"regression"``.
    """

    name: str
    train: ArrayDataset | LoaderDataset
    val: ArrayDataset | LoaderDataset
    input_shape: tuple[int, ...]
    num_classes: int
    task: str
