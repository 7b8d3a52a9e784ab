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
  ``nonfinite``, ``end``. ``resume`` carries ``replaced_records`` (see below) and
  ``config_changes`` (the settings the resume changed, each as ``key: old in config.yaml,
  new now``). A ``growth`` (or ``resplit``) event carries ``finished_phase``, the
  throughput and time of the phase it ends (:class:`distgrow.savings.PhaseStats`); ``end``
  carries the summary, with every phase and the estimated savings.

Non-finite floats are written as ``null`` (JSON has no NaN).

Each update is in the file once, also after a crash: a checkpoint notes the file's size
(``metrics_bytes``), and a resume from it first takes out the ``step`` and ``epoch`` records and
``growth``/``resplit`` events written after it (those updates run again) and a line cut by the
crash (:func:`drop_replayed_records`); the ``resume`` event counts them in
``replaced_records``. Events that tell what happened (``nonfinite``, ``stopped``, ...) stay.

:mod:`distgrow.rundir` names the run directory's files and writes them atomically; this module
imports no torch, so the report and the W&B logger can use it without loading torch.
"""

from __future__ import annotations

import contextlib
import json
import os
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
    "drop_replayed_records",
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

    A write that fails (a full disk) does not raise: the half-written line is cut off again,
    the error is kept in :attr:`error` and later records are dropped. Only rank 0 logs, so
    raising here would stop rank 0 alone while the other ranks wait in the next all-reduce;
    the trainer asks for :attr:`error` at the update's all-reduce and stops every rank.

    Args:
        path: The file (``metrics.jsonl``); created with its folder if needed, appended to if
            it exists (a resumed run continues its history).

    Raises:
        OSError: the file cannot be opened for appending.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")
        self.size = self._file.tell()
        """Bytes of whole records in the file (where a resume from now would cut it)."""
        self.error: OSError | None = None
        """The first write that failed; records are dropped from then on."""

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlLogger for {self.path} is closed; log before close().")
        if self.error is not None:
            return
        line = to_json(record) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as err:
            self.error = err
            self._cut_back()
            return
        self.size += len(line.encode("utf-8"))

    def _cut_back(self) -> None:
        """After a failed write: drop what stayed buffered and cut the file at the last whole
        record (truncating needs no free space)."""
        assert self._file is not None
        with contextlib.suppress(OSError):
            self._file.close()  # its buffer holds the torn line: closing may write part of it
        with contextlib.suppress(OSError):
            os.truncate(self.path, self.size)
        self._file = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


REPLAYED_KINDS = ("step", "epoch")
REPLAYED_EVENTS = ("growth", "resplit")
"""Records a resume writes again for the updates it replays (other events, ``nonfinite``,
``stopped``, ``need_workers``, tell what happened and stay)."""


def drop_replayed_records(path: str | Path, offset: int | None, step: int) -> int:
    """Before a resume from the checkpoint after ``step`` updates: take out of ``metrics.jsonl``
    the records of the updates the resume will run again, so that it holds each update once.

    Args:
        path: The ``metrics.jsonl`` file (nothing happens when there is none).
        offset: Its size in bytes when the checkpoint was written (the checkpoint's
            ``metrics_bytes``): records after it came later. None (a checkpoint from before
            distgrow kept it): records of updates after ``step`` came later.
        step: The checkpoint's update count.

    Returns:
        How many records were taken out (a line cut by a crash counts as one). The file is
        rewritten atomically, and only when something is taken out.

    Raises:
        OSError: the file cannot be read or rewritten.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    if offset is None or not 0 <= offset <= len(data):
        offset = 0 if offset is None else len(data)  # a file cut shorter by hand: keep it all
        after_checkpoint = False
    else:
        after_checkpoint = True
    kept: list[bytes] = []
    dropped = 0
    for line in data[offset:].splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1  # cut by the crash: appending after it would leave a torn line inside
            continue
        replayed = isinstance(record, dict) and (
            record.get("kind") in REPLAYED_KINDS
            or (record.get("kind") == "event" and record.get("event") in REPLAYED_EVENTS)
        )
        if replayed and (after_checkpoint or _step_of(record) > step):
            dropped += 1
        else:
            kept.append(line + b"\n")
    if dropped:
        atomic_write_bytes(path, data[:offset] + b"".join(kept))
    return dropped


def _step_of(record: dict[str, Any]) -> int:
    value = record.get("step")
    return value if isinstance(value, int) else -1


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
