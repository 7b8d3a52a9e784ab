"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
state sharded over the ranks, for models whose replicas do not fit one device.

For batch purposes FSDP is data parallelism: every rank trains on its own micro-batches and the
gradients are averaged over the ranks (reduce-scattered, each rank keeping its shard), so the
whole of distgrow's growth (workers, micro-batch, accumulation, the hybrid) applies unchanged.

Sharding rule (:func:`shard_units`): a model that defines ``fsdp_units()`` (an own model's
entry point may) is sharded per module it returns; the built-in transformer per block, the
wide ResNets and torchvision ResNets per residual block; every other model (the MLPs, the small
CNN) as one unit. The root is sharded last, always: it holds what no unit does (embeddings,
heads, norms). One unit is gathered at a time in the forward and backward, so peak memory is
the shards plus the largest unit.

Precision: ``bf16`` is FSDP's ``MixedPrecisionPolicy`` (parameters gathered and gradients
reduced in bfloat16, the sharded weights and the optimizer in float32; outputs come back
float32, so the loss is float32 as under DDP). ``fp32`` reduces in float32. ``fp16`` is refused
(it needs a loss scaler over sharded gradients).

Accumulation: ``set_requires_gradient_sync(False)`` on non-final micro-steps (the gradients
accumulate unsharded, unreduced), ``True`` on the last one, which reduce-scatters their sum.
FSDP averages over ranks as DDP does, so the loss convention of
:mod:`distgrow.backends.base` holds as it is.

The trainer's per-update agreement (loss sum, stop and checkpoint votes) rides the root's
reduce-scatter, as it rides DDP's all-reduce (:meth:`FSDPBackend.carry`): on several ranks in
fp32 the model is wrapped in a :class:`~distgrow.backends.torch_ddp.Carrier` whose band (one
row of 3 numbers per rank) is sharded with the root, so the update runs no collective of its
own. A separate all-reduce was measured at 5-8 % of a 2-rank CPU update at batch 640
(docs/speed.md). Under bf16 the band would be reduced in bfloat16 (a loss to 3 digits): there
the numbers keep their own float64 all-reduce, started before the backward.

Checkpoints are sharded (:mod:`distgrow.backends.sharded_state`): each rank writes its shards
with ``torch.distributed.checkpoint``, which reshards on load at any world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from distgrow.backends.base import BackendError, check_precision
from distgrow.backends.sharded_state import fqn_keyed, id_keyed, parameter_names
from distgrow.backends.torch_ddp import (
    CARRIED,
    SCALER_KEY,
    AsyncReducer,
    Carrier,
    join_process_group,
    resolve_device,
    resolve_dist_backend,
)
from distgrow.config import Config
from distgrow.runtime import Runtime

_FULL = StateDictOptions(full_state_dict=True)

# The built-in models' repeated blocks, by class name (torchvision's are imported only on a
# GPU machine; matching names keeps this module free of the model modules' imports).
_BLOCK_CLASSES = frozenset({"_Block", "_WideBlock", "BasicBlock", "Bottleneck"})


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one before the root (the documented rule, in order).

    1. ``model.fsdp_units()``, when the model defines it (an own model's hook);
    2. else the built-in models' blocks: the transformer's ``_Block``, the wide ResNet's
       ``_WideBlock``, torchvision's ``BasicBlock``/``Bottleneck``;
    3. else nothing: the model is one unit (its root).

    Raises:
        BackendError: ``fsdp_units()`` returned something other than the model's submodules.
    """
    hook = getattr(model, "fsdp_units", None)
    if callable(hook):
        units = list(cast(Iterable[nn.Module], hook()))
        inside = {id(m) for m in model.modules() if m is not model}
        stray = [type(u).__name__ for u in units if id(u) not in inside]
        if stray:
            raise BackendError(
                f"model.fsdp_units() returned {', '.join(stray)}, which are not submodules of "
                f"the model ({type(model).__name__}). Fix: return the model's own blocks (e.g. "
                "list(self.layers))."
            )
        return units
    return [m for m in model.modules() if type(m).__name__ in _BLOCK_CLASSES]


def mixed_precision(precision: str, root: bool) -> MixedPrecisionPolicy:
    """FSDP's policy for ``backend.precision`` (bf16: gather and reduce in bf16).

    Only the root's output comes back float32 (for the loss): a unit's output stays bf16, as
    the next unit or the root's own layers (a final norm) compute in bf16.
    """
    if precision == "bf16":
        return MixedPrecisionPolicy(
            param_dtype=torch.bfloat16,
            reduce_dtype=torch.bfloat16,
            output_dtype=torch.float32 if root else None,
        )
    return MixedPrecisionPolicy()


def clip_sharded_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded (DTensor) gradients: the norm of the whole gradient.

    Each rank's local norm is of its shards only; the DTensor norm is a partial result whose
    ``full_tensor()`` sums the squares over ranks. Returns the total norm before clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [cast(torch.Tensor, p.grad) for p in params]
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


class FSDPBackend(AsyncReducer):
    """:class:`~distgrow.backends.base.Backend` over FSDP2 (``fully_shard``).

    Also a :class:`~distgrow.backends.sharded_state.ShardedCheckpointing` backend. Its forward
    is a collective (it gathers each unit's parameters): every rank runs the same number of
    forwards, as the trainer's validation does.

    Args:
        cfg: The whole config (``backend``, ``run.device``, ``noise``, ``growth``).
        runtime: This worker's rank, world size and rendezvous.

    Raises:
        BackendError: fp16, the noise meter, an unsupported device, or a failed rendezvous.
    """

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        b = cfg.backend
        resolved = resolve_device(cfg.run.device, runtime.local_rank, runtime.local_world_size)
        check_precision(b.precision, resolved)
        if b.precision == "fp16":
            raise BackendError(
                "backend.name=fsdp does not train in fp16 (a loss scaler over sharded "
                "gradients is not built). Fix: set backend.precision=bf16 (or fp32)."
            )
        if cfg.noise.enabled(cfg.growth):
            raise BackendError(
                "the gradient noise scale (noise.measure, growth.mode=adaptive, "
                "growth.noise_cap) needs each rank's whole gradient, which FSDP reduce-scatters "
                "into shards. Fix: set backend.name=torch for this run, or noise.measure=off "
                "with another growth.mode."
            )
        super().__init__(runtime, resolved, resolve_dist_backend(b.dist_backend, resolved))
        self.precision = b.precision
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        # fully_shard needs a process group even for one worker: a group of one, in memory.
        self._owns_group = join_process_group(runtime, self.dist_backend, single=True)
        self.check_distinct_gpus()
        self._mesh: DeviceMesh = init_device_mesh(self._device.type, (runtime.world_size,))
        self._model: nn.Module | None = None  # the user's model (its state is what is saved)
        self._root: nn.Module | None = None  # the sharded root: the model, or its Carrier
        self._carrier: Carrier | None = None  # several ranks in fp32 (carry())
        self._band: nn.Parameter | None = None  # the carrier's band as sharded (its .grad)
        self._carry: torch.Tensor | None = None  # what the synchronising backward carries
        # The gradient sync switch as last set (fully_shard starts with it on): set only when
        # it changes, since setting it walks every module (with one micro-step per update, as
        # at small batches, it never changes).
        self._sync = True
        self._synced = False  # the current micro-step reduce-scatters (its sync is on)
        self.carries = runtime.world_size > 1 and b.precision == "fp32"
        """Whether :meth:`setup` wraps the model in a carrier for the agreement (set before
        ``setup``; benchmarks/overhead.py turns it off to time the all-reduce instead)."""

    # -- training ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Shard ``model`` in place (units, then the root); point ``optimizer`` at the shards.

        ``fully_shard`` replaces every parameter by a sharded one (a DTensor), so the
        optimizer, built over the originals, gets the new parameters in the same places. On
        several ranks in fp32 the root is a :class:`Carrier` around the model (its band rides
        the root's reduce-scatter: :meth:`carry`); the model returned is that root.
        """
        if optimizer.state:
            raise BackendError("FSDPBackend.setup: the optimizer already has state (a bug).")
        names = parameter_names(model, optimizer)
        units = shard_units(model)
        root = model
        if self.carries:
            root = self._carrier = Carrier(model, self._device, copies=self.world_size)
        for unit in units:
            fully_shard(unit, mesh=self._mesh, mp_policy=mixed_precision(self.precision, False))
        fully_shard(root, mesh=self._mesh, mp_policy=mixed_precision(self.precision, True))
        self._band = None if self._carrier is None else self._carrier.band  # sharded now
        self._sync = True  # fully_shard's default: reduce-scatter at every backward
        sharded = dict(model.named_parameters())
        for group, group_names in zip(optimizer.param_groups, names, strict=True):
            group["params"] = [sharded[name] for name in group_names]
        self._model, self._root = model, root
        return root

    def eval_module(self) -> nn.Module:
        """The module whose forward evaluates the model: the sharded root (the model, or its
        carrier), whose forward gathers the parameters the model's own layers hold sharded."""
        self._require_model()
        assert self._root is not None
        return self._root

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """Nothing to set: the gradient sync switch per micro-step is the accumulation."""
        del micro_batch, accum_steps

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """Reduce-scatter the gradients only on the last micro-step of an update."""
        if sync != self._sync:
            self._fsdp().set_requires_gradient_sync(sync)
            self._sync = sync
        self._synced = sync
        return contextlib.nullcontext()

    def _reduced_band(self) -> nn.Parameter:
        assert self._band is not None  # carry() returned _carried only with a carrier
        return self._band  # the sharded band: each rank's row after the reduce-scatter

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate; at the synchronising micro-step, with the carried numbers' term.

        Every rank adds the term at every synchronising backward (zeros when nothing rides),
        so the root's reduce-scatter holds the same parameters on all of them. The band's
        value is zeros and it is never stepped, so the term changes neither the loss nor any
        other gradient; its gradient is ``values`` in every rank's row.
        """
        if self._synced and self._carrier is not None and self._band is not None:
            self._band.grad = None  # the reduce-scatter would add to a stale one
            values, self._carry = self._carry, None
            band = self._carrier.band  # unsharded: the root keeps it gathered until backward
            if isinstance(band, DTensor):
                raise BackendError(
                    "FSDPBackend.backward: the root's parameters were resharded before the "
                    "backward, so the agreement cannot ride its reduce-scatter (a bug: FSDP2 "
                    "keeps the root gathered after its forward)."
                )
            rows = torch.zeros(CARRIED, device=band.device) if values is None else values
            loss = loss + (band.view(self.world_size, CARRIED) * rows).sum()
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """Clip the global norm of the sharded gradients, step each rank's shards, zero."""
        if grad_clip is not None:
            clip_sharded_grad_norm_(self._require_model().parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # -- full state (any backend, any world size) ---------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state on every rank (a collective: gathers every shard)."""
        state = get_model_state_dict(self._require_model(), options=_FULL)
        return {
            name: cast(torch.Tensor, value).detach().to("cpu", copy=True)
            for name, value in state.items()
        }

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a whole (unwrapped) state; each rank keeps its shards."""
        set_model_state_dict(self._require_model(), dict[str, Any](state), options=_FULL)

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state as a plain optimizer over the unwrapped model holds it."""
        model = self._require_model()
        full = get_optimizer_state_dict(model, optimizer, options=_FULL)
        return id_keyed(full, parameter_names(model, optimizer))

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load a plain (DDP, one worker, any world size) optimizer state into the shards."""
        model = self._require_model()
        state = {k: v for k, v in state.items() if k != SCALER_KEY}
        keyed = fqn_keyed(state, parameter_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, keyed, options=_FULL)

    # -- sharded state (torch.distributed.checkpoint) -----------------------------------------

    def save_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Every rank writes its shards of the model and optimizer into ``path`` (a collective)."""
        model_state, optim_state = get_state_dict(self._require_model(), optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

    def load_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Read this rank's shards from ``path``, written at any world size (a collective)."""
        model = self._require_model()
        model_state, optim_state = get_state_dict(model, optimizer)
        found: dict[str, Any] = {"model": model_state, "optim": optim_state}
        dcp.load(found, checkpoint_id=path)  # in place, resharded to this world size
        set_state_dict(
            model, optimizer, model_state_dict=found["model"], optim_state_dict=found["optim"]
        )

    def _fsdp(self) -> FSDPModule:
        self._require_model()
        root = self._root
        assert isinstance(root, FSDPModule)  # fully_shard swapped its class in setup
        return root

    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise BackendError("the backend has no model yet: call setup(model, optimizer) first.")
        return self._model
