"""Labels of your own files as training targets: classes (numbers or words) or regression values.

Shared by the npz and csv/tsv readers. ``data.task`` says what the labels are; ``auto`` reads
whole numbers and words as classes and any other number as a regression target.
"""

from __future__ import annotations

import numpy as np

from distgrow.data.containers import DatasetFormatError

__all__ = ["MAX_CLASSES", "targets"]

# Whole-number labels keep their values as class indices, so the largest label sets the number
# of classes (and a built-in model's head: distgrow.models.MAX_OUTPUTS, the same number). More
# than this is a label that is not a class number (an ID, a sentinel, a misread column).
MAX_CLASSES = 1 << 20


def _numeric(values: np.ndarray) -> np.ndarray | None:
    """``values`` as float64, or None if one of them is not a number."""
    if values.dtype.kind in "biuf":
        return values.astype(np.float64)
    try:
        return np.asarray(values, dtype=np.float64)
    except ValueError:
        return None


def targets(
    train: np.ndarray, val: np.ndarray | None, task: str, where: str
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Training and validation targets, and the number of classes (0: regression).

    Classes: labels that are whole numbers ``0 .. k-1`` keep their values (``k`` classes);
    other labels (words, negative or sparse numbers) become the index of their value in the
    sorted list of the training labels' distinct values. A validation label the training set
    does not have is an error.

    Args:
        train: The training labels ``(N,)`` (``(N, k)`` only for regression).
        val: The labels of a separate validation file, or None.
        task: ``data.task``: ``auto``, ``classification`` or ``regression``.
        where: The file, for messages.

    Raises:
        DatasetFormatError: regression labels that are not numbers, a validation class the
            training labels lack, or a missing (NaN) label.
    """
    numbers = _numeric(train)
    if task == "auto":
        task = (
            "classification"
            if numbers is None or (train.ndim == 1 and np.all(numbers == np.round(numbers)))
            else "regression"
        )
    if task == "regression":
        val_numbers = _numeric(val) if val is not None else None
        if numbers is None or (val is not None and val_numbers is None):
            raise DatasetFormatError(
                f"{where}: data.task=regression but a label is not a number; use "
                "data.task=classification for class names."
            )
        for values, split in ((numbers, "training"), (val_numbers, "validation")):
            if values is not None and np.isnan(values).any():
                row = int(np.argwhere(np.isnan(values))[0][0])
                raise DatasetFormatError(f"{where}: {split} label of sample {row} is missing.")
        return numbers.astype(np.float32), val_numbers, 0
    if train.ndim != 1:
        raise DatasetFormatError(
            f"{where}: class labels must be one per sample, got shape {train.shape}; use "
            "data.task=regression for several targets per sample."
        )
    keys = numbers if numbers is not None else train.astype(str)
    if numbers is not None and np.isnan(numbers).any():
        row = int(np.argwhere(np.isnan(numbers))[0][0])
        raise DatasetFormatError(f"{where}: the label of sample {row} is missing.")
    val_keys = None
    if val is not None:
        val_keys = _numeric(val) if numbers is not None else val.astype(str)
        if val_keys is None:
            raise DatasetFormatError(f"{where}: validation labels are words, training numbers.")
    if (
        numbers is not None
        and numbers.size
        and numbers.min() >= 0
        and np.all(numbers == np.round(numbers))
    ):
        k = int(numbers.max()) + 1
        if k > MAX_CLASSES:
            row = int(np.argmax(numbers))
            raise DatasetFormatError(
                f"{where}: the label of sample {row} is {int(numbers[row]):,}, which would make "
                f"{k:,} classes (labels are class numbers 0..C-1, at most {MAX_CLASSES:,}). "
                "Fix: number the classes 0..C-1, or set data.task=regression if they are values."
            )
        if (
            val_keys is not None
            and val_keys.size
            and (
                val_keys.max() >= k or val_keys.min() < 0 or np.any(val_keys != np.round(val_keys))
            )
        ):
            raise DatasetFormatError(
                f"{where}: validation labels go beyond the training classes 0 .. {k - 1}."
            )
        vals = None if val_keys is None else val_keys.astype(np.int64)
        return numbers.astype(np.int64), vals, k
    classes = np.unique(keys)
    train_idx = np.searchsorted(classes, keys).astype(np.int64)
    val_idx = None
    if val_keys is not None:
        val_idx = np.searchsorted(classes, val_keys).astype(np.int64)
        unknown = (val_idx >= len(classes)) | (
            classes[np.minimum(val_idx, len(classes) - 1)] != val_keys
        )
        if unknown.any():
            bad = val_keys[int(np.argwhere(unknown)[0][0])]
            raise DatasetFormatError(
                f"{where}: validation label {bad!r} is not one of the training classes "
                f"({', '.join(map(str, classes[:10]))}{', ...' if len(classes) > 10 else ''})."
            )
    return train_idx, val_idx, len(classes)
