"""DeepSpeed: ZeRO stages 0 to 3 behind the same protocol, exact across batch growth.

The DeepSpeed config is built from distgrow's own (:func:`build_ds_config`): the batch keys
from the update's split, ``gradient_clipping`` always explicit (DeepSpeed 0.19.8 defaults it to
1.0), the ZeRO stage, and bf16/fp16. A user's JSON (``backend.deepspeed_config``) is merged in
(:func:`merge_ds_config`): keys only the user sets are kept, keys both set to different values
are an error naming the key, both values and the distgrow setting that owns it.

Exactness. The trainer's loss already has the right scale for a mean over ranks of the summed
micro-step gradients (see :mod:`distgrow.backends.base`), so the backend:

* drives the accumulation boundary itself (``set_gradient_accumulation_boundary`` on every
  micro-step) instead of DeepSpeed's cumulative micro-step counter, which mixes batches when
  the accumulation count changes at an unaligned micro-step (INFRA.md);
* calls ``engine.backward(loss, scale_wrt_gas=False)``, so DeepSpeed does not divide the loss by
  its ``gradient_accumulation_steps`` a second time;
* passes the trainer's own ``torch.optim`` optimizer to ``deepspeed.initialize`` with no
  DeepSpeed scheduler, so the learning rate and momentum the trainer writes into the param
  groups before each update are the ones applied (ZeRO wraps the optimizer but keeps the same
  param-group dicts).

On CUDA the collectives run on NCCL, for a single worker too (its group of one), and
``LOCAL_RANK`` names the device distgrow chose (:func:`point_local_rank_at`: the engine trains on
``cuda:LOCAL_RANK``). Mixed precision matches the torch backend's: float outputs come back
float32 (:class:`Float32Outputs`; DeepSpeed's autocast returns 16-bit logits) and gradients are
reduced in float32 (``lower_precision_safe_modules: []``; DeepSpeed reduces Linear/Conv
gradients in 16 bits): a bf16 ZeRO-2 run ends bit-identical to the torch backend's on one
process (3.7e-3 apart with DeepSpeed's own semantics). ZeRO-3 applies the same two rules.

ZeRO-3 partitions the weights too. The model is built whole on every rank (the trainer seeds
it, checks the loss contract on it, then hands it over) and ``deepspeed.initialize`` partitions
it: ``deepspeed.zero.Init`` would build it already partitioned, but only if the backend built
the model, and the trainer's checks need the whole model once. Start-up therefore holds the
float32 weights once per rank; training then holds only this rank's slice of weights,
gradients and optimizer state. Every forward gathers each module's weights (a collective), so
the trainer runs as many validation forwards on every rank.

Checkpoints stay distgrow's, world-size independent (:mod:`distgrow.backends.deepspeed_state`):
the weights (gathered one parameter at a time under ZeRO-3) and the optimizer state a plain
``torch.optim`` optimizer would hold, assembled from ZeRO's flat per-rank partitions, and
partitioned again for this job's world size on load. DeepSpeed's own ZeRO-2/3 checkpoints would
not load at another world size (INFRA.md); distgrow never writes them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import typing
import warnings
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from distgrow.backends.base import BackendError, check_precision
from distgrow.backends.deepspeed_state import (
    gather_zero3_state,
    gather_zero12_state,
    gathered_model_state,
    load_partitioned_model_state,
    saved_dtype,
    scatter_zero3_state,
    scatter_zero12_state,
)
from distgrow.backends.torch_ddp import (
    ProcessGroupMember,
    _to_float32,
    join_process_group,
    resolve_device,
    resolve_dist_backend,
)
from distgrow.config import Config
from distgrow.core.split import preferred_micro_batch
from distgrow.extensions import check_locks, use_environment_cache
from distgrow.runtime import Runtime

# DeepSpeed prints its progress every `steps_per_print` steps; distgrow prints its own.
_QUIET_STEPS = 2**31 - 1

# Keys of the DeepSpeed config that distgrow owns, with the setting a conflict should be fixed
# in. The batch keys change at every growth event: a user's value for them cannot hold.
_OWNER = {
    "train_batch_size": "growth.* (the global batch is planned)",
    "train_micro_batch_size_per_gpu": "growth.micro_batch / growth.max_micro_batch",
    "gradient_accumulation_steps": "growth.* (accumulation is planned)",
    "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "backend.zero_stage",
    "bf16.enabled": "backend.precision (distgrow's mixed precision is torch_autocast)",
    "fp16.enabled": "backend.precision (distgrow's mixed precision is torch_autocast)",
    "torch_autocast.enabled": "backend.precision",
    "torch_autocast.dtype": "backend.precision",
    "torch_autocast.lower_precision_safe_modules": "backend.precision (gradients are reduced "
    "in float32, as the torch backend reduces them)",
}
# Sections a user's JSON must not carry: distgrow builds the optimizer (optim.*) and sets the
# learning rate of every update from its plan (schedule.*, growth.*).
_FORBIDDEN = {
    "optimizer": "optim.* (distgrow builds the torch optimizer and hands it to DeepSpeed)",
    "scheduler": "schedule.* (distgrow sets the learning rate of every update from its plan)",
}
# Values a user's JSON may give for a distgrow-owned key without conflicting ("auto" is the
# Hugging Face convention for "filled in by the trainer").
_AUTO = "auto"


class DeepSpeedConfigError(BackendError):
    """A ``backend.deepspeed_config`` that cannot be merged; the message names the key."""


def build_ds_config(
    cfg: Config, world_size: int, micro_batch: int, accum_steps: int
) -> dict[str, Any]:
    """The DeepSpeed config distgrow derives from its own, for one split of the batch.

    Args:
        cfg: The run's config (``backend``, ``optim.grad_clip``).
        world_size: Data-parallel workers.
        micro_batch: Samples per worker per micro-step.
        accum_steps: Micro-steps per update.

    Returns:
        A JSON-able dict for ``deepspeed.initialize(config=...)``.
    """
    b = cfg.backend
    config: dict[str, Any] = {
        "train_batch_size": micro_batch * accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        # Explicit: DeepSpeed 0.19.8 clips to 1.0 unless told otherwise (INFRA.md).
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": {"stage": b.zero_stage},
        # Mixed precision is torch autocast: the weights, the optimizer and the checkpoints
        # stay float32 (so a bf16 run resumes under any backend), the matmuls run in 16 bits.
        # DeepSpeed's own bf16/fp16 modes would keep 16-bit weights in the module.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }
    if b.precision != "fp32":
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16" if b.precision == "bf16" else "float16",
            # DeepSpeed would reduce the gradients of Linear/Conv weights in 16 bits (its
            # "lower precision safe modules"); DDP reduces float32 gradients: none, like DDP.
            "lower_precision_safe_modules": [],
        }
    if b.zero_stage > 0:
        # ZeRO refuses optimizers it has not been tested with (torch's SGD, RMSprop) unless
        # told; distgrow's tests check that each one gives the torch backend's parameters.
        config["zero_allow_untested_optimizer"] = True
    return config


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from _leaves(value, name)
        else:
            yield name, value


def _get(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours is theirs
    if isinstance(ours, int | float) and isinstance(theirs, int | float):
        return float(ours) == float(theirs)
    return bool(ours == theirs)


def merge_ds_config(
    ours: Mapping[str, Any], theirs: Mapping[str, Any], source: str = "the DeepSpeed JSON"
) -> dict[str, Any]:
    """Merge a user's DeepSpeed config into distgrow's.

    Precedence: keys only the user sets are kept as the user wrote them (ZeRO bucket sizes,
    ``overlap_comm``, communication settings, ...); keys only distgrow sets are distgrow's. A key
    both set is fine when the values agree (or the user wrote ``"auto"``); otherwise it is an
    error, never a silent choice: distgrow's value comes from its own config, which is where the
    fix belongs.

    Args:
        ours: :func:`build_ds_config`'s dict.
        theirs: The user's JSON, parsed.
        source: Its name in error messages (the file path).

    Returns:
        The merged config (a new dict).

    Raises:
        DeepSpeedConfigError: a conflicting key (all of them, each with both values), or an
            ``optimizer``/``scheduler`` section.
    """
    problems: list[str] = []
    for section, owner in _FORBIDDEN.items():
        if section in theirs:
            problems.append(
                f"'{section}' is set in {source}, but distgrow owns it: {owner}. Fix: remove "
                f"the '{section}' section."
            )
    for key, value in _leaves(theirs):
        if key.split(".")[0] in _FORBIDDEN:
            continue
        present, mine = _get(ours, key)
        if not present or value == _AUTO or _same(mine, value):
            continue
        setting = _OWNER.get(key)
        fix = f"set {setting} instead" if setting is not None else "remove it from the JSON"
        problems.append(
            f"'{key}' is {value!r} in {source} but {mine!r} from distgrow's config. Fix: {fix} "
            f'(or write "auto").'
        )
    if problems:
        raise DeepSpeedConfigError(
            "backend.deepspeed_config conflicts with distgrow's settings:\n  "
            + "\n  ".join(problems)
        )
    return _merge_trees(ours, theirs)


def _merge_trees(ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(ours)
    for key, value in theirs.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge_trees(merged[key], value)
        elif value != _AUTO or key not in merged:
            merged[key] = value
    return merged


def load_user_ds_config(path: str) -> dict[str, Any]:
    """Read ``backend.deepspeed_config``.

    Raises:
        DeepSpeedConfigError: the file is missing, not JSON, or not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise DeepSpeedConfigError(
            f"backend.deepspeed_config = {path!r} does not exist. Fix: give the path of a "
            "DeepSpeed JSON file, or null."
        )
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeepSpeedConfigError(
            f"backend.deepspeed_config {path!r} is not valid JSON: {err}. Fix: correct it."
        ) from err
    if not isinstance(data, dict):
        raise DeepSpeedConfigError(
            f"backend.deepspeed_config {path!r} holds a {type(data).__name__}, not a JSON object."
        )
    return data


def point_local_rank_at(
    device: torch.device, runtime: Runtime, environ: typing.MutableMapping[str, str]
) -> None:
    """Set ``LOCAL_RANK`` to the CUDA device's index (the local rank on the CPU); log a change.

    DeepSpeed's engine moves the model to ``cuda:LOCAL_RANK``: with one GPU per task (srun
    ``--gpus-per-task=1``) that is "invalid device ordinal" for every local rank but 0.
    """
    want = str(
        device.index if device.type == "cuda" and device.index is not None else runtime.local_rank
    )
    old = environ.get("LOCAL_RANK")
    if old == want:
        return
    environ["LOCAL_RANK"] = want
    change = f"set LOCAL_RANK={want}" if old is None else f"overwrote LOCAL_RANK: {old} -> {want}"
    print(
        f"distgrow[rank {runtime.rank}]: {change} (DeepSpeed trains on cuda:LOCAL_RANK; "
        f"this rank's device is {device})",
        file=sys.stderr,
        flush=True,
    )


class Float32Outputs(nn.Module):
    """The model with its floating outputs as float32, as the torch backend returns them.

    DeepSpeed's ``torch_autocast`` runs the forward under autocast and returns what the model
    returns there (16-bit logits); the torch backend's :class:`AutocastModule` returns float32,
    so the loss is computed in float32 under either backend.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return tree_map(_to_float32, self.module(*args, **kwargs))


def _import_deepspeed() -> Any:
    # DeepSpeed JIT-builds its ops in torch's extension cache: this environment's own, and a
    # lock left there by a killed build would make every rank wait forever (named, then exit 2).
    problem = check_locks(use_environment_cache())
    if problem:
        raise BackendError(problem)
    try:
        import deepspeed
    except ImportError as err:
        raise BackendError(
            f"backend.name = 'deepspeed' but DeepSpeed cannot be imported ({err}). Fix: "
            "DS_BUILD_OPS=0 pip install -c constraints.txt deepspeed (scripts/bootstrap.sh "
            "does it), or set backend.name=torch."
        ) from err
    # DeepSpeed logs its whole config at INFO; distgrow's output stays readable with warnings.
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # ZeRO-3 gathers and reduce-scatters through collectives torch 2.13 deprecates, and each
    # call warns (about 1,900 lines in a 67-update run): torch's notice to DeepSpeed, not to the
    # user.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is "
        "deprecated",
        category=FutureWarning,
    )
    return deepspeed


class DeepSpeedBackend(ProcessGroupMember):
    """:class:`~distgrow.backends.base.Backend` over a DeepSpeed engine (ZeRO 0, 1, 2 or 3).

    Args:
        cfg: The whole config (the DeepSpeed config needs ``optim`` and ``growth`` too).
        runtime: This worker's rank, world size and rendezvous (torchrun, the ``deepspeed``
            launcher, mpirun and srun all work: :mod:`distgrow.runtime` reads them).

    Raises:
        BackendError: DeepSpeed missing, an unsupported precision, a bad
            ``backend.deepspeed_config``, or a failed rendezvous.
    """

    def __init__(self, cfg: Config, runtime: Runtime) -> None:
        device = resolve_device(cfg.run.device, runtime.local_rank, runtime.local_world_size)
        super().__init__(runtime, device, resolve_dist_backend(cfg.backend.dist_backend, device))
        check_precision(cfg.backend.precision, device)
        self._cfg = cfg
        self._user_config = (
            load_user_ds_config(cfg.backend.deepspeed_config)
            if cfg.backend.deepspeed_config
            else {}
        )
        micro = preferred_micro_batch(cfg.growth)
        # The first update's split arrives with begin_update(); a config built now must already
        # merge, so that a conflicting JSON fails before any training.
        self.ds_config = merge_ds_config(
            build_ds_config(cfg, runtime.world_size, micro, 1),
            self._user_config,
            str(cfg.backend.deepspeed_config),
        )
        self._ds = _import_deepspeed()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # deepspeed.initialize asserts that LOCAL_RANK is set (a single plain process has
        # none), and its engine (and ZeRO) train on cuda:LOCAL_RANK: LOCAL_RANK names the device
        # distgrow chose (it differs where SLURM gives each task its own GPU).
        point_local_rank_at(device, runtime, os.environ)
        # DeepSpeed needs a process group even for one worker; it joins the one made here.
        self._owns_group = join_process_group(runtime, self.dist_backend, single=True)
        self.check_distinct_gpus()
        self._ds.init_distributed(dist_backend=self.dist_backend, auto_mpi_discovery=False)
        self._engine: Any = None
        self._module: nn.Module | None = None
        self._groups: list[list[nn.Parameter]] = []
        self._split: tuple[int, int] = (micro, 1)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the engine runs."""
        return int(self._cfg.backend.zero_stage)

    # -- training ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """``deepspeed.initialize`` with the trainer's optimizer; returns the engine."""
        self._module = model
        # ZeRO replaces each param group's parameters by a flat partition: keep the originals
        # to write (and read) the optimizer state per parameter.
        self._groups = [list(group["params"]) for group in optimizer.param_groups]
        wrapped = model if self._cfg.backend.precision == "fp32" else Float32Outputs(model)
        engine, _, _, _ = self._ds.initialize(
            model=wrapped, optimizer=optimizer, config=self.ds_config, dist_init_required=False
        )
        if engine.get_lr() != [group["lr"] for group in optimizer.param_groups]:
            raise BackendError(  # a DeepSpeed that replaced the trainer's optimizer
                "DeepSpeed did not keep distgrow's optimizer (its learning rates differ). Fix: "
                "remove optimizer/scheduler settings from backend.deepspeed_config."
            )
        self._engine = engine
        return typing.cast(nn.Module, engine)

    def begin_update(self, micro_batch: int, accum_steps: int) -> None:
        """Keep the engine's batch settings those of this update (DeepSpeed's own counter is
        not used for the boundary, so the change is exact at any micro-step)."""
        if (micro_batch, accum_steps) == self._split:
            return
        engine = self._require_engine()
        engine.set_train_micro_batch_size(micro_batch)
        engine.set_train_batch_size(micro_batch * accum_steps * self.world_size)
        self._split = (micro_batch, accum_steps)

    def micro_step(self, sync: bool) -> AbstractContextManager[None]:
        """Tell the engine whether this micro-step ends the update (it reduces then)."""
        self._require_engine().set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # scale_wrt_gas=False: the trainer's loss is already scaled for the whole update.
        self._require_engine().backward(loss, scale_wrt_gas=False)

    def step(self, optimizer: torch.optim.Optimizer, grad_clip: float | None) -> None:
        """``engine.step()``: clipping (set in the DeepSpeed config), update, zeroed gradients."""
        del optimizer  # the engine steps its (possibly wrapped) copy of it
        engine = self._require_engine()
        if float(grad_clip or 0.0) != float(engine.gradient_clipping()):
            raise BackendError(
                f"optim.grad_clip = {grad_clip} but the DeepSpeed engine clips at "
                f"{engine.gradient_clipping()}. Fix: set the clipping only in optim.grad_clip."
            )
        engine.step()

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        del optimizer
        engine = self._require_engine()
        if self.zero_stage > 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
            engine.optimizer.zero_grad()
        else:
            engine.zero_grad()

    # -- state ---------------------------------------------------------------------------------

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model: ZeRO 0-2 keep whole weights; ZeRO-3's are gathered one parameter
        at a time (a collective: every rank calls it)."""
        module = self._require_module()
        if self.zero_stage == 3:
            return gathered_model_state(module, self._ds)
        return {
            name: value.detach().to("cpu", dtype=saved_dtype(value), copy=True)
            for name, value in module.state_dict().items()
        }

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        module = self._require_module()
        if self.zero_stage == 3:
            load_partitioned_model_state(module, state, self._ds)
        else:
            module.load_state_dict(state)
        engine = self._engine
        if engine is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
            # ZeRO and the bf16/fp16 optimizers step a separate fp32 master copy.
            engine.optimizer.refresh_fp32_params()

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The state a plain ``torch.optim`` optimizer would hold (gathered over ranks)."""
        inner = self._require_engine().optimizer
        if self.zero_stage == 3:
            return gather_zero3_state(inner, self._groups)
        if hasattr(inner, "single_partition_of_fp32_groups"):
            return gather_zero12_state(inner, self._groups)
        if inner is optimizer:
            return optimizer.state_dict()
        raise BackendError(
            f"saving the optimizer of DeepSpeed's {type(inner).__name__} (precision "
            f"{self._cfg.backend.precision}, ZeRO stage {self.zero_stage}) is not supported. "
            "Fix: use backend.zero_stage=1, 2 or 3 with bf16/fp16, or precision fp32."
        )

    def load_optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        inner = self._require_engine().optimizer
        if self.zero_stage == 3:
            scatter_zero3_state(inner, self._groups, state)
        elif hasattr(inner, "single_partition_of_fp32_groups"):
            scatter_zero12_state(inner, self._groups, state)
        elif inner is optimizer:
            optimizer.load_state_dict(state)
        else:
            raise BackendError(
                f"loading an optimizer state into DeepSpeed's {type(inner).__name__} is not "
                "supported. Fix: use backend.zero_stage=1, 2 or 3 with bf16/fp16, or precision "
                "fp32."
            )

    def _require_engine(self) -> Any:
        if self._engine is None:
            raise BackendError("the backend has no engine yet: call setup(model, optimizer) first.")
        return self._engine

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise BackendError("the backend has no model yet: call setup(model, optimizer) first.")
        return self._module
