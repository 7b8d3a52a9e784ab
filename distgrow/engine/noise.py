"""The gradient noise scale measured in your own DDP loop, as ``distgrow train`` measures it.

``growth.mode: adaptive`` and ``growth.noise_cap`` decide from the measured ``B_simple``
(docs/noise.md). ``distgrow train`` measures it with :class:`distgrow.noise_meter.NoiseMeter`;
an own loop on ``torch.nn.parallel.DistributedDataParallel`` uses :class:`DdpNoiseProbe`, which
takes the same two measurements the same way, so :meth:`GrowthSchedule.observe_noise
<distgrow.loop.GrowthSchedule.observe_noise>` decides at the same updates. It is an
:class:`~distgrow.engine.hooks.UpdateHook` of :func:`~distgrow.engine.run_update`::

    probe = DdpNoiseProbe(cfg, ddp)
    for update in schedule.updates():
        run_update(update, loss_of, micro_step=..., hooks=[probe])
        optimizer.step()
        if schedule.step % cfg.growth.adaptive.every == 0:
            schedule.observe_noise(probe.b_simple, probe.measured)

A measured update runs all its micro-steps under ``no_sync()`` and averages the gradients in one
flat all-reduce, taking this rank's and the averaged squared norms on the way (on 2 ranks the
same sums as DDP's buckets, bit for bit: :func:`distgrow.backends.noise_hook.all_reduce_measured`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.nn.parallel import DistributedDataParallel

from distgrow.backends.noise_hook import all_reduce_measured, mean_local_norm
from distgrow.config import Config
from distgrow.engine.hooks import UpdateHook
from distgrow.noise import NoiseScaleEstimator

if TYPE_CHECKING:
    from distgrow.loop import Update

__all__ = ["DdpNoiseProbe"]


class DdpNoiseProbe(UpdateHook):
    """Measures ``B_simple`` over the updates of a DDP loop (2 or more ranks).

    As a hook of :func:`~distgrow.engine.run_update`: a measured update (every ``noise.every``)
    runs its micro-steps under ``no_sync()`` and :meth:`sync` averages the gradients after
    the last backward. Without ``run_update``, do the same by hand with :meth:`measures` and
    :meth:`sync`.

    Args:
        cfg: The config: ``noise.every`` (which updates are measured) and ``noise.ema_decay``.
        model: The ``DistributedDataParallel`` module the loop trains.
    """

    def __init__(self, cfg: Config, model: DistributedDataParallel) -> None:
        self.every = cfg.noise.every
        self.estimator = NoiseScaleEstimator(cfg.noise.ema_decay)
        self._parameters = [p for p in model.module.parameters() if p.requires_grad]
        self._group = model.process_group
        self._device = next(model.module.parameters()).device
        self._measuring = False

    def begin_update(self, update: Update) -> None:
        self._measuring = self.measures(update)

    def holds_sync(self, update: Update) -> bool:
        return self._measuring

    def end_update(self, update: Update) -> None:
        if self._measuring:
            self._measuring = False
            self.sync(update)

    def measures(self, update: Update) -> bool:
        """Whether ``update`` is measured: run its micro-steps under ``no_sync()``, then
        :meth:`sync`."""
        return update.step % self.every == 0

    def sync(self, update: Update) -> None:
        """After the last backward of a measured update, before the optimizer step (and its
        clipping): average the gradients over the ranks and take the measurement (a
        collective: every rank calls it)."""
        local_sq, global_sq = all_reduce_measured(self._parameters, self._group)
        local = sum(int(m.indices.numel()) for m in update.micro_batches)
        small = mean_local_norm(local_sq, local, update.samples, self._group, self._device)
        if small is not None:
            self.estimator.update(small[0], small[1], float(global_sq), float(update.samples))

    @property
    def b_simple(self) -> float | None:
        """The smoothed ``B_simple`` (None until it can be formed)."""
        return self.estimator.b_simple

    @property
    def measured(self) -> int:
        """Updates measured so far."""
        return self.estimator.updates
