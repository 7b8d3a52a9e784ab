"""Batch-norm running statistics merged over workers as one worker would have kept them.

Under data parallelism each rank updates its batch-norm running mean/var only from its own
micro-batches, so after a few updates the ranks' buffers differ, and none of them is what one
worker training the same global batches would hold. :class:`RunningStatsMerger` makes every
rank end each update with that single-worker value, so that checkpoints, validation and resumes
do not depend on the world size.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from distgrow.backends import Backend
from distgrow.state import TrainError

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class RunningStatsMerger:
    """Batch-norm running statistics as one worker would have accumulated them.

    Under DDP each rank updates its running mean/var only from its own micro-batches. The
    update of a BN layer with momentum ``m`` is linear: after the ghost chunks ``j = 0..T-1`` of
    one global batch, in global order, ``r = (1-m)^T r0 + Σ_j m (1-m)^(T-1-j) μ_j``. Each rank
    measures its micro-batches' contributions (the change of the buffers, minus the decay of
    the value before), weights them by the decay of the chunks that follow them in global
    order, and one all-reduce sums them: every rank ends with the single-worker value (up to
    float rounding), so checkpoints, validation and resumes do not depend on the world size.
    The number of statistic updates per micro-batch is read from ``num_batches_tracked``, so
    plain and ghost batch norm are handled alike.

    Args:
        model: The unwrapped model.
        backend: For the two all-reduces per update.

    Raises:
        TrainError: a batch-norm layer with ``momentum=None`` (a cumulative average is not
            linear in this way).
    """

    def __init__(self, model: nn.Module, backend: Backend) -> None:
        self.backend = backend
        # (running_mean, running_var, num_batches_tracked, momentum) of each BN layer.
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
        for module in model.modules():
            buffers = [getattr(module, name, None) for name in _BN_BUFFERS]
            if not all(isinstance(b, torch.Tensor) for b in buffers):
                continue
            momentum = getattr(module, "momentum", None)
            if momentum is None:
                raise TrainError(
                    f"{type(module).__name__} has momentum=None (a cumulative average), which "
                    "cannot be merged exactly across workers. Fix: use a batch-norm momentum "
                    "such as 0.1, or train on one worker."
                )
            mean, var, count = (typing.cast(torch.Tensor, b) for b in buffers)
            self.layers.append((mean, var, count, float(momentum)))
        self._start: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        # Per micro-batch: (chunk, [(updates, Δmean, Δvar) per layer]).
        self._parts: list[tuple[int, list[tuple[int, torch.Tensor, torch.Tensor]]]] = []

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        return [
            (
                mean.detach().to(torch.float64, copy=True),
                var.detach().to(torch.float64, copy=True),
                int(count),
            )
            for mean, var, count, _ in self.layers
        ]

    def begin_update(self) -> None:
        """Call before the first micro-batch of an update."""
        self._start = self._before = self._snapshot()
        self._parts = []

    def after_micro_batch(self, chunk: int) -> None:
        """Call after each micro-batch's forward; ``chunk`` is its index in the global batch.

        Micro-batches follow each other with nothing else touching the statistics, so this
        one's end is the next one's start.
        """
        after = self._snapshot()
        parts = []
        for (_, _, _, m), (mean0, var0, count0), (mean1, var1, count1) in zip(
            self.layers, self._before, after, strict=True
        ):
            q = count1 - count0
            decay = (1.0 - m) ** q
            parts.append((q, mean1 - decay * mean0, var1 - decay * var0))
        self._parts.append((chunk, parts))
        self._before = after

    def end_update(self, chunks: int) -> None:
        """Merge over ranks; ``chunks`` = workers × accum_steps of this update."""
        if not self.layers:
            return
        n = len(self.layers)
        device = self.layers[0][0].device
        counts = torch.zeros(n, chunks, dtype=torch.float64, device=device)
        for chunk, parts in self._parts:
            for i, (q, _, _) in enumerate(parts):
                counts[i, chunk] = q
        self.backend.all_reduce(counts, "sum")
        # later[i, k]: statistic updates of layer i in the chunks after chunk k (global order).
        later = counts.flip(1).cumsum(1).flip(1) - counts
        sums = [torch.zeros_like(mean) for mean, _, _ in self._start]
        sums += [torch.zeros_like(var) for _, var, _ in self._start]
        for chunk, parts in self._parts:
            for i, (_, d_mean, d_var) in enumerate(parts):
                weight = (1.0 - self.layers[i][3]) ** float(later[i, chunk])
                sums[i] += weight * d_mean
                sums[n + i] += weight * d_var
        flat = self.backend.all_reduce(torch.cat([t.flatten() for t in sums]), "sum")
        merged = list(flat.split([t.numel() for t in sums]))
        totals = counts.sum(1)
        with torch.no_grad():
            for i, ((mean, var, count, m), (mean0, var0, count0)) in enumerate(
                zip(self.layers, self._start, strict=True)
            ):
                decay = (1.0 - m) ** float(totals[i])
                mean.copy_(decay * mean0 + merged[i].view_as(mean0))
                var.copy_(decay * var0 + merged[n + i].view_as(var0))
                count.fill_(count0 + round(float(totals[i])))
