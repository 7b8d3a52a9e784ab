"""Write the image classifier example's data: an image folder of small generated PNGs.

One subfolder per class (the layout of torchvision's ``ImageFolder``), each image a noisy
picture of its class's shape (a bar, a cross, a square, ...) in a random colour and place::

    python examples/image_folder/make_images.py              # examples/image_folder/images/
    python examples/image_folder/make_images.py --per-class 500 --size 32 --out /data/shapes

Your own images work the same way: point ``data.path`` at a folder of class folders (or one
holding ``train/`` and ``val/``), in any format Pillow reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bar", "column", "cross", "square", "corner", "diagonal")


def _shape(name: str, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    q = size // 4
    if name == "bar":
        mask[2 * q - 1 : 2 * q + 1, q : 3 * q] = True
    elif name == "column":
        mask[q : 3 * q, 2 * q - 1 : 2 * q + 1] = True
    elif name == "cross":
        mask[2 * q - 1 : 2 * q + 1, q : 3 * q] = mask[q : 3 * q, 2 * q - 1 : 2 * q + 1] = True
    elif name == "square":
        mask[q : 3 * q, q : 3 * q] = True
    elif name == "corner":
        mask[q : 3 * q, q : q + 2] = mask[3 * q - 2 : 3 * q, q : 3 * q] = True
    else:
        mask[np.arange(q, 3 * q), np.arange(q, 3 * q)] = True
    return mask


def write(root: Path, per_class: int, size: int, seed: int = 0) -> None:
    """``per_class`` PNGs of ``size``×``size`` pixels for each class under ``root``."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        mask = _shape(name, size)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            colour = rng.integers(120, 256, 3, dtype=np.uint8)
            shift = rng.integers(-size // 8, size // 8 + 1, 2)
            moved = np.roll(mask, tuple(int(s) for s in shift), axis=(0, 1))
            pixels[moved] = colour
            Image.fromarray(pixels).save(root / name / f"{i:05d}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("images"))
    args = parser.parse_args()
    write(args.out, args.per_class, args.size)
    print(f"wrote {args.per_class} images per class ({len(CLASSES)} classes) to {args.out}")
