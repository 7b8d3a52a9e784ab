"""Your own data files: where their splits are and how many samples they hold, without decoding.

``distgrow plan`` and ``distgrow compare`` need the training-set size N before anything is
loaded; for ``data.name`` = npz, csv, tsv or image_folder it is counted here from the files
(an array header, the lines of a table, the image files of a folder). The readers in
:mod:`distgrow.data.readers` follow the same rules (which row is a header, which files are
images, where train and validation are), so the count and the loaded set agree.

Errors are plain ``FileNotFoundError`` / ``ValueError`` with the message a user can act on; the
config turns them into ``ConfigError``, the readers into their data errors.
"""

from __future__ import annotations

import csv
import gzip
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from distgrow.config.datasets import held_out

if TYPE_CHECKING:
    import numpy as np

    from distgrow.config.schema import DataConfig

__all__ = [
    "IMAGE_SUFFIXES",
    "csv_delimiter",
    "csv_rows",
    "file_train_size",
    "has_header",
    "image_folder_roots",
    "list_image_folder",
    "npz_header",
    "npz_member",
    "npz_rows",
    "read_npy_header",
    "stream_train_size",
]

# What Pillow decodes and torchvision's ImageFolder lists (case ignored).
IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)


def existing(path: str | None, what: str) -> Path:
    """``path`` expanded, which must be set and exist (``what`` names it in the message)."""
    if path is None:
        raise FileNotFoundError(f"{what} is not set; point it at your data file or folder.")
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"{what} {resolved} does not exist; point it at your data.")
    return resolved


# -- npz ---------------------------------------------------------------------------------------


def npz_member(path: Path, key: str) -> str:
    """The member of the ``.npz`` archive ``path`` that holds array ``key``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    except zipfile.BadZipFile as err:
        raise ValueError(
            f"{path}: not a readable .npz archive ({err}); write it with numpy.savez."
        ) from None
    if key not in names:
        raise ValueError(
            f"{path}: no array named {key!r} (it holds {', '.join(names) or 'none'}); set "
            "data.x_key / data.y_key to the names of the features and labels."
        )
    return f"{key}.npy"


# Deflate (what np.savez_compressed writes) shrinks data at most ~1032-fold; an archive member
# claiming more is a forged size (a zip bomb), not a well-compressed array.
_DEFLATE_MAX_RATIO = 1032


def _byte_words(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


# numpy's own cap on a header's length (it reads longer ones only from trusted files).
_NPY_HEADER_MAX = 10_000


def read_npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream at ``handle``, left just past
    its header.

    Versions 1.0 and 2.0 headers are latin-1; version 3.0 (what numpy writes for field names
    latin-1 cannot spell, such as ``"数"``) is UTF-8, which numpy's public
    ``read_array_header_2_0`` would decode as latin-1 (mangled names).

    Raises:
        ValueError: not a .npy header, an unknown version, or a header that does not parse.
    """
    import ast
    import struct

    import numpy as np  # here: `distgrow plan` and the config check need it only for .npy/.npz

    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    if version != (3, 0):
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not one numpy writes")
    size = handle.read(4)
    length = struct.unpack("<I", size)[0] if len(size) == 4 else -1
    if not 0 <= length <= _NPY_HEADER_MAX:
        raise ValueError(f"a version 3.0 header of {length} bytes (numpy reads {_NPY_HEADER_MAX})")
    raw = handle.read(length)
    if len(raw) < length:
        raise ValueError(f"the header is cut short ({len(raw)} of {length} bytes)")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        header = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"the header {text.strip()[:80]!r} does not parse") from None
    if not isinstance(header, dict) or header.keys() != {"descr", "fortran_order", "shape"}:
        raise ValueError(f"the header {text.strip()[:80]!r} is not a .npy header")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
        raise ValueError(f"the header's shape {shape!r} is not a tuple of ints")
    if not isinstance(fortran, bool):
        raise ValueError(f"the header's fortran_order {fortran!r} is not a bool")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"the header's descr {header['descr']!r} is not a dtype ({err})") from None
    return shape, fortran, dtype


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], str]:
    """The shape and dtype of array ``key`` in the ``.npz`` archive ``path``, from its header.

    The size the header declares is checked against the bytes the archive really holds, so a
    forged or truncated header is refused before anything is allocated; so are arrays of
    Python objects (only a pickle loads them) and arrays without rows.

    Raises:
        ValueError: one line naming the file, the array and what is wrong.
    """
    member = npz_member(path, key)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(member)
            with archive.open(info) as handle:
                shape, _, dtype = read_npy_header(handle)
                header_bytes = handle.tell()
    except (ValueError, EOFError) as err:
        raise ValueError(
            f"{path}: array {key!r} has no readable .npy header ({' '.join(str(err).split())}); "
            "write the file again with numpy.savez."
        ) from None
    if dtype.hasobject:
        raise ValueError(
            f"{path}: array {key!r} holds Python objects (dtype {dtype}), which only a pickle "
            "can load; refused, since unpickling can run code. Save numbers instead, e.g. "
            "numpy.savez(path, X=X.astype('float32'), y=y.astype('int64'))."
        )
    if not shape:
        raise ValueError(f"{path}: array {key!r} is a scalar; it needs one row per sample.")
    if any(d < 0 for d in shape):
        raise ValueError(f"{path}: array {key!r} declares the impossible shape {shape}.")
    stored = path.stat().st_size
    forged = info.compress_size > stored or (
        info.file_size > info.compress_size
        if info.compress_type == zipfile.ZIP_STORED
        else info.file_size > info.compress_size * _DEFLATE_MAX_RATIO + 1024
    )
    if forged:
        raise ValueError(
            f"{path}: the archive says array {key!r} unpacks to {_byte_words(info.file_size)} "
            f"from {_byte_words(info.compress_size)} of a {_byte_words(stored)} file: it is "
            "corrupt (or a zip bomb); write it again with numpy.savez."
        )
    declared = math.prod(shape) * dtype.itemsize
    held = max(info.file_size - header_bytes, 0)
    if declared > held:
        raise ValueError(
            f"{path}: array {key!r} declares shape {shape} of {dtype} "
            f"({_byte_words(declared)}), but the archive holds {_byte_words(held)} of it: the "
            "file is truncated or corrupt; write it again with numpy.savez."
        )
    if shape[0] == 0:
        raise ValueError(
            f"{path}: array {key!r} has no rows (shape {shape}); it needs one row per sample."
        )
    return tuple(int(d) for d in shape), str(dtype)


def npz_rows(path: Path, key: str) -> int:
    """The first dimension of array ``key`` in ``path``, read from its header only (checked by
    :func:`npz_header`)."""
    return npz_header(path, key)[0][0]


# -- csv / tsv -------------------------------------------------------------------------------


def csv_delimiter(name: str, path: Path, delimiter: str | None) -> str:
    """``data.delimiter``, or tab for tsv (and ``.tsv`` files), else a comma."""
    if delimiter is not None:
        return delimiter
    suffixes = [s.lower() for s in path.suffixes]
    return "\t" if name == "tsv" or ".tsv" in suffixes or ".tab" in suffixes else ","


def _open(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-blank line (fields stripped of spaces)."""
    with _open(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        for row in reader:
            fields = [f.strip() for f in row]
            if any(fields):
                yield reader.line_num, fields


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def has_header(first: list[str], label_column: int | str, header: bool | None) -> bool:
    """Whether the first row names the columns.

    ``data.header`` when set; a label column given by name needs a header; otherwise the first
    row is a header when one of its feature fields is not a number (empty fields, missing
    values, are left to the reader to report).
    """
    if header is not None:
        return header
    if isinstance(label_column, str):
        return True
    label = label_column % len(first) if first else 0
    return any(f and not _is_number(f) for i, f in enumerate(first) if i != label)


def _csv_count(name: str, path: Path, cfg: DataConfig) -> int:
    delimiter = csv_delimiter(name, path, cfg.delimiter)
    count, first = 0, None
    for _, fields in csv_rows(path, delimiter):
        if first is None:
            first = fields
        count += 1
    if first is None:
        raise ValueError(f"{path}: no data lines.")
    return count - has_header(first, cfg.label_column, cfg.header)


# -- image folders -----------------------------------------------------------------------------


def image_folder_roots(path: str | None, val_path: str | None) -> tuple[Path, Path | None]:
    """The training folder and the validation folder (None: split the training folder).

    ``data.val_path`` when set; else ``train/`` and ``val/`` inside ``data.path`` when both are
    there; else ``data.path`` alone.
    """
    root = existing(path, "data.path")
    if not root.is_dir():
        raise ValueError(
            f"data.path = {root} is a file; image_folder needs a folder with one subfolder of "
            "images per class."
        )
    if val_path is not None:
        return root, existing(val_path, "data.val_path")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    return root, None


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The classes (sorted subfolder names) and every image with its class index.

    As torchvision's ``ImageFolder``: one subfolder per class (hidden ones skipped), images
    anywhere below it, files in sorted order.
    """
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root} holds no class folders; image_folder needs one subfolder per class "
            "(e.g. cat/001.png, dog/002.png)."
        )
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        files = sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(
                f"{root / name} holds no image ({', '.join(IMAGE_SUFFIXES)}); remove the folder "
                "or add its images."
            )
        samples.extend((p, index) for p in files)
    return classes, samples


# -- the count ---------------------------------------------------------------------------------


def _count(name: str, path: Path, cfg: DataConfig) -> int:
    if name == "npz":
        return npz_rows(path, cfg.x_key)
    if name == "image_folder":
        return len(list_image_folder(path)[1])
    if path.is_dir():
        raise ValueError(f"data.path = {path} is a folder; {name} needs the file itself.")
    return _csv_count(name, path, cfg)


def file_train_size(cfg: DataConfig) -> int:
    """Training samples of ``cfg``'s files: all of the training file or folder when there is a
    separate validation one, else what ``data.val_fraction`` leaves.

    Raises:
        FileNotFoundError: ``data.path`` (or ``data.val_path``) does not exist.
        ValueError: the files are not in the format ``data.name`` says.
    """
    if cfg.name == "image_folder":
        train, val = image_folder_roots(cfg.path, cfg.val_path)
    else:
        train = existing(cfg.path, "data.path")
        val = existing(cfg.val_path, "data.val_path") if cfg.val_path is not None else None
    n = _count(cfg.name, train, cfg)
    if val is not None:
        return n
    if n < 2:
        raise ValueError(f"{train}: {n} sample(s) cannot be split into train and validation.")
    return n - held_out(n, cfg.val_fraction)


# -- token files and text ----------------------------------------------------------------------


def stream_train_size(cfg: DataConfig, seed: int) -> int:
    """Training windows of ``data.name`` tokens or text, from the files' headers and sizes: the
    loader's own split (:func:`distgrow.data.readers.tokens.split`,
    :func:`distgrow.data.readers.text.train_size`), whose held-out blocks follow ``seed``.

    Raises:
        FileNotFoundError: ``data.path`` (or ``data.val_path``) does not exist.
        ValueError: no ``data.seq_len``, a malformed file, too few windows.
    """
    # Imported here: the split lives with its reader (one copy of the arithmetic), and the
    # config's other users need neither torch nor the readers.
    from distgrow.data.readers import text, tokens

    reader = tokens if cfg.name == "tokens" else text
    return reader.train_size(cfg, seed)
