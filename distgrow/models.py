"""The networks distgrow trains: MLPs, a small CNN, a wide ResNet with ghost batch norm.

Smith et al. (2018) train a 16-4 wide ResNet whose batch norm is *ghost* batch norm: statistics
are computed over fixed-size ghost batches, so they do not change when the global batch grows,
nor with how it is realised (workers × micro-batch × accumulation). `GhostBatchNorm` is that
layer; every batch norm in `wrn` (and in `cnn` when asked) is one.

Your own network: `model.name: "package.module:function"` or `"path/to/file.py:function"`
(`build_entry_model`), called with `model.kwargs`; it must return an `nn.Module`. torchvision's
constructors work that way where torchvision imports (`"torchvision.models:resnet50"`).

All weights are drawn from torch's global RNG, so `torch.manual_seed(s)` before `build_model`
fixes the initial model. This module never imports `torch.distributed`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distgrow.entrypoints import call_entry_point
from distgrow.models_lm import TinyTransformer

__all__ = [
    "MAX_OUTPUTS",
    "MODELS",
    "GhostBatchNorm",
    "build_entry_model",
    "build_model",
    "count_parameters",
    "output_width",
    "uses_batch_norm",
]

MODELS: tuple[str, ...] = (
    "mlp",
    "bottleneck_mlp",
    "cnn",
    "wrn",
    "resnet18",
    "resnet34",
    "resnet50",
    "transformer",
)

_TORCHVISION_MODELS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
_IMAGE_MODELS: tuple[str, ...] = ("cnn", "wrn", *_TORCHVISION_MODELS)
_DEFAULT_MLP_HIDDEN: tuple[int, ...] = (512, 512)
# The paper's ghost batch (Smith et al. 2018, following Hoffer et al. 2017).
_DEFAULT_WRN_GHOST_BATCH = 128
# The covtype article's dropout rate (seed 000).
_ARTICLE_DROPOUT = 0.25
# Two 2×2 max-pools in `cnn` need at least 4 pixels per side.
_CNN_MIN_SIDE = 4
# A built-in head has one output per class, sized from the largest label + 1: more than this
# many is a label that is not a class number (an ID, a sentinel), not a real class count.
MAX_OUTPUTS = 1 << 20


class GhostBatchNorm(nn.Module):
    """Batch norm over fixed-size ghost batches (Hoffer et al. 2017), for (N, C, ...) inputs.

    In training, the batch is split along dim 0 into consecutive chunks of `ghost_batch`
    samples (the last one may be smaller) and each chunk is normalised with its own mean and
    variance; the affine weight and bias are shared. Running mean/var are updated once per
    chunk, in order, with the usual momentum, so they are a pure function of the sequence of
    chunks: feeding 4·g samples at once or as four micro-batches of g gives the same outputs,
    gradients and running statistics. In eval mode it uses the running statistics, exactly like
    `nn.BatchNorm1d/2d`, whose parameter and buffer names it shares (checkpoints map 1:1).

    It deliberately does not subclass `nn.modules.batchnorm._BatchNorm`: that would let
    `nn.SyncBatchNorm.convert_sync_batchnorm` silently replace it with a layer whose statistics
    span the whole global batch, the very dependence ghost batch norm exists to remove.

    Args:
        num_features: Channels C of the (N, C) or (N, C, H, W) input.
        ghost_batch: Samples per ghost batch (>= 1).
        eps: Added to the variance for numerical stability.
        momentum: Running-statistics momentum per chunk; None means a cumulative average, as in
            `nn.BatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        ghost_batch: int,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        _check_ghost_batch(ghost_batch)
        if num_features < 1:
            raise ValueError(
                f"GhostBatchNorm num_features ({num_features}) must be >= 1: "
                "pass the number of channels of the input."
            )
        self.num_features = num_features
        self.ghost_batch = ghost_batch
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.running_mean: Tensor
        self.running_var: Tensor
        self.num_batches_tracked: Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Reset running mean to 0, running var to 1 and the chunk counter to 0."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics and set the affine transform to the identity."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise `x` per ghost batch (training) or with running statistics (eval).

        Args:
            x: Input of shape (N, C) or (N, C, H, W); N may be 0.

        Returns:
            The normalised tensor, same shape as `x`.
        """
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"GhostBatchNorm expected input (N, {self.num_features}, ...) but got shape "
                f"{tuple(x.shape)}: pass (N, C) or (N, C, H, W) with C = {self.num_features}."
            )
        if not self.training or x.shape[0] == 0:
            # An empty micro-batch (a rank's share at the end of an epoch) has no statistics;
            # going through the eval path keeps the output attached to weight/bias, so backward
            # still produces (zero) gradients for every parameter, as DDP's all-reduce expects.
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        outputs = []
        for chunk in x.split(self.ghost_batch):
            values_per_channel = chunk.numel() // self.num_features
            if values_per_channel < 2:
                raise ValueError(
                    f"GhostBatchNorm got a ghost batch of {chunk.shape[0]} sample(s) with one "
                    f"value per channel (input shape {tuple(x.shape)}, ghost_batch "
                    f"{self.ghost_batch}); its variance is undefined: make the micro-batch a "
                    "multiple of ghost_batch."
                )
            # Counting per chunk (not per call) keeps momentum=None and checkpoints identical to
            # nn.BatchNorm applied chunk by chunk.
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked.item())
            else:
                factor = self.momentum
            outputs.append(
                F.batch_norm(
                    chunk,
                    self.running_mean,
                    self.running_var,
                    self.weight,
                    self.bias,
                    True,
                    factor,
                    self.eps,
                )
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, ghost_batch={self.ghost_batch}, eps={self.eps}, "
            f"momentum={self.momentum}"
        )


def uses_batch_norm(model: nn.Module) -> bool:
    """Whether the model has any batch-norm layer (plain, sync or ghost).

    The trainer needs this: batch norm makes results depend on how samples are grouped (ghost
    batches must align with micro-batches) and its running buffers must be kept in sync.

    Args:
        model: Any module.

    Returns:
        True if some submodule is an `nn.BatchNorm*`/`nn.SyncBatchNorm` or a `GhostBatchNorm`.
    """
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm | GhostBatchNorm) for m in model.modules()
    )


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not), each shared tensor counted once.

    Args:
        model: Any module.

    Returns:
        The total element count of `model.parameters()`.
    """
    return sum(p.numel() for p in model.parameters())


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: list[int] | None = None,
    dropout: float = 0.0,
    depth: int = 16,
    width: int = 4,
    ghost_batch: int | None = None,
) -> nn.Module:
    """Build one of `MODELS`, initialised from torch's global RNG.

    Args:
        name: One of `MODELS`.
        input_shape: Shape of one sample without the batch dim: any shape for the MLPs
            (flattened), (C, H, W) for `cnn`, `wrn` and the ResNets.
        num_outputs: Width of the final linear layer (classes; logits, no softmax).
        hidden: Hidden layer sizes for `mlp` (default [512, 512]); other models reject it.
        dropout: Dropout rate in [0, 1). `mlp`: after each hidden layer; `bottleneck_mlp`: the
            article's four dropouts use this rate when > 0, else the article's 0.25; `cnn`:
            before the head; `wrn`: between the two convolutions of each block. The ResNets
            have no dropout and reject a non-zero value.
        depth: `wrn` depth, 6n + 4 (16 in the paper).
        width: `wrn` widening factor k (4 in the paper).
        ghost_batch: Ghost batch size of every batch norm. `wrn` defaults to 128 (the paper).
            `cnn` gets GhostBatchNorm only when it is given (else no batch norm at all); the
            ResNets swap torchvision's nn.BatchNorm2d for GhostBatchNorm when it is given. The
            MLPs have no batch norm and reject it.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: Unknown name or an argument outside its constraint; the message names the
            value, the constraint and a fix.
        ImportError: A ResNet was asked for but torchvision cannot be imported.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}.")
    _check_common_args(name, input_shape, num_outputs, hidden, dropout, ghost_batch)
    if name == "transformer":  # input_shape is (seq_len,) token ids; outputs are the vocabulary
        return TinyTransformer(
            num_outputs, input_shape[0], depth=depth, width=width, dropout=dropout
        )
    if name == "mlp":
        return _build_mlp(input_shape, num_outputs, hidden, dropout)
    if name == "bottleneck_mlp":
        return _build_bottleneck_mlp(input_shape, num_outputs, dropout)
    channels, height, width_px = _check_image_shape(name, input_shape)
    if name == "cnn":
        if min(height, width_px) < _CNN_MIN_SIDE:
            raise ValueError(
                f"cnn input_shape {tuple(input_shape)} has sides below {_CNN_MIN_SIDE} pixels, "
                f"too small for its two 2×2 max-pools: use images of at least "
                f"{_CNN_MIN_SIDE}×{_CNN_MIN_SIDE}."
            )
        return _SmallCNN(channels, num_outputs, dropout, ghost_batch)
    if name == "wrn":
        _check_wrn_shape(depth, width)
        return _WideResNet(
            in_channels=channels,
            num_outputs=num_outputs,
            depth=depth,
            width=width,
            dropout=dropout,
            ghost_batch=_DEFAULT_WRN_GHOST_BATCH if ghost_batch is None else ghost_batch,
        )
    return _build_torchvision_resnet(name, channels, num_outputs, dropout, ghost_batch)


def build_entry_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The user's model: the function ``name`` ("module:function" / "file.py:function") called
    with ``kwargs``, initialised from torch's global RNG like the built-in ones.

    Args:
        name: ``model.name``, an entry point.
        kwargs: ``model.kwargs``.

    Returns:
        What the function returned, checked to be an ``nn.Module``, in training mode.

    Raises:
        EntryPointError: A missing module, file or attribute, a failing call, or a return
            value that is not an ``nn.Module``; one line naming ``model.name``.
    """
    model = call_entry_point(
        "model.name",
        name,
        kwargs,
        "a torch.nn.Module",
        lambda value: isinstance(value, nn.Module),
    )
    return model.train()


def output_width(model: nn.Module, x: Tensor) -> int | None:
    """The model's outputs per sample (the last dimension of ``model(x[:1])``), or None when the
    call fails or gives no ``(n, ..., outputs)`` tensor (the loss check says what is wrong).

    Runs in eval mode without gradients and restores torch's CPU RNG and the model's mode, so
    nothing is learnt and the run's random numbers do not move.
    """
    was_training = model.training
    rng = torch.get_rng_state()
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1])
    except Exception:
        return None
    finally:
        model.train(was_training)
        torch.set_rng_state(rng)
    return int(out.shape[-1]) if isinstance(out, Tensor) and out.dim() >= 2 else None


# ---------------------------------------------------------------------------- argument checks


def _check_ghost_batch(ghost_batch: int) -> None:
    # bool is an int subclass; True as a ghost batch is a config mistake, not "1".
    if isinstance(ghost_batch, bool) or not isinstance(ghost_batch, int) or ghost_batch < 1:
        raise ValueError(
            f"ghost_batch ({ghost_batch!r}) must be an integer >= 1: use the per-device "
            f"micro-batch or a divisor of it, e.g. {_DEFAULT_WRN_GHOST_BATCH} as in the paper."
        )


def _check_common_args(
    name: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden: list[int] | None,
    dropout: float,
    ghost_batch: int | None,
) -> None:
    if len(input_shape) == 0 or any(
        isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape
    ):
        raise ValueError(
            f"input_shape {input_shape!r} must be a non-empty tuple of positive integers "
            "(one sample, no batch dim): e.g. (54,) for covtype or (3, 32, 32) for CIFAR."
        )
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(
            f"num_outputs ({num_outputs!r}) must be an integer >= 1: use the number of classes."
        )
    if num_outputs > MAX_OUTPUTS:
        raise ValueError(
            f"num_outputs ({num_outputs:,}) is more than {MAX_OUTPUTS:,}: a head that large "
            "would take gigabytes. The classes are the largest label + 1: number them 0..C-1."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout ({dropout!r}) must be in [0, 1): use 0 to switch it off.")
    if hidden is not None:
        if name != "mlp":
            raise ValueError(
                f"hidden ({hidden!r}) applies only to 'mlp', not {name!r}: leave it unset."
            )
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(
                f"hidden ({hidden!r}) must list positive layer sizes: e.g. [512, 512]."
            )
    if ghost_batch is not None:
        _check_ghost_batch(ghost_batch)
        if name not in _IMAGE_MODELS:
            raise ValueError(
                f"ghost_batch ({ghost_batch}) was given but {name!r} has no batch norm: "
                f"leave it unset, or use one of {', '.join(_IMAGE_MODELS)}."
            )
    if dropout > 0.0 and name in _TORCHVISION_MODELS:
        raise ValueError(
            f"dropout ({dropout}) is not supported by torchvision's {name}: use 0, or 'wrn' "
            "which has dropout inside its blocks."
        )


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"{name} needs an image input_shape (C, H, W) but got {tuple(input_shape)}: "
            "e.g. (1, 28, 28) for MNIST or (3, 32, 32) for CIFAR; use 'mlp' for flat features."
        )
    channels, height, width = input_shape
    return channels, height, width


def _check_wrn_shape(depth: int, width: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"wrn depth ({depth!r}) must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...): "
            "use 16 as in the paper."
        )
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"wrn width ({width!r}) must be an integer >= 1: use 4 as in the paper.")


# ------------------------------------------------------------------------------------- MLPs


def _build_mlp(
    input_shape: tuple[int, ...], num_outputs: int, hidden: list[int] | None, dropout: float
) -> nn.Module:
    sizes = list(_DEFAULT_MLP_HIDDEN if hidden is None else hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for size in sizes:
        layers += [nn.Linear(in_features, size), nn.ReLU()]
        if dropout > 0.0:
            layers.append(nn.Dropout(dropout))
        in_features = size
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


def _build_bottleneck_mlp(
    input_shape: tuple[int, ...], num_outputs: int, dropout: float
) -> nn.Module:
    # The covtype article's Keras network (seed 000), layer for layer; "D" marks its dropouts.
    p = dropout if dropout > 0.0 else _ARTICLE_DROPOUT
    plan: list[int | str] = [512, "D", 256, 256, "D", 128, 256, 256, "D", 512, "D"]
    layers: list[nn.Module] = [nn.Flatten()]
    in_features = math.prod(input_shape)
    for item in plan:
        if item == "D":
            layers.append(nn.Dropout(p))
        else:
            assert isinstance(item, int)
            layers += [nn.Linear(in_features, item), nn.ReLU()]
            in_features = item
    # Logits: the article's softmax lives in the cross-entropy loss here.
    layers.append(nn.Linear(in_features, num_outputs))
    model = nn.Sequential(*layers)
    # Keras Dense defaults (glorot_uniform kernel, zero bias), so the translation starts from
    # the same distribution as the article, not torch's kaiming-uniform default.
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


# -------------------------------------------------------------------------------------- CNN


class _SmallCNN(nn.Module):
    """Three 3×3 conv blocks (32, 64, 128 channels) and a linear head; fast on CPU.

    With a ghost batch, each conv is followed by GhostBatchNorm (conv bias dropped: BN's shift
    makes it redundant); without, there is no normalisation at all.
    """

    def __init__(
        self, in_channels: int, num_outputs: int, dropout: float, ghost_batch: int | None
    ) -> None:
        super().__init__()
        widths = (32, 64, 128)
        blocks: list[nn.Module] = []
        previous = in_channels
        for index, channels in enumerate(widths):
            blocks.append(nn.Conv2d(previous, channels, 3, padding=1, bias=ghost_batch is None))
            if ghost_batch is not None:
                blocks.append(GhostBatchNorm(channels, ghost_batch))
            blocks.append(nn.ReLU())
            # Pool after the first two blocks; the last is averaged globally, so any image of
            # at least 4×4 (28×28 MNIST, 32×32 CIFAR) fits without a size-specific head.
            if index < len(widths) - 1:
                blocks.append(nn.MaxPool2d(2))
            previous = channels
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.head = nn.Linear(previous, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        features = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.head(self.dropout(features))


# ------------------------------------------------------------------------------ Wide ResNet


class _WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3×3-BN-ReLU-(dropout)-conv3×3, plus shortcut.

    As in Zagoruyko & Komodakis' reference code, when the shape changes the first BN-ReLU is
    shared by the residual branch and the 1×1 projection shortcut.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, ghost_batch: int
    ) -> None:
        super().__init__()
        self.bn1 = GhostBatchNorm(in_channels, ghost_batch)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = GhostBatchNorm(out_channels, ghost_batch)
        self.dropout = nn.Dropout(dropout) if dropout > 0.0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class _WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), CIFAR layout, every BN a GhostBatchNorm.

    Stem conv to 16 channels, three groups of n = (depth - 4) / 6 blocks at 16k, 32k, 64k
    channels (strides 1, 2, 2), final BN-ReLU, global average pool, linear head. Global pooling
    makes 32×32 (CIFAR, 8×8 at the end) and 28×28 (7×7 at the end) inputs both work.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_outputs: int,
        depth: int,
        width: int,
        dropout: float,
        ghost_batch: int,
    ) -> None:
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        groups: list[nn.Module] = []
        previous = 16
        for group_index, channels in enumerate(widths):
            stride = 1 if group_index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_group):
                blocks.append(
                    _WideBlock(
                        previous,
                        channels,
                        stride if block_index == 0 else 1,
                        dropout,
                        ghost_batch,
                    )
                )
                previous = channels
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.bn = GhostBatchNorm(previous, ghost_batch)
        self.head = nn.Linear(previous, num_outputs)
        # The reference WRN initialisation (MSR/He, fan-out) with a zero head bias.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.groups(self.stem(x))))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


# ----------------------------------------------------------------------------- torchvision


def _build_torchvision_resnet(
    name: str, in_channels: int, num_outputs: int, dropout: float, ghost_batch: int | None
) -> nn.Module:
    del dropout  # already rejected when non-zero
    try:
        # Optional and heavy: imported only when a ResNet is asked for.
        import torchvision
    except Exception as exc:  # a broken install raises RuntimeError, not only ImportError
        raise ImportError(
            f"{name} needs torchvision, which is unavailable here ({type(exc).__name__}: {exc}); "
            "with CPU-only torch 2.13 its only wheel is a CUDA build. Use 'wrn' (the paper's "
            "16-4 wide ResNet) or 'cnn' instead, or install a torchvision matching your torch."
        ) from exc
    constructors: dict[str, Callable[..., nn.Module]] = {
        "resnet18": torchvision.models.resnet18,
        "resnet34": torchvision.models.resnet34,
        "resnet50": torchvision.models.resnet50,
    }
    kwargs: dict[str, object] = {"weights": None, "num_classes": num_outputs}
    if ghost_batch is not None:
        ghost = ghost_batch  # bound for the closure, narrowed to int for mypy

        def norm_layer(num_features: int) -> nn.Module:
            return GhostBatchNorm(num_features, ghost)

        kwargs["norm_layer"] = norm_layer
    model = constructors[name](**kwargs)
    if in_channels != 3:
        # torchvision's stem is fixed at 3 channels; swap it, initialised as torchvision does.
        stem = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = stem
    return model
