"""The run's telemetry: its one clock, the metrics records and events, and rank 0's console."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NamedTuple

from distgrow.planner import Setting
from distgrow.trainer.parts import TrainerParts


class Reading(NamedTuple):
    """One look at the :class:`Clock`: its seconds and this process's CPU seconds."""

    seconds: float
    cpu_seconds: float


class Clock:
    """The run's one clock: every time a run records is read here.

    One source of seconds (``read``, ``time.perf_counter``: monotonic) serves the records'
    ``wall_s`` and ``epoch_wall_s``, the update times and ``train_s`` (through the
    :class:`~distgrow.savings.PhaseTracker` and the throughput meters, which are given
    :meth:`now`), the progress display's rate and ETA, ``startup_s``, the checkpoint interval
    and the summary. The records' ``time`` (Unix seconds, to line records up across
    relaunches) is the same reading plus the Unix time at the clock's creation
    (:meth:`unix`): two records' ``time`` differ by exactly what the clock counted between
    them. ``train_cpu_s`` reads the process's CPU time (``cpu``) at the same moments.

    Args:
        started_at: A reading of ``read`` when this process began working on the run (start-up
            counts from there); default: now.
        read: The seconds source (injectable for tests).
        cpu: This process's CPU seconds (``time.process_time``).
        unix: Unix seconds (``time.time``), read once to anchor :meth:`unix`.
    """

    def __init__(
        self,
        started_at: float | None = None,
        *,
        read: Callable[[], float] = time.perf_counter,
        cpu: Callable[[], float] = time.process_time,
        unix: Callable[[], float] = time.time,
    ) -> None:
        self._read = read
        self._cpu = cpu
        now = read()
        self._unix_offset = unix() - now
        self.started_at = now if started_at is None else started_at
        self.training_from = now  # training's start in this process (set by start_training)
        self._marks: dict[str, float] = {}

    def now(self) -> float:
        """Seconds on the clock (only differences mean anything)."""
        return self._read()

    def unix(self, at: float | None = None) -> float:
        """Unix seconds of the reading ``at`` (default: now) on this clock."""
        return (self._read() if at is None else at) + self._unix_offset

    def reading(self) -> Reading:
        """Now, with this process's CPU seconds (to time an update)."""
        return Reading(self._read(), self._cpu())

    def since(self, start: Reading) -> Reading:
        """The seconds and CPU seconds from ``start`` to now."""
        now = self.reading()
        return Reading(now.seconds - start.seconds, now.cpu_seconds - start.cpu_seconds)

    def start_training(self) -> float:
        """Training starts now (start-up is over): the laps restart; returns this process's
        start-up seconds."""
        self.training_from = self._read()
        for name in self._marks:
            self._marks[name] = self.training_from
        return self.training_from - self.started_at

    def training_s(self, at: float | None = None) -> float:
        """Seconds from :meth:`start_training` in this process to ``at`` (default: now)."""
        return (self._read() if at is None else at) - self.training_from

    def lap(self, name: str) -> float:
        """Seconds since the last lap ``name`` (or training's start); the lap restarts now."""
        now = self._read()
        elapsed = now - self._marks.get(name, self.training_from)
        self._marks[name] = now
        return elapsed

    def peek(self, name: str) -> float:
        """Seconds since the last lap ``name`` (or training's start), the lap running on."""
        return self._read() - self._marks.get(name, self.training_from)


class Telemetry(TrainerParts):
    """Records, events and console lines of a :class:`~distgrow.trainer.Trainer`."""

    def _clock(self, at: float | None = None) -> tuple[float, float]:
        """(wall seconds, worker seconds) of this run, over all its processes, up to the
        clock's reading ``at`` (default: now)."""
        elapsed = self.clock.training_s(at)
        return self.state.wall_s + elapsed, self.state.worker_seconds + elapsed * self.world

    def _record(self, kind: str, setting: Setting, **metrics: float | None) -> dict[str, Any]:
        at = self.clock.now()  # one reading: wall_s and time
        wall, _ = self._clock(at)
        record: dict[str, Any] = {
            "kind": kind,
            "epoch": self.state.epoch + (0 if kind == "epoch" else 1),
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            **asdict(setting.split),  # flat, as the records always had it
            "lr": setting.lr,
            "momentum": setting.momentum,
            "train_loss": None,
            "val_loss": None,
            "val_acc": None,
            "wall_s": wall,
            "time": self.clock.unix(at),  # Unix seconds: lines up records across relaunches
        }
        record.update(metrics)
        return record

    def _log_event(self, event: str, setting: Setting | None, **extra: Any) -> None:
        record: dict[str, Any] = {"kind": "event", "event": event}
        if setting is not None:
            record = {**self._record("event", setting), "event": event}
        else:
            record.update(
                epoch=self.state.epoch + 1,
                step=self.state.step,
                samples_seen=self.state.samples_seen,
            )
            record["time"] = self.clock.unix()
        record.update(extra)
        self.logger.log(record)

    def _say(self, line: str) -> None:
        if self.backend.is_main and self.cfg.logging.progress != "off":
            self._line(f"distgrow: {line}")

    def _line(self, line: str) -> None:
        """Print a line on rank 0's console, above the progress bar if one is shown."""
        if self.progress is not None:
            self.progress.write(line)
        else:
            self.echo(line)

    def _log_policy_events(self, setting: Setting, events: list[tuple[str, Any]]) -> None:
        """Log the decisions the growth policy took from the noise scale (with the values)."""
        for name, values in events:
            self._log_event(name, setting, **values)
            self._say(
                f"epoch {self.state.epoch + 1}, update {self.state.step:,}: {name}: "
                + ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in values.items()
                )
            )
