"""Token files larger than memory: ``data.name: tokens``.

A token file is a flat array of token ids, the layout nanoGPT, Megatron and OLMo write: a
``.npy`` file (its header gives the dtype, ``uint16`` or ``uint32``) or a raw ``.bin`` of
``uint16`` ids (``uint32`` when a ``FILE.json`` beside it says ``{"dtype": "uint32"}``).
``scripts/make_tokens.py`` makes one from text files. The vocabulary is ``vocab_size`` from
``FILE.json`` when there is one, else the largest id in the files + 1 (one pass, in chunks).

The file is never read into memory: a batch reads its windows with one ``pread`` each, so the
process holds one batch of windows and the file's pages stay in the kernel's page cache, out of
the process's resident set. (A memory map (``np.memmap``) would bring them in: the kernel maps
up to a whole large folio, hundreds of KiB, around each window a batch touches, so one batch
of 256 scattered windows put ~400 MiB of the file into the resident set until it was unmapped.
The one pass that finds the largest id maps 16 M ids at a time.) The ids are cut into
non-overlapping windows of ``data.seq_len + 1``: a sample is the first ``seq_len`` ids of a
window, its target the window shifted by one.

Validation is ``data.val_path`` (another token file) when given, else whole blocks of
consecutive windows held out with the run seed (``data.val_fraction`` of at most
:data:`MAX_BLOCKS` blocks: O(blocks) memory, never O(windows)). The epoch order of token data
is always computed on the fly (:class:`~distgrow.data.order.FeistelPermutation`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from distgrow.config import DataConfig, held_out
from distgrow.config.filesizes import read_npy_header
from distgrow.data.containers import (
    ArrayDataset,
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
)
from distgrow.data.order import STREAM_SPLIT, FeistelPermutation, stream_seed

__all__ = [
    "MAX_BLOCKS",
    "MIN_BLOCK_WINDOWS",
    "TokenFile",
    "TokenWindows",
    "block_sizes",
    "read",
    "split",
    "train_size",
]

MAX_BLOCKS = 4096
"""At most this many held-out blocks per file: a block is ``ceil(windows / 4096)`` windows
(and at least :data:`MIN_BLOCK_WINDOWS`), so the split's bookkeeping is a few pages."""

MIN_BLOCK_WINDOWS = 16
"""The smallest block (as ``text``'s held-out blocks)."""

_DTYPES: dict[str, np.dtype] = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}
_CHUNK = 1 << 24  # ids per chunk of the one pass that finds the largest id


def _meta(path: Path) -> dict[str, object]:
    side = path.with_name(path.name + ".json")
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as err:
        raise DatasetFormatError(
            f"tokens: {side} is not readable JSON ({err}); fix it or remove it."
        ) from err
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"tokens: {side} must hold a JSON object; fix it or remove it.")
    return meta


@dataclass(frozen=True)
class TokenFile:
    """Where the ids of one token file lie: ``count`` ids of ``dtype`` from byte ``offset``."""

    path: Path
    dtype: np.dtype
    offset: int
    count: int
    vocab_size: int | None = None
    """From ``FILE.json``; None: not stated."""

    @classmethod
    def open(cls, path: str, where: str) -> TokenFile:
        """The token file at ``path`` (``where``: the key it came from, for the messages).

        Raises:
            DatasetNotFoundError: No such file.
            DatasetFormatError: A ``.npy`` of another dtype or shape, a size that is not a
                whole number of ids, a bad ``FILE.json``.
        """
        file = Path(path).expanduser()
        if not file.is_file():
            raise DatasetNotFoundError(
                f"tokens: {where} {file} is not a file; point it at a token file (.bin or .npy "
                "of uint16/uint32 ids, made e.g. by scripts/make_tokens.py)."
            )
        meta = _meta(file)
        size = file.stat().st_size
        with file.open("rb") as f:
            magic = f.read(6)
            if magic == b"\x93NUMPY":
                f.seek(0)
                try:
                    shape, _fortran, dtype = read_npy_header(f)
                except (ValueError, EOFError) as err:
                    raise DatasetFormatError(
                        f"tokens: {file} has no readable .npy header "
                        f"({' '.join(str(err).split())}); save it again with numpy.save."
                    ) from None
                offset = f.tell()
                if len(shape) != 1 or dtype.newbyteorder("=") not in _DTYPES.values():
                    raise DatasetFormatError(
                        f"tokens: {file} holds a {dtype} array of shape {shape}; a token file "
                        "is 1-D uint16 or uint32: save it as such."
                    )
                return cls(file, dtype, offset, int(shape[0]), _vocab(meta, file))
        name = str(meta.get("dtype", "uint16"))
        if name not in _DTYPES:
            raise DatasetFormatError(
                f"tokens: {file}.json says dtype {name!r}; a token file holds uint16 or uint32."
            )
        stored = _DTYPES[name]
        if size % stored.itemsize:
            raise DatasetFormatError(
                f"tokens: {file} has {size} bytes, not a whole number of {name} ids "
                f"({stored.itemsize} bytes each): is it truncated, or of another dtype?"
            )
        return cls(file, stored, 0, size // stored.itemsize, _vocab(meta, file))

    def ids(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Ids ``start .. stop-1`` as a read-only map of the file (nothing is read until it is
        indexed; the map goes when the array does)."""
        stop = self.count if stop is None else min(stop, self.count)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        offset = self.offset + start * self.dtype.itemsize
        return np.memmap(self.path, self.dtype, mode="r", offset=offset, shape=(stop - start,))

    def largest_id(self) -> int:
        """The largest id in the file, in one pass mapping :data:`_CHUNK` ids at a time."""
        top = 0
        for start in range(0, self.count, _CHUNK):
            top = max(top, int(self.ids(start, start + _CHUNK).max()))
        return top


def _vocab(meta: dict[str, object], file: Path) -> int | None:
    value = meta.get("vocab_size")
    if value is None:
        return None
    if not isinstance(value, int) or value < 1:
        raise DatasetFormatError(
            f"tokens: {file}.json says vocab_size {value!r}; it must be a positive integer."
        )
    return value


@dataclass
class TokenWindows(ArrayDataset):
    """Windows of a token file, read from the file batch by batch (``pread``, not a map).

    Sample ``i`` is window ``starts[k] + (i - first[k])`` of the file, ``k`` the block that
    holds it (blocks of consecutive windows: the training or validation blocks of a split).
    :attr:`x` and :attr:`y` are placeholders of the right shape that hold no memory (stride
    0); :meth:`batch` is what reads. ``data.feed=loader`` is refused for token data.
    """

    file: TokenFile = field(kw_only=True)
    seq_len: int = field(kw_only=True)
    starts: np.ndarray = field(kw_only=True)
    """The first window of each block."""
    first: np.ndarray = field(kw_only=True)
    """The sample index each block starts at (ascending; ``first[0] == 0``)."""

    def batch(self, indices: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: the ``int64`` ids of the windows of ``indices`` and their targets."""
        if indices.dim() != 1 or indices.is_floating_point() or indices.is_complex():
            return super().batch(indices, epoch)  # the same error as the plain dataset's
        idx = indices.to(torch.long).numpy()
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token windows: an index is out of range for {len(self)} samples.")
        block = np.searchsorted(self.first, idx, side="right") - 1
        windows = self.starts[block] + (idx - self.first[block])
        span = (self.seq_len + 1) * self.file.dtype.itemsize
        with self.file.path.open("rb", buffering=0) as f:
            fd = f.fileno()
            data = b"".join(
                os.pread(fd, span, self.file.offset + w * span) for w in windows.tolist()
            )
        if len(data) != span * len(windows):
            raise DatasetFormatError(
                f"tokens: {self.file.path} ended early (read {len(data)} of "
                f"{span * len(windows)} bytes): it was truncated while training; restore it."
            )
        rows = np.frombuffer(data, dtype=self.file.dtype).reshape(len(windows), self.seq_len + 1)
        out = torch.from_numpy(rows.astype(np.int64))
        return out[:, :-1], out[:, 1:]


def block_sizes(windows: int, blocks: np.ndarray, block: int) -> np.ndarray:
    """Windows in each of ``blocks`` (block ids) of ``block`` windows, of ``windows`` in all
    (the last block of the file may be short)."""
    starts = blocks.astype(np.int64) * block
    return np.minimum(starts + block, windows) - starts


def _windows(
    file: TokenFile, seq_len: int, blocks: np.ndarray, block: int, limit: int | None
) -> TokenWindows:
    """The :class:`TokenWindows` of ``blocks`` (block ids, ascending) of ``block`` windows."""
    starts = blocks.astype(np.int64) * block
    sizes = block_sizes(file.count // (seq_len + 1), blocks, block)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    n = int(sizes.sum())
    if limit is not None:
        n = min(n, limit)
    shape = (n, seq_len)
    placeholder = torch.zeros((), dtype=torch.uint8).expand(shape)
    return TokenWindows(
        placeholder, placeholder[:, 0], file=file, seq_len=seq_len, starts=starts, first=first
    )


def held_out_blocks(
    windows: int, val_fraction: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Training and validation block ids (each ascending) and the block size, in windows.

    ``held_out(blocks, val_fraction)`` of at most :data:`MAX_BLOCKS` blocks go to validation:
    the first of a seeded on-the-fly permutation of the blocks.
    """
    block = max(MIN_BLOCK_WINDOWS, -(-windows // MAX_BLOCKS))
    blocks = -(-windows // block)
    if blocks < 2:
        raise DatasetFormatError(
            f"tokens: {where} holds {windows} windows, {blocks} block of {block}; need 2 or "
            "more to hold one out: use a longer file, a smaller data.seq_len, or a "
            "data.val_path."
        )
    chosen = FeistelPermutation(blocks, stream_seed(seed, STREAM_SPLIT), 0)
    val = np.sort(chosen.at(np.arange(held_out(blocks, val_fraction), dtype=np.int64)))
    train = np.setdiff1d(np.arange(blocks, dtype=np.int64), val)
    return train, val, block


Split = tuple[TokenFile, np.ndarray, int]
"""A file, the ids of its blocks that a split takes (ascending) and the block size, in windows."""


def split(cfg: DataConfig, seed: int) -> tuple[Split, Split]:
    """The training and validation blocks of ``cfg``'s token files, from their headers alone.

    ``data.val_path`` given: all windows of each file (one block of them); else the blocks of
    :func:`held_out_blocks`. :func:`read` loads these; :func:`train_size` counts them.

    Raises:
        ValueError: ``data.seq_len`` is not set.
        DatasetNotFoundError: No file at ``data.path`` / ``data.val_path``.
        DatasetFormatError: A malformed file, too few windows.
    """
    seq_len = cfg.seq_len
    if seq_len is None:
        raise ValueError(
            "tokens: data.seq_len is null; the ids are cut into sequences of that many "
            "tokens: set it, e.g. data.seq_len=256."
        )
    if cfg.path is None:
        raise DatasetNotFoundError(
            "tokens: data.path is null; point it at a token file (.bin or .npy of uint16/uint32 "
            "ids), e.g. one made by scripts/make_tokens.py."
        )
    train_file = TokenFile.open(cfg.path, "data.path")
    span = seq_len + 1
    windows = train_file.count // span
    if cfg.val_path is None:
        train_blocks, val_blocks, block = held_out_blocks(
            windows, cfg.val_fraction, seed, f"data.path {train_file.path}"
        )
        return (train_file, train_blocks, block), (train_file, val_blocks, block)
    val_file = TokenFile.open(cfg.val_path, "data.val_path")
    for f, key in ((train_file, "data.path"), (val_file, "data.val_path")):
        if f.count < span:
            raise DatasetFormatError(
                f"tokens: {key} {f.path} holds {f.count} ids, fewer than data.seq_len + 1 = "
                f"{span}, not one window: use a longer file or a smaller data.seq_len."
            )
    every = np.zeros(1, dtype=np.int64)  # one block of all windows
    return (train_file, every, windows), (val_file, every, val_file.count // span)


def train_size(cfg: DataConfig, seed: int) -> int:
    """The training windows :func:`read` makes of ``cfg``'s files (``data.limit_train``
    honoured), from the files' headers and sizes alone: no id is read."""
    (file, blocks, block), _ = split(cfg, seed)
    assert cfg.seq_len is not None  # split() refused it
    n = int(block_sizes(file.count // (cfg.seq_len + 1), blocks, block).sum())
    return n if cfg.limit_train is None else min(n, cfg.limit_train)


def read(name: str, cfg: DataConfig, seed: int) -> DataBundle:
    """The token file of ``data.path`` as windows of ``data.seq_len`` ids and their targets.

    Raises:
        ValueError: ``data.seq_len`` is not set, or ``data.feed=loader``.
        DatasetNotFoundError: No file at ``data.path`` / ``data.val_path``.
        DatasetFormatError: A malformed file, too few windows, an id outside the stated
            vocabulary.
    """
    if cfg.feed == "loader":
        raise ValueError(
            "tokens: data.feed = 'loader' is not how token files are read (each batch maps the "
            "file itself, no worker processes needed): set data.feed=auto."
        )
    (train_file, train_blocks, train_block), (val_file, val_blocks, val_block) = split(cfg, seed)
    seq_len = cfg.seq_len
    assert seq_len is not None  # split() refused it
    train = _windows(train_file, seq_len, train_blocks, train_block, cfg.limit_train)
    val = _windows(val_file, seq_len, val_blocks, val_block, cfg.limit_val)
    files = [train_file] if val_file is train_file else [train_file, val_file]
    # A stated vocabulary is trusted (no pass over the file); else the largest id says it.
    stated = [f.vocab_size for f in files if f.vocab_size is not None]
    vocab = max(stated) if stated else max(f.largest_id() for f in files) + 1
    return DataBundle(
        name=name,
        train=train,
        val=val,
        input_shape=(seq_len,),
        num_classes=vocab,
        task="language_model",
    )
