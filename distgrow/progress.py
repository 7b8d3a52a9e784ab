"""Progress of a long run: a tqdm bar on a terminal, plain periodic lines elsewhere (SLURM logs).

Rank 0 owns one :class:`Progress`. The trainer calls :meth:`Progress.update` after every update
(cheap: it only redraws every ``refresh_s``) and sends its own messages through
:meth:`Progress.write`, which prints them above the bar instead of through it.

* ``bar``: one tqdm line redrawn in place: a bar over all samples of the run, then the epoch,
  the phase, the global batch, the LR, the throughput and the ETA, cut to the terminal's width.
  tqdm draws it (its glyphs, ASCII on a stream that cannot take Unicode; the redraw in place;
  messages and other tqdm bars, such as DeepSpeed's, written above it without tearing it).
* ``lines``: the same facts as a plain line, printed when nothing else has been printed for
  ``interval_s`` seconds, so that a log file shows the run is alive without being flooded.
* ``auto``: ``bar`` when the stream is a terminal (and ``TERM`` is not ``dumb``), else ``lines``.

The throughput and the ETA are distgrow's own, not tqdm's: tqdm averages per call, so after a
growth (5× the samples per update) its rate lags by many updates; here the average is weighted
by time (:meth:`Progress._update_rate`), and the bar shows it through tqdm's description.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TextIO

ProgressMode = Literal["auto", "bar", "lines", "off"]


@functools.cache
def _bar_type() -> type[Any]:
    """tqdm without its monitor thread (:class:`Progress` decides when to redraw), imported
    at the first bar: ``lines`` and ``off`` (SLURM logs, other ranks) never load it."""
    from tqdm import tqdm

    class Bar(tqdm):
        monitor_interval = 0

    return Bar


@dataclass(frozen=True)
class ProgressState:
    """Where the run stands after an update: what the bar and the lines show.

    Attributes:
        epoch: The epoch in progress, 1-based.
        samples_seen: Samples processed since the start of the run (resumes included).
        step: Parameter updates so far.
        phase: The phase in progress, 1-based.
        phases: Phases in the plan (None when unknown, e.g. plateau schedules).
        global_batch: The current global batch.
        lr: The current learning rate.
    """

    epoch: int
    samples_seen: int
    step: int
    phase: int
    phases: int | None
    global_batch: int
    lr: float


def resolve_mode(mode: ProgressMode, stream: TextIO) -> Literal["bar", "lines", "off"]:
    """What ``auto`` means for ``stream``: a bar on a terminal, lines otherwise."""
    if mode != "auto":
        return mode
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        tty = False
    return "bar" if tty and os.environ.get("TERM", "") != "dumb" else "lines"


def format_eta(seconds: float | None) -> str:
    """``1:05`` under an hour, ``2:01:05`` above; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """The progress display of one run.

    Args:
        mode: ``auto``, ``bar``, ``lines`` or ``off`` (``logging.progress``).
        total_samples: Samples the whole run processes (N × epochs): the bar's 100%.
        total_epochs: ``run.epochs``.
        stream: Where to write (stdout by default).
        clock: Seconds as a float (``time.monotonic``; injectable for tests).
        refresh_s: Bar mode: least seconds between redraws.
        interval_s: Lines mode: seconds of silence before a progress line is printed.
        rate_window_s: Time constant of the throughput average (the ETA follows the current
            phase's speed within about this many seconds after a growth).
        width: Bar mode: line width (default: the terminal's).
    """

    def __init__(
        self,
        mode: ProgressMode,
        *,
        total_samples: int,
        total_epochs: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_s: float = 0.25,
        interval_s: float = 30.0,
        rate_window_s: float = 5.0,
        width: int | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self.total_samples = max(1, total_samples)
        self.total_epochs = total_epochs
        self._clock = clock
        self.refresh_s = refresh_s
        self.interval_s = interval_s
        self.rate_window_s = rate_window_s
        self._width = width
        self._last_output = clock()  # lines mode: the time of the last line printed
        self._last_draw = -math.inf
        self._bar: Any = None  # bar mode: a tqdm: made at the first draw, gone at close()
        self._prev: tuple[float, int] | None = None  # (time, samples_seen) of the last update
        self.rate: float | None = None  # samples/s, exponentially averaged over time

    # -- measurements ---------------------------------------------------------------------------

    def _update_rate(self, now: float, samples_seen: int) -> None:
        if self._prev is not None:
            t0, s0 = self._prev
            dt, ds = now - t0, samples_seen - s0
            if dt > 0 and ds >= 0:
                instant = ds / dt
                # A time-weighted average: a long update weighs more than a short one.
                alpha = 1.0 - math.exp(-dt / self.rate_window_s)
                self.rate = (
                    instant if self.rate is None else self.rate + alpha * (instant - self.rate)
                )
        self._prev = (now, samples_seen)

    def eta_s(self, samples_seen: int) -> float | None:
        """Seconds left at the current throughput (None before it is known)."""
        if not self.rate:
            return None
        return max(0, self.total_samples - samples_seen) / self.rate

    # -- display --------------------------------------------------------------------------------

    def status(self, state: ProgressState) -> str:
        """The facts shown, as one line without the bar (lines mode prints exactly this)."""
        done = min(1.0, state.samples_seen / self.total_samples)
        rate = "? samples/s" if self.rate is None else f"{self.rate:,.0f} samples/s"
        of = f"/{state.phases}" if state.phases else ""
        return (
            f"epoch {min(state.epoch, self.total_epochs)}/{self.total_epochs} {done:4.0%}  "
            f"step {state.step:,}  phase {state.phase}{of}  batch {state.global_batch:,}  "
            f"lr {state.lr:.4g}  {rate}  ETA {format_eta(self.eta_s(state.samples_seen))}"
        )

    def _draw(self, status: str, samples_seen: int) -> None:
        width = self._width or shutil.get_terminal_size((100, 20)).columns
        # Room for the status after the bar; the bar shrinks first, then tqdm cuts the line.
        cells = max(10, min(30, width - len(status) - 4))
        if self._bar is None:
            self._bar = _bar_type()(
                total=self.total_samples,
                initial=min(samples_seen, self.total_samples),
                desc=status,
                file=self.stream,
                ncols=max(1, width - 1),
                bar_format=f"|{{bar:{cells}}}| {{desc}}",
                leave=False,  # close() erases it: the trainer's last line says how it ended
                miniters=1,
                mininterval=0.0,  # the redraws are paced by update() with its own clock
                dynamic_ncols=False,
            )
            return  # tqdm drew it on creation
        self._bar.n = min(samples_seen, self.total_samples)
        self._bar.ncols = max(1, width - 1)
        self._bar.bar_format = f"|{{bar:{cells}}}| {{desc}}"
        self._bar.set_description_str(status, refresh=False)
        self._bar.refresh()

    def update(self, state: ProgressState) -> None:
        """Report the state after an update; draws or prints when it is time to."""
        if self.mode == "off":
            return
        now = self._clock()
        self._update_rate(now, state.samples_seen)
        if self.mode == "bar":
            if now - self._last_draw < self.refresh_s:
                return
            self._draw(self.status(state), state.samples_seen)
            self._last_draw = now
        elif now - self._last_output >= self.interval_s:
            self.stream.write(f"distgrow: progress: {self.status(state)}\n")
            self.stream.flush()
            self._last_output = now

    def write(self, line: str) -> None:
        """Print a message line; the bar, if shown, is redrawn below it."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
            self.stream.flush()
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last_output = self._clock()

    def close(self) -> None:
        """Erase the bar (the trainer's last line says how the run ended)."""
        if self._bar is not None:
            self._bar.close()
            self.stream.flush()
            self._bar = None
