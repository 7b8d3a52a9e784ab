"""Out of CUDA memory in an update: run it again at a smaller micro-batch, same global batch.

An update is ``workers × micro_batch × accum_steps`` samples; halving the micro-batch and
doubling the accumulation runs the same samples through the same update (the gradient is the
same sum, up to the order of the additions). :class:`OomFallback` wraps the trainer's
``train_step``: on ``torch.cuda.OutOfMemoryError`` it drops the partial gradients of the failed
update, restores the batch-norm buffers its forward passes moved, empties the CUDA cache, logs
an ``oom_fallback`` event and runs the update again at the smaller split; later updates keep
the micro-batch at or below the one that fitted (a ceiling), so the error is paid once.

When it is on (``run.oom_fallback``; null: the torch backend on one worker with in-memory
data): several workers would have to agree that one of them ran out, and DDP's reducer cannot
be rewound after a failed backward; DeepSpeed and Horovod count micro-steps inside the engine;
a ``DataLoader`` feed reads ahead in the planned micro-batches. An error raised once the
optimizer step began is never retried (the parameters may be half updated).

The split arithmetic (:func:`smaller_split`, :func:`within_ceiling`) is pure.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from distgrow.planner import Setting, Split

OOM_EVENT = "oom_fallback"


def smaller_split(split: Split, multiple: int) -> Split | None:
    """The split with the micro-batch divided by its smallest factor that keeps it a multiple
    of ``multiple`` (2 for even micro-batches) and the accumulation multiplied by it; None when
    the micro-batch cannot shrink (it is ``multiple`` already, or has no such factor)."""
    micro = split.micro_batch
    for d in range(2, micro // multiple + 1):
        if micro % d == 0 and (micro // d) % multiple == 0:
            return replace(split, micro_batch=micro // d, accum_steps=split.accum_steps * d)
    return None


def within_ceiling(split: Split, ceiling: int | None, multiple: int) -> Split:
    """``split`` shrunk (as :func:`smaller_split` does) until its micro-batch is at most
    ``ceiling``; unchanged when it already is (or no ceiling is set)."""
    while ceiling is not None and split.micro_batch > ceiling:
        smaller = smaller_split(split, multiple)
        if smaller is None:
            break
        split = smaller
    return split


def fallback_wanted(
    setting: bool | None, backend_name: str, world_size: int, device_type: str, loader_feed: bool
) -> bool:
    """``run.oom_fallback`` resolved: null is on for one CUDA worker of the torch backend with
    in-memory data (see the module's docstring for why not elsewhere)."""
    if setting is not None:
        return setting
    return device_type == "cuda" and backend_name == "torch" and world_size == 1 and not loader_feed


class OomFallback:
    """Runs updates, retrying one that ran out of CUDA memory at a smaller micro-batch.

    Args:
        enabled: From :func:`fallback_wanted`; off, :meth:`run` only calls the step.
        model: The unwrapped model (its batch-norm buffers are restored after a failure).
        optimizer: The optimizer (a step pre-hook tells whether the step began).
        drop_gradients: Zeroes the accumulated gradients (the backend's ``zero_grad``).
        multiple: Micro-batches stay multiples of this (the ghost batch).
        log_event: ``(event, setting, **extra)``: the trainer's metrics record.
        say: A line for rank 0's console.
    """

    def __init__(
        self,
        enabled: bool,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        drop_gradients: Callable[[], None],
        multiple: int,
        log_event: Callable[..., None],
        say: Callable[[str], None],
    ) -> None:
        self.enabled = enabled
        self.model = model
        self.drop_gradients = drop_gradients
        self.multiple = multiple
        self.log_event = log_event
        self.say = say
        self.ceiling: int | None = None  # the largest micro-batch known to fit
        self.retries = 0
        self._steps_begun = 0
        if enabled:
            optimizer.register_step_pre_hook(self._count_step)

    def _count_step(self, *args: Any) -> None:
        del args
        self._steps_begun += 1

    def run(
        self,
        step: Callable[[torch.Tensor, Setting], float],
        indices: torch.Tensor,
        setting: Setting,
    ) -> tuple[float, Setting]:
        """``step(indices, setting)`` at the largest split that fits; returns its loss and the
        setting it ran with (the planned one unless memory ran out, now or before).

        Raises:
            torch.cuda.OutOfMemoryError: when off, when the optimizer step had begun, or when
                the micro-batch cannot shrink further.
        """
        if not self.enabled:
            return step(indices, setting), setting
        split = within_ceiling(setting.split, self.ceiling, self.multiple)
        if split != setting.split:
            setting = replace(setting, split=split)
        while True:
            buffers = self._buffers()
            begun = self._steps_begun
            try:
                return step(indices, setting), setting
            except torch.cuda.OutOfMemoryError as err:
                smaller = smaller_split(setting.split, self.multiple)
                if self._steps_begun != begun or smaller is None:
                    raise
                error = str(err).splitlines()[0] if str(err) else "CUDA out of memory"
            # Out of the except block: its traceback, which holds the failed forward's tensors,
            # is gone, so the cache can give their memory back.
            self._recover(buffers)
            self.retries += 1
            self.ceiling = smaller.micro_batch
            self.log_event(
                OOM_EVENT,
                setting,
                error=error,
                previous=asdict(setting.split),
                retry=asdict(smaller),
            )
            self.say(
                f"out of CUDA memory at micro-batch {setting.split.micro_batch}: running the "
                f"update again as {smaller} (the same {smaller.global_batch} samples), and "
                f"keeping micro-batches at most {smaller.micro_batch} (run.oom_fallback)"
            )
            setting = replace(setting, split=smaller)

    def _buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Copies of the buffers a training forward moves (batch-norm statistics)."""
        buffers = [b for b in self.model.buffers() if b.numel()]
        return [(b, b.detach().clone()) for b in buffers] if buffers else None

    def _recover(self, buffers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Undo the failed update's partial work and give its memory back."""
        self.drop_gradients()
        if buffers is not None:
            with torch.no_grad():
                for live, saved in buffers:
                    live.copy_(saved)
        gc.collect()  # reference cycles of the failed forward
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
