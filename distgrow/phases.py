"""Throughput per phase: what :class:`PhaseTracker` measures as the trainer runs.

A *phase* is a stretch of training with one batch realisation (global batch, workers,
micro-batch, accumulation steps). :class:`PhaseTracker` measures each phase as the trainer runs
it: updates, samples, seconds spent inside updates (``train_s``: forward, backward, all-reduce,
optimizer step, batch loading), wall-clock from its first update to the next phase's first
update (``wall_s``: validation and checkpoints included) and worker-seconds. Start-up (process
start, data loading, model building, rendezvous) is outside every phase and reported apart
(:func:`process_age_s`). :mod:`distgrow.savings` turns the phases into savings and re-exports
these names.

Pure Python: no torch; no files except :func:`process_age_s`'s ``/proc``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from distgrow.planner import Split, flatten_split


@dataclass
class PhaseStats:
    """What one phase (one batch realisation) did and how long it took."""

    index: int
    """0-based position of the phase in the run."""
    split: Split
    lr: float
    """The learning rate at the phase's first update (a capped phase may decay it further)."""
    momentum: float
    start_epoch: float
    """Epochs completed when the phase began (fractional: samples seen / N)."""
    start_step: int
    """Parameter updates before the phase's first update."""
    world_size: int
    """Processes the job held during the phase: all of them count in worker-seconds."""
    updates: int = 0
    samples: int = 0
    train_s: float = 0.0
    """Seconds inside updates (loading, forward, backward, all-reduce, step)."""
    train_cpu_s: float = 0.0
    """CPU seconds this process (rank 0: all its threads) spent inside updates. With one
    thread it is the work done, which a shared machine's load and a VM's stolen time disturb far
    less than ``train_s`` (``benchmarks/schedules_wallclock.py`` compares runs by it)."""
    wall_s: float = 0.0
    """Seconds from the phase's start to the next phase's start (validation included)."""
    worker_seconds: float = 0.0
    update_s_m2: float = 0.0
    """Sum of squared deviations of the update times from their mean (Welford's running
    update): with ``updates`` and ``train_s`` it gives the spread of the phase's throughput."""
    cuda_peak_allocated_bytes: int | None = None
    """CUDA runs: the most memory tensors held during the phase (validation included)."""
    cuda_peak_reserved_bytes: int | None = None
    """CUDA runs: the most memory the caching allocator held during the phase."""

    @property
    def samples_per_s(self) -> float | None:
        """Training throughput of the whole job in this phase (samples / ``train_s``)."""
        return self.samples / self.train_s if self.train_s > 0 else None

    @property
    def samples_per_s_per_worker(self) -> float | None:
        """Throughput per worker used by the phase's realisation."""
        rate = self.samples_per_s
        return None if rate is None else rate / self.split.workers

    def to_dict(self) -> dict[str, Any]:
        """The stored fields (the split flat) plus the derived throughputs (what
        ``summary.json`` holds)."""
        stored = flatten_split(asdict(self))
        for key in CUDA_MEMORY:
            if stored[key] is None:  # a CPU run measured no device memory: absent, not zero
                del stored[key]
        return {
            **stored,
            "samples_per_s": self.samples_per_s,
            "samples_per_s_per_worker": self.samples_per_s_per_worker,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseStats:
        """Rebuild from :meth:`to_dict` output (derived keys are ignored)."""
        names = {f.name for f in fields(cls)} - {"split"}
        return cls(split=Split.from_flat(data), **{k: v for k, v in data.items() if k in names})


CUDA_MEMORY = ("cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes")
"""A phase's peak CUDA memory (bytes); present only for phases run on CUDA."""


PHASE_MEASURES = (
    "global_batch",
    "workers",
    "updates",
    "samples",
    "train_s",
    "wall_s",
    "samples_per_s",
    "samples_per_s_per_worker",
)
"""What a phase is and measured, as the report's tables and the W&B summary show it."""
PHASE_SPLIT = ("micro_batch", "accum_steps", "lr")
"""The rest of a phase's setting (the report's per-phase table shows them too)."""
SUMMARY_MEASURES = (
    "status",
    "epochs",
    "total_updates",
    "samples_seen",
    "wall_s",
    "startup_s",
    "train_s",
    "samples_per_s",
    "worker_seconds",
    "worker_hours",
    "gpu_hours",
    "world_size",
)
"""What a run's ``summary.json`` measured, as the report and the W&B summary carry it."""


class PhaseTracker:
    """Splits a run's time into phases as the trainer runs them; survives resumes.

    The trainer calls :meth:`start` when its clock starts (after start-up), :meth:`begin` when
    the realisation changes (and before the first update), :meth:`record_update` after each
    update with the seconds it took, and :meth:`tick` before reading the numbers (checkpoints,
    the summary). Time between :meth:`start` and the first :meth:`begin` belongs to no phase.

    Args:
        clock: Seconds as a float (``time.perf_counter``; injectable for tests).
        memory: On CUDA, a reader of the peak (allocated, reserved) bytes since its last call
            (:func:`distgrow.gpu.cuda_peak_memory`): each tick charges them to the current phase.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        memory: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._clock = clock
        self._memory = memory
        self.phases: list[PhaseStats] = []
        self._mark: float | None = None

    @property
    def current(self) -> PhaseStats | None:
        """The phase in progress (None before the first :meth:`begin`)."""
        return self.phases[-1] if self.phases else None

    def start(self) -> None:
        """Start counting wall-clock (at the end of start-up, and again after a resume)."""
        self._mark = self._clock()

    def tick(self) -> None:
        """Add the wall-clock since the last tick to the current phase."""
        now = self._clock()
        if self._mark is not None and self.current is not None:
            elapsed = now - self._mark
            self.current.wall_s += elapsed
            self.current.worker_seconds += elapsed * self.current.world_size
        if self._memory is not None:
            allocated, reserved = self._memory()
            if self.current is not None:
                phase = self.current
                phase.cuda_peak_allocated_bytes = max(
                    phase.cuda_peak_allocated_bytes or 0, allocated
                )
                phase.cuda_peak_reserved_bytes = max(phase.cuda_peak_reserved_bytes or 0, reserved)
        self._mark = now

    def begin(
        self,
        *,
        split: Split,
        lr: float,
        momentum: float,
        start_epoch: float,
        start_step: int,
        world_size: int,
    ) -> PhaseStats | None:
        """Close the current phase and open a new one.

        Returns:
            The phase just closed (None at the first call).
        """
        self.tick()
        finished = self.current
        self.phases.append(
            PhaseStats(
                index=len(self.phases),
                split=split,
                lr=lr,
                momentum=momentum,
                start_epoch=start_epoch,
                start_step=start_step,
                world_size=world_size,
            )
        )
        return finished

    def record_update(self, samples: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        """Count one update of ``samples`` samples that took ``seconds`` (``cpu_seconds`` of
        this process's CPU time).

        Raises:
            RuntimeError: no phase was begun (a trainer bug, not user input).
        """
        phase = self.current
        if phase is None:
            raise RuntimeError("PhaseTracker.record_update() before begin(): call begin() first")
        # Welford: the deviation from the mean before and after this update, so the spread is
        # exact in one pass without keeping every update time.
        before = phase.train_s / phase.updates if phase.updates else 0.0
        phase.updates += 1
        phase.samples += samples
        phase.train_s += seconds
        phase.train_cpu_s += cpu_seconds
        phase.update_s_m2 += (seconds - before) * (seconds - phase.train_s / phase.updates)

    def train_seconds(self) -> float:
        """Seconds inside updates, over all phases."""
        return sum(p.train_s for p in self.phases)

    def train_cpu_seconds(self) -> float:
        """This process's CPU seconds inside updates, over all phases."""
        return sum(p.train_cpu_s for p in self.phases)

    def to_list(self) -> list[dict[str, Any]]:
        """All phases as dicts with their throughputs (call :meth:`tick` first)."""
        return [p.to_dict() for p in self.phases]

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint, up to now (the clock mark is not saved: a resume
        restarts it)."""
        self.tick()  # the time since the last tick belongs in the checkpoint too
        return {"phases": [flatten_split(asdict(p)) for p in self.phases]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the phases of a checkpoint; call :meth:`start` when the clock restarts."""
        self.phases = [PhaseStats.from_dict(p) for p in state.get("phases", [])]
        self._mark = None


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere).

    Start-up is measured from the process's birth, so the interpreter and torch imports count:
    a relaunch pays them again, and the report shows it.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            stat = f.read()
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        # Field 22 (starttime, in clock ticks since boot) is the 20th after the command name,
        # which is in parentheses and may hold spaces.
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None
