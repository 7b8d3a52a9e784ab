"""The size catalogue: how many training samples each known data set has, without loading it.

``distgrow plan`` needs the training-set size N before any data is at hand;
:meth:`distgrow.config.DataConfig.expected_train_size` reads it from here.
"""

from __future__ import annotations

# Training-set sizes of data sets with an official train/test split, and total sizes of those
# split here with val_fraction (see held_out). distgrow.data is checked against these in tests.
OFFICIAL_TRAIN = {"fashion_mnist": 60_000, "mnist": 60_000, "cifar10": 50_000}
SPLIT_TOTAL = {
    "covtype": 581_012,
    "ionosphere": 351,
    "digits": 1_797,
    "breast_cancer": 569,
    "wine": 178,
    "iris": 150,
}
# Every data.name distgrow can load (distgrow.data.DATASETS; a test keeps the two equal).
# File formats: the data are the user's own files at data.path (sizes counted from the files).
FILE_FORMATS = ("npz", "csv", "tsv", "image_folder")
DATA_NAMES = (
    *OFFICIAL_TRAIN,
    *SPLIT_TOTAL,
    "synthetic_classification",
    "synthetic_regression",
    "python_stdlib",
    "text",
    "tokens",
    *FILE_FORMATS,
)


def held_out(n_total: int, val_fraction: float) -> int:
    """Validation samples taken from ``n_total`` (at least 1, and at least 1 left to train)."""
    return min(max(1, round(n_total * val_fraction)), n_total - 1)
