"""The Fashion-MNIST config's two schedules in a hand-written loop and through ``distgrow compare``.

Issue #15 item 6: ``distgrow compare`` must show a wall-clock ratio (grow_batch ÷ decay_lr) no
worse than the same two schedules run in a plain hand-written loop on the same machine, and the
throughput-against-batch curve explains why that ratio sits well above the updates ratio on a
2-core CPU.

1. **Hand-written loop.** For ``decay_lr`` and ``grow_batch`` of ``configs/fashion_mnist_mlp.yaml``
   the loop takes, update by update, the batch size and LR that ``distgrow plan`` prints (from
   the same :class:`~distgrow.planner.GrowthPolicy`), the same sample order (one permutation per
   epoch, :func:`~distgrow.data.epoch_permutation`), the same initial weights and the same
   normalised data, and runs ``zero_grad``/forward/backward/``step`` on it, with a validation
   pass per epoch as any training script has. Its training time and its whole time are measured.
2. **distgrow compare.** ``python -m distgrow compare`` on the same config and overrides, both
   variants, in a fresh directory; the ratios come from each run's ``summary.json``: ``train_s``
   (time inside updates) and ``wall_s`` (the whole run: updates, validation, checkpoints, metrics;
   process start-up excluded). Each variant runs as its own ``compare`` so that its CPU time
   (the process tree's, start-up included) can be read; the hand-written loop's CPU time is
   that of its process. With ``--threads 1`` CPU time is the work done, which load from other
   jobs distorts far less than the wall clock.
3. **Throughput against batch.** The plain loop's samples/s at batches 128 … 3200.

``--epochs-per-phase k`` runs each of the three phases of the schedule (``schedule.milestones``
at k and 2k, ``run.epochs`` 3k) for k epochs instead of the config's 5: the same shape (a third
of the epochs at each batch for grow_batch, at each LR for decay_lr), so the same expected ratio,
in a fifth of the time with the default k = 1. k = 5 is the config itself.

``--reps R`` (default 3) runs parts 1 and 2 side by side R times: each variant on both sides in
turn, each side first in every other repetition, so that a change of load on a shared machine
falls on both; every figure printed is the median over the repetitions.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/schedules_wallclock.py              # k = 1, minutes
    PYTHONPATH=. .venv/bin/python benchmarks/schedules_wallclock.py --epochs-per-phase 5
    PYTHONPATH=. .venv/bin/python benchmarks/schedules_wallclock.py --parts curve --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distgrow.config import Config, load_config
from distgrow.data import epoch_permutation
from distgrow.models import build_model
from distgrow.planner import GrowthPolicy
from distgrow.runtime import cpu_cores
from distgrow.startup import load_data

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist_mlp.yaml"
VARIANTS = ("decay_lr", "grow_batch")
CURVE_BATCHES = (128, 256, 640, 1280, 3200)
PARTS = ("loop", "compare", "curve")


@dataclass
class Timed:
    """One schedule's run: seconds inside updates, seconds in all, updates, final accuracy, and
    the CPU seconds of the whole run (with 1 thread, the work done, which other jobs on a shared
    machine distort far less than the wall clock)."""

    train_s: float
    wall_s: float
    updates: int
    val_acc: float
    cpu_s: float
    train_cpu_s: float


def _overrides(k: int) -> list[str]:
    return [f"run.epochs={3 * k}", f"schedule.milestones=[{k},{2 * k}]"]


def hand_written(
    cfg: Config, x_all: torch.Tensor, y_all: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor]
) -> Timed:
    """The schedule of ``cfg`` in a minimal loop; see the module docstring."""
    n = len(y_all)
    policy = GrowthPolicy(cfg, n, min_workers=1)
    torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
    model = build_model("mlp", input_shape=(1, 28, 28), num_outputs=10, hidden=[512, 512])
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    train_s, train_cpu_s, updates, acc = 0.0, 0.0, 0, math.nan
    started, cpu_started = time.perf_counter(), time.process_time()
    for epoch in range(cfg.run.epochs):
        order = epoch_permutation(n, cfg.run.seed, epoch)
        position = 0
        epoch_started, epoch_cpu_started = time.perf_counter(), time.process_time()
        while position < n:
            setting = policy.setting(epoch, position)
            for group in optimizer.param_groups:
                group["lr"], group["momentum"] = setting.lr, setting.momentum
            rows = order[position : position + setting.global_batch]
            loss = nn.functional.cross_entropy(model(x_all[rows]), y_all[rows])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            position += len(rows)
            updates += 1
        train_s += time.perf_counter() - epoch_started
        train_cpu_s += time.process_time() - epoch_cpu_started
        model.eval()
        with torch.no_grad():
            acc = float((model(val[0]).argmax(1) == val[1]).double().mean())
        model.train()
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return Timed(train_s, wall_s, updates, acc, cpu_s, train_cpu_s)


def through_compare(k: int, out: Path, threads: int | None, variant: str) -> Timed:
    """``distgrow compare`` of one variant (alone, to take its CPU time); its summary."""
    extra = [] if threads is None else [f"run.threads={threads}"]
    command = [
        sys.executable, "-m", "distgrow", "compare", str(CONFIG), *_overrides(k), *extra,
        "--variants", variant, "--out", str(out),
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    summary = json.loads((out / "runs" / variant / "summary.json").read_text())
    return Timed(
        train_s=float(summary["train_s"]),
        wall_s=float(summary["wall_s"]),
        updates=int(summary["total_updates"]),
        val_acc=float(summary["val_acc"]),
        cpu_s=cpu_s,  # the whole process: imports, data loading and start-up too
        train_cpu_s=float(summary["train_cpu_s"]),
    )


def median_timed(runs: list[Timed]) -> Timed:
    """Each field's median over repetitions (updates and accuracy are the same in all)."""
    return Timed(
        train_s=statistics.median(t.train_s for t in runs),
        wall_s=statistics.median(t.wall_s for t in runs),
        updates=runs[0].updates,
        val_acc=runs[0].val_acc,
        cpu_s=statistics.median(t.cpu_s for t in runs),
        train_cpu_s=statistics.median(t.train_cpu_s for t in runs),
    )


def throughput_curve(
    x_all: torch.Tensor, y_all: torch.Tensor, samples: int, reps: int
) -> dict[int, float]:
    """The plain loop's median samples/s per batch size (``reps`` blocks of ``samples``)."""
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 28, 28), num_outputs=10, hidden=[512, 512])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = epoch_permutation(len(y_all), 0, 0)
    rates: dict[int, list[float]] = {b: [] for b in CURVE_BATCHES}
    for rep in range(reps + 1):  # interleaved over batch sizes; the first round warms up
        for batch in CURVE_BATCHES:
            steps = max(2, samples // batch)
            started = time.perf_counter()
            for step in range(steps):
                rows = order[(step * batch) % (len(order) - batch) :][:batch]
                loss = nn.functional.cross_entropy(model(x_all[rows]), y_all[rows])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if rep:
                rates[batch].append(steps * batch / (time.perf_counter() - started))
    return {b: statistics.median(r) for b, r in rates.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the three parts and print them, ready to paste."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs-per-phase", type=int, default=1, help="k (the config: 5)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: distgrow's choice)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="what to run: the hand-written loop, distgrow compare, the throughput curve",
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of the loop and compare (medians)"
    )
    parser.add_argument("--curve-samples", type=int, default=32_000, help="samples per block")
    parser.add_argument("--curve-reps", type=int, default=3, help="blocks per batch size")
    args = parser.parse_args(argv)
    if args.reps < 1:
        print(f"--reps {args.reps} must be >= 1. Fix: e.g. 3.")
        return 2
    if args.epochs_per_phase < 1:
        print(f"--epochs-per-phase {args.epochs_per_phase} must be >= 1. Fix: e.g. 1.")
        return 2
    if not CONFIG.is_file():
        print(f"{CONFIG} is missing. Fix: run from a distgrow checkout.")
        return 2
    threads = args.threads or cpu_cores()  # what a single `distgrow train` process takes
    torch.set_num_threads(threads)
    k = args.epochs_per_phase
    cfgs = {v: load_config(CONFIG, [*_overrides(k), f"growth.mode={v}"]) for v in VARIANTS}
    data = load_data(cfgs["decay_lr"])
    x_all, y_all = data.train.batch(torch.arange(len(data.train)))
    val = data.val.batch(torch.arange(len(data.val)))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"Fashion-MNIST MLP, {CONFIG.name} with {' '.join(_overrides(k))} ({k} epoch(s) per "
        f"phase), {threads} thread(s), 1 process; load average at the start {load} on "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    sides = [p for p in ("loop", "compare") if p in args.parts]
    runs: dict[str, dict[str, list[Timed]]] = {p: {v: [] for v in VARIANTS} for p in sides}
    with tempfile.TemporaryDirectory() as out:
        for rep in range(args.reps):
            # Side by side: each variant on both sides in turn, each side first in every other
            # repetition, so a change of load falls on both.
            for variant in VARIANTS:
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    if side == "loop":
                        one = hand_written(cfgs[variant], x_all, y_all, val)
                    else:
                        where = Path(out) / f"{variant}-{rep}"
                        one = through_compare(k, where, args.threads, variant)
                    runs[side][variant].append(one)
    labels = {"loop": "hand-written loop", "compare": "distgrow compare"}
    rows = [(labels[p], {v: median_timed(runs[p][v]) for v in VARIANTS}) for p in sides]
    if args.reps > 1:
        print(f"  medians of {args.reps} repetitions")
    for label, timed in rows:
        decay, grow = timed["decay_lr"], timed["grow_batch"]
        print(f"  {label}:")
        for variant in VARIANTS:
            t = timed[variant]
            print(
                f"    {variant:10s} {t.updates:6,d} updates  train {t.train_s:7.1f} s "
                f"(CPU {t.train_cpu_s:5.1f} s)  "
                f"wall {t.wall_s:7.1f} s  CPU {t.cpu_s:7.1f} s  val_acc {t.val_acc:.4f}"
            )
        print(
            f"    grow/decay: updates {grow.updates / decay.updates:.3f}, "
            f"train time {grow.train_s / decay.train_s:.3f}, "
            f"train CPU time {grow.train_cpu_s / decay.train_cpu_s:.3f}, "
            f"wall clock {grow.wall_s / decay.wall_s:.3f}, CPU time {grow.cpu_s / decay.cpu_s:.3f}",
            flush=True,
        )
    if "curve" in args.parts:
        curve = throughput_curve(x_all, y_all, args.curve_samples, args.curve_reps)
        base = curve[CURVE_BATCHES[0]]
        print(f"  plain loop throughput against batch ({threads} thread(s)):")
        for batch, rate in curve.items():
            print(f"    batch {batch:5d}: {rate:9,.0f} samples/s  ({rate / base:.2f}× batch 128)")
    print(f"  load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
