"""Real data sets as in-memory tensors, and how one global batch is cut across ranks.

The named data sets are held whole in memory (Fashion-MNIST as ``uint8``: 47 MB) and batched
by tensor indexing, with no ``DataLoader`` and no worker processes: a batch is
``dataset.batch(indices, epoch)``. An image folder is not: a :class:`LoaderDataset` decodes
each sample when it is read, and training reads it through a ``DataLoader`` with worker
processes (:mod:`~distgrow.data.feed`) in the same order and batches (``data.feed``).

* :mod:`~distgrow.data.order`: the world-size-invariant global order (METHOD.md §6) and the
  seeds (``epoch_permutation``, ``shard_global_batch``, ``splitmix64``).
* :mod:`~distgrow.data.containers`: ``ArrayDataset``, ``DataBundle`` and the data errors.
* :mod:`~distgrow.data.transforms`: normalisation and augmentation, per batch.
* :mod:`~distgrow.data.readers`: one module per file format; :mod:`~distgrow.data.splits`
  turns what they read into a bundle; :mod:`~distgrow.data.load` is the entry point,
  ``load_dataset(cfg.data, seed=...)``.

Data sets (:data:`DATASETS`):

* ``fashion_mnist``, ``mnist``: IDX files (``.gz`` or raw); validation = the official t10k set.
* ``cifar10``: the python pickle batches, read with a restricted unpickler (no code runs).
* ``covtype``: a local UCI CSV / NPZ file, or scikit-learn's ``fetch_covtype`` cache.
* ``ionosphere``: the UCI ``ionosphere.data`` file.
* ``digits``, ``breast_cancer``, ``wine``, ``iris``: scikit-learn's bundled copies.
* ``synthetic_classification``, ``synthetic_regression``: generated from the seed.
* ``npz``, ``csv``, ``tsv``, ``image_folder``: your own files at ``data.path`` (see
  :mod:`~distgrow.data.readers`); an image folder is decoded sample by sample and read through
  a ``DataLoader`` with worker processes (:mod:`~distgrow.data.feed`), not held in memory.

This package does not import ``torch.distributed``.
"""

from __future__ import annotations

from distgrow.data.containers import (
    ArrayDataset,
    BatchTransform,
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
    LoaderDataset,
    TensorSamples,
    UnsafePickleError,
)
from distgrow.data.load import canonical_name, load_dataset
from distgrow.data.order import (
    epoch_order,
    epoch_permutation,
    micro_batch_seed,
    shard_global_batch,
    shard_split,
    splitmix64,
)
from distgrow.data.readers import DATASETS
from distgrow.data.readers.idx import FASHION_MNIST_DEFAULT_ROOT, MNIST_DEFAULT_ROOT
from distgrow.data.readers.synthetic import SYNTHETIC_CLASSES

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEFAULT_ROOT",
    "MNIST_DEFAULT_ROOT",
    "SYNTHETIC_CLASSES",
    "ArrayDataset",
    "BatchTransform",
    "DataBundle",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "LoaderDataset",
    "TensorSamples",
    "UnsafePickleError",
    "canonical_name",
    "epoch_order",
    "epoch_permutation",
    "load_dataset",
    "micro_batch_seed",
    "shard_global_batch",
    "shard_split",
    "splitmix64",
]
