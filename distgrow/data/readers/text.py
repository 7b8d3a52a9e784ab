"""Text as byte tokens: your own text, or a language-modelling set every Python install carries.

``text`` is your own: the ``*.py`` / ``*.txt`` files of ``data.path`` (a folder, or one file of
any name), read whole; ``data.val_path`` (a file or folder likewise) is then the validation
text, else blocks are held out as below. ``python_stdlib`` is the first 1 MiB of the Python
standard library's top-level modules (the ``*.py`` files in ``sysconfig.get_paths()["stdlib"]``,
in name order), or of the files of ``data.root``. The text is read as bytes, so the
vocabulary is the 256 byte values and no tokenizer is needed.

The byte stream is cut into windows of ``data.seq_len + 1`` bytes that do not overlap: a
sample is the first ``seq_len`` bytes of a window and its target is the same window shifted by
one (the next byte at every position). Windows are grouped into contiguous blocks of
:data:`BLOCK_SEQUENCES`, and a seeded choice of ``data.val_fraction`` of the blocks is held out,
so validation text is never a neighbour of, nor shares a byte with, training text.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from distgrow.config import DataConfig, held_out
from distgrow.data.containers import (
    ArrayDataset,
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
)
from distgrow.data.order import STREAM_SPLIT, stream_seed
from distgrow.data.splits import limit

__all__ = [
    "BLOCK_SEQUENCES",
    "CORPUS_BYTES",
    "VOCAB",
    "corpus_bytes",
    "read",
    "sequences",
    "text_size",
    "train_size",
]

VOCAB = 256
"""Byte-level tokens: one per byte value."""

CORPUS_BYTES = 1 << 20
"""The corpus is the first 1 MiB of the files: the same size on every Python 3.x install (the
standard library's top-level modules hold several MiB), so ``data.size`` can be stated."""

BLOCK_SEQUENCES = 16
"""Consecutive sequences per block of the train/validation split."""

_SUFFIXES = (".py", ".txt")


def _files(root: str | None, where: str = "python_stdlib: data.root") -> list[Path]:
    if root is None:
        folder = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(folder.glob("*.py"))
        if not files:
            raise DatasetNotFoundError(
                f"python_stdlib: no *.py files in {folder} (the standard library of this "
                "Python); set data.root to a folder of .py or .txt files."
            )
        return files
    null = "set it to null for the standard library" if "root" in where else "fix it"
    path = Path(root).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{where} {path} is neither a file nor a folder; point it at a text file or a "
            f"folder of .py / .txt files, or {null}."
        )
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
    if not files:
        raise DatasetNotFoundError(
            f"{where} {path}: no .py or .txt files in it; add some or point it elsewhere."
        )
    return files


def corpus_bytes(
    root: str | None, max_bytes: int | None = CORPUS_BYTES, where: str = "python_stdlib: data.root"
) -> np.ndarray:
    """The first ``max_bytes`` bytes of the files under ``root``, concatenated, as ``uint8``.

    Args:
        root: ``data.root``: a text file, a folder of ``.py`` / ``.txt`` files, or ``None``
            for the standard library's top-level modules.
        max_bytes: How much of the concatenated files to keep (None: all of it).
        where: The key ``root`` came from, for the messages.

    Raises:
        DatasetNotFoundError: No such file or folder, or no text files in it.
    """
    parts: list[bytes] = []
    total = 0
    for path in _files(root, where):
        data = path.read_bytes()
        parts.append(data if max_bytes is None else data[: max_bytes - total])
        total += len(parts[-1])
        if max_bytes is not None and total >= max_bytes:
            break
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def sequences(tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets from non-overlapping windows of ``seq_len + 1`` tokens.

    Returns:
        ``(x, y)``, both ``int64`` ``(n, seq_len)`` with ``y[i, t] == x[i, t + 1]`` for
        ``t < seq_len - 1``; window ``i`` covers ``tokens[i * (seq_len + 1):][: seq_len + 1]``.
    """
    n = _sequence_count(len(tokens), seq_len)
    windows = torch.from_numpy(tokens[: n * (seq_len + 1)].astype(np.int64))
    windows = windows.reshape(n, seq_len + 1)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _blocks(n: int, name: str) -> int:
    """Blocks of :data:`BLOCK_SEQUENCES` that ``n`` sequences make (the last may be short)."""
    blocks = -(-n // BLOCK_SEQUENCES)
    if blocks < 2:
        raise DatasetFormatError(
            f"{name}: {n} sequences make {blocks} block of {BLOCK_SEQUENCES}; need 2 or "
            "more to hold one out: use a longer text, a smaller data.seq_len, or (text) a "
            "data.val_path."
        )
    return blocks


def _val_blocks(blocks: int, val_fraction: float, seed: int) -> list[int]:
    """The held-out block ids: the first ``held_out(blocks, val_fraction)`` of a seeded
    permutation."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(stream_seed(seed, STREAM_SPLIT))
    chosen = torch.randperm(blocks, generator=generator)[: held_out(blocks, val_fraction)]
    return [int(b) for b in chosen.tolist()]


def block_split(
    n: int, val_fraction: float, seed: int, name: str = "python_stdlib"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation sequence indices, held out by whole blocks of consecutive sequences.

    ``round(blocks × val_fraction)`` blocks (at least 1, at most all but 1) of
    :data:`BLOCK_SEQUENCES` go to validation, chosen with the run seed; both index lists are
    in text order.
    """
    blocks = _blocks(n, name)
    is_val = torch.zeros(n, dtype=torch.bool)
    for b in _val_blocks(blocks, val_fraction, seed):
        is_val[b * BLOCK_SEQUENCES : (b + 1) * BLOCK_SEQUENCES] = True
    index = torch.arange(n)
    return index[~is_val], index[is_val]


def _sequence_count(size: int, seq_len: int) -> int:
    """Windows of ``seq_len + 1`` that ``size`` tokens make (as :func:`sequences` cuts them)."""
    return size // (seq_len + 1)


def text_size(root: str, where: str) -> int:
    """Bytes of the text files :func:`corpus_bytes` reads under ``root`` (file sizes alone)."""
    return sum(p.stat().st_size for p in _files(root, where))


def train_size(cfg: DataConfig, seed: int) -> int:
    """The training sequences :func:`read` makes for ``data.name: text`` (``data.val_path``,
    ``data.val_fraction``, ``data.limit_train`` honoured), from the files' sizes alone.

    Raises:
        ValueError, DatasetNotFoundError, DatasetFormatError: as :func:`read`.
    """
    seq_len = _seq_len(cfg, "text")
    path = _text_path(cfg)
    n = _sequence_count(text_size(path, "text: data.path"), seq_len)
    if cfg.val_path is not None:
        val_n = _sequence_count(text_size(cfg.val_path, "text: data.val_path"), seq_len)
        _check_both(n, val_n, seq_len)
    else:
        blocks = _blocks(n, "text")
        last = n - (blocks - 1) * BLOCK_SEQUENCES
        val_blocks = _val_blocks(blocks, cfg.val_fraction, seed)
        n -= sum(last if b == blocks - 1 else BLOCK_SEQUENCES for b in val_blocks)
    return n if cfg.limit_train is None else min(n, cfg.limit_train)


def _seq_len(cfg: DataConfig, name: str) -> int:
    if cfg.seq_len is None:
        raise ValueError(
            f"{name}: data.seq_len is null; the text is cut into sequences of that many "
            "tokens: set it, e.g. data.seq_len=64."
        )
    return cfg.seq_len


def _text_path(cfg: DataConfig) -> str:
    if cfg.path is None:
        raise DatasetNotFoundError(
            "text: data.path is null; point it at your text (a file, or a folder of .py / "
            ".txt files), e.g. data.path=corpus.txt (python_stdlib reads the standard "
            "library)."
        )
    return cfg.path


def _check_both(n: int, val_n: int, seq_len: int) -> None:
    if val_n == 0 or n == 0:
        short = "data.val_path" if val_n == 0 else "data.path"
        raise DatasetFormatError(
            f"text: {short} holds fewer than data.seq_len + 1 = {seq_len + 1} bytes, not "
            "one sequence: use a longer text or a smaller data.seq_len."
        )


def read(name: str, cfg: DataConfig, seed: int) -> DataBundle:
    """The byte-level language-modelling set: sequences of ``data.seq_len`` bytes.

    Args:
        name: ``"text"`` (``data.path`` read whole, ``data.val_path`` honoured) or
            ``"python_stdlib"`` (the first :data:`CORPUS_BYTES` of ``data.root``).
        cfg: The data section: ``path`` (= ``root``), ``val_path``, ``seq_len``,
            ``val_fraction``, ``limit_train``, ``limit_val``.
        seed: The run seed, which chooses the held-out blocks.

    Returns:
        The bundle: ``int64`` token sequences ``(N, seq_len)`` with their next-token targets,
        256 classes (one per byte value).

    Raises:
        ValueError: ``data.seq_len`` is not set.
        DatasetNotFoundError: No text where ``data.root`` (or ``data.val_path``) points;
            ``text`` without ``data.path``.
        DatasetFormatError: Too little text for one training and one validation block.
    """
    seq_len = _seq_len(cfg, name)
    if name == "text":
        x, y = sequences(corpus_bytes(_text_path(cfg), None, "text: data.path"), seq_len)
    else:
        x, y = sequences(corpus_bytes(cfg.root), seq_len)
    if name == "text" and cfg.val_path is not None:
        val_x, val_y = sequences(corpus_bytes(cfg.val_path, None, "text: data.val_path"), seq_len)
        _check_both(x.shape[0], val_x.shape[0], seq_len)
        train_x, train_y = limit(x, y, cfg.limit_train)
        val_x, val_y = limit(val_x, val_y, cfg.limit_val)
    else:
        train_idx, val_idx = block_split(x.shape[0], cfg.val_fraction, seed, name)
        train_x, train_y = limit(x[train_idx], y[train_idx], cfg.limit_train)
        val_x, val_y = limit(x[val_idx], y[val_idx], cfg.limit_val)
    return DataBundle(
        name=name,
        train=ArrayDataset(train_x, train_y),
        val=ArrayDataset(val_x, val_y),
        input_shape=(seq_len,),
        num_classes=VOCAB,
        task="language_model",
    )
