"""The metrics seam: a Logger protocol, its JSON-lines and null implementations, a meter.

Rank 0 logs through a :class:`JsonlLogger` (``metrics.jsonl`` in the run directory, one JSON
object per line, flushed line by line and appended to on resume); the other ranks get a
:class:`NullLogger`. Weights & Biases (:mod:`distgrow.wandb_logger`) joins through
:class:`MultiLogger` without the trainer knowing. This module never imports ``wandb``.

Record kinds written by the trainer (field ``kind``):

* ``step``: every ``logging.every_steps`` updates (with ``samples_per_s`` and
  ``samples_per_s_per_worker``);
* ``epoch``: at each epoch end, with the validation metrics;
* ``event``: ``event`` names it: ``start``, ``resume``, ``growth``, ``need_workers``,
  ``nonfinite``, ``end``. A ``growth`` (or ``resplit``) event carries ``finished_phase``, the
  throughput and time of the phase it ends (:class:`distgrow.savings.PhaseStats`); ``end``
  carries the summary, with every phase and the estimated savings.

Non-finite floats are written as ``null`` (JSON has no NaN).

:func:`atomic_write` (temporary file, fsync, rename) writes the JSON files here and the
checkpoints (:mod:`distgrow.checkpoint`); this module imports no torch, so the report and the
W&B logger can use it without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class Logger(Protocol):
    """Where metric records go."""

    def log(self, record: dict[str, Any]) -> None:
        """Record one dict of JSON-compatible values."""
        ...

    def close(self) -> None:
        """Flush and release whatever the logger holds."""
        ...


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become None; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(record: dict[str, Any]) -> str:
    """One record as a strict JSON line (no NaN/Infinity literals)."""
    return json.dumps(_plain(record), allow_nan=False, sort_keys=False)


class NullLogger:
    """Drops every record (the logger of ranks other than 0)."""

    def log(self, record: dict[str, Any]) -> None:
        del record

    def close(self) -> None:
        return None


class JsonlLogger:
    """Appends each record to a JSON-lines file and flushes it at once.

    Args:
        path: The file (``metrics.jsonl``); created with its folder if needed, appended to if
            it exists (a resumed run continues its history).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlLogger for {self.path} is closed; log before close().")
        self._file.write(to_json(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MultiLogger:
    """Sends each record to several loggers, in order."""

    def __init__(self, loggers: Iterable[Logger]) -> None:
        self.loggers = list(loggers)

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    atomic_write(Path(path), lambda f: f.write(data))


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write`` to a temporary file next to ``target``, then rename it over.

    On any failure the temporary file is removed and ``target`` keeps its old content.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (for tests and reports)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | Path, obj: Mapping[str, Any]) -> None:
    """Write ``obj`` as indented strict JSON, atomically (``summary.json``, ``resize.json``,
    the reports' JSON)."""
    text = json.dumps(_plain(obj), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


class ThroughputMeter:
    """Samples per second between two reads, and in total.

    Args:
        clock: Seconds as a float (``time.perf_counter``; injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._last_time = clock()
        self._pending = 0

    def add(self, samples: int) -> None:
        """Count ``samples`` processed since the last :meth:`rate`."""
        self._pending += samples

    def restart(self) -> None:
        """Start a new interval now, dropping what was counted (e.g. after validation)."""
        self._last_time, self._pending = self._clock(), 0

    def rate(self) -> float:
        """Samples per second since the previous call (or since creation), then reset."""
        now = self._clock()
        elapsed = now - self._last_time
        rate = self._pending / elapsed if elapsed > 0 else 0.0
        self._last_time, self._pending = now, 0
        return rate
