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

# (running means, running variances, num_batches_tracked of every layer stacked), float64
# copies taken between micro-batches.
_Snapshot = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]


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
        # Everything below stays on the buffers' device: the host never waits for a value
        # (no int()/float() of a count or weight), so the merge costs no host-device sync.
        device = self.layers[0][0].device if self.layers else torch.device("cpu")
        # 1 - momentum per layer: a statistic update multiplies the value before by it.
        self._keep = torch.tensor(
            [1.0 - m for _, _, _, m in self.layers], dtype=torch.float64, device=device
        )
        self._start: _Snapshot = ([], [], self._keep)
        self._before: _Snapshot = self._start
        # Per micro-batch: (chunk, updates per layer, [Δmean per layer], [Δvar per layer]).
        self._parts: list[tuple[int, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]] = []

    def _snapshot(self) -> _Snapshot:
        means = [mean.detach().to(torch.float64, copy=True) for mean, _, _, _ in self.layers]
        variances = [var.detach().to(torch.float64, copy=True) for _, var, _, _ in self.layers]
        counts = torch.stack([count.detach() for _, _, count, _ in self.layers])
        return means, variances, counts

    def begin_update(self) -> None:
        """Call before the first micro-batch of an update."""
        if not self.layers:
            return
        self._start = self._before = self._snapshot()
        self._parts = []

    def after_micro_batch(self, chunk: int) -> None:
        """Call after each micro-batch's forward; ``chunk`` is its index in the global batch.

        Micro-batches follow each other with nothing else touching the statistics, so this
        one's end is the next one's start.
        """
        if not self.layers:
            return
        after = self._snapshot()
        (means0, vars0, counts0), (means1, vars1, counts1) = self._before, after
        updates = (counts1 - counts0).to(torch.float64)
        decay = self._keep.pow(updates)
        d_means = [means1[i] - decay[i] * means0[i] for i in range(len(self.layers))]
        d_vars = [vars1[i] - decay[i] * vars0[i] for i in range(len(self.layers))]
        self._parts.append((chunk, updates, d_means, d_vars))
        self._before = after

    def end_update(self, chunks: int) -> None:
        """Merge over ranks; ``chunks`` = workers × accum_steps of this update."""
        if not self.layers:
            return
        n = len(self.layers)
        counts = torch.zeros(n, chunks, dtype=torch.float64, device=self._keep.device)
        for chunk, updates, _, _ in self._parts:
            counts[:, chunk] = updates
        self.backend.all_reduce(counts, "sum")
        # later[i, k]: statistic updates of layer i in the chunks after chunk k (global order).
        later = counts.flip(1).cumsum(1).flip(1) - counts
        weights = self._keep[:, None].pow(later)  # (layers, chunks)
        means0, vars0, counts0 = self._start
        sums = [torch.zeros_like(mean) for mean in means0] + [torch.zeros_like(v) for v in vars0]
        for chunk, _, d_means, d_vars in self._parts:
            for i in range(n):
                sums[i] += weights[i, chunk] * d_means[i]
                sums[n + i] += weights[i, chunk] * d_vars[i]
        flat = self.backend.all_reduce(torch.cat([t.flatten() for t in sums]), "sum")
        merged = list(flat.split([t.numel() for t in sums]))
        totals = counts.sum(1)
        decays = self._keep.pow(totals)
        new_counts = counts0 + totals.round().to(counts0.dtype)
        with torch.no_grad():
            for i, (mean, var, count, _) in enumerate(self.layers):
                mean.copy_(decays[i] * means0[i] + merged[i].view_as(means0[i]))
                var.copy_(decays[i] * vars0[i] + merged[n + i].view_as(vars0[i]))
                count.copy_(new_counts[i])
