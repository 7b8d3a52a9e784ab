"""Data-parallel engines behind one small :class:`~distgrow.backends.base.Backend` protocol.

Only the modules in this package import ``torch.distributed`` (or, later, ``deepspeed`` and
``horovod``); the trainer picks one by ``backend.name`` through :func:`make_backend` and never
branches on it.
"""

from __future__ import annotations

from distgrow.backends.base import Backend, BackendError, ReduceOp
from distgrow.config import BackendConfig, RunConfig
from distgrow.runtime import Runtime

__all__ = ["Backend", "BackendError", "ReduceOp", "make_backend"]

# Backends the config accepts that this version does not ship yet.
_LATER = {
    "deepspeed": "the DeepSpeed backend",
    "horovod": "the Horovod backend",
}


def make_backend(cfg: BackendConfig, runtime: Runtime, run: RunConfig) -> Backend:
    """Start the backend named by ``cfg.name`` for this worker.

    Args:
        cfg: The ``backend`` section.
        runtime: This worker's rank and rendezvous (:func:`distgrow.runtime.detect_runtime`).
        run: The ``run`` section (``run.device``).

    Returns:
        A started backend (process group initialised when ``world_size > 1``).

    Raises:
        BackendError: an engine this version does not ship, or one that cannot start.
    """
    if cfg.name == "torch":
        # Imported here so that `distgrow plan` and the config never load torch.distributed.
        from distgrow.backends.torch_ddp import TorchBackend

        return TorchBackend(cfg, runtime, device=run.device)
    if cfg.name in _LATER:
        raise BackendError(
            f"backend.name = {cfg.name!r}: {_LATER[cfg.name]} is not implemented yet in this "
            "version of distgrow. Fix: use backend.name=torch (DDP over gloo or NCCL)."
        )
    raise BackendError(f"backend.name = {cfg.name!r} is unknown. Fix: use backend.name=torch.")
