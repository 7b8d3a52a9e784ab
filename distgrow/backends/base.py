"""The small interface the trainer talks to; each data-parallel engine implements it.

The trainer never branches on the engine. It asks the backend to wrap the model, to run a
micro-step with or without gradient synchronisation, to step the optimizer, and for the few
collectives it needs (agreeing on a finite loss, validation sums, broadcasting the plateau
decision). Each backend owns its accumulation mechanics: DDP's ``no_sync``, DeepSpeed's
engine boundary, Horovod's ``backward_passes_per_step``.

Loss convention (every backend): the trainer scales each micro-batch's summed loss by
``world_size / samples_in_global_batch``, so that the backend's *mean over ranks* of the
accumulated *sum over micro-steps* is exactly the mean over the global batch. A backend must
neither divide the loss by the accumulation count again (DeepSpeed does by default) nor average
the micro-steps instead of summing them.

State convention: :meth:`Backend.model_state_dict` and :meth:`Backend.optimizer_state_dict`
return what a plain, unwrapped ``torch.optim`` optimizer over the unwrapped model would hold
(engines that partition or wrap the optimizer consolidate it), so that a checkpoint loads at any
world size and under any backend.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal, NoReturn, Protocol, runtime_checkable

import torch
from torch import nn

ReduceOp = Literal["sum", "max", "min"]


class BackendError(RuntimeError):
    """A backend cannot start or cannot do what was asked; the message says how to fix it."""


@runtime_checkable
class Backend(Protocol):
    """A data-parallel engine as the trainer sees it."""

    @property
    def rank(self) -> int:
        """Global rank of this worker."""
        ...

    @property
    def world_size(self) -> int:
        """Number of workers."""
        ...

    @property
    def local_rank(self) -> int:
        """Rank on this node."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the model and batches live."""
        ...

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes files."""
        ...

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap ``model`` (already on :attr:`device`) for data-parallel training.

        Returns:
            The module to call for training forward passes.
        """
        ...

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """Called before the first micro-step of every update with that update's split.

        Engines that count micro-steps themselves (DeepSpeed's batch settings, Horovod's
        ``backward_passes_per_step``) adjust to it here, so a growth event changes the
        accumulation exactly at an update boundary.

        Args:
            micro_batch: Samples per rank per micro-step of a full global batch.
            accum_steps: Micro-steps in this update (the trainer runs exactly this many).
        """
        ...

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """Context around the forward and backward of one micro-batch.

        Args:
            sync: True on the last micro-step of an update (gradients are reduced across
                ranks); False on the others (which do not reduce gradients, except where the
                engine partitions them, as ZeRO-2 does).
        """
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (inside :meth:`micro_step`)."""
        ...

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Apply the reduced gradients (clipping their global norm first), then zero them."""
        ...

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop accumulated gradients without stepping (a skipped update)."""
        ...

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over all ranks in place and return it (identity on one worker)."""
        ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` from rank ``src`` on every rank (picklable; between trusted ranks only)."""
        ...

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        ...

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The unwrapped model's state, as CPU tensors (the same on every rank)."""
        ...

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an unwrapped state (from any world size) into the model."""
        ...

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's full state as ``optimizer.state_dict()`` of an unwrapped optimizer.

        A collective for engines that partition the optimizer: every rank must call it.
        """
        ...

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a full optimizer state (from any world size and backend) on every rank."""
        ...

    def rejoin(self, exit_code: int) -> bool:
        """After training stopped with ``exit_code``: did the job change membership in place?

        True when the engine has re-formed the job with new workers (Horovod Elastic: workers
        joined, the trainer stopped at an update boundary with a checkpoint) and this process
        should resume from that checkpoint at the new world size; False to leave.
        """
        ...

    def shutdown(self, exit_code: int) -> NoReturn:
        """Leave the job and end the process with ``exit_code``.

        Multi-process: destroy the process group, flush stdout/stderr, ``os._exit`` (a normal
        interpreter exit aborts ~15% of gloo jobs, INFRA.md). A single process without a
        process group raises ``SystemExit(exit_code)``, so in-process callers can catch it.
        """
        ...


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot train in (the rule every backend applies).

    fp16 needs a CUDA device (a dynamic loss scaler made for GPU kernels; CPU kernels have no
    fast fp16). bf16 runs on the CPU and on GPUs that support it.

    Raises:
        BackendError: naming the precision, the device and the fix.
    """
    if precision == "fp16" and device.type != "cuda":
        raise BackendError(
            "backend.precision = 'fp16' needs a CUDA device, but this run trains on the CPU. "
            "Fix: set backend.precision=bf16 or fp32."
        )
    # including_emulation=False: a pre-Ampere GPU (V100, T4) passes the default check because
    # torch emulates bf16 there, at a fraction of fp16's speed; refuse it as unsupported.
    if (
        precision == "bf16"
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        raise BackendError(
            f"backend.precision = 'bf16' is not supported natively by "
            f"{torch.cuda.get_device_name(device)} (bf16 needs compute capability 8.0 or newer; "
            "older GPUs only emulate it, slowly). Fix: set backend.precision=fp16 or fp32."
        )
