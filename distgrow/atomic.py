"""Atomic writes and what a failed one says: the temporary file, fsync, rename; one line naming
the file, the errno and the fix; strict JSON. Pure: imports neither torch nor anything of
distgrow's (:mod:`distgrow.rundir` writes every run-directory file through it and re-exports it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TEMPORARY_SUFFIX = ".tmp"
"""What every temporary file of :func:`atomic_write` ends with (it starts with ``.NAME.``)."""


_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read (only os.umask can), then put back


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write`` to a temporary file next to ``target``, fsync it, rename it over.

    On any failure the temporary file is removed and ``target`` keeps its old content. A
    failed write is always an :class:`OSError` naming ``target`` (not the temporary file),
    also when ``write`` turned it into another error: ``torch.save`` meets a disk that fills
    mid-write with ``OSError 28`` and then raises ``RuntimeError ... unexpected pos``.

    Raises:
        OSError: the directory, the temporary file or the rename failed (``filename`` is
            ``target``, or the directory in the way).
    """
    fd, tmp = -1, ""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent
        )
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp's is 0600)
        with os.fdopen(fd, "wb") as f:
            fd = -1  # closed by the with block from here on
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = os_error_within(err)
        if cause is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        named = _naming(cause, target)
        if named is err:
            raise
        raise named from err
    _fsync_dir(target.parent)


def os_error_within(err: BaseException) -> OSError | None:
    """``err`` when it is an :class:`OSError`, else the first one it was raised from (or
    during: ``__cause__``, then ``__context__``); None when there is none."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _naming(err: OSError, target: Path) -> OSError:
    """``err`` with ``target`` as its file when it named none, or a temporary file of it."""
    name = err.filename
    if isinstance(name, str) and not Path(name).name.startswith(f".{target.name}."):
        return err
    return OSError(err.errno, err.strerror or str(err), str(target))  # its subclass, by errno


# errno -> the fix, for the failures a user fixes by making room or pointing elsewhere.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)
IN_THE_WAY = (errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def is_disk_error(err: OSError) -> bool:
    """A full disk, a missing permission or a file in the way: fixed by the user, not retried."""
    return err.errno in (*NO_SPACE, *NO_PERMISSION, *IN_THE_WAY)


WRITE_FAILURE = "cannot write the "
"""How every line of :func:`write_failure` starts (the launch controller reads it in a
worker's error: such a failure is not retried)."""


def write_failure(
    err: OSError, what: str, path: str | Path, *, setting: str = "run.output_dir", after: str = ""
) -> str:
    """One line for a failed write: what, the path, the errno and the fix.

    Args:
        err: The error the write raised.
        what: What was being written (``"checkpoint"``, ``"launch log"``).
        path: The file or directory the write was for (``err.filename`` wins when set).
        setting: Where the user points the output elsewhere (``run.output_dir``, ``--out``).
        after: A sentence appended after the fix (where the last good checkpoint is).
    """
    where = Path(err.filename) if isinstance(err.filename, str) else Path(path)
    code = errno.errorcode.get(err.errno or 0, "unknown")
    reason = f"[Errno {err.errno} {code}] {err.strerror or err}"
    if err.errno in NO_SPACE:
        fix = (
            f"free space on the file system of {where.parent} (or raise the quota), or set "
            f"{setting} to a file system with room"
        )
    elif err.errno in NO_PERMISSION:
        fix = f"make {where.parent} writable, or set {setting} to a writable directory"
    elif err.errno in IN_THE_WAY:
        # ENOTDIR names the path asked for; what is in the way is the file among its parents.
        blocker = next((p for p in (where, *where.parents) if p.is_file()), where)
        fix = f"move {blocker} out of the way, or set {setting} to another directory"
    elif err.errno == errno.ENOENT:
        fix = f"create {where.parent} (or mount it again), or set {setting} elsewhere"
    else:
        fix = f"check the file system, or set {setting} to another directory"
    tail = f" {after}" if after else ""
    return f"{WRITE_FAILURE}{what} {where}: {reason}. Fix: {fix}.{tail}"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    atomic_write(Path(path), lambda f: f.write(data))


def plain(value: Any) -> Any:
    """``value`` as strict JSON types: non-finite floats become None, tuples lists, dataclasses
    dicts, numpy/torch scalars Python numbers (anything with ``.item()``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        return plain(value.item())
    return value


def to_json(record: Mapping[str, Any]) -> str:
    """One strict-JSON line (what ``metrics.jsonl`` holds)."""
    return json.dumps(plain(record), allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` (a mapping or a dataclass) as indented strict JSON, atomically."""
    text = json.dumps(plain(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
