"""What a run does differently on a CUDA device: where the data lives, the model's memory
format and compilation, and the memory it used.

* In-memory data sets (``data.feed=memory``) are moved to the device once when they take at
  most ``data.device_fraction`` of its free memory, so every batch is gathered there; otherwise
  each batch's stored rows are gathered into pinned host memory, copied without blocking, and
  transformed (normalised, augmented) on the device (:class:`PinnedArrays`).
* ``run.channels_last`` puts a convolution model's weights and 4-D inputs in the channels_last
  memory format (auto: on CUDA only, where cuDNN's NHWC kernels are the fast ones);
  ``run.compile`` compiles the model's forward in place (the state dict keeps its keys, so
  checkpoints load under either setting).
* :func:`cuda_peak_memory` reads (and resets) the peak allocated and reserved CUDA memory; the
  trainer's :class:`~distgrow.savings.PhaseTracker` records it per phase.

The decisions are pure functions (:func:`data_placement`, :func:`wants_channels_last`), tested
on the CPU; the CUDA paths themselves have not run on a GPU in this project's CI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from distgrow.config import RunConfig
from distgrow.data import ArrayDataset, DataBundle

Placement = Literal["device", "pinned", "host"]


def data_placement(
    data_bytes: int, free_bytes: int | None, fraction: float, device_type: str
) -> Placement:
    """Where an in-memory data set lives during training.

    Args:
        data_bytes: The training and validation tensors' bytes.
        free_bytes: The device's free memory (None off CUDA).
        fraction: ``data.device_fraction``: the share of the free memory the data may take.
        device_type: ``cpu`` or ``cuda``.

    Returns:
        ``device`` (moved once, batches gathered there), ``pinned`` (gathered in pinned host
        memory and copied without blocking) or ``host`` (the CPU: nothing to do).
    """
    if device_type != "cuda":
        return "host"
    if free_bytes is not None and fraction > 0 and data_bytes <= fraction * free_bytes:
        return "device"
    return "pinned"


@dataclass
class PinnedArrays(ArrayDataset):
    """An :class:`ArrayDataset` whose batches are gathered on the host and transformed on the
    device: the stored rows (``uint8`` images: a quarter of the float32 bytes) go into pinned
    memory, cross without blocking the host, and the transform runs where the model does.

    ``pin=False`` gathers into ordinary memory (the CPU tests; torch cannot pin without CUDA).
    The result has the same bits as :meth:`ArrayDataset.batch` of the same data on the host:
    the crop and flip are gathers, and :class:`~distgrow.data.transforms.NormalizeImages`
    looks its values up in a table made on the host (CUDA's own ``x / 255.0`` is
    ``x * (1 / 255)``, one ulp off the CPU's for 126 of the 256 byte values). A user's
    transform that computes on the device may differ in the last bits.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pin: bool = True

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformed ``(x, y)`` of ``indices``, on :attr:`device`."""
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            return super().batch(indices, epoch)  # the same error as the plain dataset's
        idx = indices.to(dtype=torch.long)
        idx = torch.where(idx < 0, idx + len(self), idx)
        # Pinned buffers come from torch's caching host allocator, which reuses a block only
        # after the copy that reads it has finished: a fresh buffer per batch is safe and cheap.
        x = torch.empty((idx.numel(), *self.x.shape[1:]), dtype=self.x.dtype, pin_memory=self.pin)
        y = torch.empty((idx.numel(), *self.y.shape[1:]), dtype=self.y.dtype, pin_memory=self.pin)
        torch.index_select(self.x, 0, idx, out=x)
        torch.index_select(self.y, 0, idx, out=y)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.transform is not None:
            x = self.transform(x, idx, epoch)  # host indices (BatchTransform): no wait
        return x, y


def _tensor_bytes(data: ArrayDataset) -> int:
    return data.x.numel() * data.x.element_size() + data.y.numel() * data.y.element_size()


def place_data(
    data: DataBundle, device: torch.device, fraction: float, say: Callable[[str], None]
) -> DataBundle:
    """``data`` with its in-memory splits where :func:`data_placement` puts them.

    Data read through a ``DataLoader`` (``data.feed=loader``) is left alone: its loader pins
    batches (``data.pin_memory``). On the CPU nothing changes.
    """
    train, val = data.train, data.val
    if device.type != "cuda" or type(train) is not ArrayDataset or type(val) is not ArrayDataset:
        return data
    total = _tensor_bytes(train) + _tensor_bytes(val)
    free, _ = torch.cuda.mem_get_info(device)
    where = data_placement(total, free, fraction, device.type)
    if where == "device":
        say(
            f"data: {total / 2**20:,.0f} MiB of tensors moved to {device} once (data.device_"
            f"fraction={fraction:g} of {free / 2**30:.1f} GiB free); batches are gathered there"
        )
        return replace(
            data,
            train=ArrayDataset(train.x.to(device), train.y.to(device), train.transform),
            val=ArrayDataset(val.x.to(device), val.y.to(device), val.transform),
        )
    say(
        f"data: {total / 2**20:,.0f} MiB stays in host memory (over data.device_fraction="
        f"{fraction:g} of {free / 2**30:.1f} GiB free); batches are copied from pinned memory"
    )
    return replace(
        data,
        train=PinnedArrays(train.x, train.y, train.transform, device=device),
        val=PinnedArrays(val.x, val.y, val.transform, device=device),
    )


def has_conv2d(model: nn.Module) -> bool:
    """True when the model holds a 2-D convolution (4-D weights channels_last applies to)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def wants_channels_last(setting: str | bool, device_type: str, model_has_conv2d: bool) -> bool:
    """``run.channels_last`` resolved: ``auto`` is on for 2-D convolutions on CUDA only (on
    the CPU, oneDNN's blocked formats gain little from it, and the MLPs have no convolution)."""
    if setting == "auto":
        return device_type == "cuda" and model_has_conv2d
    return bool(setting) and model_has_conv2d


def _channels_last_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    del module
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point()
        else a
        for a in args
    )


def configure_tf32(enabled: bool) -> None:
    """``run.tf32``: CUDA's fp32 matmuls and cuDNN convolutions in TF32 (or IEEE fp32).

    Process-wide flags that touch CUDA kernels only (the CPU's matmuls keep their precision).
    GPUs before Ampere have no TF32 and compute in fp32 whatever the flag says.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def prepare_model(
    model: nn.Module, device: torch.device, run: RunConfig, compile_backend: Any = "inductor"
) -> nn.Module:
    """The model (already on ``device``) in channels_last and compiled, as ``run`` asks.

    On CUDA it also sets ``run.tf32`` (:func:`configure_tf32`). Both change the module in
    place and keep its state-dict keys: a forward pre-hook turns 4-D
    inputs channels_last (weights alone would let the first convolution copy its input), and
    the instance's ``forward`` is replaced by its ``torch.compile`` (``torch.compile(model)``
    would wrap the module and prefix every key with ``_orig_mod.``; ``nn.Module.compile()``
    captured no graph in torch 2.13 here).

    Args:
        model: The model, on ``device``.
        device: Where it trains.
        run: ``run.channels_last`` and ``run.compile``.
        compile_backend: ``torch.compile``'s backend (tests pass a cheap one: inductor's C++
            build takes minutes on a small CPU).
    """
    if device.type == "cuda":
        configure_tf32(run.tf32)
    if wants_channels_last(run.channels_last, device.type, has_conv2d(model)):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        model.register_forward_pre_hook(_channels_last_inputs)
    if run.compile:
        model.forward = torch.compile(model.forward, backend=compile_backend)
    return model


MemoryReader = Callable[[], tuple[int, int]]


def cuda_peak_memory(device: torch.device) -> MemoryReader | None:
    """A reader of ``(peak allocated, peak reserved)`` bytes on ``device`` since its last
    call (it resets the peaks); None off CUDA, so CPU runs record no memory at all."""
    if device.type != "cuda":
        return None

    def read() -> tuple[int, int]:
        peaks = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peaks[0]), int(peaks[1])

    return read
