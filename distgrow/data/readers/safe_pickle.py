"""Unpickling numeric numpy arrays from files nobody vouches for, without running anything.

A pickle can import and call any function while it loads. The data files read here (CIFAR-10's
python batches) only need numpy's array reconstruction, so :func:`restricted_load` resolves
those few globals and refuses every other one before it is imported, let alone called. It also
refuses object-dtype arrays (they could carry anything), and a file that declares more bytes
than it holds (an absurd size or a truncated file) is a :class:`DatasetFormatError` before
anything is allocated for it.
"""

from __future__ import annotations

import importlib
import io
import math
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distgrow.data.containers import DatasetFormatError, UnsafePickleError

__all__ = ["restricted_load"]


def _numpy_private(name: str, *modules: str) -> Callable[[], Any]:
    """A lazy getter for a numpy-internal unpickling helper.

    It lives in ``numpy._core`` in numpy 2 and ``numpy.core`` before; importing the
    ``numpy.core`` spelling under numpy 2 warns, so the new place is tried first.
    """

    def get() -> Any:
        for module in modules:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        raise pickle.UnpicklingError(f"this numpy has no {name} in {' or '.join(modules)}")

    return get


_reconstruct_function = _numpy_private(
    "_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray"
)
_frombuffer_function = _numpy_private("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")


def _safe_dtype(*args: Any) -> np.dtype[Any]:
    """``numpy.dtype`` for plain numeric types only: object arrays could carry anything."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError(
            f"refusing to unpickle an object-dtype array ({dtype}); only numeric arrays "
            "are allowed."
        )
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it in protocol-2 pickles to spell ``bytes``.

    Only the latin-1 codec is allowed: other codecs (zlib, base64, ...) are not needed.
    """
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(
            f"refusing _codecs.encode with codec {encoding!r}; only latin1 is needed."
        )
    return text.encode("latin1")


def _nbytes(shape: Any, dtype: Any) -> int:
    """The bytes an array of ``shape`` and ``dtype`` would take (0 if either is not one)."""
    dims = shape if isinstance(shape, tuple | list) else (shape,)
    if not all(isinstance(d, int) for d in dims):
        return 0  # numpy refuses it itself
    try:
        itemsize = np.dtype(dtype).itemsize
    except (TypeError, ValueError):
        itemsize = 1
    return math.prod(max(d, 0) for d in dims) * max(itemsize, 1)


def _check_declared_sizes(raw: bytes, source: str) -> None:
    """Walk the opcodes once: every length the pickle declares must fit in the file.

    The C unpickler allocates a counted ``bytes`` (or a protocol-4 frame) before it reads it,
    so a 20-byte file that declares 2**50 bytes would be a ``MemoryError``. ``pickletools``
    reads each argument from the buffer instead, and runs out of bytes instead of memory.
    """
    try:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(raw)):
            if opcode.name == "FRAME" and isinstance(arg, int) and arg > len(raw) - (pos or 0):
                raise DatasetFormatError(
                    f"{source}: declares a frame of {arg} bytes at byte {pos} but the file has "
                    f"{len(raw)} bytes (an absurd size or a truncated file); download it again."
                )
    except DatasetFormatError:
        raise
    except (ValueError, EOFError) as exc:
        # e.g. "expected 1125899906842624 bytes in a bytes8, but only 3 remain" or
        # "pickle exhausted before seeing STOP".
        raise DatasetFormatError(
            f"{source}: truncated or corrupt pickle ({exc}); download the file again."
        ) from exc


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the few globals numpy arrays need.

    Any other global raises :class:`UnsafePickleError` before it is imported. An array
    may not be declared larger than the file (``limit`` bytes): numpy's pickles always start
    from an empty array and fill it from bytes that are in the file.
    """

    def __init__(self, raw: bytes, source: str, hint: str) -> None:
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.limit = len(raw)
        self.source = source
        self.hint = hint
        # (module, name) -> the object to hand back. Both numpy module spellings appear:
        # files pickled under numpy 1 say numpy.core, under numpy 2 numpy._core.
        self.allowed: dict[tuple[str, str], Callable[[], Any]] = {
            ("numpy.core.multiarray", "_reconstruct"): lambda: self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): lambda: self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _frombuffer_function,
            ("numpy._core.numeric", "_frombuffer"): _frombuffer_function,
            ("numpy", "ndarray"): lambda: np.ndarray,
            ("numpy", "dtype"): lambda: _safe_dtype,
            ("_codecs", "encode"): lambda: _latin1_encode,
        }

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> Any:
        size = _nbytes(shape, dtype)
        if size > self.limit:
            raise DatasetFormatError(
                f"{self.source}: declares an array of shape {shape} ({size} bytes), more than "
                f"the whole file ({self.limit} bytes); the file is corrupt or not what it "
                "claims to be."
            )
        return _reconstruct_function()(subtype, shape, dtype)

    def find_class(self, module: str, name: str) -> Any:
        factory = self.allowed.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: only numpy array reconstruction "
                f"is allowed in {self.hint}."
            )
        return factory()


def restricted_load(path: Path, hint: str = "this data file") -> Any:
    """Unpickle ``path`` allowing numeric numpy arrays, dicts, lists, numbers and bytes only.

    Args:
        path: The file (read whole: the checks need its length).
        hint: What the file should be, for the refusal message, e.g. ``"CIFAR-10 batch
            files (is this file really from <url>?)"``.

    Returns:
        The unpickled object (``encoding="bytes"``: py2 strings stay ``bytes``).

    Raises:
        UnsafePickleError: The pickle asks for a global other than numpy's array helpers, an
            object dtype or a codec other than latin-1. Nothing it names has run.
        DatasetFormatError: The file is truncated, corrupt, or declares more bytes than it
            holds.
    """
    source = str(path)
    raw = path.read_bytes()
    _check_declared_sizes(raw, source)
    try:
        return _RestrictedUnpickler(raw, source, hint).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}") from exc
    except DatasetFormatError:
        raise
    except Exception as exc:
        # Whatever a malformed stream makes the unpickler or numpy raise (EOFError,
        # UnpicklingError, TypeError from a bad REDUCE, numpy's ValueError for a state that
        # does not fit, ...), it is the file that is wrong, not the program.
        raise DatasetFormatError(
            f"{source}: not a readable pickle ({type(exc).__name__}: {exc})."
        ) from exc
