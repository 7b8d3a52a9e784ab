"""Checkpoints of sharded engines: ``torch.distributed.checkpoint`` (DCP) beside distgrow's file.

A backend that shards the model and optimizer (:class:`ShardedCheckpointing`, FSDP2) does not
gather them into rank 0's ``ckpt-<step>.pt``: every rank writes its shards into the directory
``ckpt-<step>.dcp/``, and the ``model`` and ``optimizer`` entries of the ``.pt`` name that
directory (``{"sharded_dcp": "ckpt-<step>.dcp"}``). The rest of the ``.pt`` (the growth policy,
the position in the data, the counters) is distgrow's own state, as for every backend.

Atomic as the ``.pt`` is: the shards are written into ``.ckpt-<step>.dcp.tmp/`` and renamed
to ``ckpt-<step>.dcp`` by rank 0 once every rank's shards and DCP's metadata are written; only
then is the ``.pt`` written (atomically), so a crash at any moment leaves the previous
checkpoint whole and at worst a directory without its ``.pt``, which the next save removes
(:func:`distgrow.checkpoint.remove_orphan_shards`).

Loads at any world size and under any backend:

* a sharded backend reads a sharded checkpoint with DCP, which reshards (2 → 4 → 1 ranks);
* a sharded backend loads a full checkpoint (DDP, DeepSpeed ZeRO 0–2, Horovod, one worker)
  through its ``load_model_state_dict``/``load_optimizer_state_dict``;
* any other backend reads a sharded checkpoint whole (:func:`read_full`, no process group) and
  loads it as it loads a full one.

The DCP directory lives in the run directory, which every rank must see (a shared file system
across nodes), as DCP's file writer requires.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from distgrow.backends.base import Backend, BackendError
from distgrow.checkpoint import SHARDED_KEY


@runtime_checkable
class ShardedCheckpointing(Protocol):
    """A backend whose model and optimizer are saved as shards (a capability, beside
    :class:`~distgrow.backends.base.Backend`)."""

    def save_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Every rank writes its shards into ``path`` (a collective)."""
        ...

    def load_sharded(self, path: Path, optimizer: torch.optim.Optimizer) -> None:
        """Every rank reads its shards from ``path``, saved at any world size (a collective)."""
        ...


def sharded_dir(checkpoint: Path) -> Path:
    """The DCP directory of the checkpoint file ``checkpoint`` (``ckpt-<step>.dcp``)."""
    return checkpoint.with_suffix(".dcp")


def is_sharded(entry: Any) -> bool:
    """Whether a checkpoint's ``model`` entry names a DCP directory."""
    return isinstance(entry, dict) and isinstance(entry.get(SHARDED_KEY), str)


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The name of each parameter of each of ``optimizer``'s groups, in the model.

    Raises:
        ValueError: the optimizer holds a parameter the model does not (a bug in the caller).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    try:
        return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not the model's") from None


def id_keyed(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """A name-keyed optimizer state (``get_optimizer_state_dict``'s) as a plain optimizer's
    ``state_dict()``: parameters numbered in the order of its groups, tensors on the CPU."""
    flat = [name for group in names for name in group]
    index = {name: i for i, name in enumerate(flat)}
    per_param = {
        index[name]: {k: _cpu(v) for k, v in values.items()}
        for name, values in state["state"].items()
    }
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [index[n] for n in gnames]}
        for group, gnames in zip(state["param_groups"], names, strict=True)
    ]
    return {"state": per_param, "param_groups": groups}


def fqn_keyed(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """A plain optimizer's ``state_dict()`` keyed by parameter names (the inverse of
    :func:`id_keyed`), as ``set_optimizer_state_dict`` takes it."""
    flat = [name for group in names for name in group]
    per_param = {flat[int(i)]: values for i, values in state["state"].items()}
    groups = [
        {
            **{k: v for k, v in group.items() if k != "params"},
            "params": [flat[int(i)] for i in group["params"]],
        }
        for group in state["param_groups"]
    ]
    return {"state": per_param, "param_groups": groups}


def save_model_and_optimizer(
    backend: Backend, optimizer: torch.optim.Optimizer, checkpoint: Path
) -> tuple[Any, Any]:
    """The checkpoint's ``model`` and ``optimizer`` entries (every rank calls it).

    A sharded backend writes ``ckpt-<step>.dcp/`` now (see the module docstring) and both
    entries name it; any other returns its full state dicts.

    Raises:
        BackendError: on every rank, when rank 0 could not rename the shards into place, or
            a rank does not see them there (the run directory is not shared by the nodes);
            the previous checkpoints are untouched. (DCP's own write errors come as its
            ``CheckpointException``.)
    """
    if not isinstance(backend, ShardedCheckpointing):
        return backend.model_state_dict(), backend.optimizer_state_dict(optimizer)
    final = sharded_dir(checkpoint)
    temporary = final.with_name(f".{final.name}.tmp")
    if backend.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # a write a kill cut short
    backend.barrier()
    backend.save_sharded(temporary, optimizer)  # returns once every rank's shards are written
    why = ""
    if backend.is_main:
        try:
            _replace_dir(temporary, final)
        except OSError as err:
            why = f"{type(err).__name__}: {err}"
    # The all-reduce also holds every rank until rank 0 has renamed the shards.
    if backend.all_reduce(torch.tensor([float(bool(why))]), "max").item():
        raise BackendError(
            f"the shards of this checkpoint could not be moved into {final} "
            f"({why or 'on rank 0'}). The previous checkpoints are untouched. Fix: free space "
            "in (or allow writes to) the run directory, then rerun with --resume."
        )
    # Every rank must see the renamed shards: a rank on a node whose run directory is its own
    # disk wrote its shards there, where no resume would find them. Said now, not at a resume.
    require_seen(backend, final / ".metadata", "which rank 0 wrote")
    entry = {SHARDED_KEY: final.name}
    return entry, dict(entry)


def load_model_and_optimizer(
    backend: Backend,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    run_dir: Path,
) -> None:
    """Load a checkpoint's model and optimizer, full or sharded, into any backend.

    Args:
        backend: The started backend (after ``setup``).
        model: The model the trainer built (the backend's, sharded in place under FSDP).
        optimizer: The optimizer over its parameters.
        state: The checkpoint (:func:`distgrow.checkpoint.load_checkpoint`).
        run_dir: The run directory that holds a sharded checkpoint's DCP directory.
    """
    if not is_sharded(state["model"]):
        backend.load_model_state_dict(state["model"])
        backend.load_optimizer_state_dict(optimizer, state["optimizer"])
        return
    path = run_dir / state["model"][SHARDED_KEY]
    if isinstance(backend, ShardedCheckpointing):
        # A relaunch wider onto a node whose run directory is its own disk (nothing saved
        # there yet): the same line as after a save, not DCP's FileNotFoundError per rank.
        require_seen(backend, path / ".metadata", "of the checkpoint this run resumes from")
        backend.load_sharded(path, optimizer)
        return
    full = read_full(path)
    backend.load_model_state_dict(full["model"])
    backend.load_optimizer_state_dict(
        optimizer, id_keyed(full["optim"], parameter_names(model, optimizer))
    )


def read_full(path: Path) -> dict[str, Any]:
    """A DCP checkpoint read whole into this process (no process group, CPU tensors).

    Returns:
        ``{"model": {name: tensor}, "optim": {"state": {name: {...}}, "param_groups": [...]}}``
        as :meth:`ShardedCheckpointing.save_sharded` wrote them, unsharded.
    """
    # Imported here: torch.distributed.checkpoint adds ~1 s to every run's start-up otherwise.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata()
    flat: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            flat[key] = None  # a plain value (an LR, a flag): DCP replaces it when it loads
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(flat, storage_reader=reader, no_dist=True)
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return _unflatten(flat, mappings)


def _unflatten(flat: dict[str, Any], mappings: dict[str, Any]) -> Any:
    """DCP's flat keys (``optim.param_groups.0.lr``) back into the nested dicts and lists,
    by the paths its save planner recorded (``("optim", "param_groups", 0, "lr")``)."""
    root: dict[Any, Any] = {}
    for key, value in flat.items():
        path = tuple(mappings.get(key, (key,)))
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _lists(root)


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 (DCP's list indices) as lists, recursively."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    keys = list(converted)
    if keys and all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(len(keys))):
        return [converted[i] for i in range(len(keys))]
    return converted


SEEN_WITHIN_S = 60.0
"""How long a rank waits to see the shards rank 0 renamed: a network file system may cache a
directory's entries on other nodes for some seconds (NFS: ``acdirmax``, 60 s by default).
``DISTGROW_SHARDS_SEEN_WITHIN_S`` replaces it (a mount with a longer cache; a test)."""

SEEN_WITHIN_ENV = "DISTGROW_SHARDS_SEEN_WITHIN_S"


def seen_within_s() -> float:
    """:data:`SEEN_WITHIN_S`, or the seconds ``DISTGROW_SHARDS_SEEN_WITHIN_S`` gives.

    Raises:
        BackendError: the variable is not a number of seconds >= 0.
    """
    raw = os.environ.get(SEEN_WITHIN_ENV)
    if raw is None:
        return SEEN_WITHIN_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise BackendError(
            f"{SEEN_WITHIN_ENV}={raw!r} is not a number of seconds. Fix: unset it (60 s), or "
            f"set it to the seconds a rank may wait to see shards another node wrote, e.g. 120."
        )
    return value


def require_seen(backend: Backend, metadata: Path, whose: str) -> None:
    """Every rank checks it sees ``metadata`` (DCP's ``.metadata`` of a checkpoint's shards),
    waiting :func:`seen_within_s` for a network file system's cache; a collective.

    Raises:
        BackendError: on every rank, when one rank does not see it (the run directory is not
            one file system shared by every node).
    """
    unseen = torch.tensor([float(not _appears(metadata, seen_within_s()))])
    if backend.all_reduce(unseen, "max").item():
        raise BackendError(
            f"a rank does not see {metadata}, {whose}: under backend.name=fsdp every rank "
            "writes and reads its shards in the run directory, so it must be one shared file "
            "system on every node. Fix: set run.output_dir to a shared path (NFS, Lustre, ...), "
            "or use backend.name=torch."
        )


def _appears(path: Path, within_s: float) -> bool:
    """Whether ``path`` exists now or within ``within_s`` seconds (polled)."""
    deadline = time.monotonic() + within_s
    while not path.is_file():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _replace_dir(temporary: Path, final: Path) -> None:
    """Rename ``temporary`` to ``final``; an existing ``final`` (the same step saved again) is
    set aside first and removed after."""
    aside = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    temporary.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def _cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
