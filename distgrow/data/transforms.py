"""Per-batch transforms of stored features: image normalisation and random crop and flip.

Random augmentation is a pure function of ``(seed, epoch, sample index)``, so the same sample
is augmented the same way whether it lands on rank 0 or rank 7, in micro-batch 1 or 3.
Transforms run on the stored ``uint8`` pixels of a batch, never on the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from distgrow.data.containers import BatchTransform, to_device
from distgrow.data.order import seed64, splitmix64

__all__ = [
    "AUGMENTATION",
    "Compose",
    "NormalizeImages",
    "RandomCropFlip",
    "crop_flip_params",
    "image_stats",
]


def image_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (of pixel / 255) of ``uint8`` images ``(N, C, H, W)``.

    Computed from a 256-bin histogram per channel: exact, and no float copy of the images.
    """
    arr = x.numpy()
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for channel in range(arr.shape[1]):
        counts = np.bincount(arr[:, channel].reshape(-1), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        means.append(mean)
        # A constant channel would divide by zero; scaling by 1 leaves it centred at 0.
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


class NormalizeImages:
    """``uint8`` images -> ``float32`` ``(pixel / 255 - mean) / std`` per channel.

    On a GPU, ``uint8`` pixels are looked up in a table of the 256 values per channel,
    computed once on the host with the formula above and copied bit for bit to the device:
    the same bits as on the CPU (CUDA computes ``x / 255.0`` as ``x * (1 / 255)``, one ulp off
    for 126 of the 256 byte values), and one gather instead of four passes. On the CPU the
    formula runs as written (the table's own arithmetic; a gather is slower there). Mean, std
    and table are copied to a device once, not per batch.
    """

    pointwise = True  # each image's output depends on that image alone (BatchTransform)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        values = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16)
        # (C, 256): the formula itself, evaluated on the host, flattened for torch.take.
        self.table = ((values / 255.0 - self.mean) / self.std).reshape(-1, 256)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _for(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The table, mean and std on ``device``: copied there once, not per batch."""
        if device not in self._on:
            self._on[device] = (
                to_device(self.table.reshape(-1), device),
                to_device(self.mean, device),
                to_device(self.std, device),
            )
        return self._on[device]

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        if x.device.type != "cpu" and x.dtype == torch.uint8 and x.dim() == 4:
            return self.lookup(x)
        # On the CPU the formula is the table's own arithmetic, and three times faster.
        _, mean, std = self._for(x.device)
        return (x.to(torch.float32) / 255.0 - mean) / std

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``(N, C, H, W)`` normalised by the table (what a GPU runs)."""
        table, _, _ = self._for(x.device)
        offsets = torch.arange(0, table.numel(), 256, device=x.device)
        return torch.take(table, x.to(torch.long) + offsets.view(1, -1, 1, 1))

    def __repr__(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"NormalizeImages(mean={mean}, std={std})"


def hash_samples(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """A 64-bit hash per sample of ``(seed, epoch, index)`` (splitmix64, vectorised).

    numpy ``uint64`` arrays wrap on overflow and shift logically, which is what the hash
    needs (torch ``int64`` would shift arithmetically).
    """
    key = splitmix64(splitmix64(seed64(seed)) ^ seed64(epoch))
    z = indices.astype(np.uint64) ^ np.uint64(key)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def crop_flip_params(
    seed: int, epoch: int, indices: torch.Tensor, padding: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop offsets ``(dy, dx)`` in ``0 .. 2*padding`` and a flip flag.

    Each is drawn from a different bit range of the per-sample hash, so it depends only on
    ``(seed, epoch, index)``. Computed on the host, where training's indices are, and copied to
    ``device`` (default: the indices' device) in one pinned, non-blocking copy.
    """
    host = indices.numpy() if indices.device.type == "cpu" else indices.cpu().numpy()
    h = hash_samples(seed, epoch, host)
    span = np.uint64(2 * padding + 1)
    params = np.empty((3, h.shape[0]), dtype=np.int64)
    params[0] = h % span
    params[1] = (h >> np.uint64(16)) % span
    params[2] = (h >> np.uint64(32)) & np.uint64(1)
    moved = to_device(torch.from_numpy(params), device or indices.device)
    return moved[0], moved[1], moved[2].to(torch.bool)


class RandomCropFlip:
    """Random crop after zero-padding, and optional horizontal flip, per sample.

    The standard CIFAR augmentation (pad 4, crop back to 32×32, flip with probability 1/2),
    with each sample's draw a pure function of ``(seed, epoch, index)``. Works on any dtype;
    it runs on the stored ``uint8`` pixels, so the padding is black (0) as in torchvision.
    """

    def __init__(self, seed: int, padding: int, flip: bool) -> None:
        self.seed = seed
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        n, _, height, width = x.shape
        pad = self.padding
        dy, dx, flip = crop_flip_params(self.seed, epoch, indices, pad, x.device)
        if not self.flip:
            flip = torch.zeros_like(flip)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        rows = dy[:, None] + torch.arange(height, device=x.device)  # (n, H)
        cols = torch.arange(width, device=x.device)
        # A flip reads the crop's columns right to left: one gather does crop and flip.
        cols = torch.where(flip[:, None], width - 1 - cols, cols) + dx[:, None]  # (n, W)
        batch = torch.arange(n, device=x.device)[:, None, None]
        channels_last = padded.permute(0, 2, 3, 1)
        out = channels_last[batch, rows[:, :, None], cols[:, None, :]]  # (n, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(seed={self.seed}, padding={self.padding}, flip={self.flip})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, *transforms: BatchTransform) -> None:
        self.transforms = transforms
        self.pointwise = all(getattr(t, "pointwise", False) for t in transforms)

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, epoch: int) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x, indices, epoch)
        return x

    def __repr__(self) -> str:
        return f"Compose{self.transforms!r}"


# Augmentation per image set: (padding, horizontal flip). A mirrored digit is not the same
# digit, so MNIST is only shifted; clothes and CIFAR objects keep their class when mirrored.
AUGMENTATION: dict[str, tuple[int, bool]] = {
    "cifar10": (4, True),
    "fashion_mnist": (2, True),
    "mnist": (2, False),
}
