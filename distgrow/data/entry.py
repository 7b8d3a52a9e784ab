"""Your own data: ``data.name: "package.module:function"`` or ``"path/to/file.py:function"``.

The function is called with ``data.kwargs`` and returns ``(train, val)`` or
``(train, val, collate_fn)``: two map-style ``torch.utils.data.Dataset`` (``__len__`` and
``__getitem__``; an ``IterableDataset`` has no fixed order to shard) and an optional collate
function that turns a list of items into ``(inputs, targets)`` (default: torch's
``default_collate``). :func:`load_torch_datasets` does that and checks it; a DataLoader-driven
feed can start from it. :func:`entry_bundle` reads every item once into an in-memory
:class:`ArrayDataset` (the trainer's fast path): integer targets are class labels
(classification, ``num_classes`` = the largest label + 1), float targets are regression.

It must return the same data each time it is called (a relaunch, a resume and every worker call
it again): seed any randomness of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset, default_collate

from distgrow.config import DataConfig
from distgrow.data.containers import ArrayDataset, DataBundle
from distgrow.entrypoints import EntryPointError, call_entry_point

__all__ = ["TorchSplits", "entry_bundle", "load_torch_datasets"]

# Items read per collate call while materialising.
_CHUNK = 1024


@dataclass(frozen=True)
class TorchSplits:
    """What a ``data.name`` entry point returned, checked.

    Attributes:
        train: The training Dataset (map-style).
        val: The validation Dataset (map-style).
        collate_fn: Turns a list of items into ``(inputs, targets)``; None: ``default_collate``.
    """

    train: Any
    val: Any
    collate_fn: Callable[[list[Any]], Any] | None


def _map_style(value: Any) -> bool:
    return (
        not isinstance(value, IterableDataset)
        and hasattr(value, "__getitem__")
        and hasattr(value, "__len__")
    )


def _returns_splits(value: Any) -> bool:
    if not isinstance(value, tuple | list) or len(value) not in (2, 3):
        return False
    collate_ok = len(value) == 2 or value[2] is None or callable(value[2])
    return _map_style(value[0]) and _map_style(value[1]) and collate_ok


def load_torch_datasets(cfg: DataConfig) -> TorchSplits:
    """Call the ``data.name`` entry point with ``data.kwargs`` and check what it returned.

    Raises:
        EntryPointError: Not importable, the call failed, or it did not return two map-style
            Datasets (and an optional collate function); one line naming ``data.name``.
    """
    result = call_entry_point(
        "data.name",
        cfg.name,
        cfg.kwargs,
        "(train, val) or (train, val, collate_fn): map-style torch.utils.data.Datasets "
        "(with __len__ and __getitem__)",
        _returns_splits,
    )
    return TorchSplits(result[0], result[1], result[2] if len(result) == 3 else None)


def _materialise(
    cfg: DataConfig,
    split: str,
    dataset: Any,
    collate: Callable[[list[Any]], Any],
    limit: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset) if limit is None else min(len(dataset), limit)
    if n < 1:
        raise EntryPointError(
            f"data.name = {cfg.name!r}: the {split} Dataset is empty. Fix: return at least one "
            "sample in each split."
        )
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    for start in range(0, n, _CHUNK):
        indices = range(start, min(n, start + _CHUNK))
        try:
            batch = collate([dataset[i] for i in indices])
        except Exception as exc:
            raise EntryPointError(
                f"data.name = {cfg.name!r}: items {start}..{indices[-1]} of the {split} Dataset "
                f"do not collate ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}), "
                "expected (input tensor, label) items. Fix: return tensors and numbers, or a "
                "collate function as the third value."
            ) from exc
        x, y = _inputs_targets(cfg, split, batch, len(indices))
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _inputs_targets(
    cfg: DataConfig, split: str, batch: Any, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    ok = (
        isinstance(batch, Sequence)
        and len(batch) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n for t in batch)
    )
    if not ok:
        if isinstance(batch, Sequence):
            found = "(" + ", ".join(_shape_words(t) for t in batch[:4]) + ")"
        else:
            found = _shape_words(batch)
        raise EntryPointError(
            f"data.name = {cfg.name!r}: {n} items of the {split} Dataset collate into {found}, "
            f"expected (inputs, targets): two tensors of {n} rows. Fix: make each item "
            "(input tensor, label), or return a collate function that builds that pair."
        )
    x, y = batch
    return x, y


def _shape_words(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return type(value).__name__


def entry_bundle(cfg: DataConfig, *, seed: int = 0) -> DataBundle:
    """The entry point's data, read into memory as a :class:`DataBundle`.

    Args:
        cfg: The data section; ``name`` is an entry point, ``kwargs`` its arguments,
            ``limit_train`` / ``limit_val`` keep the first k samples.
        seed: Unused: the function is called without it and must be deterministic (kept for
            the signature of the other loaders).

    Raises:
        EntryPointError: What :func:`load_torch_datasets` refuses, an empty split, items that
            do not collate into (inputs, targets), or targets that are neither labels nor
            numbers; one line naming ``data.name``.
    """
    del seed
    splits = load_torch_datasets(cfg)
    collate = splits.collate_fn or default_collate
    x_train, y_train = _materialise(cfg, "training", splits.train, collate, cfg.limit_train)
    x_val, y_val = _materialise(cfg, "validation", splits.val, collate, cfg.limit_val)
    if x_train.shape[1:] != x_val.shape[1:]:
        raise EntryPointError(
            f"data.name = {cfg.name!r}: training inputs have shape {list(x_train.shape[1:])} "
            f"per sample, validation inputs {list(x_val.shape[1:])}. Fix: make them match."
        )
    classes = not y_train.is_floating_point() and y_train.dtype != torch.bool
    if classes != (not y_val.is_floating_point() and y_val.dtype != torch.bool):
        raise EntryPointError(
            f"data.name = {cfg.name!r}: training targets are {y_train.dtype}, validation "
            f"targets {y_val.dtype}. Fix: class labels (integers) in both, or numbers in both."
        )
    num_classes = 0
    if classes:
        y_train, y_val = y_train.long(), y_val.long()
        low = int(min(y_train.min(), y_val.min()))
        if low < 0 or y_train.dim() != 1 or y_val.dim() != 1:
            raise EntryPointError(
                f"data.name = {cfg.name!r}: integer targets are class labels and must be one "
                f"per sample, from 0 (found shape {list(y_train.shape)}, smallest {low}). Fix: "
                "labels 0..C-1, or float targets for regression."
            )
        num_classes = int(max(y_train.max(), y_val.max())) + 1
    else:
        y_train, y_val = y_train.float(), y_val.float()
    # Models are float32; float64 inputs (numpy's default) would not meet their weights.
    x_train, x_val = (x.float() if x.dtype == torch.float64 else x for x in (x_train, x_val))
    return DataBundle(
        name=cfg.name,
        train=ArrayDataset(x_train, y_train),
        val=ArrayDataset(x_val, y_val),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_classes=num_classes,
        task="classification" if classes else "regression",
    )
