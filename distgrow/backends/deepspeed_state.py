"""A DeepSpeed engine's model and optimizer state, full and unpartitioned, for every ZeRO stage.

distgrow's checkpoints hold what a plain ``torch.optim`` optimizer over the unwrapped model would
hold (:mod:`distgrow.backends.base`), so that a run saved at one world size resumes at another
and under another backend. DeepSpeed's own checkpoints cannot: ZeRO-2's refuse another world
size (INFRA.md), and ZeRO-3's hold per-rank shards of the weights too. The functions here turn
the engine's partitions into that full state and back; every rank calls them (they are
collectives: all ranks walk the parameters in the same order).

* ZeRO 1/2 keep the weights whole but the fp32 optimizer state in one flat partition per param
  group (``single_partition_of_fp32_groups``): :func:`gather_zero12_state` /
  :func:`scatter_zero12_state`.
* ZeRO-3 partitions the weights as well (each parameter keeps ``ds_tensor``, its slice, and an
  empty ``data`` outside a forward), and its fp32 master copy and optimizer state live in one
  flat partition per *sub-group* (``fp32_partitioned_groups_flat``, found per parameter through
  ``grad_position``). Weights are gathered one parameter at a time
  (``deepspeed.zero.GatheredParameters``: never the whole model at once) and written back the
  same way (``modifier_rank=0``), then the fp32 master copy is refreshed from them; the
  optimizer state is all-gathered by ``safe_get_full_optimizer_state`` and written back as
  this rank's padded slice (``safe_set_local_optimizer_state``; :func:`_local_slice` says why
  not ``safe_set_full_optimizer_state``): :func:`gathered_model_state`,
  :func:`load_partitioned_model_state`,
  :func:`gather_zero3_state`, :func:`scatter_zero3_state`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distgrow.backends.base import BackendError


def is_partitioned(value: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its ``data`` holds nothing outside a forward; ``ds_shape`` is its
    real shape)."""
    return hasattr(value, "ds_id")


def saved_dtype(value: torch.Tensor) -> torch.dtype:
    """float32 for floating tensors: checkpoints hold float32 whatever the engine trained in,
    as the torch backend's do, so that any backend can resume them."""
    return torch.float32 if value.is_floating_point() else value.dtype


def _to_cpu(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to("cpu", dtype=saved_dtype(value), copy=True)


def gathered_model_state(module: nn.Module, deepspeed: Any) -> dict[str, torch.Tensor]:
    """The full state dict of a (possibly ZeRO-3) module, as CPU tensors, on every rank.

    One parameter is gathered at a time: the peak is the largest parameter, not the model.
    """
    state: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if is_partitioned(value):
            with deepspeed.zero.GatheredParameters([value]):
                state[name] = _to_cpu(value)
        else:
            state[name] = _to_cpu(value)
    return state


def load_partitioned_model_state(
    module: nn.Module, state: dict[str, torch.Tensor], deepspeed: Any
) -> None:
    """Load a full state dict (from any world size) into a ZeRO-3 module, on every rank.

    Every rank holds the same ``state`` (the trainer broadcasts the checkpoint); rank 0's copy is
    broadcast into the gathered parameter and partitioned again. The caller refreshes the
    optimizer's fp32 master copy afterwards.

    Raises:
        BackendError: the keys or shapes differ from this model's (as ``load_state_dict``
            would say).
    """
    own = module.state_dict(keep_vars=True)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [
        f"{name}: {tuple(state[name].shape)} saved, {tuple(_shape(own[name]))} here"
        for name in own.keys() & state.keys()
        if tuple(state[name].shape) != tuple(_shape(own[name]))
    ]
    if missing or unexpected or wrong:
        raise BackendError(
            f"the checkpoint's model does not fit this one (missing {missing}, unexpected "
            f"{unexpected}, other shapes {wrong}). Fix: resume with the same model.* settings."
        )
    with torch.no_grad():
        for name, target in own.items():
            value = state[name]
            if is_partitioned(target):
                with deepspeed.zero.GatheredParameters([target], modifier_rank=0):
                    target.data.copy_(value.to(target.device, dtype=target.dtype))
            else:
                target.copy_(value.to(target.device, dtype=target.dtype))


def _shape(value: torch.Tensor) -> torch.Size:
    return value.ds_shape if is_partitioned(value) else value.shape  # type: ignore[attr-defined]


def _group_entry(group: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    return {**{k: v for k, v in group.items() if k != "params"}, "params": ids}


def _clone(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def _check_groups(saved_groups: list[dict[str, Any]], groups: list[list[nn.Parameter]]) -> None:
    if len(saved_groups) != len(groups) or any(
        len(s["params"]) != len(p) for s, p in zip(saved_groups, groups, strict=True)
    ):
        raise BackendError(
            "the checkpoint's optimizer has other parameter groups than this model's. "
            "Fix: resume with the same model and optimizer."
        )


# -- ZeRO 1 and 2 -----------------------------------------------------------------------------


def gather_zero12_state(zero: Any, groups: list[list[nn.Parameter]]) -> dict[str, Any]:
    """Every rank: each parameter's optimizer state, assembled from all ZeRO-1/2 partitions.

    Args:
        zero: The engine's ZeRO-1/2 optimizer (``engine.optimizer``).
        groups: The original parameters of each param group (ZeRO replaced them by partitions).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer  # the trainer's optimizer, now over flat fp32 partitions
    state: dict[int, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    index = 0
    for g, (group, params) in enumerate(zip(base.param_groups, groups, strict=True)):
        flat = zero.single_partition_of_fp32_groups[g]
        flat_state = base.state.get(flat, {})
        per_element = [k for k, v in flat_state.items() if _is_per_element(v, flat)]
        shared = {k: _clone(v) for k, v in flat_state.items() if k not in per_element}
        if per_element:
            zero._lazy_init_hp_params_optimizer_state()
        ids = list(range(index, index + len(params)))
        for i, param in zip(ids, params, strict=True):
            if not flat_state:
                continue
            entry = dict(shared)
            for key in per_element:
                full = safe_get_full_optimizer_state(param, key)
                entry[key] = full.detach().to("cpu", copy=True).view_as(param)
            state[i] = entry
        out.append(_group_entry(group, ids))
        index += len(params)
    return {"state": state, "param_groups": out}


def scatter_zero12_state(
    zero: Any, groups: list[list[nn.Parameter]], saved: dict[str, Any]
) -> None:
    """Every rank: take this rank's slice of each parameter's saved optimizer state (ZeRO 1/2)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = zero.optimizer
    saved_groups = saved["param_groups"]
    _check_groups(saved_groups, groups)
    saved_state = {int(k): v for k, v in saved["state"].items()}
    for g, (group, saved_group) in enumerate(zip(base.param_groups, saved_groups, strict=True)):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        ids = [int(i) for i in saved_group["params"]]
        entries = [saved_state[i] for i in ids if i in saved_state]
        if not entries:
            continue
        flat = zero.single_partition_of_fp32_groups[g]
        params = groups[g]
        first = next(i for i in ids if i in saved_state)
        sample = saved_state[first]
        shape = params[ids.index(first)].shape
        per_element = [
            k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.shape == shape
        ]
        # torch optimizers create their state at the first step: create it the same way
        # (the right keys, per-element tensors shaped like the flat partition).
        flat_state = base.state[flat]
        for key, value in sample.items():
            flat_state[key] = torch.zeros_like(flat) if key in per_element else _clone(value)
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
        for i, param in zip(ids, params, strict=True):
            entry = saved_state.get(i)
            for key in per_element:
                if entry is None or key not in entry:
                    continue
                value = entry[key].to(flat.device, dtype=flat.dtype)
                safe_set_full_optimizer_state(param, value, key)


def _is_per_element(value: Any, flat: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == flat.shape


# -- ZeRO 3 -----------------------------------------------------------------------------------


def _zero3_flat(zero: Any, param: nn.Parameter) -> torch.Tensor:
    """The flat fp32 partition (one per ZeRO-3 sub-group) that holds ``param``'s slice: the
    tensor the trainer's optimizer keys its state by."""
    sub_group = zero.grad_position[zero.get_param_id(param)][0]
    flat = zero.fp32_partitioned_groups_flat[sub_group]
    if not isinstance(flat, torch.Tensor):  # an optimizer swapped out to NVMe (not configured)
        raise BackendError(
            f"DeepSpeed's ZeRO-3 partition of sub-group {sub_group} is not in memory "
            f"({type(flat).__name__}). Fix: remove offload_optimizer from backend.deepspeed_config."
        )
    return flat


def gather_zero3_state(zero: Any, groups: list[list[nn.Parameter]]) -> dict[str, Any]:
    """Every rank: each parameter's optimizer state, all-gathered from its ZeRO-3 partitions.

    Args:
        zero: The engine's ``DeepSpeedZeroOptimizer_Stage3``.
        groups: The parameters of each param group, in the optimizer's order.
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    base = zero.optimizer
    state: dict[int, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    index = 0
    for group, params in zip(base.param_groups, groups, strict=True):
        ids = list(range(index, index + len(params)))
        for i, param in zip(ids, params, strict=True):
            if not param.requires_grad:
                continue  # frozen: no optimizer state, as under torch.optim
            flat = _zero3_flat(zero, param)
            flat_state = base.state.get(flat, {})
            if not flat_state:
                continue  # no step yet: torch.optim holds no state either
            entry: dict[str, Any] = {}
            for key, value in flat_state.items():
                if _is_per_element(value, flat):
                    full = safe_get_full_optimizer_state(param, key)  # all-gather
                    entry[key] = full.detach().to("cpu", copy=True).reshape(_shape(param))
                else:
                    entry[key] = _clone(value)
            state[i] = entry
        out.append(_group_entry(group, ids))
        index += len(params)
    return {"state": state, "param_groups": out}


def scatter_zero3_state(zero: Any, groups: list[list[nn.Parameter]], saved: dict[str, Any]) -> None:
    """Every rank: create the ZeRO-3 optimizer state and fill this rank's slice of each
    parameter's saved state (no collective: every rank holds the whole saved state)."""
    from deepspeed.utils import safe_set_local_optimizer_state

    base = zero.optimizer
    saved_groups = saved["param_groups"]
    _check_groups(saved_groups, groups)
    saved_state = {int(k): v for k, v in saved["state"].items()}
    for group, saved_group, params in zip(base.param_groups, saved_groups, groups, strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
        for i, param in zip((int(i) for i in saved_group["params"]), params, strict=True):
            entry = saved_state.get(i)
            if entry is None or not param.requires_grad:
                continue
            flat = _zero3_flat(zero, param)
            # torch optimizers create their state at the first step: create it the same way,
            # per-element tensors shaped like the flat partition (its padding stays zero).
            flat_state = base.state[flat]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.shape == _shape(param):
                    if key not in flat_state:
                        flat_state[key] = torch.zeros_like(flat)
                    mine = _local_slice(param, value.to(flat.device, dtype=flat.dtype))
                    safe_set_local_optimizer_state(param, mine, key)
                else:
                    flat_state[key] = _clone(value)


def _local_slice(param: Any, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 slice of a full per-element tensor of ``param``, zero-padded.

    DeepSpeed 0.19.8's ``safe_set_full_optimizer_state`` cuts ``numel / world`` elements at
    ``rank × partition`` without the padding: on the last rank of a parameter whose size the
    world does not divide it fails ("start (9) + length (3) exceeds dimension size (10)", 10
    elements on 4 ranks); the slice is cut here, padded as DeepSpeed pads its partitions.
    """
    import torch.distributed as dist

    size = int(param.ds_tensor.ds_numel)
    rank = dist.get_rank(group=param.ds_process_group)
    padded = torch.zeros(size * dist.get_world_size(group=param.ds_process_group), dtype=full.dtype)
    padded[: full.numel()] = full.flatten().cpu()
    return padded[rank * size : (rank + 1) * size].to(full.device)
