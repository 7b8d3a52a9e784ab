"""Out of CUDA memory in an update: run it again at a smaller micro-batch, same global batch.

An update is ``workers × micro_batch × accum_steps`` samples; halving the micro-batch and
doubling the accumulation runs the same samples through the same update (the gradient is the
same sum, up to the order of the additions). :class:`OomFallback` wraps the trainer's
``train_step`` (the one wrapper around :func:`distgrow.engine.run_update` and its hooks; its
place in their order: :mod:`distgrow.engine.hooks`): on ``torch.cuda.OutOfMemoryError`` (or
a cuBLAS/cuDNN allocation failure, :func:`is_oom`) it drops the partial gradients of the failed
update, restores the batch-norm buffers its forward passes moved, empties the CUDA cache, logs
an ``oom_fallback`` event and runs the update again at the smaller split; later updates keep
the micro-batch at or below the one that fitted (a ceiling), so the error is paid once; the
ceiling goes into the checkpoint, so a relaunch does not pay it again.

When it is on (``run.oom_fallback``; null: the torch backend on one worker with in-memory
data; ``true`` on several workers is refused): several workers would have to agree that one
of them ran out, and DDP's reducer cannot be rewound after a failed backward; DeepSpeed and
Horovod count micro-steps inside the engine; a ``DataLoader`` feed reads ahead in the planned
micro-batches. An error raised once the optimizer step began is never retried (the
parameters may be half updated).

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
from distgrow.state import TrainError

OOM_EVENT = "oom_fallback"

# How libraries below torch say they ran out of device memory: cuBLAS and cuDNN allocate their
# workspaces themselves and raise a plain RuntimeError, not torch.cuda.OutOfMemoryError.
_OOM_MESSAGES = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` says the device ran out of memory: torch's own error, or a cuBLAS or
    cuDNN allocation failure (a ``RuntimeError`` naming its status)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)


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
    in-memory data (see the module's docstring for why not elsewhere).

    Raises:
        TrainError: ``true`` on several workers: a rank that retries alone would leave the
            others waiting in a collective of the update it abandoned.
    """
    if setting and world_size > 1:
        raise TrainError(
            f"run.oom_fallback = true on {world_size} workers: one rank cannot retry an update "
            "while the others wait in its gradient all-reduce. Fix: set run.oom_fallback=null "
            "(off on several workers), or lower growth.max_micro_batch (distgrow probe measures "
            "what fits)."
        )
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

    def state_dict(self) -> dict[str, Any]:
        """The micro-batch ceiling, for the checkpoint: a relaunch keeps below it."""
        return {"ceiling": self.ceiling}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a checkpoint's ceiling (absent in checkpoints before it was recorded)."""
        ceiling = state.get("ceiling")
        self.ceiling = None if ceiling is None else int(ceiling)

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
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
                smaller = smaller_split(setting.split, self.multiple)
                if not is_oom(err) or self._steps_begun != begun or smaller is None:
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
