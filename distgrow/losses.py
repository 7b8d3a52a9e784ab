"""The training loss and the validation metric: built-ins or the user's own functions.

The contract that keeps accumulation exact: a loss gives each sample's loss (a tensor of shape
``[n]``) or their **sum** (a scalar), never a batch mean. The trainer sums a micro-batch's
per-sample losses and scales the sum by ``world_size / n`` (``n`` the samples of the global
batch; see :mod:`distgrow.backends.base`), so the gradient is the global batch's mean gradient
however the batch is split over workers and accumulation steps, and an empty micro-batch
contributes 0. A mean per micro-batch would weight samples by the size of their micro-batch.
:meth:`Objective.check` enforces it before training: it calls the loss on a few samples, all
together and one by one, and refuses a batch mean with one line.

Built-in losses (``loss.name``): ``auto`` (``cross_entropy`` for class labels, ``mse`` for
regression targets, distgrow's behaviour before this section existed), ``cross_entropy``,
``nll``, and the element-wise ``mse``, ``l1``, ``smooth_l1``, ``bce_with_logits`` (each
sample's loss is the mean over its output elements). ``loss.kwargs`` go to torch's function
(e.g. ``label_smoothing`` for cross_entropy, ``beta`` for smooth_l1).

An entry point (``"module:function"`` / ``"file.py:function"``) is called as
``function(outputs, targets, **loss.kwargs)``; a class (``"torch.nn:HuberLoss"``) is built once
with ``loss.kwargs`` and then called as ``instance(outputs, targets)``.

The metric (``loss.metric``): ``accuracy`` (classification), ``loss`` (the validation loss
only), ``auto`` (accuracy for classification, else the loss only) or an entry point
``function(outputs, targets)`` under the same contract (per-sample scores or their sum), logged
as ``val_metric``: its mean over the validation set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgrow.config import LossConfig
from distgrow.entrypoints import (
    EntryPointError,
    is_entry_point,
    resolve_entry_point,
)

__all__ = ["LOSSES", "LossSum", "Objective", "build_objective", "loss_sum"]

LossSum = Callable[[Tensor, Tensor], Tensor]
"""``(outputs, targets) -> the sum over samples`` (a scalar tensor)."""

# Samples the contract check runs on: enough to tell a sum from a mean, cheap for any model.
_CHECK_SAMPLES = 8
_CHECK_RTOL = 1e-4


def _elementwise(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A per-element torch loss as a sum over samples of each sample's mean over its outputs."""

    def summed(outputs: Tensor, targets: Tensor, **kwargs: Any) -> Tensor:
        if outputs.numel() == targets.numel():
            outputs = outputs.reshape(targets.shape)  # (n, 1) outputs for (n,) targets
        per_element = fn(outputs, targets.to(outputs.dtype), reduction="none", **kwargs)
        if per_element.dim() > 1:
            return per_element.flatten(1).mean(1).sum()
        return per_element.sum()

    return summed


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    # Written out (not F.mse_loss) to keep the numbers distgrow gave before loss.name existed.
    if outputs.numel() == targets.numel():
        outputs = outputs.reshape(targets.shape)
    squared = (outputs - targets) ** 2
    return squared.flatten(1).mean(1).sum() if squared.dim() > 1 else squared.sum()


def _cross_entropy(outputs: Tensor, targets: Tensor, **kwargs: Any) -> Tensor:
    if outputs.dim() == 3 and targets.dim() == 2:  # sequences: each counts its mean per token
        per_token = F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none", **kwargs)
        return per_token.mean(1).sum()
    return F.cross_entropy(outputs, targets, reduction="sum", **kwargs)


def _nll(outputs: Tensor, targets: Tensor, **kwargs: Any) -> Tensor:
    return F.nll_loss(outputs, targets, reduction="sum", **kwargs)


LOSSES: dict[str, Callable[..., Tensor]] = {
    "cross_entropy": _cross_entropy,
    "nll": _nll,
    "mse": _mse,
    "l1": _elementwise(F.l1_loss),
    "smooth_l1": _elementwise(F.smooth_l1_loss),
    "bce_with_logits": _elementwise(F.binary_cross_entropy_with_logits),
}
"""Built-in losses: each returns the sum over samples of the per-sample losses."""

# Losses whose targets are class indices: they need a classification data set.
_CLASS_LOSSES = ("cross_entropy", "nll")


def loss_sum(outputs: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """The sum over samples of each sample's loss (cross-entropy, or MSE for regression).

    ``loss.name: auto``. A sum, not a mean, so that the trainer can divide by the global
    batch's size: an empty micro-batch gives 0 with gradients of 0 for every parameter.
    """
    if num_classes > 0:
        return _cross_entropy(outputs, targets)
    return _mse(outputs, targets)


def _accuracy_sum(outputs: Tensor, targets: Tensor) -> Tensor:
    if outputs.dim() == 3 and targets.dim() == 2:  # sequences: each its next-token accuracy
        return (outputs.argmax(-1) == targets).float().mean(1).sum()
    return (outputs.argmax(1) == targets).sum()


class _UserSum:
    """A user's loss or metric, reduced to a sum over samples (checked on every call)."""

    def __init__(self, key: str, value: str, fn: Callable[[Tensor, Tensor], Any]) -> None:
        self.key, self.value, self.fn = key, value, fn

    def raw(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """What the function returns, checked to be a tensor of shape [] or [n]."""
        n = outputs.shape[0]
        result = self.fn(outputs, targets)
        if not isinstance(result, Tensor):
            raise ValueError(
                f"{self.key} = {self.value!r}: returned {type(result).__name__}, expected a "
                f"tensor of per-sample values (shape [{n}]) or their sum (a scalar). Fix: return "
                "a tensor, e.g. F.cross_entropy(outputs, targets, reduction='none')."
            )
        if result.dim() == 0 or tuple(result.shape) == (n,):
            return result
        raise ValueError(
            f"{self.key} = {self.value!r}: returned shape {list(result.shape)} for a batch of "
            f"{n}, expected per-sample values (shape [{n}]) or their sum (shape []). Fix: "
            "reduce each sample's values to one, e.g. .flatten(1).mean(1)."
        )

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        result = self.raw(outputs, targets)
        return result if result.dim() == 0 else result.sum()


def _user_loss(key: str, value: str, kwargs: dict[str, Any]) -> _UserSum:
    target = resolve_entry_point(key, value)
    if isinstance(target, type):
        # A loss class (torch.nn.HuberLoss, the user's own nn.Module): built once.
        try:
            instance = target(**kwargs)
        except Exception as exc:
            raise EntryPointError(
                f"{key} = {value!r}: building it with loss.kwargs {kwargs!r} failed "
                f"({type(exc).__name__}: {exc}). Fix: make loss.kwargs match its parameters."
            ) from exc
        if not callable(instance):
            raise EntryPointError(
                f"{key} = {value!r}: found a {type(instance).__name__} that cannot be called, "
                "expected a loss (outputs, targets) -> tensor. Fix: name a function or class."
            )
        return _UserSum(key, value, instance)
    if not callable(target):
        raise EntryPointError(
            f"{key} = {value!r}: found {type(target).__name__}, expected a function "
            "(outputs, targets) -> tensor. Fix: name a function."
        )

    def call(outputs: Tensor, targets: Tensor) -> Any:
        return target(outputs, targets, **kwargs)

    return _UserSum(key, value, call)


@dataclass(frozen=True)
class Objective:
    """What the trainer minimises and what it reports on the validation set.

    Attributes:
        loss_sum: ``(outputs, targets) -> Σ per-sample loss``.
        metric_sum: ``(outputs, targets) -> Σ per-sample score``, or None (the loss only).
        metric_key: The record key of the metric's mean: ``val_acc`` or ``val_metric``.
        loss_name: ``loss.name``, for messages.
        metric_name: ``loss.metric``, for messages.
    """

    loss_sum: LossSum
    metric_sum: LossSum | None
    metric_key: str
    loss_name: str = "auto"
    metric_name: str = "auto"

    def check(self, model: nn.Module, x: Tensor, y: Tensor, model_name: str) -> None:
        """Run the model, the loss and the metric on the samples ``x``, ``y`` and refuse a batch
        mean, a wrong shape or a call that fails, each with one line naming its key.

        The user's losses and metrics are called on all samples together and one by one: their
        sum must equal the sum of the parts. Runs in eval mode without gradients and restores
        torch's CPU RNG, so nothing is learnt and the run's random numbers do not move.

        Args:
            model: The model (its mode is restored afterwards).
            x: A few training inputs (two or more to tell a sum from a mean).
            y: Their targets.
            model_name: ``model.name``, for messages.

        Raises:
            ValueError: What failed, in one line.
        """
        was_training = model.training
        model.eval()
        # A forward that draws random numbers even in eval mode must not move the run's RNG.
        rng = torch.get_rng_state()
        try:
            with torch.no_grad():
                try:
                    outputs = model(x)
                except Exception as exc:
                    raise ValueError(
                        f"model.name = {model_name!r}: calling the model on a batch of inputs of "
                        f"shape {list(x.shape)} failed ({_brief(exc)}). Fix: make the model "
                        "accept the data's samples (see model.kwargs)."
                    ) from exc
                for key, value, fn in (
                    ("loss.name", self.loss_name, self.loss_sum),
                    ("loss.metric", self.metric_name, self.metric_sum),
                ):
                    if fn is None:
                        continue
                    try:
                        fn(outputs, y)
                    except ValueError:
                        raise  # already one line naming the key
                    except Exception as exc:
                        raise ValueError(
                            f"{key} = {value!r}: calling it on the model's outputs (shape "
                            f"{list(outputs.shape)}) and targets (shape {list(y.shape)}, "
                            f"{y.dtype}) failed ({_brief(exc)}). Fix: match the loss to the "
                            "model and data (loss.kwargs, the model's outputs)."
                        ) from exc
                    if isinstance(fn, _UserSum) and x.shape[0] >= 2:
                        _check_sum(fn, outputs, y)
        finally:
            model.train(was_training)
            torch.set_rng_state(rng)


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}"


def _check_sum(fn: _UserSum, outputs: Tensor, targets: Tensor) -> None:
    n = outputs.shape[0]
    whole = fn.raw(outputs, targets)
    if whole.dim() == 1:
        return  # per-sample values: the trainer sums them
    parts = [float(fn(outputs[i : i + 1], targets[i : i + 1])) for i in range(n)]
    total, value = sum(parts), float(whole)
    tol = _CHECK_RTOL * max(1.0, abs(total))
    if math.isclose(value, total, rel_tol=_CHECK_RTOL, abs_tol=tol):
        return
    if math.isclose(value, total / n, rel_tol=_CHECK_RTOL, abs_tol=tol):
        problem = (
            f"returned the batch mean ({value:.6g} on {n} samples whose losses sum to {total:.6g})"
        )
    else:
        problem = f"returned {value:.6g} on {n} samples whose losses one by one sum to {total:.6g}"
    raise ValueError(
        f"{fn.key} = {fn.value!r}: {problem}; expected per-sample values (shape [n]) or their "
        "sum, so that accumulation over micro-batches and workers stays exact. Fix: use "
        "reduction='none' (or 'sum') instead of a mean."
    )


def build_objective(cfg: LossConfig, num_classes: int) -> Objective:
    """The loss and metric of ``cfg`` for a data set with ``num_classes`` classes (0: regression).

    Raises:
        EntryPointError: An entry point cannot be imported or is not callable.
        ValueError: A built-in that does not fit the task (cross_entropy on regression
            targets, accuracy without classes).
    """
    kwargs = dict(cfg.kwargs)
    loss: LossSum
    if is_entry_point(cfg.name):
        loss = _user_loss("loss.name", cfg.name, kwargs)
    else:
        name = cfg.name
        if name == "auto":
            name = "cross_entropy" if num_classes > 0 else "mse"
        if name in _CLASS_LOSSES and num_classes == 0:
            raise ValueError(
                f"loss.name = {cfg.name!r} needs class labels, but the data has float targets "
                "(regression). Fix: loss.name=mse (or auto), or integer labels."
            )
        if kwargs and name == "mse":
            raise ValueError(f"loss.kwargs = {kwargs!r}: mse takes none. Fix: remove loss.kwargs.")
        loss = functools.partial(LOSSES[name], **kwargs)
    metric: LossSum | None = None
    key = "val_acc"
    if is_entry_point(cfg.metric):
        metric = _user_loss("loss.metric", cfg.metric, {})
        key = "val_metric"
    elif cfg.metric == "accuracy" or (cfg.metric == "auto" and num_classes > 0):
        if num_classes == 0:
            raise ValueError(
                "loss.metric = 'accuracy' needs class labels, but the data has float targets "
                "(regression). Fix: loss.metric=loss (or auto)."
            )
        metric = _accuracy_sum
    return Objective(
        loss_sum=loss,
        metric_sum=metric,
        metric_key=key,
        loss_name=cfg.name,
        metric_name=cfg.metric,
    )
