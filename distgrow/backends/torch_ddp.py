"""PyTorch DistributedDataParallel: gloo on CPU, NCCL on CUDA devices.

One worker runs without a process group (no rendezvous, no collectives). Several workers join
the ``env://`` rendezvous that :mod:`distgrow.runtime` exported, and the model is wrapped in
DDP; accumulation skips the all-reduce on non-boundary micro-steps with ``no_sync()``.

DDP does not sync buffers at each forward: batch-norm running statistics are merged by the
trainer exactly as one worker would have computed them (see ``distgrow.trainer``), instead of
being overwritten by rank 0's at every forward.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys
from contextlib import AbstractContextManager
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distgrow.backends.base import BackendError, ReduceOp
from distgrow.config import BackendConfig
from distgrow.runtime import Runtime, finalize_mpi

# Long enough for rank 0 to write a large checkpoint while the others wait at a barrier.
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

# Buffers are synced once at construction, never at each forward (the trainer merges batch-norm
# statistics itself). torch 2.13 renamed the switch; older versions only have the first name.
_NO_FORWARD_BUFFER_SYNC: dict[str, Any] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """The device for ``run.device`` (``auto``, ``cpu``, ``cuda``) on this local rank.

    Raises:
        BackendError: ``cuda`` was asked for but no CUDA device is visible.
    """
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BackendError(
            "run.device = 'cuda' but torch sees no CUDA device (torch "
            f"{torch.__version__}). Fix: set run.device=cpu or run.device=auto."
        )
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def resolve_dist_backend(requested: str, device: torch.device) -> str:
    """The process-group backend: ``auto`` is NCCL on CUDA and gloo on the CPU.

    Raises:
        BackendError: NCCL was asked for on the CPU.
    """
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise BackendError(
            "backend.dist_backend = 'nccl' needs CUDA devices, but this run trains on the CPU. "
            "Fix: set backend.dist_backend=gloo (or auto)."
        )
    return requested


def join_process_group(runtime: Runtime, dist_backend: str, single: bool = False) -> bool:
    """Join this job's ``env://`` process group.

    Args:
        runtime: This worker's place in the job.
        dist_backend: ``gloo`` or ``nccl``.
        single: Also create a group of one (in memory, no rendezvous) for a single worker;
            engines such as DeepSpeed need a process group even then.

    Returns:
        True when this call created a process group (the caller destroys it at shutdown).

    Raises:
        BackendError: the rendezvous failed; the message names the address and the fix.
    """
    if runtime.world_size <= 1:
        if not single or dist.is_initialized():
            return False
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        return True
    try:
        dist.init_process_group(
            backend=dist_backend,
            init_method="env://",
            rank=runtime.rank,
            world_size=runtime.world_size,
            timeout=_COLLECTIVE_TIMEOUT,
        )
    except Exception as err:  # rendezvous failures come as several exception types
        raise BackendError(
            f"rank {runtime.rank}/{runtime.world_size} could not join the "
            f"{dist_backend} process group at {runtime.master_addr}:"
            f"{runtime.master_port}: {err}. Fix: check MASTER_ADDR/MASTER_PORT and that "
            "every worker was started (on CPU, GLOO_SOCKET_IFNAME=lo may help)."
        ) from err
    return True


class ProcessGroupMember:
    """Identity, collectives and shutdown over ``torch.distributed`` (gloo or NCCL).

    Shared by the engines that run on a ``torch.distributed`` process group (DDP here,
    DeepSpeed): the collectives the trainer needs do not depend on how the model is wrapped.

    Args:
        runtime: This worker's rank, world size and rendezvous.
        device: The resolved device.
        dist_backend: ``gloo`` or ``nccl`` (see :func:`resolve_dist_backend`).
    """

    def __init__(self, runtime: Runtime, device: torch.device, dist_backend: str) -> None:
        self._runtime = runtime
        self._device = device
        self.dist_backend = dist_backend
        self._owns_group = False  # set by the subclass that joins (or creates) the group

    # -- identity ------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self._runtime.rank

    @property
    def world_size(self) -> int:
        return self._runtime.world_size

    @property
    def local_rank(self) -> int:
        return self._runtime.local_rank

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_main(self) -> bool:
        return self._runtime.rank == 0

    @property
    def _distributed(self) -> bool:
        # This backend's own job, not whatever process group the interpreter holds.
        return self._runtime.world_size > 1

    # -- collectives ---------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        if not self._distributed:
            return tensor
        # NCCL reduces only CUDA tensors, gloo handles both: move when needed, copy back.
        comm = tensor if self.dist_backend != "nccl" else tensor.to(self._device)
        dist.all_reduce(comm, op=_OPS[op])
        if comm is not tensor:
            tensor.copy_(comm)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if not self._distributed:
            return
        if self.dist_backend == "nccl":
            dist.barrier(device_ids=[self._device.index])
        else:
            dist.barrier()

    def rejoin(self, exit_code: int) -> bool:
        """Never: a ``torch.distributed`` group cannot change membership in place (torchrun's
        elastic mode restarts the workers instead)."""
        del exit_code
        return False

    def shutdown(self, exit_code: int) -> NoReturn:
        """End the process (see :meth:`distgrow.backends.base.Backend.shutdown`)."""
        distributed = self._distributed
        if self._owns_group and dist.is_initialized():
            with contextlib.suppress(Exception):  # a peer that is already gone must not hang us
                dist.destroy_process_group()
        finalize_mpi()  # only if distgrow.runtime asked MPI for the ranks
        sys.stdout.flush()
        sys.stderr.flush()
        if distributed:
            os._exit(exit_code)
        raise SystemExit(exit_code)


class TorchBackend(ProcessGroupMember):
    """:class:`~distgrow.backends.base.Backend` over ``torch.distributed`` and DDP.

    Args:
        cfg: The ``backend`` section (``dist_backend``, ``precision``).
        runtime: This worker's rank, world size and rendezvous.
        device: ``run.device``: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        BackendError: an unsupported precision or device, or a failed rendezvous.
    """

    def __init__(self, cfg: BackendConfig, runtime: Runtime, device: str = "auto") -> None:
        if cfg.precision != "fp32":
            raise BackendError(
                f"backend.precision = {cfg.precision!r} is not implemented yet in the torch "
                "backend. Fix: set backend.precision=fp32 (or use backend.name=deepspeed)."
            )
        resolved = resolve_device(device, runtime.local_rank)
        super().__init__(runtime, resolved, resolve_dist_backend(cfg.dist_backend, resolved))
        self._module: nn.Module | None = None
        self._ddp: DistributedDataParallel | None = None
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._owns_group = join_process_group(runtime, self.dist_backend)

    # -- training ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap ``model`` in DDP when there are several workers (else return it as it is)."""
        del optimizer  # DDP leaves the optimizer alone; other engines wrap it
        self._module = model
        if not self._distributed:
            return model
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        self._ddp = DistributedDataParallel(model, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)
        return self._ddp

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """Nothing to set: ``no_sync()`` on all but the last micro-step is the accumulation."""
        del micro_batch, accum_steps

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """``no_sync()`` on non-boundary micro-steps, so they do not all-reduce."""
        if self._ddp is not None and not sync:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._require_module().parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- state ---------------------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            name: value.detach().to("cpu", copy=True)
            for name, value in self._require_module().state_dict().items()
        }

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._require_module().load_state_dict(state)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's own state dict: DDP replicates it on every rank."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        optimizer.load_state_dict(state)

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise BackendError("the backend has no model yet: call setup(model, optimizer) first.")
        return self._module
