"""Covertype: a local UCI CSV (plain or ``.gz``) or NPZ file, or scikit-learn's cache.

54 features, cover types 1..7 (read as classes 0..6), split here with ``data.val_fraction``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from distgrow.config import DataConfig
from distgrow.config.filesizes import npz_header
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.readers.common import has_suffix, open_text
from distgrow.data.splits import Table

__all__ = ["read"]

_COVTYPE_URL = "https://archive.ics.uci.edu/dataset/31/covertype (file covtype.data.gz)"
_COVTYPE_FEATURES = 54
_COVTYPE_SUFFIXES = (".csv", ".csv.gz", ".data", ".data.gz", ".npz")
_COVTYPE_NAMES = tuple(f"covtype{s}" for s in (".data.gz", ".data", ".csv.gz", ".csv", ".npz"))


def _is_header(line: str) -> bool:
    """True if a CSV line is not all numbers (a column-name header)."""
    try:
        [float(token) for token in line.strip().split(",") if token.strip()]
    except ValueError:
        return True
    return False


def _read_covtype_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, 54)`` and labels 1..7 from a UCI covtype CSV or an NPZ file."""
    if path.name.lower().endswith(".npz"):
        try:
            with zipfile.ZipFile(path) as members:
                present = {n[: -len(".npy")] for n in members.namelist() if n.endswith(".npy")}
            for key in ("X", "y"):
                if key in present:  # its header against the file's size, before allocating
                    npz_header(path, key)
        except ValueError as exc:
            raise DatasetFormatError(str(exc)) from None
        except (OSError, zipfile.BadZipFile) as exc:
            raise DatasetFormatError(f"{path}: not a readable NPZ archive ({exc}).") from None
        # allow_pickle=False: an NPZ of object arrays could run code when loaded.
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = [k for k in ("X", "y") if k not in archive.files]
                if missing:
                    raise DatasetFormatError(
                        f"{path}: NPZ must hold arrays 'X' (N, 54) and 'y' (N,); missing "
                        f"{missing}, found {archive.files}."
                    )
                features = np.asarray(archive["X"], dtype=np.float64)
                labels = np.asarray(archive["y"])
        except DatasetFormatError:
            raise
        except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
            # Object arrays (refused without unpickling), a corrupt zip, a truncated member.
            raise DatasetFormatError(
                f"{path}: not a readable NPZ of numeric arrays X (N, 54) and y (N,): {exc}"
            ) from exc
    else:
        try:
            with open_text(path) as handle:
                first = handle.readline()
            skip = 1 if _is_header(first) else 0
            with open_text(path) as handle:
                table = np.loadtxt(handle, delimiter=",", skiprows=skip, dtype=np.float64, ndmin=2)
        except (ValueError, EOFError, OSError) as exc:
            raise DatasetFormatError(
                f"{path}: not a covtype CSV (54 numbers then the label 1..7 per line, comma-"
                f"separated, optional header): {exc}"
            ) from exc
        if table.shape[1] != _COVTYPE_FEATURES + 1:
            raise DatasetFormatError(
                f"{path}: {table.shape[1]} columns per line, expected "
                f"{_COVTYPE_FEATURES + 1} (54 features then the label)."
            )
        features, labels = table[:, :-1], table[:, -1]
    if features.ndim != 2 or features.shape[1] != _COVTYPE_FEATURES:
        raise DatasetFormatError(
            f"{path}: features must have shape (N, {_COVTYPE_FEATURES}), got {features.shape}."
        )
    if labels.shape != (features.shape[0],):
        raise DatasetFormatError(
            f"{path}: {labels.shape} labels for {features.shape[0]} samples; need one each."
        )
    return features, labels


def _covtype_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Cover types 1..7 (as in the UCI file and scikit-learn) -> class indices 0..6."""
    values = np.asarray(labels, dtype=np.float64)
    if values.size and (
        not np.all(values == np.round(values)) or values.min() < 1 or values.max() > 7
    ):
        raise DatasetFormatError(
            f"{source}: covtype labels must be the integers 1..7 (UCI convention), found "
            f"{values.min():g}..{values.max():g}; if yours are 0..6, add 1 before saving."
        )
    return values.astype(np.int64) - 1


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """Covtype features and 0-based labels from a local file or scikit-learn's cache.

    Args:
        name: ``"covtype"``.
        cfg: The data section; ``cfg.root`` is the file, a folder holding ``covtype.*``, or
            scikit-learn's data home; ``cfg.download`` lets scikit-learn fetch it.
        seed: Unused (the split is made by the caller).

    Returns:
        ``(N, 54)`` features and classes 0..6.

    Raises:
        DatasetNotFoundError: No local file and nothing in scikit-learn's cache.
        DatasetFormatError: A local file is malformed.
        ValueError: ``cfg.root`` is a file of another kind.
    """
    root, download = cfg.root, cfg.download
    if root is not None:
        path = Path(root).expanduser()
        if path.is_file():
            if not has_suffix(path, _COVTYPE_SUFFIXES):
                raise ValueError(
                    f"covtype: data.root = {path} is a file but not one of "
                    f"{', '.join(_COVTYPE_SUFFIXES)}; point it at a UCI covtype CSV or an NPZ "
                    "with arrays X and y."
                )
            features, labels = _read_covtype_file(path)
            return Table(features, _covtype_labels(labels, str(path)), 7)
        if has_suffix(path, _COVTYPE_SUFFIXES):
            # Do not hand a missing file's name to scikit-learn: it would create a folder.
            raise DatasetNotFoundError(
                f"covtype: data.root = {path} does not exist. Point data.root at a local "
                f"covtype CSV/NPZ (UCI file: {_COVTYPE_URL}), or set data.download=true "
                "(needs network) to fetch it through scikit-learn."
            )
        if path.is_dir():
            for name in _COVTYPE_NAMES:
                if (path / name).is_file():
                    features, labels = _read_covtype_file(path / name)
                    return Table(features, _covtype_labels(labels, str(path / name)), 7)
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError(
            "covtype without a local file needs scikit-learn: pip install 'distgrow[data]', "
            "or point data.root at a local covtype CSV/NPZ."
        ) from exc
    try:
        features, labels = sklearn.datasets.fetch_covtype(
            data_home=root, download_if_missing=download, return_X_y=True
        )
    except OSError as exc:  # includes URLError (no network) and "Data not found"
        home = sklearn.datasets.get_data_home(root)
        looked = f"{root} (local files {', '.join(_COVTYPE_NAMES)}) and " if root else ""
        raise DatasetNotFoundError(
            f"covtype: not found; looked in {looked}scikit-learn's cache "
            f"{os.path.join(home, 'covertype')} (download={download}: {exc}). Set "
            "data.download=true (needs network) or point data.root at a local covtype "
            f"CSV/NPZ (UCI file: {_COVTYPE_URL})."
        ) from exc
    labels = _covtype_labels(labels, "fetch_covtype")
    return Table(np.asarray(features, dtype=np.float64), labels, 7)
