"""MNIST and Fashion-MNIST: four IDX files (raw or ``.gz``); validation = the official t10k set.

Format: http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT".
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from distgrow.config import DataConfig
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.splits import ImageSplits

__all__ = ["FASHION_MNIST_DEFAULT_ROOT", "MNIST_DEFAULT_ROOT", "read", "read_idx"]

# Where Debian's `dataset-fashion-mnist` package puts the IDX files.
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
# No package ships MNIST here; this is only the place looked at when data.root is unset
# (the layout Debian uses for Fashion-MNIST).
MNIST_DEFAULT_ROOT = "/usr/share/datasets/mnist"

_FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
_MNIST_URLS = "http://yann.lecun.com/exdb/mnist/"

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE
# FORMAT").
_IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _read_maybe_gzip(path: Path) -> bytes:
    """The bytes of a file, gunzipped if it is gzip (by its magic bytes, not its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, ValueError) as exc:
        raise DatasetFormatError(
            f"{path}: corrupt or truncated gzip file ({exc}); download it again."
        ) from exc


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or gzip) into a native-endian numpy array.

    Header: two zero bytes, a type byte, the number of dimensions, then each dimension as a
    big-endian ``uint32``; the data follow, big-endian, and must fill the dimensions exactly.

    Raises:
        DatasetFormatError: Bad magic, unknown type, or a size that does not match the header.
    """
    data = _read_maybe_gzip(path)
    if len(data) < 4:
        raise DatasetFormatError(
            f"{path}: {len(data)} bytes is too short for an IDX header (4 bytes at least)."
        )
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: bad IDX magic {data[:4].hex()} (expected 0000 then a type byte in "
            f"{sorted(f'{t:#04x}' for t in _IDX_DTYPES)} and the number of dimensions); "
            "is this an IDX file?"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetFormatError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the file has {len(data)}."
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says shape {dims} of {dtype.name} = {expected} data bytes, "
            f"but the file holds {actual} ({'truncated' if actual < expected else 'extra'}"
            " data); download the file again."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable copy: torch.from_numpy needs both.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _idx_candidates(split: str, kind: str, ndim: int) -> list[str]:
    """File names an IDX file goes by (raw or gz; the dot variant of some MNIST mirrors)."""
    stems = [f"{split}-{kind}-idx{ndim}-ubyte", f"{split}-{kind}.idx{ndim}-ubyte"]
    return [name for stem in stems for name in (stem, stem + ".gz")]


_IDX_FILES = {
    "train_images": ("train", "images", 3),
    "train_labels": ("train", "labels", 1),
    "val_images": ("t10k", "images", 3),
    "val_labels": ("t10k", "labels", 1),
}


def _find_idx_files(directories: Sequence[Path]) -> dict[str, Path] | None:
    """The four IDX files, all from the first directory that holds all of them."""
    for directory in directories:
        found: dict[str, Path] = {}
        for key, (split, kind, ndim) in _IDX_FILES.items():
            for name in _idx_candidates(split, kind, ndim):
                if (directory / name).is_file():
                    found[key] = directory / name
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``uint8 (N, 1, H, W)`` and labels ``int64 (N,)`` from two IDX files."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetFormatError(
            f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
            f"{images.shape}."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFormatError(
            f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} "
            f"{labels.shape}."
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the two files must come from the same release."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(
            f"{labels_path}: labels must be 0..9, found {labels.min()}..{labels.max()}."
        )
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def read(name: str, cfg: DataConfig, seed: int) -> ImageSplits:
    """Train and t10k splits of an MNIST-format data set.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        cfg: The data section; ``cfg.root`` is the folder of the four files (also the
            ``<root>/MNIST/raw`` layout torchvision downloads into), ``None`` the default place.
        seed: Unused (the split is the official one).

    Returns:
        ``uint8 (N, 1, H, W)`` images and ``int64`` labels 0..9.

    Raises:
        DatasetNotFoundError: The four files are not all in one of the folders looked at.
        DatasetFormatError: A file is not a well-formed IDX file of images or labels.
    """
    root = cfg.root
    if root is not None:
        base = Path(root).expanduser()
        # Also accept the layout torchvision downloads into (root/FashionMNIST/raw).
        sub = "FashionMNIST" if name == "fashion_mnist" else "MNIST"
        directories = [base, base / sub / "raw"]
    elif name == "fashion_mnist":
        directories = [Path(FASHION_MNIST_DEFAULT_ROOT)]
    else:
        directories = [Path(MNIST_DEFAULT_ROOT)]
    files = _find_idx_files(directories)
    if files is None:
        looked = ", ".join(str(d) for d in directories)
        wanted = ", ".join(_idx_candidates(*spec)[1] for spec in _IDX_FILES.values())
        if name == "fashion_mnist":
            how = (
                "install the Debian package `dataset-fashion-mnist` (apt-get install "
                f"dataset-fashion-mnist; it fills {FASHION_MNIST_DEFAULT_ROOT}) or download "
                f"the four files from {_FASHION_MNIST_URL} and set data.root to their folder"
            )
        else:
            how = (
                f"download the four files from the MNIST site {_MNIST_URLS} and set "
                "data.root to their folder"
            )
        raise DatasetNotFoundError(
            f"{name}: IDX files not found; looked in {looked} for {wanted} (raw or .gz). "
            f"To get them: {how}."
        )
    train_x, train_y = _load_idx_pair(files["train_images"], files["train_labels"])
    val_x, val_y = _load_idx_pair(files["val_images"], files["val_labels"])
    if train_x.shape[1:] != val_x.shape[1:]:
        raise DatasetFormatError(
            f"{name}: train images are {tuple(train_x.shape[2:])} but test images are "
            f"{tuple(val_x.shape[2:])} ({files['train_images']}, {files['val_images']})."
        )
    return ImageSplits(train_x, train_y, val_x, val_y, num_classes=10)
