"""The entry point: the data section of a config in, a :class:`DataBundle` out."""

from __future__ import annotations

import difflib
from dataclasses import replace

from distgrow.config import DataConfig
from distgrow.data.containers import ArrayDataset, DataBundle, LoaderDataset, TensorSamples
from distgrow.data.entry import entry_bundle
from distgrow.data.readers import DATASETS, READERS
from distgrow.data.splits import ImageSplits, image_bundle, tabular_bundle
from distgrow.data.transforms import AUGMENTATION
from distgrow.entrypoints import is_entry_point

__all__ = ["canonical_name", "load_dataset"]


def canonical_name(name: str) -> str:
    """The data set ``name`` names, as a key of :data:`DATASETS` (``-`` read as ``_``).

    Raises:
        ValueError: No data set has that name (the message gives the nearest names).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in READERS:
        near = difflib.get_close_matches(key, DATASETS, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        raise ValueError(f"unknown data set {name!r}; {hint}choose one of: {', '.join(DATASETS)}.")
    return key


def load_dataset(cfg: DataConfig, *, seed: int = 0) -> DataBundle:
    """Load the data set of ``cfg``, split and ready to batch (in memory, or read sample by
    sample for an image folder and with ``data.feed=loader``).

    Image sets keep ``uint8`` pixels and normalise per batch with the exact per-channel mean
    and std of their whole training split (computed, not hard-coded: for the real files this
    gives the familiar Fashion-MNIST 0.2860 / 0.3530, MNIST 0.1307 / 0.3081, CIFAR-10
    (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616)). Tabular sets are ``float32``,
    standardised with the training split's statistics.

    ``cfg`` is taken as validated (:meth:`DataConfig.validate`: fractions and counts in
    range); only what depends on the data set itself is checked here.

    Args:
        cfg: The data section: ``name`` (one of :data:`DATASETS`, case ignored), ``path``
            alias ``root`` (a folder, or for covtype / ionosphere also the file itself; the
            file or folder of npz / csv / tsv / image_folder; ``None`` is the
            default place: Fashion-MNIST ``/usr/share/datasets/fashion-mnist``, covtype
            scikit-learn's cache), ``val_fraction`` (sets without an official test split),
            ``download`` (covtype through scikit-learn), ``augment`` (random crop and flip of
            the image sets' training split: cifar10 pad 4 + flip, fashion_mnist pad 2 + flip,
            mnist pad 2), ``limit_train`` / ``limit_val`` (the first k samples after the
            split), the sizes of the synthetic sets, the file formats' options (array names,
            label column, image size, ...) and ``feed`` (``loader``: the training split is a
            :class:`LoaderDataset` over the same samples).
        seed: The run seed: the train/validation split, the synthetic data and the
            augmentation (a pure function of ``(seed, epoch, index)``).

    Returns:
        The :class:`DataBundle`.

    Raises:
        ValueError: Unknown name, or augmentation asked for a set that has none.
        DatasetNotFoundError: The files are not there (the message says how to get them).
        DatasetFormatError: A file is there but malformed, truncated or unsafe
            (:class:`UnsafePickleError`).
    """
    if is_entry_point(cfg.name):
        return entry_bundle(cfg, seed=seed)  # the user's own Datasets (docs/own_code.md)
    key = canonical_name(cfg.name)
    if cfg.augment and key not in AUGMENTATION:
        raise ValueError(
            f"augment=True: no augmentation is defined for {key!r} (only for the image sets "
            f"{', '.join(AUGMENTATION)}); set data.augment=false."
        )
    read = READERS[key](key, cfg, seed)
    if isinstance(read, DataBundle):
        bundle = read
    elif isinstance(read, ImageSplits):
        bundle = image_bundle(key, read, cfg, seed)
    else:
        bundle = tabular_bundle(key, read, cfg, seed)
    if cfg.feed == "loader" and isinstance(bundle.train, ArrayDataset):
        # The same tensors, read sample by sample through a DataLoader in training.
        train = bundle.train
        bundle = replace(
            bundle, train=LoaderDataset(TensorSamples(train.x, train.y), train.y, train.transform)
        )
    return bundle
