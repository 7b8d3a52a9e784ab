"""The optional features of an update, plugged into :func:`distgrow.engine.run_update`.

An :class:`UpdateHook` is called at five points of an update, each hook in the order of the
list given to ``run_update`` (``end_update`` too):

1. ``begin_update(update)``: before the first micro-step;
2. ``holds_sync(update)``: True when the hook synchronises this update's gradients itself (all
   micro-steps then run without the all-reduce);
3. ``before_last_backward(update, total)``: in the last micro-step, after its forward, before
   its backward (``total``: the update's summed, scaled loss on this rank);
4. ``after_micro_step(update, micro)``: after each micro-step's backward;
5. ``end_update(update)``: after the last backward, before the optimizer step.

``distgrow train`` plugs in, in this order: the batch-norm merge (:class:`BatchNormMergeHook`),
the noise meter (:class:`NoiseMeterHook`) and the per-update agreement
(:class:`AgreementHook`).

The one wrapper, outside all five points: the OOM retry (:class:`distgrow.oom.OomFallback`,
``oom.run(train_step, indices, setting)``) wraps the whole update: the hyperparameters,
``run_update`` with these hooks, the agreement's answer and the optimizer step. A hook cannot
be it: a retry runs the update again, from the top. When a micro-step runs out of CUDA memory
before the optimizer step began, it drops the gradients, restores the batch-norm buffers and
calls the step again at a smaller split: every hook then sees ``begin_update`` anew and one
whole update at that split (so a hook keeps nothing of an attempt past ``begin_update``). It is
on only where no collective can be half done (one worker; :func:`distgrow.oom.fallback_wanted`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from distgrow.agreement import Agreement
    from distgrow.bn_merge import RunningStatsMerger
    from distgrow.loop import MicroBatch, Update
    from distgrow.noise_meter import NoiseMeter

__all__ = ["AgreementHook", "BatchNormMergeHook", "NoiseMeterHook", "UpdateHook"]


class UpdateHook:
    """Does nothing at each point: subclass and override what a feature needs."""

    def begin_update(self, update: Update) -> None:
        del update

    def holds_sync(self, update: Update) -> bool:
        del update
        return False

    def before_last_backward(self, update: Update, total: torch.Tensor) -> None:
        del update, total

    def after_micro_step(self, update: Update, micro: MicroBatch) -> None:
        del update, micro

    def end_update(self, update: Update) -> None:
        del update


class BatchNormMergeHook(UpdateHook):
    """Batch-norm running statistics of all ranks merged as one worker would have them."""

    def __init__(self, merger: RunningStatsMerger) -> None:
        self.merger = merger

    def begin_update(self, update: Update) -> None:
        self.merger.begin_update()

    def after_micro_step(self, update: Update, micro: MicroBatch) -> None:
        self.merger.after_micro_batch(micro.chunk)

    def end_update(self, update: Update) -> None:
        self.merger.end_update(update.workers * update.accum_steps)


class NoiseMeterHook(UpdateHook):
    """The gradient noise scale (``noise.measure``); under DDP a measured update syncs itself."""

    def __init__(self, meter: NoiseMeter) -> None:
        self.meter = meter

    def begin_update(self, update: Update) -> None:
        self.meter.begin_update(update.step, update.accum_steps, update.global_batch)

    def holds_sync(self, update: Update) -> bool:
        return self.meter.syncs_itself

    def after_micro_step(self, update: Update, micro: MicroBatch) -> None:
        self.meter.after_micro_step(int(micro.indices.numel()))

    def end_update(self, update: Update) -> None:
        local = sum(int(m.indices.numel()) for m in update.micro_batches)
        self.meter.end_update(local, update.samples)


class AgreementHook(UpdateHook):
    """The ranks' agreement (the loss, a stop, a checkpoint), started with the last backward."""

    def __init__(self, agreement: Agreement, wants_checkpoint: Callable[[], bool]) -> None:
        self.agreement = agreement
        self.wants_checkpoint = wants_checkpoint

    def before_last_backward(self, update: Update, total: torch.Tensor) -> None:
        self.agreement.start(total, wants_checkpoint=self.wants_checkpoint())
