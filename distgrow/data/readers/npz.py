"""npz: a numpy archive holding the features and the labels (``data.x_key``, ``data.y_key``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from distgrow.config import DataConfig
from distgrow.config.filesizes import existing, npz_header
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.readers.labels import targets
from distgrow.data.splits import Table

__all__ = ["read"]


def _arrays(path: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The features and labels of one archive, checked: numbers, one label per row, no NaN."""
    try:
        for key in (cfg.x_key, cfg.y_key):
            # Each header against the file's real size (and no objects) before anything is
            # allocated: a forged header would ask for terabytes.
            npz_header(path, key)
        # allow_pickle=False: an archive of objects could run code when unpickled.
        with np.load(path, allow_pickle=False) as archive:
            x, y = archive[cfg.x_key], archive[cfg.y_key]
    except (zipfile.BadZipFile, OSError) as err:
        raise DatasetFormatError(f"{path}: not a readable .npz archive ({err}).") from err
    except ValueError as err:
        said = " ".join(str(err).split())
        raise DatasetFormatError(said if said.startswith(str(path)) else f"{path}: {said}") from err
    if x.ndim < 1 or x.dtype.kind not in "biuf":
        raise DatasetFormatError(
            f"{path}: array {cfg.x_key!r} has dtype {x.dtype} and shape {x.shape}; the features "
            "must be numbers with one row per sample."
        )
    if x.ndim == 1:
        x = x[:, None]  # one feature per sample
    if y.shape[:1] != x.shape[:1]:
        raise DatasetFormatError(
            f"{path}: {cfg.x_key!r} has {x.shape[0]} rows but {cfg.y_key!r} has "
            f"{y.shape[0] if y.ndim else 0}; one label per sample."
        )
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1)
        if bad.any():
            raise DatasetFormatError(
                f"{path}: row {int(np.argwhere(bad)[0][0])} of {cfg.x_key!r} has a missing "
                "(NaN) or infinite value; fill or drop it."
            )
    return x, y


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """Features ``data.x_key`` and labels ``data.y_key`` of the archive ``data.path``.

    Args:
        name: ``"npz"``.
        cfg: The data section (``path``, ``val_path``, ``x_key``, ``y_key``, ``task``).
        seed: Unused (the split is made by the caller).

    Returns:
        The table (with the validation arrays of ``data.val_path`` when set).

    Raises:
        DatasetNotFoundError: the file is not there.
        DatasetFormatError: not an archive, an array missing, or arrays that do not fit.
    """
    try:
        path = existing(cfg.path, "data.path")
        val_path = existing(cfg.val_path, "data.val_path") if cfg.val_path else None
    except FileNotFoundError as err:
        raise DatasetNotFoundError(str(err)) from err
    x, y = _arrays(path, cfg)
    val_x, val_y = _arrays(val_path, cfg) if val_path is not None else (None, None)
    if val_x is not None and val_x.shape[1:] != x.shape[1:]:
        raise DatasetFormatError(
            f"{val_path}: samples of shape {val_x.shape[1:]}, the training file's are "
            f"{x.shape[1:]}; they must match."
        )
    train_t, val_t, classes = targets(y, val_y, cfg.task, str(path))
    return Table(x, train_t, classes, val_x, val_t)
