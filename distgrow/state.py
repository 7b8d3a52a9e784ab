"""Where a run stands: the training counters a checkpoint carries and a resume continues.

:class:`TrainState` is the trainer's part of a checkpoint; the model, the optimizer, the growth
policy and the phase tracker save their own state beside it (see
:meth:`distgrow.trainer.Trainer.state_dict`). Its keys are the checkpoint's top-level keys of
format version 1 (``epoch``, ``position``, ``step``, ...), so files written before this class
existed load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from distgrow.planner import Split
from distgrow.rundir import is_disk_error as is_disk_error
from distgrow.rundir import write_failure


class TrainError(RuntimeError):
    """A run that cannot start or continue as asked; the message says how to fix it."""


class RunDirWriteError(TrainError):
    """The run directory cannot be written (full disk, no permission, a file in the way).

    A usage error, not a crash: exit 2, and a retry would fail the same way until the disk or
    the directory is fixed.
    """


def write_error(err: OSError, what: str, path: str | Path, after: str = "") -> RunDirWriteError:
    """One line for a failed write in the run directory: the errno, the path and the fix
    (:func:`distgrow.rundir.write_failure`).

    Args:
        err: The error the write raised.
        what: What was being written (``"checkpoint"``, ``"metrics record"``).
        path: The file or directory the write was for (``err.filename`` wins when set).
        after: A sentence appended after the fix (where the last good checkpoint is).
    """
    return RunDirWriteError(write_failure(err, what, path, after=after))


def _no_validation_yet() -> dict[str, float | None]:
    return {"val_loss": None, "val_acc": None}


@dataclass
class TrainState:
    """The counters of one run, over all of its processes (resumes included)."""

    epoch: int = 0
    """The epoch in progress (0-based); equal to the epochs completed when ``position`` is 0."""
    position: int = 0
    """Samples of this epoch already consumed: where the next update's global batch starts."""
    step: int = 0
    """Parameter updates so far."""
    samples_seen: int = 0
    realisation: Split | None = None
    """The split of the last update (None before the first)."""
    epoch_loss_sum: float = 0.0
    """Σ mean loss × samples over this epoch's updates."""
    epoch_samples: int = 0
    growth_events: int = 0
    last_val: dict[str, float | None] = field(default_factory=_no_validation_yet)
    last_train_loss: float | None = None
    wall_s: float = 0.0
    """Wall-clock seconds of training (in memory: of the earlier processes of this run; in a
    checkpoint: up to the moment it was written)."""
    worker_seconds: float = 0.0
    startup_s: float = 0.0
    """Start-up seconds of the processes of this run (up to their first update)."""

    def state_dict(self) -> dict[str, Any]:
        """Plain data (the split as a dict), for a ``weights_only`` checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the counters of a checkpoint; a key it lacks keeps its default."""
        defaults = TrainState()
        for f in fields(self):
            if f.name not in state:
                setattr(self, f.name, getattr(defaults, f.name))
                continue
            value = state[f.name]
            kind = type(getattr(defaults, f.name))
            # int and float fields come back as such even from a file that stored 3 for 3.0.
            setattr(self, f.name, kind(value) if kind in (int, float) else value)
        real = state.get("realisation")
        self.realisation = Split(**real) if real else None
        self.last_val = dict(self.last_val)
