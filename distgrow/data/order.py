"""The world-size-invariant global sample order, and the seeds everything random hangs from.

The order in which samples are consumed never depends on how a global batch is realised
(METHOD.md §6): :func:`epoch_permutation` gives one permutation per epoch from ``(seed,
epoch)`` alone, the trainer cuts it into global batches, and :func:`shard_global_batch` cuts a
global batch into the micro-batches of one rank, strided over ranks.

:func:`splitmix64` is the one 64-bit mixer of the package (the augmentation's per-sample hash,
the split and synthetic-data seeds, the trainer's micro-batch seed all use it).

An epoch's order is a ``torch.randperm`` of the samples while that is cheap; above
:data:`ON_THE_FLY_MIN_SAMPLES` samples, and for token data (``data.name: tokens``) at any size,
it is a :class:`FeistelPermutation`: a seeded bijection of ``0 .. n-1`` whose entries are
computed when a global batch asks for them, O(1) memory and O(batch) time per rank instead of
O(n) (10^9 windows: 8 GB and tens of seconds of ``randperm`` per epoch on every rank).
"""

from __future__ import annotations

import math
from typing import Protocol, overload

import numpy as np
import torch

__all__ = [
    "MASK64",
    "ON_THE_FLY_MIN_SAMPLES",
    "STREAM_SPLIT",
    "STREAM_SYNTHETIC",
    "FeistelPermutation",
    "epoch_order",
    "epoch_permutation",
    "seed64",
    "shard_global_batch",
    "shard_split",
    "splitmix64",
    "stream_seed",
]

MASK64 = (1 << 64) - 1

# Per-purpose constants hashed into a seed by stream_seed (see there).
STREAM_SPLIT = 1
STREAM_SYNTHETIC = 2


def seed64(seed: int) -> int:
    """An arbitrary Python int as an unsigned 64-bit seed (negative seeds wrap, as in C)."""
    return seed & MASK64


def splitmix64(value: int) -> int:
    """The splitmix64 finaliser: a well-mixed 64-bit hash of one 64-bit integer."""
    z = (value + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, stream: int) -> int:
    """A generator seed for one purpose (split, synthetic data), decorrelated from the others.

    Without this, seed 0's validation split and epoch 0's permutation would both come from
    ``manual_seed(0)``; hashing in a per-purpose constant keeps the streams independent.
    """
    return splitmix64(seed64(seed) ^ splitmix64(stream)) & ((1 << 63) - 1)


ON_THE_FLY_MIN_SAMPLES = 1 << 24
"""From this many samples (16,777,216: a 128 MiB ``randperm`` per rank per epoch) on, every
data set's epoch order is a :class:`FeistelPermutation` computed on the fly."""

FEISTEL_ROUNDS = 6
"""Rounds of the Feistel network (4 already give a pseudo-random permutation with a random
round function; 6 leave a margin for splitmix64 standing in for one)."""


def _mix(values: np.ndarray) -> np.ndarray:
    """:func:`splitmix64` of each ``uint64`` in ``values`` (numpy wraps uint64 products)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A seeded permutation of ``range(n)`` computed entry by entry, never held in memory.

    A balanced Feistel network of :data:`FEISTEL_ROUNDS` rounds permutes ``range(4**h)``, the
    smallest power of 4 at least ``n`` (so under ``4 n``); its round function is
    :func:`splitmix64` of the right half xor a per-round key hashed from ``(seed, epoch)``. An
    entry that lands at or past ``n`` is sent through the network again (cycle walking) until it
    lands inside: the walk stays on the cycle of its start, so the result is a bijection of
    ``range(n)``, and under 4 rounds are expected per entry. Everything is a pure function of
    ``(n, seed, epoch, position)``: the same on every rank, in every process, at any world size.

    ``perm[a:b]`` is an ``int64`` tensor of the entries at positions ``a .. b-1`` (clipped to
    ``n``), as slicing the ``randperm`` tensor gives; ``perm[i]`` one entry.
    """

    def __init__(self, n: int, seed: int, epoch: int) -> None:
        if n < 0:
            raise ValueError(f"FeistelPermutation: n = {n} must be >= 0 (the number of samples).")
        self.n = n
        self.half_bits = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        base = splitmix64(seed64(seed * 1_000_003 + epoch) ^ 0xFE15_7E1)
        self._keys = [np.uint64(splitmix64(base + r)) for r in range(FEISTEL_ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def _network(self, x: np.ndarray) -> np.ndarray:
        bits = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> bits, x & mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << bits) | right

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The entries at ``positions`` (each in ``0 .. n-1``), as ``int64``."""
        out = self._network(positions.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._network(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)

    @overload
    def __getitem__(self, key: slice) -> torch.Tensor: ...

    @overload
    def __getitem__(self, key: int) -> int: ...

    def __getitem__(self, key: slice | int) -> torch.Tensor | int:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.n)
            return torch.from_numpy(self.at(np.arange(start, stop, step, dtype=np.int64)))
        index = key + self.n if key < 0 else key
        if not 0 <= index < self.n:
            raise IndexError(f"position {key} is out of range for a permutation of {self.n}.")
        return int(self.at(np.array([index], dtype=np.int64))[0])


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The whole sample order of one epoch as a tensor (``torch.randperm``).

    A permutation of ``range(n)`` drawn by a CPU ``torch.Generator`` seeded with
    ``seed * 1_000_003 + epoch`` (taken modulo 2**64), so it depends only on ``(seed, epoch)``
    and is the same on every rank and in every process, whatever the world size. Training
    asks :func:`epoch_order`, which gives this below :data:`ON_THE_FLY_MIN_SAMPLES`.

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
    generator.manual_seed(seed64(seed * 1_000_003 + epoch))
    return torch.randperm(n, generator=generator, dtype=torch.long)


def epoch_order(
    n: int, seed: int, epoch: int, *, on_the_fly: bool = False
) -> torch.Tensor | FeistelPermutation:
    """The global sample order of one epoch, as training slices it into global batches.

    :func:`epoch_permutation` below :data:`ON_THE_FLY_MIN_SAMPLES` samples without
    ``on_the_fly``; otherwise the :class:`FeistelPermutation` of the same ``(n, seed, epoch)``,
    sliced like the tensor. Either depends only on ``(seed, epoch)``: the same on every rank
    and in every process, whatever the world size.

    Args:
        n: Number of samples (>= 0).
        seed: Run seed.
        epoch: Epoch number.
        on_the_fly: Compute the order on the fly whatever ``n`` (token data does).

    Raises:
        ValueError: ``n`` is negative.
    """
    if on_the_fly or n >= ON_THE_FLY_MIN_SAMPLES:
        return FeistelPermutation(n, seed, epoch)
    return epoch_permutation(n, seed, epoch)


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


class SplitShape(Protocol):
    """How a global batch is split: a :class:`~distgrow.planner.Split` or a ``Setting``."""

    @property
    def workers(self) -> int: ...

    @property
    def micro_batch(self) -> int: ...

    @property
    def accum_steps(self) -> int: ...


def shard_split(
    indices: torch.Tensor, split: SplitShape, *, rank: int, align: int = 1
) -> list[torch.Tensor]:
    """:func:`shard_global_batch` with the workers, micro-batch and accumulation of ``split``."""
    return shard_global_batch(
        indices,
        workers=split.workers,
        micro_batch=split.micro_batch,
        accum_steps=split.accum_steps,
        rank=rank,
        align=align,
    )


def micro_batch_seed(seed: int, epoch: int, first_index: int) -> int:
    """The RNG seed of a micro-batch: a hash of (run seed, epoch, its first sample's index).

    Dropout masks then depend on which samples are processed, not on the rank, the world size
    or the accumulation step that processes them (the trainer and :mod:`distgrow.loop` both
    seed each micro-batch with it).
    """
    value = 0
    for part in (seed, epoch, first_index):
        value = splitmix64(value ^ (part & 0xFFFFFFFFFFFFFFFF))
    return value & 0x7FFFFFFFFFFFFFFF
