"""PyTorch DistributedDataParallel: gloo on CPU, NCCL on CUDA devices.

One worker runs without a process group (no rendezvous, no collectives). Several workers join
the ``env://`` rendezvous that :mod:`distgrow.runtime` exported, and the model is wrapped in
DDP; accumulation skips the all-reduce on non-boundary micro-steps with ``no_sync()``.

DDP does not sync buffers at each forward: batch-norm running statistics are merged by the
trainer exactly as one worker would have computed them (see ``distgrow.trainer``), instead of
being overwritten by rank 0's at every forward.

Mixed precision (``backend.precision``: ``bf16`` or ``fp16``) is ``torch.autocast`` around the
training forward, as DeepSpeed's ``torch_autocast`` does it: the weights, the optimizer and the
checkpoints stay float32, so a run resumes under any backend and precision. The forward's
floating outputs come back as float32, so the loss is computed in float32. fp16 adds a dynamic
``GradScaler``: every micro-step of an update is scaled by the same power of two and the sum is
unscaled once before clipping and the step, so accumulation stays exact; its state is saved
with the optimizer's.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map

from distgrow.backends.base import BackendError, ReduceOp, check_precision
from distgrow.config import BackendConfig
from distgrow.devices import check_distinct_gpus, gpu_identity, select_device
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


def resolve_device(
    requested: str, local_rank: int, local_world: int = 1, env: Mapping[str, str] | None = None
) -> torch.device:
    """The device for ``run.device`` (``auto``, ``cpu``, ``cuda``) on this local rank: the one
    rule of :func:`distgrow.devices.select_device` (every backend uses it).

    Raises:
        DeviceError: CUDA asked for (or GPUs present under ``auto``) that torch cannot use, or
            more ranks on the node than visible GPUs.
    """
    return select_device(requested, local_rank, local_world, env)


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
        # The group's own backend: DeepSpeed runs its collectives (on CUDA tensors) on it.
        dist.init_process_group(backend=dist_backend, store=dist.HashStore(), rank=0, world_size=1)
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


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# The optimizer state's key for the fp16 loss scaler (torch's optimizers ignore unknown keys, so
# any backend loads such a checkpoint).
SCALER_KEY = "grad_scaler"


class AutocastModule(nn.Module):
    """Runs the wrapped module's forward under ``torch.autocast``; float outputs as float32.

    The wrapper holds no parameters of its own: its state dict is the wrapped module's under
    ``module.``, and the backends save the wrapped module directly.

    Args:
        module: The model (float32 weights).
        device_type: ``cpu`` or ``cuda``.
        dtype: ``torch.bfloat16`` or ``torch.float16``.
    """

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        # The loss (the user's too) then runs in float32, as autocast itself would run it.
        return tree_map(_to_float32, out)


CARRIED = 3
"""Numbers one update can carry in DDP's gradient all-reduce (:class:`Carrier`): the trainer's
loss sum, stop votes and checkpoint votes."""


class Carrier(nn.Module):
    """The model under DDP, with one small parameter whose gradient carries a few numbers.

    ``band`` (:data:`CARRIED` float32 zeros) is never updated or saved. At the synchronising
    micro-step the backend adds ``band · values`` to the loss it backpropagates: a term
    of value 0 that changes no other gradient, whose gradient with respect to ``band`` is
    ``values``. DDP reduces ``band.grad`` in its first bucket with the last layers' gradients,
    so after the backward every rank holds ``values`` averaged over ranks, with no collective
    of its own (:meth:`TorchBackend.carry`).

    Under FSDP (:class:`~distgrow.backends.fsdp_backend.FSDPBackend`) the band holds ``copies``
    (the world size) rows of :data:`CARRIED` numbers, one row per rank's shard: every rank's
    gradient repeats its values in each row, so the reduce-scatter leaves each rank the average
    in its own row.

    Args:
        module: The model (or its autocast wrapper).
        device: Where the model's parameters are.
        copies: Rows of :data:`CARRIED` numbers (1 under DDP; the world size under FSDP).
    """

    def __init__(self, module: nn.Module, device: torch.device, copies: int = 1) -> None:
        super().__init__()
        self.inner = module
        self.band = nn.Parameter(torch.zeros(CARRIED * copies, device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _to_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    return value


def autocast_model(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """``model`` itself for fp32, else wrapped in :class:`AutocastModule`."""
    if precision == "fp32":
        return model
    return AutocastModule(model, device.type, _DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


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

    def check_distinct_gpus(self) -> None:
        """On CUDA, several ranks: refuse two ranks on one GPU (a collective, every rank).

        Raises:
            DeviceError: naming the two ranks and the GPU.
        """
        if not self._distributed or self._device.type != "cuda":
            return
        identities: list[Any] = [None] * self.world_size
        dist.all_gather_object(identities, gpu_identity(self._device))
        check_distinct_gpus(identities)

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


class AsyncReducer(ProcessGroupMember):
    """A :class:`ProcessGroupMember` that can also start an all-reduce and wait later, and
    whose gradient reduction can carry the trainer's agreement (:meth:`carry`): the engines
    whose gradient reduction is torch's own, DDP and FSDP."""

    # Set by the engine: its Carrier when the gradients carry the agreement, whether the
    # current micro-step reduces them, and what that micro-step's backward carries.
    _carrier: Carrier | None = None
    _synced: bool = False
    _carry: torch.Tensor | None = None

    def carry(self, values: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """Let ``values`` (:data:`CARRIED` numbers) ride this micro-step's gradient reduction
        (DDP's all-reduce, FSDP's reduce-scatter: the engine's ``backward`` adds them).

        Call inside the synchronising micro-step, before its ``backward``. Returns the
        function that gives their sum over ranks (float64) once that backward has returned, or
        None where nothing can carry them (one process, FSDP in bf16, a micro-step that does
        not reduce): all-reduce them then. The carried sum is float32 arithmetic (the engine's
        averaging): exact for counts below 2**24, a float32 rounding of a loss.
        """
        if self._carrier is None or not self._synced or values.numel() != CARRIED:
            return None
        self._carry = values.detach().reshape(CARRIED).to(torch.float32)
        return self._carried

    def _reduced_band(self) -> nn.Parameter:
        """The parameter whose gradient holds the carried numbers after the backward."""
        raise NotImplementedError

    def _carried(self) -> torch.Tensor:
        band = self._reduced_band()
        grad, band.grad = band.grad, None
        if grad is None:
            raise RuntimeError(
                f"{type(self).__name__}.carry: read before the synchronising backward."
            )
        if isinstance(grad, DTensor):  # FSDP: this rank's row of the sharded band
            with torch.no_grad():  # to_local is then the tensor itself, not an autograd op
                grad = grad.to_local()
        return grad.to(torch.float64) * self.world_size  # the engine averaged it

    def all_reduce_async(
        self, tensor: torch.Tensor, op: ReduceOp = "sum"
    ) -> Callable[[], torch.Tensor]:
        """Start :meth:`all_reduce`; the function returned waits for it and gives the result.

        Where the gradients cannot carry the trainer's per-update agreement (FSDP; DDP's
        :meth:`TorchBackend.carry` for a measured noise-scale update, extras), the trainer
        starts that all-reduce before the backward, so that it runs while the gradients are
        reduced instead of after them (every rank issues the two in the same order). DDP and
        FSDP only: Horovod and DeepSpeed reduce their own way.
        """
        if not self._distributed:
            return lambda: tensor
        comm = tensor if self.dist_backend != "nccl" else tensor.to(self._device)
        work = dist.all_reduce(comm, op=_OPS[op], async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            if comm is not tensor:
                tensor.copy_(comm)
            return tensor

        return wait


class TorchBackend(AsyncReducer):
    """:class:`~distgrow.backends.base.Backend` over ``torch.distributed`` and DDP.

    Args:
        cfg: The ``backend`` section (``dist_backend``, ``precision``).
        runtime: This worker's rank, world size and rendezvous.
        device: ``run.device``: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        BackendError: an unsupported precision or device, or a failed rendezvous.
    """

    def __init__(self, cfg: BackendConfig, runtime: Runtime, device: str = "auto") -> None:
        resolved = resolve_device(device, runtime.local_rank, runtime.local_world_size)
        check_precision(cfg.precision, resolved)
        super().__init__(runtime, resolved, resolve_dist_backend(cfg.dist_backend, resolved))
        self.precision = cfg.precision
        self.scaler = grad_scaler(cfg.precision, resolved)
        self._module: nn.Module | None = None
        self._ddp: DistributedDataParallel | None = None
        self._carrier: Carrier | None = None
        self._synced = False  # the current micro-step is DDP's synchronising one
        self._carry: torch.Tensor | None = None  # what its backward carries (carry())
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._owns_group = join_process_group(runtime, self.dist_backend)
        self.check_distinct_gpus()

    # -- training ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Wrap ``model`` for autocast (bf16/fp16) and in DDP when there are several workers."""
        del optimizer  # DDP leaves the optimizer alone; other engines wrap it
        self._module = model
        wrapped = autocast_model(model, self.precision, self._device)
        if not self._distributed:
            return wrapped
        device_ids = [self._device.index] if self._device.type == "cuda" else None
        self._carrier = Carrier(wrapped, self._device)
        self._ddp = DistributedDataParallel(
            self._carrier, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC
        )
        return self._ddp

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """Nothing to set: ``no_sync()`` on all but the last micro-step is the accumulation."""
        del micro_batch, accum_steps

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """``no_sync()`` on non-boundary micro-steps, so they do not all-reduce."""
        self._synced = self._ddp is not None and sync
        if self._ddp is not None and not sync:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def _reduced_band(self) -> nn.Parameter:
        return self._require_carrier().band  # DDP reduces it in place

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss if self.scaler is None else self.scaler.scale(loss)
        if self._synced and self._carrier is not None:
            # DDP reduces every parameter at the synchronising backward: the band always gets
            # a gradient (zeros when nothing rides), added after the loss scale so it is exact.
            band = self._carrier.band
            band.grad = None
            values, self._carry = self._carry, None
            # (band is zeros and never stepped: band.detach() carries zeros)
            scaled = scaled + torch.dot(band, values if values is not None else band.detach())
        scaled.backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Clip and step; under fp16, unscale first and skip a step whose gradients overflowed."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # the reduced sum, once: clipping sees true norms
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._require_module().parameters(), grad_clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()  # the scale changes only here, between updates
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
        """The optimizer's own state dict (DDP replicates it), with fp16's loss scaler."""
        state = optimizer.state_dict()
        if self.scaler is not None:
            state[SCALER_KEY] = self.scaler.state_dict()
        return state

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a state from any backend; a saved loss scaler resumes only under fp16."""
        state = dict(state)
        scaler_state = state.pop(SCALER_KEY, None)
        optimizer.load_state_dict(state)
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    def _require_carrier(self) -> Carrier:
        if self._carrier is None:
            raise BackendError("the backend carries nothing: it runs no DDP model.")
        return self._carrier

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise BackendError("the backend has no model yet: call setup(model, optimizer) first.")
        return self._module
