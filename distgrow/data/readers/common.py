"""Small file helpers the text readers share."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import IO

__all__ = ["has_suffix", "open_text"]


def has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    """True if ``path``'s name ends with one of ``suffixes`` (case ignored)."""
    return any(path.name.lower().endswith(s) for s in suffixes)


def open_text(path: Path) -> IO[str]:
    """A text handle on a plain or ``.gz`` file."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")
