"""image_folder: one subfolder of images per class (torchvision's ``ImageFolder`` layout).

::

    data.path/                  data.path/train/cat/...   (or data.val_path for validation)
        cat/001.png                       val/cat/...
        dog/002.jpg

Images are decoded with Pillow when a sample is read (:class:`ImageFiles`), optionally
resized (``data.image_size``) and centre-cropped (``data.crop``), and kept ``uint8`` until a
batch is normalised with the training split's per-channel mean and std. With ``data.feed``
``loader`` (the default for image folders) nothing is held in memory: training reads through a
``DataLoader`` with worker processes; ``memory`` decodes every image once, up front.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distgrow.config import DataConfig
from distgrow.config.filesizes import image_folder_roots, list_image_folder
from distgrow.data.containers import (
    ArrayDataset,
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
    LoaderDataset,
)
from distgrow.data.feed import loader_batches
from distgrow.data.splits import seeded_split
from distgrow.data.transforms import NormalizeImages

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageFiles", "decode", "read", "streamed_image_stats"]

DEFAULT_MAX_IMAGE_PIXELS = DataConfig().max_image_pixels


def _pixel_refusal(path: str, pixels: int | None, max_pixels: int) -> DatasetFormatError:
    size = f"{pixels:,} pixels" if pixels is not None else "an image"
    fix = f"data.max_image_pixels={pixels}" if pixels is not None else "data.max_image_pixels"
    return DatasetFormatError(
        f"{path}: {size}, more than data.max_image_pixels = {max_pixels:,} (refused as a "
        f"possible decompression bomb). Fix: if the image is genuine, set {fix} or more; "
        "else remove the file."
    )


@contextlib.contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``max_pixels`` while an image is decoded.

    Pillow warns above ``MAX_IMAGE_PIXELS`` and refuses above twice that, naming no file;
    distgrow checks the size itself, so Pillow's warning is silenced and its refusal (also
    checked on frames and crops) moved to at least ``max_pixels``. Decoding runs on one thread
    per process (the loop's, or a loader worker's), so the module setting is restored safely.
    """
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def decode(
    path: str,
    mode: str,
    size: tuple[int, int] | None,
    crop: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """One image as ``uint8 (C, H, W)``: decoded, converted to ``mode``, resized, cropped.

    Raises:
        DatasetFormatError: Pillow cannot read the file, the image has more than
            ``max_pixels`` pixels (``data.max_image_pixels``), or the crop is larger than the
            image; one line naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_limit(max_pixels), Image.open(path) as opened:
            if opened.width * opened.height > max_pixels:
                raise _pixel_refusal(path, opened.width * opened.height, max_pixels)
            image = opened.convert(mode)
            if size is not None and (image.height, image.width) != size:
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            if crop is not None:
                h, w = crop
                if h > image.height or w > image.width:
                    raise DatasetFormatError(
                        f"{path}: data.crop = [{h}, {w}] is larger than the image "
                        f"({image.height} × {image.width}); crop less or set data.image_size."
                    )
                top, left = (image.height - h) // 2, (image.width - w) // 2
                image = image.crop((left, top, left + w, top + h))
            pixels = np.asarray(image, dtype=np.uint8)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _pixel_refusal(path, int(found.group(1)) if found else None, max_pixels) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as err:
        if isinstance(err, DatasetFormatError):
            raise
        said = " ".join(str(err).split())
        raise DatasetFormatError(f"{path}: not an image Pillow can read ({said}).") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.array(pixels.transpose(2, 0, 1), order="C")  # a writable copy, (C, H, W)


class ImageFiles(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image files as a map-style ``Dataset``: ``files[i]`` decodes image ``i``.

    Holds only paths and labels (cheap to pickle into loader workers). Every image must come
    out with the shape of the first (``shape``); resize them with ``data.image_size`` if not.

    Args:
        paths: The image files.
        labels: Their class indices.
        mode: ``"RGB"`` or ``"L"``.
        size: Resize to ``(height, width)``, or None.
        crop: Centre-crop to ``(height, width)`` after the resize, or None.
        shape: The ``(C, H, W)`` every image must have (None: the first image's).
        max_pixels: Refuse an image of more pixels (``data.max_image_pixels``).
    """

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        mode: str,
        size: tuple[int, int] | None,
        crop: tuple[int, int] | None,
        shape: tuple[int, ...] | None = None,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.mode, self.size, self.crop = mode, size, crop
        self.max_pixels = max_pixels
        self.shape = shape if shape is not None else tuple(self._decode(0).shape)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> np.ndarray:
        return decode(self.paths[index], self.mode, self.size, self.crop, self.max_pixels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self._decode(index)
        if pixels.shape != self.shape:
            raise DatasetFormatError(
                f"{self.paths[index]}: image of shape {pixels.shape} (C, H, W), the others are "
                f"{self.shape}; set data.image_size=[H, W] to resize them all."
            )
        return torch.from_numpy(pixels), self.labels[index]

    def subset(self, indices: list[int]) -> ImageFiles:
        """The images at ``indices``, in that order."""
        return ImageFiles(
            [self.paths[i] for i in indices],
            [int(self.labels[i]) for i in indices],
            self.mode,
            self.size,
            self.crop,
            self.shape,
            self.max_pixels,
        )


def _loader(files: ImageFiles, workers: int, batch: int = 256) -> DataLoader[Any]:
    return DataLoader(files, batch_size=batch, shuffle=False, num_workers=workers)


def streamed_image_stats(
    files: ImageFiles, workers: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``pixel / 255`` over ``files``, in one streamed pass.

    The same 256-bin histograms as :func:`~distgrow.data.transforms.image_stats`, summed
    batch by batch, so an image folder read from files normalises exactly like the same
    images held in memory.
    """
    channels = files.shape[0]
    counts = np.zeros((channels, 256), dtype=np.float64)
    for x, _ in loader_batches(_loader(files, workers)):
        arr = x.numpy()
        for c in range(channels):
            counts[c] += np.bincount(arr[:, c].reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(channels):
        total = counts[c].sum()
        mean = float((counts[c] * values).sum() / total)
        var = float((counts[c] * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _in_memory(files: ImageFiles, workers: int) -> ArrayDataset:
    xs, ys = [], []
    for x, y in loader_batches(_loader(files, workers)):
        xs.append(x)
        ys.append(y)
    return ArrayDataset(torch.cat(xs), torch.cat(ys))


def _folder(root: Path, what: str) -> tuple[list[str], list[tuple[Path, int]]]:
    try:
        return list_image_folder(root)
    except ValueError as err:
        raise DatasetFormatError(f"{what}: {err}") from err


def read(name: str, cfg: DataConfig, seed: int) -> DataBundle:
    """The image folder ``data.path`` as a bundle read sample by sample (or decoded up front).

    Args:
        name: ``"image_folder"``.
        cfg: The data section: ``path``, ``val_path`` (or ``train/`` and ``val/`` inside
            ``path``; else a seeded ``val_fraction`` split), ``image_size``, ``crop``,
            ``image_mode``, ``normalize``, ``feed``, ``loader_workers``, ``limit_train`` /
            ``limit_val``.
        seed: The run seed (the train/validation split).

    Returns:
        The bundle: :class:`LoaderDataset` splits, or :class:`ArrayDataset` with
        ``data.feed=memory``.

    Raises:
        DatasetNotFoundError: a folder is not there.
        DatasetFormatError: no class folders, an empty class, an unreadable image, images of
            different sizes without ``data.image_size``, a validation class not in training.
    """
    try:
        train_root, val_root = image_folder_roots(cfg.path, cfg.val_path)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(str(err)) from err
    except ValueError as err:
        raise DatasetFormatError(str(err)) from err
    classes, samples = _folder(train_root, "data.path")
    size = (cfg.image_size[0], cfg.image_size[1]) if cfg.image_size else None
    crop = (cfg.crop[0], cfg.crop[1]) if cfg.crop else None
    everything = ImageFiles(
        [str(p) for p, _ in samples],
        [c for _, c in samples],
        cfg.image_mode,
        size,
        crop,
        max_pixels=cfg.max_image_pixels,
    )
    if val_root is None:
        train_idx, val_idx = seeded_split(len(everything), cfg.val_fraction, seed)
        train = everything.subset(train_idx.tolist())
        val = everything.subset(val_idx.tolist())
    else:
        train = everything
        val_classes, val_samples = _folder(val_root, "data.val_path")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DatasetFormatError(
                f"{val_root}: class folder(s) {', '.join(unknown)} are not among the training "
                f"classes ({', '.join(classes)}); the two folders need the same classes."
            )
        index = {c: i for i, c in enumerate(classes)}
        val = ImageFiles(
            [str(p) for p, _ in val_samples],
            [index[val_classes[c]] for _, c in val_samples],
            cfg.image_mode,
            size,
            crop,
            train.shape,
            cfg.max_image_pixels,
        )
    workers = cfg.loader_workers
    # Statistics of the whole training split, before any limit (as for the built-in sets).
    if cfg.normalize:
        mean, std = streamed_image_stats(train, workers)
    else:
        mean, std = (0.0,) * train.shape[0], (1.0,) * train.shape[0]
    normalize = NormalizeImages(mean, std)
    if cfg.limit_train is not None:
        train = train.subset(list(range(min(cfg.limit_train, len(train)))))
    if cfg.limit_val is not None:
        val = val.subset(list(range(min(cfg.limit_val, len(val)))))
    if cfg.feed == "memory":
        train_set: ArrayDataset | LoaderDataset = _in_memory(train, workers)
        val_set: ArrayDataset | LoaderDataset = _in_memory(val, workers)
        train_set.transform = val_set.transform = normalize
    else:
        train_set = LoaderDataset(train, train.labels, normalize)
        val_set = LoaderDataset(val, val.labels, normalize)
    return DataBundle(
        name=name,
        train=train_set,
        val=val_set,
        input_shape=train.shape,
        num_classes=len(classes),
        task="classification",
    )
