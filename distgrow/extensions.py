"""Where DeepSpeed's JIT-compiled ops are built, and the lock a killed build leaves behind.

torch builds JIT extensions (DeepSpeed's ``deepspeed_shm_comm``) under
``$TORCH_EXTENSIONS_DIR``, by default the user's ``~/.cache/torch_extensions``: two checkouts
with their own environments then rebuild the op in turn over each other. distgrow sets
``TORCH_EXTENSIONS_DIR`` to ``<sys.prefix>/torch_extensions`` (inside the environment) when the
user has not set it, for its own process and every process it starts.

A build holds torch's ``FileBaton``: a file ``lock`` in the extension's build directory,
created when the build starts, kept open by the building process and removed at its end. A
build killed midway leaves the file, and every later process waits on it forever.
:func:`check_locks` names such files: no process holds them open (refused once older than
:data:`STALE_AFTER_S`, when another machine sharing the file system cannot be building).

No torch here: ``distgrow plan`` imports this module.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"

STALE_AFTER_S = 30 * 60.0
"""Age from which a lock is stale when its holder cannot be looked for (no /proc, another
user's lock): a CPU op builds in 1-2 minutes, CUDA ops in under 15."""

HELD_GRACE_S = 5.0
"""A lock younger than this is never called stale (its build may be just starting)."""


def default_dir(prefix: str | None = None) -> Path:
    """``<sys.prefix>/torch_extensions``: the JIT cache inside this Python environment."""
    return Path(prefix if prefix is not None else sys.prefix) / "torch_extensions"


def _can_create(path: Path) -> bool:
    """Whether ``path`` exists as a writable folder or can be made (its nearest existing
    ancestor is a writable folder)."""
    for here in (path, *path.parents):
        if here.exists():
            return here.is_dir() and os.access(here, os.W_OK)
    return False


def torch_default_root(environ: MutableMapping[str, str] | None = None) -> Path:
    """Where torch puts JIT extensions without ``TORCH_EXTENSIONS_DIR`` (the user's cache)."""
    env = os.environ if environ is None else environ
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions"


def use_environment_cache(
    environ: MutableMapping[str, str] | None = None, prefix: str | None = None
) -> Path:
    """Set ``TORCH_EXTENSIONS_DIR`` to :func:`default_dir` unless the user set it.

    An environment this user cannot write to (a shared, read-only install) is left alone:
    torch then builds in the user's own cache, as without distgrow.

    Returns:
        The directory torch builds JIT extensions in from now on (the user's, if set).
    """
    env = os.environ if environ is None else environ
    if not env.get(ENV):
        inside = default_dir(prefix)
        if not _can_create(inside):
            return torch_default_root(env)
        env[ENV] = str(inside)
    return Path(env[ENV])


def _lock_files(root: Path) -> list[Path]:
    # <root>/<name>/lock; under torch's default root one level deeper (<root>/py311_cpu/<name>).
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def _holders_visible(path: Path) -> bool:
    """Whether this process can see every process that could hold ``path`` open."""
    if not Path("/proc/self/fd").is_dir():
        return False
    try:
        owner = path.stat().st_uid
    except OSError:
        return False
    return os.geteuid() in (0, owner)


def _open_paths(proc: Path = Path("/proc")) -> set[str]:
    """Every file some visible process holds open (Linux: the targets of ``/proc/*/fd/*``)."""
    held: set[str] = set()
    for pid in proc.iterdir():
        if not pid.name.isdigit():
            continue
        try:
            fds = list((pid / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                held.add(os.readlink(fd))
            except OSError:
                continue
    return held


def orphaned_locks(
    root: Path, now: float | None = None, held: Iterable[str] | None = None
) -> list[tuple[Path, float]]:
    """The build locks under ``root`` that no process here holds open, with their ages (s).

    On one machine such a lock is stale: its build was killed and no one will remove it. On
    a file system shared by several machines another one may still be building; so only a
    lock older than :data:`STALE_AFTER_S` is refused outright (:func:`check_locks`).

    Args:
        root: ``TORCH_EXTENSIONS_DIR``.
        now: The time to measure ages at (default: now).
        held: The files processes hold open (default: read from ``/proc``; where the holders
            cannot be seen, only locks older than :data:`STALE_AFTER_S` are returned).
    """
    locks = _lock_files(root) if root.is_dir() else []
    if not locks:
        return []
    now = time.time() if now is None else now
    open_now = set(_open_paths() if held is None else held)
    found = []
    for lock in locks:
        try:
            age = now - lock.stat().st_mtime
        except OSError:  # released meanwhile
            continue
        if age < HELD_GRACE_S or str(lock.resolve()) in open_now or str(lock) in open_now:
            continue
        if held is not None or _holders_visible(lock) or age >= STALE_AFTER_S:
            found.append((lock, age))
    return found


def check_locks(root: Path | None = None, warn: Callable[[str], None] | None = None) -> str | None:
    """Name the stale build locks under ``root`` (default: ``$TORCH_EXTENSIONS_DIR``).

    Returns:
        One line (value, problem, fix) for a lock no process holds that is older than
        :data:`STALE_AFTER_S`: DeepSpeed would wait on it forever. A younger one (another
        machine may be building) is named through ``warn`` (default: stderr) instead.
    """
    root = use_environment_cache() if root is None else root
    for lock, age in orphaned_locks(root):
        if age >= STALE_AFTER_S:
            return (
                f"{lock} is the lock of a JIT build of {lock.parent.name} that no process holds, "
                f"{age / 60:.0f} min old: a killed build left it and DeepSpeed would wait on it "
                f"forever. Fix: rm {lock} (the op is then rebuilt once)."
            )
        line = (
            f"distgrow: warning: {lock}: no process on this machine holds this JIT build lock of "
            f"{lock.parent.name} ({age:.0f} s old); unless another machine is building it, a "
            f"killed build left it and DeepSpeed will wait forever: rm {lock}"
        )
        (warn or (lambda text: print(text, file=sys.stderr)))(line)
    return None
