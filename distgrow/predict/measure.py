"""The timing probe: what the throughput model (:mod:`distgrow.predict.profile`) is fitted to.

``distgrow probe`` measures samples/s and memory per micro-batch; this measures, for the same
model on the same device, what a prediction of wall-clock needs beyond that:

* one micro-step (a fresh micro-batch's load, forward, backward) at several micro-batches, the
  optimizer step, a validation forward, and a checkpoint's write, in this process, with the
  threads a one-worker run would take (means over at least :data:`MIN_TIME_S` each: a shared
  machine's load moves single timings);
* for each worker count asked for, that many processes on this node joined in a process group
  of the config's backend (gloo on the CPU), each with the threads ``distgrow train`` would
  give it: a DDP micro-step without the all-reduce (``no_sync``) and one with it, so the node's
  sharing of its cores and the gradient all-reduce are both measured, and the rendezvous;
* a cold worker's start (a new interpreter importing ``distgrow.startup`` and
  ``torch._dynamo``: what a relaunch pays; ``launch.preload`` avoids it on one machine).

The record is cached beside the memory probe's (:func:`timing_path`), keyed by the probe's
identity (:func:`distgrow.probe_cache.probe_identity`) plus the threads per worker and the
cores: unlike the memory limit, times depend on them.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from distgrow.config import Config
from distgrow.data import DataBundle
from distgrow.predict.profile import TimingProfile, WorldRow
from distgrow.probe import probe_device
from distgrow.probe_cache import (
    cache_dir,
    cache_key,
    data_placement_of,
    device_name,
    probe_identity,
)
from distgrow.runtime import Runtime, cpu_cores

COLD_START = "import distgrow.startup, torch._dynamo"
"""What a relaunched worker imports before its first update (interpreter + distgrow + torch)."""


def worker_threads(cfg: Config, local_workers: int) -> int:
    """The intra-op threads ``distgrow train`` gives each of ``local_workers`` on this node."""
    return cfg.run.threads or max(1, cpu_cores() // max(1, local_workers))


def timing_identity(cfg: Config, data: DataBundle, device: torch.device) -> dict[str, Any]:
    """The memory probe's identity plus the threads of a one-worker run and the cores (which
    give several workers' threads): times depend on both, the memory limit on neither."""
    placement = data_placement_of(cfg, data, device)
    identity = probe_identity(cfg, data.input_shape, device_name(device), placement)
    threads = worker_threads(cfg, 1)
    return {**identity, "record": "timing", "threads": threads, "cores": cpu_cores()}


def timing_path(identity: dict[str, Any]) -> Path:
    """``<probe cache>/timing-<key>.json``."""
    return cache_dir() / f"timing-{cache_key(identity)}.json"


MIN_TIME_S = 0.5
"""Each piece is repeated for at least this long (and ``reps`` times): a run's time is a sum
over many updates, so the probe's mean must span the machine's changes of load, not a moment."""
MAX_REPS = 500
WORLD_REPS = 40
"""Calls each rank of a timed process group makes (the same on every rank: they are collective)."""


def _mean_time(
    fn: Callable[[], None],
    sync: Callable[[], None],
    reps: int,
    warmup: int,
    min_time: float | None = None,
) -> tuple[float, float]:
    """The mean wall-clock and CPU seconds (this process, all its threads) of one call of
    ``fn``, over at least ``reps`` calls and ``min_time`` seconds (0: exactly ``reps``, as
    the ranks of a process group must all make the same calls)."""
    min_time = MIN_TIME_S if min_time is None else min_time
    for _ in range(warmup):
        fn()
    sync()
    calls = 0
    started, cpu = time.perf_counter(), time.process_time()
    while calls < reps or (time.perf_counter() - started < min_time and calls < MAX_REPS):
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - started) / calls, (time.process_time() - cpu) / calls


class _Single:
    """One model on one device, timed piece by piece as the trainer runs them."""

    def __init__(self, cfg: Config, data: DataBundle, device: torch.device) -> None:
        from distgrow.backends.torch_ddp import autocast_model
        from distgrow.gpu import prepare_model
        from distgrow.losses import build_objective
        from distgrow.trainer import build_optimizer, build_run_model

        self.device, self.data = device, data
        self.base = prepare_model(build_run_model(cfg, data).to(device), device, cfg.run)
        self.model = autocast_model(self.base, cfg.backend.precision, device)
        self.objective = build_objective(cfg.loss, data.num_classes)
        self.optimizer = build_optimizer(cfg.optim, self.base.parameters())
        self.generator = torch.Generator().manual_seed(cfg.run.seed)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch(self, m: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        source = self.data.train if split == "train" else self.data.val
        idx = torch.randint(len(source), (m,), generator=self.generator)
        x, y = source.batch(idx, 0)
        return x.to(self.device), y.to(self.device)

    def micro_step(self, m: int) -> None:
        x, y = self.batch(m)
        (self.objective.loss_sum(self.model(x), y) / m).backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(self, m: int) -> None:
        x, y = self.batch(m, "val" if len(self.data.val) else "train")
        self.objective.loss_sum(self.model(x), y)

    def checkpoint(self, folder: str) -> None:
        path = os.path.join(folder, "ckpt.pt")
        state = {"model": self.base.state_dict(), "optimizer": self.optimizer.state_dict()}
        torch.save(state, path)


def measure_timing(
    cfg: Config,
    data: DataBundle,
    *,
    micro_batches: Sequence[int],
    world_sizes: Sequence[int],
    data_load_s: float,
    reps: int = 7,
    warmup: int = 2,
    echo: Callable[[str], None] = print,
) -> TimingProfile:
    """Measure the timing profile of ``cfg``'s model on this node (see the module docstring).

    Args:
        cfg: The config (model, optimizer, precision, backend, threads).
        data: Its data set (the micro-batches are real samples).
        micro_batches: The micro-batches to time alone (the plan's range).
        world_sizes: Worker counts above 1 to time as a process group on this node.
        data_load_s: How long loading ``data`` took (kept with the record).
        reps: Timed repetitions per piece, at least (their mean is kept).
        warmup: Repetitions dropped first.
        echo: Prints progress.
    """
    device = probe_device(cfg)
    threads = worker_threads(cfg, 1)
    torch.set_num_threads(threads)
    identity = timing_identity(cfg, data, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.run.seed)
        single = _Single(cfg, data, device)
        micro_rows, micro_cpu_rows = [], []
        for m in sorted(set(micro_batches)):
            s, cpu = _mean_time(partial(single.micro_step, m), single.sync, reps, warmup)
            single.optimizer.zero_grad(set_to_none=True)
            micro_rows.append((m, s))
            micro_cpu_rows.append((m, cpu))
            echo(f"timing: micro-step of {m}: {s * 1e3:.3f} ms ({cpu * 1e3:.3f} ms CPU)")

        def one_step() -> None:
            single.micro_step(micro_rows[0][0])
            single.step()

        both_s, both_cpu = _mean_time(one_step, single.sync, reps, warmup)
        step_s = max(0.0, both_s - micro_rows[0][1])
        step_cpu_s = max(0.0, both_cpu - micro_cpu_rows[0][1])
        eval_sizes = sorted({min(m, 500) for m in micro_batches} | {min(500, max(micro_batches))})
        eval_rows = [
            (m, _mean_time(partial(single.forward, m), single.sync, reps, warmup)[0])
            for m in eval_sizes
        ]
        with tempfile.TemporaryDirectory(prefix="distgrow-timing-") as folder:
            checkpoint_s = _mean_time(lambda: single.checkpoint(folder), single.sync, 3, 1)[0]
        grad_bytes = sum(
            p.numel() * p.element_size() for p in single.base.parameters() if p.requires_grad
        )
        world_micro = micro_rows[0][0]
        x, y = single.batch(world_micro)
        model = single.base.cpu()
    echo(f"timing: optimizer step {step_s * 1e3:.3f} ms, checkpoint {checkpoint_s * 1e3:.1f} ms")
    world_rows = []
    for w in sorted({w for w in world_sizes if w > 1}):
        row = _measure_world(cfg, model, x.cpu(), y.cpu(), data.num_classes, w, reps, warmup)
        world_rows.append(row)
        echo(
            f"timing: {w} workers ({row.threads} thread(s) each): micro-step "
            f"{row.compute_s * 1e3:.3f} ms, with all-reduce {row.sync_s * 1e3:.3f} ms, "
            f"rendezvous {row.init_s:.2f} s"
        )
    cold = cold_start_s()
    echo(f"timing: a cold worker's start (interpreter, distgrow, torch): {cold:.2f} s")
    return TimingProfile(
        device=identity["device"],
        threads=threads,
        cores=cpu_cores(),
        backend=cfg.backend.name,
        dist_backend="nccl" if device.type == "cuda" else "gloo",
        micro_rows=micro_rows,
        step_s=step_s,
        micro_cpu_rows=micro_cpu_rows,
        step_cpu_s=step_cpu_s,
        eval_rows=eval_rows,
        checkpoint_s=checkpoint_s,
        world_micro_batch=world_micro,
        world_rows=world_rows,
        grad_bytes=grad_bytes,
        cold_start_s=cold,
        data_load_s=data_load_s,
        gpus=torch.cuda.device_count() if device.type == "cuda" else 0,
        max_micro_batch=cfg.growth.max_micro_batch
        if isinstance(cfg.growth.max_micro_batch, int)
        else None,
        identity=identity,
        key=cache_key(identity),
        measured_at=time.time(),
        val_size=len(data.val),
    )


def cold_start_s(tries: int = 1) -> float:
    """The fastest of ``tries`` new interpreters importing :data:`COLD_START`."""
    best = math.inf
    for _ in range(tries):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", COLD_START], check=True, capture_output=True)
        best = min(best, time.perf_counter() - started)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _measure_world(
    cfg: Config,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    workers: int,
    reps: int,
    warmup: int,
) -> WorldRow:
    """``workers`` processes in a process group of ``cfg``'s backend: rank 0's means."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    threads = worker_threads(cfg, workers)
    with tempfile.TemporaryDirectory(prefix="distgrow-world-") as folder:
        out = os.path.join(folder, "rank0.json")
        procs = [
            ctx.Process(
                target=_world_rank,
                args=(cfg, model, x, y, num_classes, r, workers, port, threads, reps, warmup, out),
            )
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=600)
        codes = [p.exitcode for p in procs]
        if not os.path.exists(out):
            raise RuntimeError(
                f"the {workers}-worker timing did not finish (exit codes {codes}). Fix: run "
                "`distgrow estimate` again with --workers-to-time 1 to skip it."
            )
        with open(out, encoding="utf-8") as f:
            found = json.load(f)
    return WorldRow(workers=workers, threads=threads, **found)


def _world_rank(
    cfg: Config,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    rank: int,
    workers: int,
    port: int,
    threads: int,
    reps: int,
    warmup: int,
    out: str,
) -> None:
    """One rank of :func:`_measure_world` (a spawned process; ends with the backend's exit)."""
    from distgrow.backends import make_backend
    from distgrow.losses import build_objective
    from distgrow.trainer import build_optimizer

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    runtime = Runtime(rank, workers, rank, workers, "127.0.0.1", port, "none")
    started = time.perf_counter()
    backend = make_backend(cfg, runtime)
    init_s = time.perf_counter() - started
    model = model.to(backend.device)
    x, y = x.to(backend.device), y.to(backend.device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    wrapped = backend.setup(model, optimizer)
    objective = build_objective(cfg.loss, num_classes)

    def sync() -> None:
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)

    def micro(sync_grads: bool) -> Callable[[], None]:
        def run() -> None:
            with backend.micro_step(sync_grads):
                backend.backward(objective.loss_sum(wrapped(x), y) / x.shape[0])
            backend.zero_grad(optimizer)

        return run

    times: dict[str, float] = {}
    for name, sync_grads in (("compute", False), ("sync", True)):
        backend.barrier()
        times[f"{name}_s"], times[f"{name}_cpu_s"] = _mean_time(
            micro(sync_grads), sync, max(reps, WORLD_REPS), warmup, min_time=0.0
        )
    # Every rank's result is rank 0's: they ran the same steps in lockstep.
    if rank == 0:
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**times, "init_s": init_s}, f)
        os.replace(tmp, out)
    backend.barrier()
    backend.shutdown(0)
