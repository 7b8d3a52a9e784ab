"""Unpickling numeric numpy arrays from files nobody vouches for, without running anything.

A pickle can import and call any function while it loads. The data files read here (CIFAR-10's
python batches) only need numpy's array reconstruction, so :func:`restricted_load` resolves
those few globals and refuses every other one before it is imported, let alone called. It also
refuses object-dtype arrays (they could carry anything) and dtype states that would crash
numpy, and a file that declares more bytes than it holds (an absurd size or a truncated file)
is a :class:`DatasetFormatError` before anything is allocated for it.
"""

from __future__ import annotations

import importlib
import io
import math
import pickle
import pickletools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

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


# Opcode byte -> (name, how its argument's length is given) from pickletools' table: a fixed
# byte count (>= 0) or one of pickletools' markers (up to a newline, or a count in the
# leading 1, 4 or 8 bytes).
_OPCODES = {op.code.encode("latin1")[0]: op for op in pickletools.opcodes}
_COUNT_BYTES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}


def _check_declared_sizes(raw: bytes, source: str) -> None:
    """Walk the opcodes once: every length the pickle declares must fit in the file.

    Python's C unpickler allocates a counted ``bytes`` before it reads it, so a 20-byte file
    that declares 2**50 bytes is a ``MemoryError`` there; checked here first, it is a message
    that says which count at which byte. The walk reads the counts and skips the payloads
    (``pickletools.genops`` would decode every string: seconds for a CIFAR-10 batch).

    Raises:
        DatasetFormatError: A count runs past the end, an opcode is unknown, or STOP is
            missing (a truncated file).
    """
    size = len(raw)
    pos = 0

    def fail(problem: str) -> DatasetFormatError:
        return DatasetFormatError(
            f"{source}: truncated or corrupt pickle ({problem}); download the file again."
        )

    while pos < size:
        op = _OPCODES.get(raw[pos])
        if op is None:
            raise fail(f"unknown opcode {raw[pos]:#04x} at byte {pos}")
        start, pos = pos, pos + 1
        if op.name == "STOP":
            return
        arg = op.arg
        if arg is None:
            continue
        if arg.n == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if arg.name.endswith("_pair") else 1):
                end = raw.find(b"\n", pos)
                if end < 0:
                    raise fail(f"{op.name} at byte {start} has no end of line")
                pos = end + 1
            continue
        if arg.n >= 0:
            count_bytes, signed, fixed = arg.n, False, True
        else:
            count_bytes, signed = _COUNT_BYTES[arg.n]
            fixed = False
        if pos + count_bytes > size:
            raise fail(f"{op.name} at byte {start} runs past the end")
        if fixed:
            if op.name == "FRAME":
                declared = int.from_bytes(raw[pos : pos + 8], "little")
                if declared > size - pos - 8:
                    raise fail(
                        f"declares a frame of {declared} bytes at byte {start} but the file "
                        f"has {size} bytes"
                    )
            pos += count_bytes
            continue
        declared = int.from_bytes(raw[pos : pos + count_bytes], "little", signed=signed)
        pos += count_bytes
        if declared < 0 or declared > size - pos:
            raise fail(
                f"{op.name} at byte {start} declares {declared} bytes but only {size - pos} remain"
            )
        pos += declared
    raise fail("it ends before its STOP opcode")


def _check_dtype_state(dtype: np.dtype[Any], state: Any) -> None:
    """Refuse a dtype state other than the one a plain numeric dtype pickles with.

    ``dtype.__setstate__`` trusts its flags: a file that sets the object flags on ``uint8``
    crashes numpy (a segmentation fault, not an exception). Only the byte order may differ
    from what a fresh dtype of the same kind would pickle.
    """
    fresh = dtype.__reduce__()[2]
    if (
        not isinstance(state, tuple)
        or len(state) != len(fresh)
        or state[0] != fresh[0]
        or state[1] not in ("<", ">", "|", "=", b"<", b">", b"|", b"=")
        or state[2:] != fresh[2:]
    ):
        shown = repr(state)[:200]
        raise UnsafePickleError(
            f"refusing the dtype state {shown} for {dtype}; only a plain numeric "
            "dtype's state (its byte order) is allowed."
        )


_BUILD: Callable[[Any], None] = pickle._Unpickler.dispatch[pickle.BUILD[0]]


# The pure-Python unpickler, not the C one: only it lets BUILD (an object's __setstate__
# with state from the file) be checked before it runs.
class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only the few globals numpy arrays need.

    Any other global raises :class:`UnsafePickleError` before it is imported. An array
    may not be declared larger than the file (``limit`` bytes): numpy's pickles always start
    from an empty array and fill it from bytes that are in the file. BUILD applies state
    only to arrays and to dtypes whose state is a plain numeric dtype's.
    """

    # Neither is in typeshed: the unpickler's working stack and its opcode table.
    stack: list[Any]
    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

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

    def load_build(self) -> None:
        """BUILD: the object below the state on the stack gets ``__setstate__(state)``."""
        if len(self.stack) < 2:
            raise pickle.UnpicklingError("BUILD with an empty stack")
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(inst, state)
        elif type(inst) is not np.ndarray:
            raise UnsafePickleError(
                f"refusing to set the state of a {type(inst).__name__}; only numpy arrays "
                "and dtypes are built from state."
            )
        _BUILD(self)

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str) -> Any:
        factory = self.allowed.get((module, name))
        if factory is None:
            # The names come from the file: escaped, so that they stay on one line.
            spelled = f"{module}.{name}".encode("unicode_escape").decode("ascii")
            raise UnsafePickleError(
                f"refusing to load global {spelled}: only numpy array reconstruction "
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
        # does not fit, ...), it is the file that is wrong, not the program. Some of those
        # messages span lines; the error is one.
        reason = " ".join(str(exc).split())
        raise DatasetFormatError(
            f"{source}: not a readable pickle ({type(exc).__name__}: {reason})."
        ) from exc
