"""The file readers, one module per format, and the table of data-set names they serve.

Each reader is ``read(name, cfg, seed)`` and returns what it read, unsplit and unnormalised:
:class:`~distgrow.data.splits.ImageSplits` (images with their official test split) or a
:class:`~distgrow.data.splits.Table` (split later with ``data.val_fraction``), or a finished
:class:`~distgrow.data.containers.DataBundle` (an image folder, read sample by sample; the
byte text of ``text`` and ``python_stdlib``, split into blocks by its reader). A new format
is a new module here and a line in :data:`READERS`.

Your own files (``data.path``): ``npz`` (arrays ``data.x_key`` / ``data.y_key``), ``csv`` /
``tsv`` (a label column by name or index), ``image_folder`` (a subfolder per class), ``text``
(byte tokens of text files, for language models), ``tokens`` (a token file read through a
memory map, never into memory).
"""

from __future__ import annotations

from collections.abc import Callable

from distgrow.config import DataConfig
from distgrow.data.containers import DataBundle
from distgrow.data.readers import (
    cifar,
    covtype,
    csv,
    idx,
    image_folder,
    ionosphere,
    npz,
    sklearn_sets,
    synthetic,
    text,
    tokens,
)
from distgrow.data.splits import ImageSplits, Table

__all__ = ["DATASETS", "READERS", "Reader"]

Reader = Callable[[str, DataConfig, int], ImageSplits | Table | DataBundle]

# Canonical name -> reader; the order is the order the names are listed in messages.
READERS: dict[str, Reader] = {
    "fashion_mnist": idx.read,
    "mnist": idx.read,
    "cifar10": cifar.read,
    "covtype": covtype.read,
    "ionosphere": ionosphere.read,
    **dict.fromkeys(sklearn_sets.NAMES, sklearn_sets.read),
    "synthetic_classification": synthetic.read,
    "synthetic_regression": synthetic.read,
    "python_stdlib": text.read,
    "text": text.read,
    "tokens": tokens.read,
    "npz": npz.read,
    "csv": csv.read,
    "tsv": csv.read,
    "image_folder": image_folder.read,
}

DATASETS: tuple[str, ...] = tuple(READERS)
