"""DDP's gradient all-reduce, with the squared norms the noise scale needs taken on the way.

Gray et al. (NeurIPS 2024, arXiv 2411.00999): a communication hook sees each gradient bucket
before the averaging all-reduce (this rank's local gradient) and after it (the global mean), so
both squared norms of :mod:`distgrow.noise` cost two reductions over memory the all-reduce
reads anyway, and no extra collective per bucket. The local norms are averaged over ranks with
one small all-reduce per update (:func:`all_reduce_local_norm`, or ``Backend.all_reduce`` of
:func:`distgrow.noise.pack_local_norm`).

The hook averages exactly as DDP does without a hook: multiply by ``1/world_size``, then sum
(DDP's reducer multiplies while copying into the bucket; ``allreduce_hook`` divides instead,
which rounds differently at world sizes that are not powers of two). Parameters after a step
are therefore bit-identical with and without it.

Only under ``no_sync`` accumulation does the hook see the *whole* update's local gradient: it
runs at the synchronising micro-step, on the gradients summed over all micro-steps, so the
small batch is micro-batch × accumulation steps per rank.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations at registration
# and refuses ``bucket: "dist.GradBucket"`` as a string.
import threading

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distgrow.backends.torch_ddp import Carrier, TorchBackend
from distgrow.noise import pack_local_norm, unpack_local_norms

__all__ = [
    "NoiseHookState",
    "all_reduce_local_norm",
    "all_reduce_measured",
    "attach",
    "mean_local_norm",
    "noise_allreduce_hook",
    "register",
]


class NoiseHookState:
    """Per-parameter squared norms of one update, filled by :func:`noise_allreduce_hook`.

    The norms are kept per parameter and summed in parameter order, not per bucket: DDP
    rebuilds its buckets after the first iteration of each process, so a resumed run groups
    the parameters differently for one update, and per-bucket float32 sums would then round
    differently from the uninterrupted run's. Per parameter, the sums are the same bit for bit.

    Args:
        process_group: The group DDP reduces over (None: the default group).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        # Buckets' futures complete on other threads (gloo's, NCCL's callback thread).
        self._lock = threading.Lock()
        self._local: dict[int, torch.Tensor] = {}
        self._global: dict[int, torch.Tensor] = {}
        self.buckets = 0
        """Buckets seen in this update (DDP's layout: one at first, rebuilt after it)."""
        self.order: dict[int, int] = {}
        """``id(parameter)`` → its index in ``model.parameters()`` (set by :func:`register`)."""
        self.active = True
        """False: the hook only averages (updates that are not measured skip the norms)."""
        self.skip: set[int] = set()
        """``id()`` of DDP's parameters that are not the model's (the trainer's carrier)."""

    def reset(self) -> None:
        """Forget the last update (call before the synchronising micro-step)."""
        with self._lock:
            self._local, self._global, self.buckets = {}, {}, 0

    def _add(self, keys: list[int], norms: list[torch.Tensor], reduced: bool) -> None:
        with self._lock:
            (self._global if reduced else self._local).update(zip(keys, norms, strict=True))
            self.buckets += not reduced

    @staticmethod
    def _sum(norms: dict[int, torch.Tensor]) -> torch.Tensor:
        return torch.stack([norms[k] for k in sorted(norms)]).sum() if norms else torch.zeros(())

    def local_sq_norm(self) -> torch.Tensor:
        """``|g_r|²``: this rank's accumulated gradient before the all-reduce (as DDP saw it)."""
        with self._lock:
            return self._sum(self._local)

    def global_sq_norm(self) -> torch.Tensor:
        """``|G_B|²``: the averaged gradient after the all-reduce (the same on every rank).

        Read after the backward of the synchronising micro-step returned (DDP waits for every
        bucket's future before that).
        """
        with self._lock:
            if len(self._global) != len(self._local):
                raise RuntimeError(
                    f"noise hook: {len(self._global)} of {len(self._local)} gradients reduced; "
                    "read the norms after the synchronising backward has returned."
                )
            return self._sum(self._global)


def _squares(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``|t|²`` of each tensor, in float32."""
    return [n.square() for n in torch._foreach_norm([t.float() for t in tensors])]


def noise_allreduce_hook(
    state: NoiseHookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average a bucket over ranks as DDP does, recording its gradients' squared norms before
    and after."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    active = state.active
    grads: list[torch.Tensor] = []
    keys: list[int] = []
    if active:
        # Views into the buffer, one per parameter; the all-reduce below works in place, so
        # after it they hold the averaged gradients.
        # The trainer's carried numbers (Carrier.band) are not a gradient: left out.
        pairs = [
            (g, state.order.get(id(p), -1 - i))
            for i, (g, p) in enumerate(zip(bucket.gradients(), bucket.parameters(), strict=True))
            if id(p) not in state.skip
        ]
        grads = [g for g, _ in pairs]
        keys = [k for _, k in pairs]
        # Queued before the in-place scaling on the same stream, so it reads the local gradient.
        state._add(keys, _squares(grads), reduced=False)
    buffer.mul_(1.0 / dist.get_world_size(group))
    work = dist.all_reduce(buffer, group=group, async_op=True)

    def finish(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = fut.value()[0]
        if active:
            state._add(keys, _squares(grads), reduced=True)
        return reduced

    return work.get_future().then(finish)


def register(model: DistributedDataParallel, state: NoiseHookState) -> None:
    """Install the hook on a DDP model (once, before the first backward)."""
    carrier = model.module
    state.skip = {id(carrier.band)} if isinstance(carrier, Carrier) else set()
    state.order = {id(p): i for i, p in enumerate(model.parameters()) if id(p) not in state.skip}
    model.register_comm_hook(state, noise_allreduce_hook)


def all_reduce_local_norm(
    state: NoiseHookState, local_samples: int, global_samples: int, device: torch.device
) -> tuple[float, float] | None:
    """``(|G_b|², b)`` over all ranks: one all-reduce of three numbers (a collective).

    Args:
        state: The hook's state after the synchronising backward.
        local_samples: Samples this rank accumulated in the update (0 for an empty share).
        global_samples: Samples in the update over all ranks.
        device: The backend's device (where the collective runs).

    Returns:
        The mean over non-empty ranks of their per-sample mean gradients' squared norms, and
        the harmonic mean of their sample counts; None when fewer than two ranks had samples.
    """
    return mean_local_norm(
        state.local_sq_norm(), local_samples, global_samples, state.process_group, device
    )


def mean_local_norm(
    local_sq_norm: torch.Tensor,
    local_samples: int,
    global_samples: int,
    process_group: dist.ProcessGroup | None,
    device: torch.device,
) -> tuple[float, float] | None:
    """``(|G_b|², b)`` over all ranks from this rank's ``|g_r|²``: one all-reduce of three
    numbers (a collective; see :func:`all_reduce_local_norm`)."""
    group = process_group if process_group is not None else dist.group.WORLD
    packed = pack_local_norm(
        local_sq_norm, local_samples, dist.get_world_size(group), global_samples, device=device
    )
    dist.all_reduce(packed, group=group)
    return unpack_local_norms(packed)


def all_reduce_measured(
    parameters: list[torch.nn.Parameter], process_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the gradients over ranks as DDP does, taking their squared norms before and
    after: for an update whose micro-steps all ran under ``no_sync()``.

    The measured updates synchronise themselves (one flat all-reduce after the backward) so
    that the others keep DDP's own reducer, with no Python hook on the way: on a small model the
    hook's Python per bucket costs more than the norms (docs/noise.md, Cost). The averaging is
    DDP's: multiply by ``1/world_size``, then sum; on 2 ranks a sum of two numbers is the same
    in either order, so the gradients are bit-identical to DDP's; on more ranks the collective
    may add a flat buffer in another order than DDP's buckets (equal to float rounding).
    Norms are per parameter, summed in parameter order (as the hook's).

    Returns:
        ``(|g_r|², |G_B|²)``: this rank's accumulated gradient's squared norm, and the averaged
        gradient's (the same on every rank).
    """
    group = process_group if process_group is not None else dist.group.WORLD
    for p in parameters:
        if p.grad is None:  # DDP's reducer reduces zeros for a parameter without a gradient
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in parameters if p.grad is not None]
    local = torch.stack(_squares(grads)).sum()
    flat = torch._utils._flatten_dense_tensors(grads)
    flat.mul_(1.0 / dist.get_world_size(group))
    dist.all_reduce(flat, group=group)
    for grad, reduced in zip(
        grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True
    ):
        grad.copy_(reduced)
    return local, torch.stack(_squares(grads)).sum()


def attach(
    backend: object, train_model: torch.nn.Module, hook: bool = False
) -> tuple[str, NoiseHookState | None, str]:
    """Where this job's two batch sizes come from, and the hook installed if it needs one.

    Args:
        backend: The started backend.
        train_model: The module the backend returned (DDP under several workers).
        hook: Under DDP, measure with the communication hook on every update's buckets
            (``"hook"``) instead of letting measured updates synchronise themselves
            (``"ddp"``, :func:`all_reduce_measured`; the default: unmeasured updates then cost
            nothing).

    Returns:
        ``(source, hook state, why not)``: ``("ddp", None, "")`` under DDP, or
        ``("hook", state, "")`` with ``hook`` (the hook is registered on ``train_model``);
        ``("micro", None, "")`` for one worker of the torch backend (the micro-batches of an
        accumulated update, :class:`distgrow.noise.MicroStepNorms`); ``("none", None,
        reason)`` otherwise.
    """
    if isinstance(train_model, DistributedDataParallel):
        if not hook:
            return "ddp", None, ""
        state = NoiseHookState(train_model.process_group)
        register(train_model, state)
        return "hook", state, ""
    name = type(backend).__name__
    world = int(getattr(backend, "world_size", 1))
    if isinstance(backend, TorchBackend) and world == 1:
        return "micro", None, ""
    if world == 1:
        return (
            "none",
            None,
            f"the one-worker measurement (from the micro-batches' gradients) is built for "
            f"the torch backend only, not {name}; use backend.name=torch to measure",
        )
    return (
        "none",
        None,
        f"{name} all-reduces each gradient in place inside the engine (Horovod: as soon as it "
        "is ready; DeepSpeed: in its own buckets, partitioned under ZeRO), so no rank's local "
        "gradient is kept to take its norm; measure with backend.name=torch (DDP hook)",
    )
