"""scikit-learn's bundled copies: digits, breast_cancer, wine, iris (no network)."""

from __future__ import annotations

import numpy as np

from distgrow.config import DataConfig
from distgrow.data.splits import Table

__all__ = ["NAMES", "read"]

NAMES = ("digits", "breast_cancer", "wine", "iris")


def read(name: str, cfg: DataConfig, seed: int) -> Table:
    """One of scikit-learn's bundled sets.

    Args:
        name: One of :data:`NAMES`.
        cfg: The data section (nothing in it applies).
        seed: Unused (the split is made by the caller).

    Returns:
        The table; the classes are the labels 0..k-1 the set comes with.

    Raises:
        ImportError: scikit-learn is not installed (the message says how to install it).
    """
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ImportError(f"{name} comes with scikit-learn: pip install 'distgrow[data]'.") from exc
    loader = {
        "digits": sklearn.datasets.load_digits,
        "breast_cancer": sklearn.datasets.load_breast_cancer,
        "wine": sklearn.datasets.load_wine,
        "iris": sklearn.datasets.load_iris,
    }[name]
    features, labels = loader(return_X_y=True)
    labels = np.asarray(labels, dtype=np.int64)
    return Table(np.asarray(features, dtype=np.float64), labels, int(labels.max()) + 1)
