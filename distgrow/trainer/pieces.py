"""Pieces the training loop uses: the optimizer and model of a config, and what draws random."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from distgrow.config import Config, OptimConfig
from distgrow.data import (
    DataBundle,
)
from distgrow.entrypoints import EntryPointError, is_entry_point
from distgrow.models import build_entry_model, build_model
from distgrow.planner import Plan
from distgrow.state import TrainError


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer of ``optim.name`` with the config's start values.

    The learning rate and momentum are overwritten before every update from the plan; betas,
    eps and weight decay stay as configured.
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.name == "adam":
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.RMSprop(
        params, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def build_run_model(cfg: Config, data: DataBundle) -> nn.Module:
    """The model of ``cfg.model`` for ``data`` (on the CPU; also what ``distgrow probe`` runs).

    Raises:
        TrainError: the model cannot be built for this data (or this install).
    """
    m, d = cfg.model, data
    if is_entry_point(m.name):
        try:
            return build_entry_model(m.name, m.kwargs)
        except EntryPointError as err:
            raise TrainError(str(err)) from err
    if d.num_classes > 0:
        outputs = d.num_classes
    else:
        outputs = 1 if d.train.y.dim() == 1 else int(d.train.y.shape[1])
    try:
        return build_model(
            m.name,
            input_shape=d.input_shape,
            num_outputs=outputs,
            hidden=list(m.hidden) if m.name == "mlp" else None,
            dropout=m.dropout,
            depth=m.depth,
            width=m.width,
            ghost_batch=m.ghost_batch,
        )
    except (ValueError, ImportError) as err:  # the model does not fit this data or install
        raise TrainError(
            f"model.name = {m.name!r} cannot be built for data.name = {d.name!r} (samples "
            f"of shape {d.input_shape}): {err}"
        ) from err


def _count_realisations(plan: Plan) -> int:
    """Phases of a plan as the trainer counts them: a new one at each change of split."""
    splits = [p.split for p in plan.phases]
    return sum(1 for i, split in enumerate(splits) if i == 0 or split != splits[i - 1])


# Modules of torch.nn that draw random numbers in training mode; every other torch.nn module
# is deterministic, and so are these of distgrow's own models.
_RANDOM_TORCH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


_DETERMINISTIC_OWN_MODULES = frozenset({"GhostBatchNorm", "_SmallCNN", "_WideBlock", "_WideResNet"})


def draws_random(model: nn.Module) -> bool:
    """Whether ``model`` may draw random numbers in a training forward (or backward).

    True unless every submodule is a torch.nn layer that draws none (not dropout, not RReLU)
    or one of distgrow's own deterministic modules: a user's module, whose ``forward`` could
    call ``torch.rand``, counts as random, as does a dropout layer of any rate.
    """
    for module in model.modules():
        kind = type(module)
        if isinstance(module, _RANDOM_TORCH_MODULES):
            return True
        if isinstance(module, nn.MultiheadAttention | nn.RNNBase) and module.dropout > 0:
            return True  # functional dropout inside (attention weights, between RNN layers)
        if kind.__module__.startswith("torch.nn.modules."):
            continue
        if kind.__module__ == "distgrow.models" and kind.__name__ in _DETERMINISTIC_OWN_MODULES:
            continue
        if kind.__module__.startswith("torchvision.models.") and kind.__name__ in (
            "BasicBlock",
            "Bottleneck",
            "ResNet",
        ):
            continue  # distgrow's torchvision ResNets: convolutions, batch norm, ReLU, pooling
        return True
    return False


def _reseed(seed: int, device: torch.device) -> None:
    """``torch.manual_seed(seed)`` for the generators a micro-batch draws from (dropout).

    ``torch.manual_seed`` also queues a seed for every CUDA device, and while CUDA is not
    initialised (every CPU run) it records a Python traceback each time: 0.2-1 ms per call,
    about a tenth of a batch-128 MLP update on the CPU (docs/speed.md). The CPU generator and
    this device's are the same draws.
    """
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator (set by the backend)


def _print_flush(line: str) -> None:
    print(line, flush=True)


def val_pieces(n: int, chunk: int, piece: int, world: int) -> list[list[tuple[int, int, int]]]:
    """Each rank's validation forwards: ``(chunk index, first sample, end)``, in order.

    The ``n`` samples are cut into chunks of ``chunk`` (one row of sums each, so the totals do
    not depend on the world size), chunk ``c`` goes to rank ``c % world``, and each chunk is
    fed in pieces of at most ``piece`` samples (what a training micro-batch may hold).
    """
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
    for c in range(math.ceil(n / chunk)):
        end = min(n, (c + 1) * chunk)
        out[c % world].extend(
            (c, start, min(end, start + piece)) for start in range(c * chunk, end, piece)
        )
    return out
