"""``distgrow probe``: throughput and peak memory against the micro-batch on this device.

For the config's model, data, loss, optimizer and precision, the probe times a few updates
(forward, backward, optimizer step; warm-up updates dropped) at micro-batches from
``growth.base_batch`` upward, doubling, and stops at the first that runs out of memory, goes
over the memory budget or would (its predicted peak, extrapolated linearly from the last two),
or passes the largest global batch the config allows. From the table:

* **where throughput saturates**: the smallest micro-batch within ``tolerance`` (5 %) of the
  best samples/s (:func:`saturation_point`); the micro-batch to prefer (``growth.micro_batch``);
* **the memory limit**: the largest micro-batch that stayed within the budget
  (``growth.max_micro_batch``; ``auto`` uses it).

Memory: on CUDA what training will hold: the caching allocator's peak *reserved* bytes (tensors,
cuBLAS workspaces, fragmentation) plus the memory outside it (the CUDA context, cuDNN and NCCL
buffers: the device's used memory minus the reserved), with the data placed as training places
it (``data.device_fraction``), plus what the probe's single process does not build: DDP's
gradient buckets (one more copy of the gradients) on several workers, and the noise meter's
float64 gradient copy (:func:`training_overhead_bytes`). That sum is compared with a budget of
the device's total memory (default 90 %: the rest is headroom for allocator growth over a long
run and for the other processes a node runs). On the CPU the growth of the process's peak
resident set over its size after a first update (``VmHWM`` in ``/proc/self/status``, reset
through ``/proc/self/clear_refs``), against a budget of the memory available when the probe
starts (default 50 %). Each micro-batch reuses one batch of real samples, so the table measures
the device, not the data pipeline.

Results are cached under ``~/.cache/distgrow/probe/`` (``$XDG_CACHE_HOME`` if set), one JSON file
per key: a hash of the model config, the optimizer, the input shape, the precision, the
device's name, where the data lives, the world size, the backend, ``run.compile`` and
``run.channels_last``. A cached probe measured under another ``--memory-budget`` than the one
given measures again (without one, the cache serves what it holds and prints its budget).
``growth.max_micro_batch: auto`` reads that cache (:func:`resolve_auto`), and probes once at
the start of training when nothing is cached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch

from distgrow.backends import Backend
from distgrow.backends.torch_ddp import autocast_model, grad_scaler, resolve_device
from distgrow.config import Config
from distgrow.data import DataBundle
from distgrow.gpu import place_data, prepare_model
from distgrow.losses import build_objective
from distgrow.oom import is_oom
from distgrow.planner import Limits
from distgrow.probe_cache import (
    CACHE_VERSION,
    DEFAULT_TOLERANCE,
    ProbeResult,
    ProbeRow,
    Status,
    cache_dir,
    cache_key,
    cache_path,
    data_placement_of,
    device_name,
    format_result,
    format_row,
    gib,
    probe_identity,
    read_cache,
    training_overhead_bytes,
    write_cache,
)
from distgrow.runtime import cpu_cores
from distgrow.state import TrainError
from distgrow.trainer import build_optimizer, build_run_model

# The results and their cache live in distgrow.probe_cache; importers find them here too.
__all__ = [
    "CACHE_VERSION",
    "DEFAULT_CPU_FRACTION",
    "DEFAULT_CUDA_FRACTION",
    "DEFAULT_TOLERANCE",
    "MAX_BUDGET_GIB",
    "ProbeError",
    "ProbeResult",
    "ProbeRow",
    "Status",
    "budget_bytes",
    "cache_dir",
    "cache_key",
    "cache_path",
    "cached_limit",
    "data_placement_of",
    "device_memory_bytes",
    "device_name",
    "doubling_sequence",
    "format_result",
    "format_row",
    "gib",
    "measure",
    "parse_budget",
    "predicted_peak",
    "probe_device",
    "probe_identity",
    "read_cache",
    "resolve_auto",
    "run_probe",
    "same_budget",
    "saturation_point",
    "training_overhead_bytes",
    "write_cache",
]

DEFAULT_CUDA_FRACTION = 0.9
DEFAULT_CPU_FRACTION = 0.5
MAX_BUDGET_GIB = 2**20
"""A ``--memory-budget`` in GiB above this (a PiB) is no device's memory: a typo."""


class ProbeError(ValueError):
    """A probe that cannot run as asked; the message names the value and the fix."""


# --------------------------------------------------------------------------------------------
# The pure rules (the results and their cache: distgrow.probe_cache)
# --------------------------------------------------------------------------------------------


def doubling_sequence(start: int, limit: int) -> list[int]:
    """``start, 2·start, 4·start, …`` up to ``limit`` (``[start]`` when ``limit < start``)."""
    if start < 1:
        raise ValueError(f"the first micro-batch must be at least 1, got {start}")
    sizes = [start]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    return sizes


def saturation_point(
    table: Sequence[tuple[int, float]], tolerance: float = DEFAULT_TOLERANCE
) -> int:
    """The smallest micro-batch whose samples/s is within ``tolerance`` of the table's best.

    Args:
        table: ``(micro_batch, samples_per_s)`` rows, in any order.
        tolerance: 0.05 accepts 95 % of the best throughput.

    Raises:
        ValueError: an empty table.
    """
    if not table:
        raise ValueError("saturation_point needs at least one measured micro-batch")
    best = max(rate for _, rate in table)
    return min(micro for micro, rate in table if rate >= (1.0 - tolerance) * best)


def predicted_peak(peaks: Sequence[tuple[int, int]], micro_batch: int) -> int | None:
    """The peak memory at ``micro_batch``, extrapolated linearly from the last two measured
    ``(micro_batch, bytes)`` points (from the origin with one point; None with none)."""
    if not peaks:
        return None
    if len(peaks) == 1:
        m, b = peaks[0]
        return math.ceil(b * micro_batch / m)
    (m0, b0), (m1, b1) = peaks[-2], peaks[-1]
    slope = (b1 - b0) / (m1 - m0)
    return math.ceil(b1 + slope * (micro_batch - m1))


def parse_budget(text: str) -> tuple[Literal["fraction", "bytes"], float]:
    """``--memory-budget``: ``0.8`` or ``80%`` (a fraction of the device's memory) or ``12``
    (GiB; any number above 1).

    Raises:
        ProbeError: not a positive finite number, or a percentage above 100.
    """
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw.removesuffix("GiB").removesuffix("G"))
    except ValueError:
        value = math.nan
    if percent:
        value /= 100.0
    if (
        not math.isfinite(value)
        or value <= 0
        or (percent and value > 1.0)
        or value > MAX_BUDGET_GIB
    ):
        raise ProbeError(
            f"--memory-budget = {text!r}: must be a fraction of the device's memory (0 < f <= 1, "
            f"or a percentage) or GiB (a number above 1, at most {MAX_BUDGET_GIB:,}). Fix: e.g. "
            "--memory-budget 0.8 or 12."
        )
    if percent or value <= 1.0:
        return ("fraction", value)
    return ("bytes", value * 2**30)


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux)
        return True
    except OSError:
        return False


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _total_bytes(device: torch.device) -> int | None:
    """The device's whole memory: the GPU's, or the machine's (``MemTotal``)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def device_memory_bytes(device: torch.device) -> int | None:
    """What the budget's fraction applies to: the GPU's total memory, or the memory available
    to this process on the CPU (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return _available_bytes()


def budget_bytes(spec: str | None, device: torch.device) -> int | None:
    """The budget in bytes from ``--memory-budget`` (None: the device's default fraction).

    Raises:
        ProbeError: a budget in GiB above the device's whole memory.
    """
    kind, value = (
        parse_budget(spec)
        if spec is not None
        else ("fraction", DEFAULT_CUDA_FRACTION if device.type == "cuda" else DEFAULT_CPU_FRACTION)
    )
    if kind == "bytes":
        total = _total_bytes(device)
        if total is not None and value > total:
            raise ProbeError(
                f"--memory-budget = {spec!r}: {value / 2**30:,.4g} GiB is more than the "
                f"{total / 2**30:.1f} GiB {device} has, so it would stop nothing. Fix: a budget "
                f"of at most {total / 2**30:.1f} GiB, or a fraction such as 0.8."
            )
        return int(value)
    total = device_memory_bytes(device)
    return None if total is None else int(value * total)


def _is_oom(err: BaseException) -> bool:
    return is_oom(err) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


class _Stepper:
    """One model, optimizer and loss, stepped at any micro-batch as the trainer would."""

    def __init__(self, cfg: Config, data: DataBundle, device: torch.device) -> None:
        self.device = device
        self.data = data
        model = prepare_model(build_run_model(cfg, data).to(device), device, cfg.run)
        self.model = autocast_model(model, cfg.backend.precision, device)
        self.objective = build_objective(cfg.loss, data.num_classes)
        self.optimizer = build_optimizer(cfg.optim, model.parameters())
        self.scaler = grad_scaler(cfg.backend.precision, device)

    def batch(self, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(micro_batch) % len(self.data.train)
        x, y = self.data.train.batch(idx, 0)
        return x.to(self.device), y.to(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = self.objective.loss_sum(self.model(x), y) / x.shape[0]
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(
    cfg: Config,
    data: DataBundle,
    device: torch.device,
    *,
    budget: int | None,
    steps: int = 5,
    warmup: int = 2,
    tolerance: float = DEFAULT_TOLERANCE,
    echo: Callable[[str], None] | None = None,
    world_size: int = 1,
    budget_spec: str | None = None,
) -> ProbeResult:
    """Probe ``cfg``'s model on ``device`` (see the module's docstring for the rules).

    Args:
        cfg: The config (model, data, loss, optimizer, precision, growth.base_batch).
        data: Its loaded data set.
        device: Where to measure.
        budget: Bytes of memory the micro-batch may use (None: no budget; CPU peaks are then
            reported but stop nothing).
        steps: Timed updates per micro-batch.
        warmup: Updates run first and dropped (allocations, autotuning, compilation).
        tolerance: See :func:`saturation_point`.
        echo: Prints each row as it is measured.
        world_size: The workers training will run on (DDP's buckets; the cache key).
        budget_spec: The ``--memory-budget`` text, kept with the result.

    Raises:
        ProbeError: not even the smallest micro-batch fits.
    """
    # The largest global batch the config allows bounds the micro-batches worth measuring;
    # the config's own memory limits do not (they are what the probe measures).
    unlimited = replace(cfg.growth, max_micro_batch=None, max_accum_steps=None)
    limits = Limits.from_config(unlimited, cfg.model, len(data.train))
    sizes = doubling_sequence(cfg.growth.base_batch, limits.cap)
    name = device_name(device)
    placement = data_placement_of(cfg, data, device)
    identity = probe_identity(cfg, data.input_shape, name, placement, world_size)
    # The data where training keeps it: on the GPU it takes memory beside the model.
    data = place_data(data, device, cfg.data.device_fraction, lambda line: None)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed)
        stepper = _Stepper(cfg, data, device)
        overhead = training_overhead_bytes(cfg, stepper.model, world_size)
        # A first update creates the gradients and the optimizer state: the CPU baseline then
        # holds everything but the activations and the batch.
        first = _measure_one(stepper, sizes[0], 1, 0, None)
        if first.status == "out_of_memory":
            raise ProbeError(
                f"growth.base_batch = {sizes[0]} does not fit on {name}: it ran out of memory. "
                "Fix: lower growth.base_batch (the probe starts there)."
            )
        base_rss = _proc_status_kib("VmRSS") if device.type != "cuda" else None
        rows, stopped = _measure_doubling(
            stepper, sizes, budget, overhead, base_rss, steps=steps, warmup=warmup, echo=echo
        )
        if stopped is None:
            stopped = f"reached the largest global batch the config allows ({limits.cap})"
        del stepper
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fitted = [r for r in rows if r.status == "ok" and r.samples_per_s is not None]
    if not fitted:
        raise ProbeError(
            f"growth.base_batch = {sizes[0]} does not fit on {name}: {stopped}. Fix: lower "
            "growth.base_batch (the probe starts there), or raise --memory-budget."
        )
    table = [(r.micro_batch, r.samples_per_s) for r in fitted if r.samples_per_s is not None]
    return ProbeResult(
        key=cache_key(identity),
        device=name,
        memory_kind="cuda_peak_reserved" if device.type == "cuda" else "cpu_peak_rss_growth",
        budget_bytes=budget,
        rows=rows,
        preferred_micro_batch=saturation_point(table, tolerance),
        max_micro_batch=max(r.micro_batch for r in fitted),
        stopped=stopped,
        tolerance=tolerance,
        identity=identity,
        measured_at=time.time(),
        budget_spec=budget_spec,
        overhead_bytes=overhead,
    )


def _measure_doubling(
    stepper: _Stepper,
    sizes: Sequence[int],
    budget: int | None,
    overhead: int,
    base_rss: int | None,
    *,
    steps: int,
    warmup: int,
    echo: Callable[[str], None] | None,
) -> tuple[list[ProbeRow], str | None]:
    """The rows of ``sizes`` in turn, up to the first that runs out of memory, goes over
    ``budget`` or would (its predicted peak); with why it stopped (None: it measured them all)."""
    rows: list[ProbeRow] = []
    peaks: list[tuple[int, int]] = []
    for m in sizes:
        guess = predicted_peak(peaks, m)
        if budget is not None and guess is not None and guess > budget:
            return rows, f"micro-batch {m} would need about {gib(guess)} (budget {gib(budget)})"
        row = _measure_one(stepper, m, steps, warmup, base_rss)
        if row.peak_bytes is not None and overhead:
            row = replace(row, peak_bytes=row.peak_bytes + overhead)
        rows.append(row)
        if echo is not None:
            echo(format_row(row))
        if row.status == "out_of_memory":
            return rows, f"micro-batch {m} ran out of memory"
        if row.peak_bytes is not None:
            if budget is not None and row.peak_bytes > budget:
                rows[-1] = replace(row, status="over_budget")
                return rows, f"micro-batch {m} used {gib(row.peak_bytes)} (budget {gib(budget)})"
            peaks.append((m, row.peak_bytes))
    return rows, None


def _measure_one(
    stepper: _Stepper, micro_batch: int, steps: int, warmup: int, base_rss_kib: int | None
) -> ProbeRow:
    cuda = stepper.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(stepper.device)
    reset = base_rss_kib is not None and _reset_peak_rss()
    try:
        x, y = stepper.batch(micro_batch)
        for _ in range(warmup):
            stepper.step(x, y)
        stepper.sync()
        started = time.perf_counter()
        for _ in range(steps):
            stepper.step(x, y)
        stepper.sync()
        elapsed = time.perf_counter() - started
    except (RuntimeError, MemoryError) as err:
        if not (_is_oom(err) or isinstance(err, MemoryError)):
            raise
        stepper.optimizer.zero_grad(set_to_none=True)
        return ProbeRow(micro_batch, "out_of_memory")
    rate = micro_batch * steps / elapsed if elapsed > 0 else None
    if cuda:
        reserved = int(torch.cuda.max_memory_reserved(stepper.device))
        free, total = torch.cuda.mem_get_info(stepper.device)
        # Outside the allocator: the CUDA context, cuDNN/NCCL buffers (and any other process).
        outside = max(0, total - free - int(torch.cuda.memory_reserved(stepper.device)))
        return ProbeRow(micro_batch, "ok", rate, reserved + outside, reserved)
    hwm = _proc_status_kib("VmHWM") if reset else None
    growth = None if hwm is None or base_rss_kib is None else max(0, hwm - base_rss_kib) * 1024
    return ProbeRow(micro_batch, "ok", rate, growth)


# --------------------------------------------------------------------------------------------
# The command and `growth.max_micro_batch: auto`
# --------------------------------------------------------------------------------------------


def probe_device(cfg: Config) -> torch.device:
    """The device ``distgrow train`` would use for ``run.device`` in a single process."""
    return resolve_device(cfg.run.device, 0)


def run_probe(
    cfg: Config,
    data: DataBundle,
    *,
    memory_budget: str | None = None,
    refresh: bool = False,
    steps: int = 5,
    warmup: int = 2,
    echo: Callable[[str], None] = print,
) -> ProbeResult:
    """``distgrow probe``: the cached result for this model and device, or a new measurement
    (``refresh``) written to the cache."""
    if steps < 1 or warmup < 0:
        raise ProbeError(
            f"--steps = {steps}, --warmup = {warmup}: at least 1 timed update and no negative "
            "warm-up. Fix: e.g. --steps 5 --warmup 2."
        )
    device = probe_device(cfg)
    if device.type == "cpu" and cfg.run.threads is None:
        torch.set_num_threads(cpu_cores())
    elif cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    budget = budget_bytes(memory_budget, device)
    placement = data_placement_of(cfg, data, device)
    identity = probe_identity(cfg, data.input_shape, device_name(device), placement)
    key = cache_key(identity)
    cached = None if refresh else read_cache(key)
    if cached is not None and not same_budget(cached.budget_spec, memory_budget):
        echo(
            f"probe: the cached probe was measured under --memory-budget "
            f"{cached.budget_spec or 'default'}; measuring again under {memory_budget or 'default'}"
        )
        cached = None
    if cached is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(cached.measured_at))
        echo(
            format_result(cached, f"cached {when} in {cache_path(key)} (--refresh measures again)")
        )
        return cached
    echo(f"probe: {identity['device']}, micro-batches from {cfg.growth.base_batch}, doubling")
    result = measure(
        cfg, data, device, budget=budget, steps=steps, warmup=warmup, budget_spec=memory_budget
    )
    path = write_cache(result)
    echo(format_result(result, f"saved to {path}"))
    return result


def same_budget(cached: str | None, asked: str | None) -> bool:
    """Whether a cached probe answers for the budget asked for now: any, when none is asked
    (the cache serves what was measured, its budget printed); else the same budget."""
    if asked is None:
        return True
    if cached is None:
        return False
    try:
        return parse_budget(cached) == parse_budget(asked)
    except ProbeError:
        return False


def resolve_auto(
    cfg: Config, data: DataBundle, backend: Backend, echo: Callable[[str], None]
) -> Config:
    """``cfg`` with ``growth.max_micro_batch: auto`` replaced by the probe's answer for this
    model on this device: the cache's, else a probe run now on rank 0 (and cached). Every
    rank gets rank 0's answer, so all plan alike.

    Returns:
        ``cfg`` itself when the setting is not ``auto``.
    """
    if cfg.growth.max_micro_batch != "auto":
        return cfg
    answer: tuple[int, str] | str | None = None
    if backend.is_main:
        placement = data_placement_of(cfg, data, backend.device)
        identity = probe_identity(
            cfg, data.input_shape, device_name(backend.device), placement, backend.world_size
        )
        result = read_cache(cache_key(identity))
        source = f"probe cache {cache_path(cache_key(identity))}"
        if result is None:
            echo(f"distgrow: growth.max_micro_batch=auto: probing {identity['device']} first")
            try:
                result = measure(
                    cfg,
                    data,
                    backend.device,
                    budget=budget_bytes(None, backend.device),
                    world_size=backend.world_size,
                )
                source = f"probed now, cached in {write_cache(result)}"
            except ProbeError as err:
                answer = str(err)
        if result is not None:
            answer = (result.max_micro_batch, source)
    answer = backend.broadcast_object(answer)
    if not isinstance(answer, tuple):
        raise TrainError(f"growth.max_micro_batch=auto: {answer}")
    limit, source = answer
    if backend.is_main:
        echo(f"distgrow: growth.max_micro_batch=auto → {limit} ({source})")
    return replace(cfg, growth=replace(cfg.growth, max_micro_batch=int(limit)))


def cached_limit(cfg: Config, data: DataBundle) -> tuple[int, Path] | None:
    """The cached ``max_micro_batch`` for ``cfg`` on the device this machine trains on, with
    its file (for ``distgrow plan``); None when nothing is cached."""
    device = probe_device(cfg)
    placement = data_placement_of(cfg, data, device)
    key = cache_key(probe_identity(cfg, data.input_shape, device_name(device), placement))
    result = read_cache(key)
    return None if result is None else (result.max_micro_batch, cache_path(key))
