"""CIFAR-10, python version: five ``data_batch_*`` pickles and ``test_batch``.

Read with :func:`~distgrow.data.readers.safe_pickle.restricted_load`: no code in a file runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distgrow.config import DataConfig
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.readers.safe_pickle import restricted_load
from distgrow.data.splits import ImageSplits

__all__ = ["read", "read_batch"]

_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_HINT = f"CIFAR-10 batch files (is this file really from {_CIFAR10_URL}?)"
_ROW = 3 * 32 * 32


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 (N, 3072)`` rows and ``int64 (N,)`` labels of one CIFAR-10 batch file.

    Raises:
        UnsafePickleError: The file asks for anything but numeric numpy arrays.
        DatasetFormatError: The file is truncated, corrupt or not shaped like a batch.
    """
    content = restricted_load(path, _HINT)
    if not isinstance(content, dict):
        raise DatasetFormatError(
            f"{path}: expected a dict with b'data' and b'labels', got {type(content).__name__}."
        )
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if data is None or labels is None:
        raise DatasetFormatError(
            f"{path}: missing b'data' or b'labels' (keys: {sorted(map(repr, content))})."
        )
    # Checked before np.asarray: a list of references to one memoised list is a few bytes in
    # the file but N × M numbers once numpy makes it an array.
    if not isinstance(data, np.ndarray):
        raise DatasetFormatError(
            f"{path}: b'data' must be a numpy array (uint8, N × 3072), got {type(data).__name__}."
        )
    if isinstance(labels, list):
        odd = next((v for v in labels if not isinstance(v, int | np.integer)), None)
        if odd is not None:
            raise DatasetFormatError(
                f"{path}: b'labels' must be a list of integers, found a {type(odd).__name__} in it."
            )
    elif not isinstance(labels, np.ndarray):
        raise DatasetFormatError(
            f"{path}: b'labels' must be a list of integers, got {type(labels).__name__}."
        )
    labels_arr = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetFormatError(
            f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}."
        )
    if labels_arr.shape != (data.shape[0],) or not np.issubdtype(labels_arr.dtype, np.integer):
        raise DatasetFormatError(
            f"{path}: b'labels' must be {data.shape[0]} integers (one per row of b'data'), "
            f"got {labels_arr.dtype} {labels_arr.shape}."
        )
    if labels_arr.size and (labels_arr.min() < 0 or labels_arr.max() > 9):
        raise DatasetFormatError(
            f"{path}: labels must be 0..9, found {labels_arr.min()}..{labels_arr.max()}."
        )
    return data, labels_arr.astype(np.int64)


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


def read(name: str, cfg: DataConfig, seed: int) -> ImageSplits:
    """The 50000 training and 10000 test images of CIFAR-10 (python version).

    Args:
        name: ``"cifar10"``.
        cfg: The data section; ``cfg.root`` holds ``cifar-10-batches-py/`` or is that folder.
        seed: Unused (the split is the official one).

    Returns:
        ``uint8 (N, 3, 32, 32)`` images and ``int64`` labels 0..9.

    Raises:
        DatasetNotFoundError: ``cfg.root`` is unset or lacks one of the six files.
        DatasetFormatError: A file is malformed or unsafe (:func:`read_batch`).
    """
    root = cfg.root
    if root is None:
        raise DatasetNotFoundError(
            "cifar10: data.root is not set and no package ships CIFAR-10 here; download "
            f"{_CIFAR10_URL}, extract it (tar xzf) and set data.root to the folder holding "
            "cifar-10-batches-py/."
        )
    base = Path(root).expanduser()
    directories = [base / "cifar-10-batches-py", base]
    names = (*_CIFAR_TRAIN, _CIFAR_TEST)
    directory = next((d for d in directories if all((d / n).is_file() for n in names)), None)
    if directory is None:
        raise DatasetNotFoundError(
            f"cifar10: looked in {', '.join(map(str, directories))} for {', '.join(names)}; "
            f"not all found. Download {_CIFAR10_URL}, extract it (tar xzf) and set data.root "
            "to the folder holding cifar-10-batches-py/."
        )
    train = [read_batch(directory / n) for n in _CIFAR_TRAIN]
    test_data, test_labels = read_batch(directory / _CIFAR_TEST)
    # Rows are the 1024 red, then green, then blue pixels, each row-major 32×32.
    train_x = torch.from_numpy(np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32))
    train_y = torch.from_numpy(np.concatenate([lab for _, lab in train]))
    val_x = torch.from_numpy(test_data.reshape(-1, 3, 32, 32))
    val_y = torch.from_numpy(test_labels)
    return ImageSplits(train_x, train_y, val_x, val_y, num_classes=10)
