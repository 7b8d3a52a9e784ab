"""One update on this rank: its micro-steps, as ``distgrow train`` runs them (on one screen)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from distgrow.engine.hooks import UpdateHook
from distgrow.loop import MicroBatch, Update

__all__ = ["run_update"]


def run_update(
    update: Update,
    loss_of: Callable[[MicroBatch], torch.Tensor],
    *,
    micro_step: Callable[[bool], AbstractContextManager[object]] = lambda sync: nullcontext(),
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    reseed: Callable[[int], object] | None = torch.manual_seed,
    hooks: Sequence[UpdateHook] = (),
) -> torch.Tensor:
    """Forward and backward of this rank's micro-batches of ``update``; no optimizer step.

    Each micro-batch's loss is ``loss_of(micro)``, its *summed* per-sample loss, times
    ``update.loss_scale``: averaged over ranks by the all-reduce and added over micro-steps,
    the gradient is the global batch's mean. The all-reduce runs on the last micro-step only
    (``micro_step(sync)``: e.g. ``nullcontext()`` if sync else ``ddp.no_sync()``), unless a hook
    holds it (:meth:`UpdateHook.holds_sync`). Dropout is reseeded per micro-batch
    (``reseed(micro.seed)``; None for a model that draws nothing at random).

    Args:
        update: From :meth:`GrowthSchedule.updates <distgrow.loop.GrowthSchedule.updates>`.
        loss_of: The summed loss of a micro-batch (an empty one too: zero gradients).
        micro_step: The context of one micro-step, given whether it all-reduces.
        backward: ``loss.backward()``, or the engine's (a loss scaler, DeepSpeed).
        reseed: Seeds the generators dropout draws from.
        hooks: The optional features, called in this order (:mod:`distgrow.engine.hooks`).

    Returns:
        This rank's summed, scaled loss of the update (float64, not synchronised).
    """
    for hook in hooks:
        hook.begin_update(update)
    held = any([hook.holds_sync(update) for hook in hooks])
    last = len(update.micro_batches) - 1
    total: torch.Tensor | None = None
    for k, micro in enumerate(update.micro_batches):
        with micro_step(micro.sync and not held):
            if reseed is not None and micro.seed is not None:
                reseed(micro.seed)
            loss = loss_of(micro) * update.loss_scale
            total = loss.detach().double() if total is None else total + loss.detach()
            if k == last:
                for hook in hooks:
                    hook.before_last_backward(update, total)
            backward(loss)
        for hook in hooks:
            hook.after_micro_step(update, micro)
    for hook in hooks:
        hook.end_update(update)
    assert total is not None  # an update has at least one micro-step
    return total
