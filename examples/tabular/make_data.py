"""Write the tabular example's data: ``data.csv`` (a header, 12 numeric features, a word label).

Three classes, from a fixed random linear teacher with 5% of the labels redrawn, so that the
best accuracy is below 100% and the runs can be compared on it::

    python examples/tabular/make_data.py            # writes examples/tabular/data.csv
    python examples/tabular/make_data.py --rows 6000 --out my.csv

Your own table works the same way: numeric feature columns and one label column (words or
class numbers), named in the config by ``data.label_column``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("low", "mid", "high")


def write(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` samples of the teacher task as CSV at ``path``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 12))
    label = np.argmax(x @ rng.normal(size=(12, 3)), axis=1)
    flip = rng.random(rows) < 0.05
    label[flip] = rng.integers(0, 3, int(flip.sum()))
    header = ",".join([*(f"f{i}" for i in range(12)), "grade"])
    lines = [
        ",".join([*(f"{v:.5f}" for v in row), CLASSES[k]]) for row, k in zip(x, label, strict=True)
    ]
    path.write_text("\n".join([header, *lines]) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6000)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("data.csv"))
    args = parser.parse_args()
    write(args.out, args.rows)
    print(f"wrote {args.rows} rows to {args.out}")
