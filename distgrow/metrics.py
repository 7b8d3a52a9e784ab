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

:mod:`distgrow.rundir` names the run directory's files and writes them atomically; this module
imports no torch, so the report and the W&B logger can use it without loading torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from distgrow.rundir import atomic_write, atomic_write_bytes, read_jsonl, to_json, write_json

__all__ = [
    "JsonlLogger",
    "Logger",
    "MultiLogger",
    "NullLogger",
    "ThroughputMeter",
    "atomic_write",
    "atomic_write_bytes",
    "read_jsonl",
    "to_json",
    "write_json",
]


@runtime_checkable
class Logger(Protocol):
    """Where metric records go."""

    def log(self, record: dict[str, Any]) -> None:
        """Record one dict of JSON-compatible values."""
        ...

    def close(self) -> None:
        """Flush and release whatever the logger holds."""
        ...


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
