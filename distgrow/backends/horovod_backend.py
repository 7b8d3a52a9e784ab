"""Horovod: ``hvd.DistributedOptimizer`` behind the same protocol, exact across batch growth.

Horovod runs its own controller (Gloo or MPI): under ``horovodrun``, ``mpirun`` or
``srun --mpi=pmix`` the ranks come from ``hvd.init()``, not from a ``torch.distributed``
rendezvous, and every collective the trainer needs goes through Horovod.

Accumulation is Horovod's own: ``backward_passes_per_step`` is set to the update's
accumulation count before its first micro-step (:meth:`HorovodBackend.begin_update`), so the
gradient hooks accumulate locally and start the all-reduce during the last backward pass. The
reduced gradient is the rank *average* (``op=hvd.Average``) of each rank's *sum* over its
micro-steps (Horovod sums them, INFRA.md), which is exactly the trainer's loss convention (see
:mod:`distgrow.backends.base`): the loss is not divided again. A growth event changes the count
at an update boundary, so it is exact too.

Parameters are broadcast from rank 0 at setup. A resume needs no broadcast of its own: the
trainer hands every rank the checkpoint rank 0 read (``broadcast_object``), so each loads the
same model and optimizer state. (``hvd.broadcast_optimizer_state`` would also initialise an
empty state with a dummy step, which moves the weights under weight decay and counts a step in
Adam.)

Horovod Elastic (``horovodrun --min-np/--max-np --host-discovery-script``, which ``distgrow
launch`` builds for ``launch.elastic=true``): when the driver reports new slots, the backend
sends this process a SIGTERM, so the trainer stops after the update in progress (every rank
after the same one) and checkpoints, as for any stop signal (:mod:`distgrow.signals`). Then
:meth:`HorovodBackend.rejoin` re-forms the job (``hvd.shutdown()``/``hvd.init()``, what
``hvd.elastic.run`` does on a reset) and the trainer resumes from that checkpoint at the new
world size in the same process, while the new workers start and resume from it too. Workers
that leave (a failure) are not handled in place: the job fails and ``distgrow launch`` restarts
it from the newest checkpoint (``launch.max_restarts``).

Mixed precision is the torch backend's (:mod:`distgrow.backends.torch_ddp`): autocast around
the forward, float32 weights and checkpoints; under fp16 the loss scaler unscales the reduced
gradients after ``synchronize()`` and steps inside ``skip_synchronize()``, as Horovod's AMP
example does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from contextlib import AbstractContextManager
from typing import Any, NoReturn

import torch
from torch import nn

from distgrow.backends.base import BackendError, ReduceOp, check_precision
from distgrow.backends.torch_ddp import (
    SCALER_KEY,
    autocast_model,
    grad_scaler,
    resolve_device,
)
from distgrow.config import Config
from distgrow.devices import check_distinct_gpus, gpu_identity
from distgrow.runtime import Runtime, finalize_mpi
from distgrow.signals import exit_status


def _import_horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as err:
        raise BackendError(
            f"backend.name = 'horovod' but horovod.torch cannot be imported ({err}). Fix: "
            "bash launchers/install_horovod.sh (Horovod 0.28.1 needs a C++17 fix to build "
            "against torch >= 2.1; the script applies it), or set backend.name=torch."
        ) from err
    return hvd


def check_cuda_build(hvd: Any, device: torch.device) -> None:
    """Refuse CUDA training with a Horovod built without CUDA and NCCL.

    Such a build fails at the first broadcast of a CUDA tensor ("Requested ReadyEvent with GPU
    device but not compiled with CUDA"); say so at start-up instead, in one line.

    Raises:
        BackendError: ``device`` is CUDA and ``hvd.cuda_built()`` or ``hvd.nccl_built()`` is
            false.
    """
    if device.type != "cuda":
        return
    missing = [name for name in ("cuda_built", "nccl_built") if not getattr(hvd, name)()]
    if missing:
        raise BackendError(
            f"this run trains on {device}, but Horovod was built without CUDA/NCCL "
            f"(hvd.{'(), hvd.'.join(missing)}() is false), so it cannot reduce CUDA tensors. "
            "Fix: rebuild it where CUDA is present (bash launchers/install_horovod.sh builds "
            "with HOROVOD_GPU_OPERATIONS=NCCL), or set backend.name=torch or run.device=cpu."
        )


class HorovodBackend:
    """:class:`~distgrow.backends.base.Backend` over Horovod (Gloo or MPI controller).

    Args:
        cfg: The whole config (``backend``, ``run.device``).
        runtime: The launcher's view of this worker; Horovod's own ranks win where they
            differ (``horovodrun --gloo`` sets only ``HOROVOD_*`` variables).

    Raises:
        BackendError: Horovod missing, a precision this device cannot train in, or ranks that
            disagree.
    """

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        # The device's kind is known before Horovod starts: refuse fp16 on the CPU first.
        check_precision(cfg.backend.precision, resolve_device(cfg.run.device, 0))
        self.precision = cfg.backend.precision
        self._hvd = _import_horovod()
        self._hvd.init()
        self._elastic = os.environ.get("HOROVOD_ELASTIC") == "1"
        self._joined = threading.Event()  # set by Horovod's notification thread
        if self._elastic:
            self._listen_for_new_workers()
        elif runtime.launcher != "none" and (
            runtime.world_size != self._hvd.size() or runtime.rank != self._hvd.rank()
        ):
            raise BackendError(
                f"the {runtime.launcher} variables say rank {runtime.rank} of "
                f"{runtime.world_size}, Horovod says {self._hvd.rank()} of {self._hvd.size()}. "
                "Fix: start Horovod jobs with horovodrun, mpirun or srun --mpi=pmix, one "
                "process per slot."
            )
        self._device = resolve_device(
            cfg.run.device, int(self._hvd.local_rank()), int(self._hvd.local_size())
        )
        check_cuda_build(self._hvd, self._device)
        if self._device.type == "cuda" and self.world_size > 1:
            check_distinct_gpus(self._hvd.allgather_object(gpu_identity(self._device)))
        self.scaler = grad_scaler(self.precision, self._device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._module: nn.Module | None = None
        self._optimizer: Any = None  # hvd.DistributedOptimizer around the trainer's optimizer

    # -- identity ------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def world_size(self) -> int:
        return int(self._hvd.size())

    @property
    def local_rank(self) -> int:
        return int(self._hvd.local_rank())

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- training ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Broadcast rank 0's parameters; wrap ``optimizer`` in ``hvd.DistributedOptimizer``.

        The wrapper shares the trainer's param-group dicts (so the learning rate and momentum
        the trainer sets are the ones used) but keeps its own state: the backend steps, saves
        and loads through it.
        """
        hvd = self._hvd
        self._module = model
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self._optimizer = hvd.DistributedOptimizer(
            optimizer,
            named_parameters=model.named_parameters(),
            backward_passes_per_step=1,
            op=hvd.Average,
        )
        return autocast_model(model, self.precision, self._device)

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """``backward_passes_per_step = accum_steps``: the hooks reduce on the last pass."""
        del micro_batch
        self._require_optimizer().set_backward_passes_per_step(accum_steps)

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """Nothing to do: the count set in :meth:`begin_update` decides when to reduce."""
        del sync
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Wait for the all-reduces, clip the reduced gradients, step, zero them."""
        del optimizer
        wrapped = self._require_optimizer()
        wrapped.synchronize()
        if self.scaler is not None:
            self.scaler.unscale_(wrapped)  # the reduced gradients, once
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._require_module().parameters(), grad_clip)
        with wrapped.skip_synchronize():
            if self.scaler is None:
                wrapped.step()
            else:
                self.scaler.step(wrapped)  # skipped when the gradients overflowed
                self.scaler.update()
        wrapped.zero_grad()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop an update (non-finite loss): finish its all-reduces, then zero the gradients."""
        del optimizer
        wrapped = self._require_optimizer()
        wrapped.synchronize()  # outstanding handles must complete on every rank
        wrapped.zero_grad()

    # -- collectives ---------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        hvd = self._hvd
        ops = {"sum": hvd.Sum, "max": hvd.Max, "min": hvd.Min}
        tensor.copy_(hvd.allreduce(tensor, op=ops[op]))
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        return self._hvd.broadcast_object(obj, root_rank=src)

    def barrier(self) -> None:
        if self.world_size > 1:
            self._hvd.barrier()

    # -- state ---------------------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            name: value.detach().to("cpu", copy=True)
            for name, value in self._require_module().state_dict().items()
        }

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        module = self._require_module()
        module.load_state_dict(state)  # the same state on every rank (Trainer.open_run)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The wrapper's state (it holds the momentum buffers, not the trainer's optimizer),
        with fp16's loss scaler."""
        del optimizer
        state = dict(self._require_optimizer().state_dict())
        if self.scaler is not None:
            state[SCALER_KEY] = self.scaler.state_dict()
        return state

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        del optimizer
        wrapped = self._require_optimizer()
        state = dict(state)
        scaler_state = state.pop(SCALER_KEY, None)
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        # torch's load_state_dict replaces the param-group dicts: copy the loaded values into
        # the ones the trainer's optimizer shares, so its per-update LR keeps reaching them.
        shared = list(wrapped.param_groups)
        wrapped.load_state_dict(state)
        for mine, loaded in zip(shared, wrapped.param_groups, strict=True):
            mine.update(loaded)
        wrapped.param_groups = shared

    # -- Horovod Elastic -----------------------------------------------------------------------

    def _listen_for_new_workers(self) -> None:
        from horovod.common.elastic import notification_manager

        notification_manager.init()  # the driver's messages arrive on a thread of its own
        notification_manager.register_listener(self)

    def on_hosts_updated(self, timestamp: int, update_res: Any) -> None:
        """Horovod's notification thread: the driver found other slots (workers to add).

        A SIGTERM to this process is the trainer's way in: it stops after the current update,
        agreed with the other ranks, and checkpoints; :meth:`rejoin` takes it from there.
        """
        del timestamp, update_res
        if not self._joined.is_set():
            self._joined.set()
            os.kill(os.getpid(), signal.SIGTERM)

    def rejoin(self, exit_code: int) -> bool:
        """Horovod Elastic: re-form the job with the workers that joined (see the module doc).

        Returns:
            True when the trainer stopped for new workers and the job was re-formed: resume
            from the checkpoint just written at :attr:`world_size`.
        """
        if not (self._elastic and self._joined.is_set()):
            return False
        if exit_code != exit_status(signal.SIGTERM):
            return False  # it stopped for another reason (an error): leave
        before = self.world_size
        self._hvd.shutdown()
        self._hvd.init()  # the new rendezvous round, with the workers that joined
        self._joined.clear()
        self._module = self._optimizer = None
        if self.is_main:
            print(
                f"distgrow: Horovod Elastic: {before} -> {self.world_size} workers; resuming "
                "from the checkpoint just written",
                file=sys.stderr,
                flush=True,
            )
        return True

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise BackendError("the backend has no model yet: call setup(model, optimizer) first.")
        return self._module

    def _require_optimizer(self) -> Any:
        if self._optimizer is None:
            raise BackendError("the backend has no optimizer yet: call setup(model, optimizer).")
        return self._optimizer

    def shutdown(self, exit_code: int) -> NoReturn:
        """Shut Horovod down and end the process (``os._exit`` when several ranks ran)."""
        distributed = self.world_size > 1
        with contextlib.suppress(Exception):  # a peer that is already gone must not hang us
            self._hvd.shutdown()
        finalize_mpi()  # when mpi4py, not Horovod, initialised MPI (distgrow.runtime)
        sys.stdout.flush()
        sys.stderr.flush()
        if distributed:
            os._exit(exit_code)
        raise SystemExit(exit_code)
