"""The world-size-invariant global sample order, and the seeds everything random hangs from.

The order in which samples are consumed never depends on how a global batch is realised
(METHOD.md §6): :func:`epoch_permutation` gives one permutation per epoch from ``(seed,
epoch)`` alone, the trainer cuts it into global batches, and :func:`shard_global_batch` cuts a
global batch into the micro-batches of one rank, strided over ranks.

:func:`splitmix64` is the one 64-bit mixer of the package (the augmentation's per-sample hash,
the split and synthetic-data seeds, the trainer's micro-batch seed all use it).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

__all__ = [
    "MASK64",
    "STREAM_SPLIT",
    "STREAM_SYNTHETIC",
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
    generator.manual_seed(seed64(seed * 1_000_003 + epoch))
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
