"""Ionosphere: the UCI ``ionosphere.data`` file (34 numbers then ``g`` or ``b`` per line)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distgrow.config import DataConfig
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.readers.common import open_text
from distgrow.data.splits import Table

__all__ = ["read"]

_IONOSPHERE_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/ionosphere/ionosphere.data"
)

_IONOSPHERE_FEATURES = 34


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """Features ``(N, 34)`` and labels (g -> 1, b -> 0) from UCI ``ionosphere.data``.

    Args:
        name: ``"ionosphere"``.
        cfg: The data section; ``cfg.root`` is the file or its folder.
        seed: Unused (the split is made by the caller).

    Returns:
        The table, 2 classes.

    Raises:
        DatasetNotFoundError: ``cfg.root`` is unset or the file is not there.
        DatasetFormatError: A line is not 34 numbers then g or b.
    """
    root = cfg.root
    if root is None:
        raise DatasetNotFoundError(
            "ionosphere: data.root is not set; download ionosphere.data from "
            f"{_IONOSPHERE_URL} and set data.root to the file or its folder."
        )
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / "ionosphere.data"
    if not path.is_file():
        raise DatasetNotFoundError(
            f"ionosphere: {path} not found; download it from {_IONOSPHERE_URL} and set "
            "data.root to the file or its folder."
        )
    rows: list[list[float]] = []
    labels: list[int] = []
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            fields = [f.strip() for f in line.strip().split(",")]
            if len(fields) != _IONOSPHERE_FEATURES + 1:
                raise DatasetFormatError(
                    f"{path}, line {number}: {len(fields)} fields, expected "
                    f"{_IONOSPHERE_FEATURES + 1} (34 numbers then g or b)."
                )
            label = fields[-1].lower()
            if label not in ("g", "b"):
                raise DatasetFormatError(
                    f"{path}, line {number}: label {fields[-1]!r} is not 'g' or 'b'."
                )
            try:
                rows.append([float(f) for f in fields[:-1]])
            except ValueError as exc:
                raise DatasetFormatError(f"{path}, line {number}: {exc}.") from exc
            labels.append(1 if label == "g" else 0)
    if not rows:
        raise DatasetFormatError(f"{path}: no data lines.")
    return Table(np.asarray(rows, dtype=np.float64), np.asarray(labels, dtype=np.int64), 2)
