"""What every room of the :class:`~distgrow.trainer.Trainer` may use: its attributes, typed.

The Trainer is one object built from rooms, each a module of :mod:`distgrow.trainer`:
:mod:`~distgrow.trainer.telemetry` (the clock, records, events, console),
:mod:`~distgrow.trainer.lifecycle` (run directory, resume, checkpoints, summary),
:mod:`~distgrow.trainer.resize` (more workers, elastic interim splits, the stops) and
:mod:`~distgrow.trainer.loop` (the loop itself). ``Trainer.__init__`` sets these attributes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distgrow.agreement import Agreement
from distgrow.backends import Backend
from distgrow.bn_merge import RunningStatsMerger
from distgrow.config import Config
from distgrow.data import DataBundle
from distgrow.data.feed import LoaderFeed
from distgrow.loop import GrowthSchedule
from distgrow.losses import Objective
from distgrow.metrics import JsonlLogger, Logger, ThroughputMeter
from distgrow.noise_meter import NoiseMeter
from distgrow.oom import OomFallback
from distgrow.planner import GrowthPolicy, Plan, Setting
from distgrow.progress import Progress
from distgrow.rundir import RunDir
from distgrow.savings import PhaseTracker
from distgrow.signals import StopSignals
from distgrow.state import TrainState

if TYPE_CHECKING:
    from distgrow.trainer.telemetry import Clock


class TrainerParts:
    """The Trainer's attributes (declarations only; ``Trainer.__init__`` sets them)."""

    cfg: Config
    plan_cfg: Config
    backend: Backend
    data: DataBundle
    world: int
    rank: int
    device: torch.device
    echo: Callable[[str], None]
    num_train: int
    run_dir: RunDir
    align: int
    policy: GrowthPolicy
    plan: Plan
    schedule: GrowthSchedule
    model: nn.Module
    train_model: nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    bn_merger: RunningStatsMerger | None
    noise: NoiseMeter | None
    feed: LoaderFeed | None
    oom: OomFallback
    logger: Logger
    fingerprint: dict[str, Any]
    state: TrainState
    last_setting: Setting | None
    clock: Clock
    startup_s: float
    phases: PhaseTracker
    progress: Progress | None
    planned_phases: int | None
    stop_signals: StopSignals
    agreement: Agreement
    startup_marks: dict[str, float]
    _jsonl: JsonlLogger | None
    _config_changes: list[str]
    _last_checkpoint: tuple[tuple[int, int, int], Path] | None
    _asked_for_workers: int
    _draws_random: bool
    _meter: ThroughputMeter
    _epoch_meter: ThroughputMeter
    _window_loss: float
    _window_samples: int
