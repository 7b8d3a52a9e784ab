"""What the timing probe measured on one node, and the throughput model fitted to it.

A :class:`TimingProfile` is the probe's record (a JSON file: ``distgrow estimate`` writes one
beside the probe cache, and a user copies it from their cluster's node). :class:`Throughput`
is the model fitted to it, the one place the prediction's arithmetic lives:

* a micro-step (load the micro-batch, forward, backward) of ``m`` samples on one worker alone:
  **measured** at several micro-batches; between two of them the line through both, beyond
  them ``a + b·m``, least squares over all (**modelled**);
* the optimizer step: ``step_s`` (**measured**);
* ``W`` workers on one node share it: the micro-step takes ``contention(W)`` times as long
  (**measured** at the worker counts the probe ran; beyond them, on a CPU the cores are shared
  out, ``× W_local/W_max``, on GPUs 1: **modelled**);
* the gradient all-reduce over ``W`` workers on this backend: **measured** at the probe's worker
  counts, between them and beyond the ring model ``α·(W−1) + β·(W−1)/W`` fitted to them
  (**modelled**; across nodes the network is not measured: the node's own links stand in);
* validation: a forward of ``c + d·m`` per piece (**measured**, fitted), pieces split over ranks
  as the trainer splits them;
* a checkpoint (**measured**) at each epoch end and each growth;
* a relaunch when the worker count changes (a new job step or SLURM job): a cold worker's
  start (**measured**: interpreter, distgrow, torch) plus the process group's start (**measured**).

Pure Python: no torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from distgrow.atomic import atomic_write_bytes

PROFILE_KIND = "distgrow-timing"
PROFILE_VERSION = 1
VAL_CHUNK = 500
"""The trainer's validation chunk (``distgrow.trainer.loop._VAL_CHUNK``): chunks are split over
ranks, each chunk in pieces no larger than a training micro-batch may be."""


class ProfileError(ValueError):
    """A timing profile that cannot be read or used; the message names the file and the fix."""


@dataclass(frozen=True)
class WorldRow:
    """One worker count, measured with that many processes on the node at ``micro_batch``."""

    workers: int
    threads: int
    """Intra-op threads each worker ran with."""
    compute_s: float
    """One micro-step without the all-reduce (DDP ``no_sync``), on rank 0."""
    sync_s: float
    """One micro-step with the gradient all-reduce."""
    init_s: float
    """Joining the process group (the rendezvous)."""
    compute_cpu_s: float = 0.0
    """CPU seconds of ``compute_s`` (rank 0's process)."""
    sync_cpu_s: float = 0.0

    @property
    def allreduce_s(self) -> float:
        """The all-reduce's share of a synchronised micro-step."""
        return max(0.0, self.sync_s - self.compute_s)


@dataclass
class TimingProfile:
    """The timing probe's record of one model on one node (see the module's docstring)."""

    device: str
    threads: int
    """Intra-op threads of the single-worker rows."""
    cores: int
    """CPU cores the node gave the probe."""
    backend: str
    dist_backend: str
    micro_rows: list[tuple[int, float]]
    """``(micro_batch, seconds)`` of one micro-step (load, forward, backward) alone."""
    step_s: float
    """One optimizer step (with zeroing the gradients)."""
    eval_rows: list[tuple[int, float]]
    """``(micro_batch, seconds)`` of one validation forward."""
    checkpoint_s: float
    world_micro_batch: int
    world_rows: list[WorldRow]
    grad_bytes: int
    cold_start_s: float
    """A new worker process: interpreter + ``import distgrow.startup`` + ``torch._dynamo``."""
    data_load_s: float
    """Loading the config's data set (part of every job's start-up)."""
    val_size: int = 0
    """Validation samples of the probed data set (a prediction without the data uses it)."""
    gpus: int = 0
    """GPUs on the node (0: CPU workers)."""
    micro_cpu_rows: list[tuple[int, float]] = field(default_factory=list)
    """The CPU seconds of ``micro_rows`` (this process, all its threads)."""
    step_cpu_s: float = 0.0
    max_micro_batch: int | None = None
    """The memory limit the probe found (None: not measured)."""
    identity: dict[str, Any] = field(default_factory=dict)
    key: str = ""
    measured_at: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def workers_per_node(self) -> int:
        """How many workers one node of this kind holds: its GPUs, else its cores."""
        return self.gpus or self.cores

    def cpu_view(self) -> TimingProfile:
        """The same profile with CPU seconds in place of wall-clock where both were measured."""
        if not self.micro_cpu_rows:
            raise ProfileError("the timing profile has no CPU times (measured before they were)")
        world = [
            replace(w, compute_s=w.compute_cpu_s, sync_s=w.sync_cpu_s) for w in self.world_rows
        ]
        return replace(
            self, micro_rows=list(self.micro_cpu_rows), step_s=self.step_cpu_s, world_rows=world
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimingProfile:
        if data.get("kind") != PROFILE_KIND or data.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"not a distgrow timing profile of version {PROFILE_VERSION} (kind "
                f"{data.get('kind')!r}, version {data.get('version')!r})"
            )
        fields = {k: v for k, v in data.items() if k not in ("kind", "version")}
        fields["micro_rows"] = [(int(m), float(s)) for m, s in fields["micro_rows"]]
        fields["eval_rows"] = [(int(m), float(s)) for m, s in fields["eval_rows"]]
        fields["micro_cpu_rows"] = [(int(m), float(s)) for m, s in fields.get("micro_cpu_rows", [])]
        fields["world_rows"] = [WorldRow(**row) for row in fields["world_rows"]]
        return cls(**fields)

    def save(self, path: Path) -> Path:
        """Write the profile atomically (:func:`distgrow.atomic.atomic_write_bytes`)."""
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=2).encode("utf-8"))
        return path


def read_profile(path: str | Path) -> TimingProfile:
    """The profile in ``path``.

    Raises:
        ProfileError: missing, unreadable, or not a timing profile (the message says which).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return TimingProfile.from_json(data)
    except OSError as err:
        raise ProfileError(
            f"--probe {path}: cannot read it ({err.strerror or err}). Fix: give the timing file "
            "`distgrow estimate` printed on the node (under ~/.cache/distgrow/probe/)."
        ) from err
    except (ValueError, TypeError, KeyError) as err:
        raise ProfileError(
            f"--probe {path}: not a distgrow timing profile ({err}). Fix: give the "
            "timing-*.json file `distgrow estimate` wrote on the node, not the memory probe's."
        ) from err


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of the least-squares line ``y = a + b·x`` (through the origin with one point;
    a negative intercept, which no time has, is refitted through the origin)."""
    if not points:
        raise ValueError("fit_line needs at least one point")
    if len(points) == 1 or len({x for x, _ in points}) == 1:
        x, y = points[0]
        return 0.0, y / x if x else 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx
    a = my - b * mx
    if a < 0 or b < 0:
        b = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
        a = 0.0
    return a, b


@dataclass(frozen=True)
class Throughput:
    """The model fitted to a :class:`TimingProfile` (see the module's docstring)."""

    profile: TimingProfile
    a: float
    b: float
    eval_a: float
    eval_b: float
    ring_alpha: float
    ring_beta: float

    @classmethod
    def fit(cls, profile: TimingProfile, clock: str = "wall") -> Throughput:
        """The model of ``profile``'s wall-clock, or (``clock="cpu"``) of the CPU seconds
        rank 0 spends inside updates (what a shared machine's load disturbs least)."""
        if clock == "cpu":
            profile = profile.cpu_view()
        if not profile.micro_rows or not profile.eval_rows:
            raise ProfileError("the timing profile has no measured micro-batches")
        a, b = fit_line([(float(m), s) for m, s in profile.micro_rows])
        ea, eb = fit_line([(float(m), s) for m, s in profile.eval_rows])
        ring = [(w.workers, w.allreduce_s) for w in profile.world_rows if w.workers > 1]
        alpha, beta = _fit_ring(ring)
        return cls(profile, a, b, ea, eb, alpha, beta)

    # -- the pieces ---------------------------------------------------------------------------

    def micro_step_s(self, micro_batch: int) -> float:
        """One micro-step of ``micro_batch`` samples on a worker alone: between measured
        micro-batches the line through the two nearest, beyond them ``a + b·m``."""
        return _between(self.profile.micro_rows, micro_batch, self.a, self.b)

    def forward_s(self, micro_batch: int) -> float:
        """One validation forward of ``micro_batch`` samples (as :meth:`micro_step_s`)."""
        return _between(self.profile.eval_rows, micro_batch, self.eval_a, self.eval_b)

    def local_workers(self, workers: int, per_node: int) -> int:
        """Workers on the busiest node when ``workers`` fill nodes of ``per_node``."""
        return min(workers, max(1, per_node))

    def contention(self, local: int) -> float:
        """How much longer a micro-step takes with ``local`` workers on one node."""
        if local <= 1:
            return 1.0
        rows = {w.workers: w for w in self.profile.world_rows}
        alone = self.micro_step_s(self.profile.world_micro_batch)
        if local in rows and alone > 0:
            return max(1.0, rows[local].compute_s / alone)
        measured = sorted(w for w in rows if w > 1)
        if self.profile.gpus:
            return 1.0  # a GPU per worker: nothing shared but the host (modelled)
        if not measured or alone <= 0:
            return max(1.0, local * self.profile.threads / max(1, self.profile.cores))
        below = max((w for w in measured if w < local), default=None)
        above = min((w for w in measured if w > local), default=None)
        if below is not None and above is not None:  # between two measured counts: linear
            cb, ca = rows[below].compute_s / alone, rows[above].compute_s / alone
            return max(1.0, cb + (ca - cb) * (local - below) / (above - below))
        ref = below if below is not None else above
        assert ref is not None
        return max(1.0, rows[ref].compute_s / alone * local / ref)

    def allreduce_s(self, workers: int) -> float:
        """The gradient all-reduce over ``workers`` (0 for one)."""
        if workers <= 1:
            return 0.0
        rows = {w.workers: w for w in self.profile.world_rows}
        if workers in rows:
            return rows[workers].allreduce_s
        return self.ring_alpha * (workers - 1) + self.ring_beta * (workers - 1) / workers

    def update_s(self, micro_batch: int, accum_steps: int, workers: int, per_node: int) -> float:
        """One parameter update: ``accum_steps`` micro-steps, the all-reduce, the step."""
        c = self.contention(self.local_workers(workers, per_node))
        compute = c * (accum_steps * self.micro_step_s(micro_batch) + self.profile.step_s)
        return compute + self.allreduce_s(workers)

    def validation_s(self, val_size: int, workers: int, per_node: int, piece_cap: int) -> float:
        """One validation pass: ``ceil(chunks / W)`` chunks of :data:`VAL_CHUNK` per rank, each
        in pieces of at most ``piece_cap``."""
        if val_size <= 0:
            return 0.0
        chunks = math.ceil(val_size / VAL_CHUNK)
        size = min(VAL_CHUNK, val_size)
        piece = max(1, min(size, piece_cap))
        full, rest = divmod(size, piece)
        per_chunk = full * self.forward_s(piece) + (self.forward_s(rest) if rest else 0.0)
        c = self.contention(self.local_workers(workers, per_node))
        return c * math.ceil(chunks / max(1, workers)) * per_chunk

    def init_s(self, workers: int) -> float:
        """Joining a process group of ``workers`` (the measured count nearest below)."""
        if workers <= 1:
            return 0.0
        rows = sorted(self.profile.world_rows, key=lambda w: w.workers)
        below = [w for w in rows if w.workers <= workers] or rows[:1]
        return below[-1].init_s if below else 0.0

    def relaunch_s(self, workers: int) -> float:
        """A new job step at ``workers``: a cold worker's start and the rendezvous."""
        return self.profile.cold_start_s + self.init_s(workers)

    def startup_s(self, workers: int) -> float:
        """A job's start-up: a cold worker, the data set's load and the rendezvous."""
        return self.profile.cold_start_s + self.profile.data_load_s + self.init_s(workers)

    def to_json(self) -> dict[str, Any]:
        """The fitted numbers (what the report's plot and the benchmark reuse)."""
        return {
            "micro_step_s": {"a": self.a, "b": self.b},
            "step_s": self.profile.step_s,
            "eval_s": {"a": self.eval_a, "b": self.eval_b},
            "ring": {"alpha": self.ring_alpha, "beta": self.ring_beta},
            "checkpoint_s": self.profile.checkpoint_s,
            "cold_start_s": self.profile.cold_start_s,
        }


def _between(rows: Sequence[tuple[int, float]], m: int, a: float, b: float) -> float:
    """Linear interpolation of ``rows`` at ``m`` inside their range; ``a + b·m`` outside."""
    points = sorted(rows)
    if not points or m < points[0][0] or m > points[-1][0]:
        return a + b * m
    for (m0, t0), (m1, t1) in itertools.pairwise(points):
        if m0 <= m <= m1:
            return t0 + (t1 - t0) * (m - m0) / (m1 - m0)
    return points[-1][1] if m == points[-1][0] else a + b * m


def _fit_ring(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """``(α, β)`` of ``t(W) = α·(W−1) + β·(W−1)/W`` by least squares (β alone from one point;
    (0, 0) from none: the all-reduce was never measured)."""
    if not points:
        return 0.0, 0.0
    xs = [((w - 1.0), (w - 1.0) / w) for w, _ in points]
    ys = [t for _, t in points]
    if len(points) == 1:
        return 0.0, ys[0] / xs[0][1]
    s11 = sum(x1 * x1 for x1, _ in xs)
    s12 = sum(x1 * x2 for x1, x2 in xs)
    s22 = sum(x2 * x2 for _, x2 in xs)
    t1 = sum(x1 * y for (x1, _), y in zip(xs, ys, strict=True))
    t2 = sum(x2 * y for (_, x2), y in zip(xs, ys, strict=True))
    det = s11 * s22 - s12 * s12
    if abs(det) < 1e-18:
        return 0.0, t2 / s22
    alpha = (t1 * s22 - t2 * s12) / det
    beta = (s11 * t2 - s12 * t1) / det
    if alpha < 0 or beta < 0:  # no time is negative: the better of the one-term fits
        b_only = t2 / s22
        a_only = t1 / s11
        err_b = sum((y - b_only * x2) ** 2 for (_, x2), y in zip(xs, ys, strict=True))
        err_a = sum((y - a_only * x1) ** 2 for (x1, _), y in zip(xs, ys, strict=True))
        return (0.0, b_only) if err_b <= err_a else (a_only, 0.0)
    return alpha, beta
