"""Data-parallel engines behind one small :class:`~distgrow.backends.base.Backend` protocol.

Only the modules in this package import ``torch.distributed``, ``deepspeed`` or ``horovod``;
the trainer picks one by ``backend.name`` through :func:`make_backend` and never branches on it.

======================  ==============================  =====================================
``backend.name``        module                          accumulation mechanics
======================  ==============================  =====================================
``torch``               :mod:`.torch_ddp`               DDP ``no_sync()``
``fsdp``                :mod:`.fsdp_backend`            ``set_requires_gradient_sync(False)``
``deepspeed``           :mod:`.deepspeed_backend`       the engine's accumulation boundary
``horovod``             :mod:`.horovod_backend`         ``backward_passes_per_step``
======================  ==============================  =====================================

The DeepSpeed and Horovod modules are imported only when chosen (they import their engines
lazily too), so a machine without them runs the torch backend.
"""

from __future__ import annotations

from distgrow.backends.base import Backend, BackendError, ReduceOp
from distgrow.config import Config
from distgrow.runtime import Runtime

__all__ = ["Backend", "BackendError", "ReduceOp", "make_backend"]


def make_backend(cfg: Config, runtime: Runtime) -> Backend:
    """Start the backend named by ``cfg.backend.name`` for this worker.

    Args:
        cfg: The whole config (DeepSpeed builds its config from ``optim`` and ``growth`` too).
        runtime: This worker's rank and rendezvous (:func:`distgrow.runtime.detect_runtime`).

    Returns:
        A started backend (process group or Horovod initialised).

    Raises:
        BackendError: an engine that is not installed or cannot start; the message says how
            to fix it.
    """
    name = cfg.backend.name
    # Imported here so that `distgrow plan` and the config never load torch.distributed.
    if name == "torch":
        from distgrow.backends.torch_ddp import TorchBackend

        return TorchBackend(cfg.backend, runtime, device=cfg.run.device)
    if name == "fsdp":
        from distgrow.backends.fsdp_backend import FSDPBackend

        return FSDPBackend(cfg, runtime)
    if name == "deepspeed":
        from distgrow.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(cfg, runtime)
    if name == "horovod":
        from distgrow.backends.horovod_backend import HorovodBackend

        return HorovodBackend(cfg, runtime)
    raise BackendError(
        f"backend.name = {name!r} is unknown. Fix: use torch, fsdp, deepspeed or horovod."
    )
