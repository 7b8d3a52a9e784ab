"""The run's telemetry: its clock, the metrics records and events, and rank 0's console."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from distgrow.planner import Setting
from distgrow.trainer.parts import TrainerParts


class Telemetry(TrainerParts):
    """Records, events and console lines of a :class:`~distgrow.trainer.Trainer`."""

    def _clock(self) -> tuple[float, float]:
        """(wall seconds, worker seconds) of this run, over all its processes so far."""
        elapsed = time.perf_counter() - self._start_time
        return self.state.wall_s + elapsed, self.state.worker_seconds + elapsed * self.world

    def _record(self, kind: str, setting: Setting, **metrics: float | None) -> dict[str, Any]:
        wall, _ = self._clock()
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
            "time": time.time(),  # wall-clock (Unix seconds): lines up records across relaunches
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
            record["time"] = time.time()
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
