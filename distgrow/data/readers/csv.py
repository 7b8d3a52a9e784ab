"""csv / tsv: a table of numbers with one label column (by name or index), header or not.

The label column may hold class names (words), class numbers or regression targets (see
:func:`~distgrow.data.readers.labels.targets`); every other column is a numeric feature. An
empty or ``NA`` / ``NaN`` / ``?`` field is a missing value: an error naming the file, line
and column (distgrow does not guess how to fill it).
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np

from distgrow.config import DataConfig
from distgrow.config.filesizes import csv_delimiter, csv_rows, existing, has_header
from distgrow.data.containers import DatasetFormatError, DatasetNotFoundError
from distgrow.data.readers.labels import targets
from distgrow.data.splits import Table

__all__ = ["read"]

MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "?"})


def _label_index(label: int | str, names: list[str] | None, width: int, path: Path) -> int:
    if isinstance(label, str):
        if names is None:
            raise DatasetFormatError(
                f"{path}: data.label_column = {label!r} names a column but the file has no "
                "header row; give the column's index (e.g. -1) or set data.header=true."
            )
        if label not in names:
            raise DatasetFormatError(
                f"{path}: no column named {label!r}; the header has {', '.join(names)}."
            )
        return names.index(label)
    if not -width <= label < width:
        raise DatasetFormatError(
            f"{path}: data.label_column = {label} is out of range for {width} columns; use "
            f"0 .. {width - 1} or -1 for the last."
        )
    return label % width


def _table(path: Path, name: str, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(N, columns - 1)`` float64 and the raw label strings of one file."""
    delimiter = csv_delimiter(name, path, cfg.delimiter)
    rows = csv_rows(path, delimiter)
    try:
        first_line, first = next(rows)
    except StopIteration:
        raise DatasetFormatError(f"{path}: no data lines.") from None
    except (csv.Error, UnicodeDecodeError, OSError) as err:
        raise DatasetFormatError(f"{path}: not a readable text table ({err}).") from err
    width = len(first)
    header = has_header(first, cfg.label_column, cfg.header)
    names = first if header else None
    label = _label_index(cfg.label_column, names, width, path)
    features: list[list[float]] = []
    labels: list[str] = []
    data = rows if header else itertools.chain([(first_line, first)], rows)
    try:
        for line, fields in data:
            if len(fields) != width:
                raise DatasetFormatError(
                    f"{path}, line {line}: {len(fields)} fields, the first row has {width}; "
                    f"every row needs the same columns (delimiter {delimiter!r})."
                )
            row: list[float] = []
            for column, text in enumerate(fields):
                column_name = names[column] if names else f"column {column}"
                if text.lower() in MISSING:
                    raise DatasetFormatError(
                        f"{path}, line {line}: missing value in {column_name!r}; fill or drop "
                        "the row (distgrow does not guess missing values)."
                    )
                if column == label:
                    continue
                try:
                    row.append(float(text))
                except ValueError:
                    raise DatasetFormatError(
                        f"{path}, line {line}: {column_name!r} = {text!r} is not a number; "
                        "features must be numbers (encode categories as numbers), or set "
                        "data.label_column to the column of the labels."
                    ) from None
            features.append(row)
            labels.append(fields[label])
    except (csv.Error, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: not a readable text table ({err}).") from err
    if not features:
        raise DatasetFormatError(f"{path}: a header and no data lines.")
    return np.asarray(features, dtype=np.float64), np.asarray(labels)


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """The table ``data.path`` (and ``data.val_path``): numeric features and one label column.

    Args:
        name: ``"csv"`` or ``"tsv"`` (the default delimiter).
        cfg: The data section (``path``, ``val_path``, ``label_column``, ``header``,
            ``delimiter``, ``task``).
        seed: Unused (the split is made by the caller).

    Returns:
        The table.

    Raises:
        DatasetNotFoundError: the file is not there.
        DatasetFormatError: ragged rows, a missing value, a feature that is not a number, an
            unknown label column (each names the file and line).
    """
    try:
        path = existing(cfg.path, "data.path")
        val_path = existing(cfg.val_path, "data.val_path") if cfg.val_path else None
    except FileNotFoundError as err:
        raise DatasetNotFoundError(str(err)) from err
    if path.is_dir():
        raise DatasetFormatError(f"data.path = {path} is a folder; {name} needs the file.")
    x, raw = _table(path, name, cfg)
    val_x, val_raw = _table(val_path, name, cfg) if val_path is not None else (None, None)
    if val_x is not None and val_x.shape[1] != x.shape[1]:
        raise DatasetFormatError(
            f"{val_path}: {val_x.shape[1]} feature columns, the training file has {x.shape[1]}."
        )
    train_t, val_t, classes = targets(raw, val_raw, cfg.task, str(path))
    return Table(x, train_t, classes, val_x, val_t)
