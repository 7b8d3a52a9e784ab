"""distgrow's trainer against a minimal hand-written loop: the throughput ratio per batch size.

Both train the same model (MLP 784-512-512-10, SGD lr 0.1 momentum 0.9) on the same data
(Fashion-MNIST from ``/usr/share/datasets/fashion-mnist``, or random tensors of its shape when
it is missing), at the same global batch, thread count and sample order (the run's epoch
permutation), in the same process. The plain loop gathers its rank's rows of each global batch
from the normalised float32 training set, runs forward, ``cross_entropy(reduction="sum")``
times the same scale, backward and ``SGD.step`` (under DDP on 2 ranks, exactly as a
hand-written DDP loop would). distgrow's side is :meth:`distgrow.trainer.Trainer.train_step`,
the span the trainer itself times as an update (``phases[].train_s`` in ``summary.json``):
hyperparameters, sharding, data fetch, the micro-steps, the agreed loss all-reduce and the
backend's step.

The sides take turns in blocks of ``--steps`` updates, ``--reps`` times per batch size, each
side going first in turn (so whatever the order does, caches or the scheduler, falls on all
alike, as does load on a shared machine); the ratio printed is the median of the per-block
ratios
(distgrow samples/s ÷ plain samples/s; 1.00 = no overhead). The same ratio over rank 0's process
CPU time is printed too: with one thread per rank it is the compute each side used, which load
from other processes on a shared machine distorts far less than the wall clock.

``--backend fsdp`` runs both sides sharded (FSDP2): distgrow's ``backend.name=fsdp`` against a
plain loop over the same MLP under ``fully_shard`` (the root as one unit, the rule distgrow
applies to an MLP), SGD built over the sharded parameters, the same loss scale (FSDP's
reduce-scatter averages over ranks as DDP's all-reduce does).

``--agreement`` (fsdp only) picks how distgrow's side agrees on the loss and votes per update:
``carried`` (distgrow's way: the numbers ride FSDP's reduce-scatter), ``all-reduce`` (their own
gloo all-reduce, as before the carrier) or ``none`` (no collective at all: a floor for the
measurement, not a valid run: a NaN on one rank would not stop the others).

``--control`` adds a third side, a second copy of the hand-written loop, timed in the same
rotation (an A/A comparison): its ratio to the plain loop should be 1, and how far it strays is
what this machine resolves in the same run (on 2 ranks sharing 2 cores, a few per cent).

``--pieces`` times, in 1 process, each piece of work ``train_step`` does that the plain loop
does not (sharding, the loss accumulator, ``batch()`` beyond its gather, the agreement, and the
2-rank carrier's term, backward and read-back), each alone with ``timeit``, against the median
update: the overhead as a sum of measured parts, which a shared machine disturbs far less than
the end-to-end ratio.

``--profile`` runs ``cProfile`` over ``--steps`` of distgrow's updates per batch size instead
(rank 0) and prints where the update's time went.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py                 # 1 process
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --world 2       # 2 gloo ranks
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --world 2 --control   # A/A control
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --world 2 --backend fsdp   # FSDP2 row
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --pieces
    PYTHONPATH=. .venv/bin/python benchmarks/overhead.py --profile --batches 128 3200
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from distgrow.backends import Backend, make_backend
from distgrow.backends.fsdp_backend import FSDPBackend
from distgrow.config import load_config
from distgrow.data import epoch_permutation
from distgrow.data.order import shard_split
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.trainer import Trainer

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _config(batch: int, workers: int, out: str, backend: str = "torch") -> list[str]:
    data = (
        ["data.name=fashion_mnist"]
        if FASHION.is_dir()
        else [
            "data.name=synthetic_classification",
            "data.synthetic_samples=70000",
            "data.synthetic_features=784",
        ]
    )
    return [
        *data,
        "model.name=mlp",
        "model.hidden=[512,512]",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "schedule.type=constant",
        f"growth.base_batch={batch}",
        f"growth.micro_batch={batch // workers}",
        f"growth.max_micro_batch={batch // workers}",
        "growth.max_dataset_fraction=null",
        "run.epochs=1",
        "run.device=cpu",
        f"backend.name={backend}",
        f"run.output_dir={out}",
        "logging.progress='off'",
    ]


def _plain_model(world: int, backend: str = "torch") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model: nn.Module = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip
    if backend == "fsdp":  # the process group is the backend's (a group of one on 1 rank)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    elif world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


class _PlainSide:
    """The hand-written loop: this rank's rows of each global batch, forward, backward, step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        order: torch.Tensor,
        batch: int,
        rank: int,
        world: int,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.x_all, self.y_all, self.order = x_all, y_all, order
        self.batch, self.micro, self.scale = batch, batch // world, world / batch
        self.offset = rank * self.micro
        self.n_batches = len(order) // batch

    def block(self, first_step: int, steps: int) -> None:
        for step in range(first_step, first_step + steps):
            pos = (step % self.n_batches) * self.batch + self.offset
            rows = self.order[pos : pos + self.micro]  # this rank's share of the global batch
            x, y = self.x_all[rows], self.y_all[rows]
            loss = nn.functional.cross_entropy(self.model(x), y, reduction="sum") * self.scale
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def trainer_block(
    trainer: Trainer, setting: Any, order: torch.Tensor, batch: int
) -> Callable[[int, int], None]:
    """distgrow's side: :meth:`Trainer.train_step` on the same global batches."""
    n_batches = len(order) // batch

    def block(first_step: int, steps: int) -> None:
        for step in range(first_step, first_step + steps):
            pos = (step % n_batches) * batch
            trainer.train_step(order[pos : pos + batch], setting)

    return block


def _agreement_as(backend: Backend, how: str) -> None:
    """The FSDP update's agreement as ``--agreement`` asks (before the trainer's ``setup``)."""
    if how == "carried":
        return
    if not isinstance(backend, FSDPBackend):
        raise SystemExit(f"--agreement {how} is for --backend fsdp. Fix: drop it.")
    backend.carries = False  # the agreement's own all-reduce, started before the backward
    if how == "none":  # measurement only: no collective at all (each rank's own loss)
        backend.all_reduce_async = lambda t, op="sum": lambda: t  # type: ignore[method-assign,assignment]


def _timed(
    backend: Backend, block: Callable[[int, int], None], first_step: int, steps: int
) -> tuple[float, float]:
    """Wall and process CPU seconds of ``steps`` updates, the ranks started together."""
    backend.barrier()
    started, cpu_started = time.perf_counter(), time.process_time()
    block(first_step, steps)
    return time.perf_counter() - started, time.process_time() - cpu_started


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    runtime = Runtime(rank, world, rank, world, "127.0.0.1", port, "none")
    # Keyed by (batch, side): per-block ratios plain time ÷ side time, and samples/s.
    ratios: dict[tuple[int, str], list[float]] = {}
    cpu_ratios: dict[tuple[int, str], list[float]] = {}
    rates: dict[tuple[int, str], list[float]] = {}
    profiles: dict[int, str] = {}
    backend: Backend | None = None
    for batch in args.batches:
        cfg = load_config(None, _config(batch, world, f"{out}/run{batch}", args.backend))
        if backend is None:
            backend = make_backend(cfg, runtime)
            _agreement_as(backend, args.agreement)
        trainer = Trainer(cfg, backend, load_data(cfg))
        setting = trainer.next_setting()
        order = epoch_permutation(trainer.num_train, cfg.run.seed, 0)
        if args.profile:
            profiles[batch] = _profile(trainer, setting, order, batch, args.steps)
            continue
        if args.pieces:
            profiles[batch] = _pieces(trainer, setting, order, batch)
            continue
        # The plain loop's data: the whole normalised training set as one float32 tensor, ready.
        x_all, y_all = trainer.data.train.batch(torch.arange(trainer.num_train), 0)
        model, optimizer = _plain_model(world, args.backend)
        blocks = {
            "plain": _PlainSide(model, optimizer, x_all, y_all, order, batch, rank, world).block,
            "distgrow": trainer_block(trainer, setting, order, batch),
        }
        if args.control:  # a second copy of the plain loop, timed in the same rotation (A/A)
            copy = _PlainSide(
                *_plain_model(world, args.backend), x_all, y_all, order, batch, rank, world
            )
            blocks["control"] = copy.block
        names = list(blocks)
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        step = 0
        for rep in range(args.reps + 1):  # the first rep warms every side up and is dropped
            # The sides take turns at going first, so whatever the order does (caches, the
            # scheduler, a neighbour's job) falls on all alike.
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                seconds, cpu_seconds = _timed(backend, blocks[name], step, args.steps)
                step += args.steps
                if rep:
                    wall[name].append(seconds)
                    cpu[name].append(cpu_seconds)
        for name in names[1:]:
            ratios[(batch, name)] = [p / o for o, p in zip(wall[name], wall["plain"], strict=True)]
            cpu_ratios[(batch, name)] = [
                p / o for o, p in zip(cpu[name], cpu["plain"], strict=True)
            ]
            rates[(batch, name)] = [args.steps * batch / t for t in wall[name]]
        rates[(batch, "plain")] = [args.steps * batch / t for t in wall["plain"]]
    if rank == 0:
        torch.save((ratios, rates, cpu_ratios, profiles), Path(out) / "result.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


# Where the profile puts the update's time: (label, file, function, caller), the cumulative
# time of that function called from that caller (None: from anywhere).
# The micro-steps run in engine/step.py's run_update, each micro-batch's loss in _loss_of.
_PARTS = (
    ("forward (the model)", "torch/nn/modules/module.py", "_wrapped_call_impl", "_loss_of"),
    ("loss function", "distgrow/losses.py", None, "_loss_of"),
    ("backward (+ the gradient all-reduce)", "distgrow/backends/", "backward", "run_update"),
    ("optimizer step + zero_grad", "distgrow/backends/", "step", "train_step"),
    ("data: gather (+ normalise)", "distgrow/data/containers.py", "batch", "_loss_of"),
    ("agreement: start the all-reduce", "distgrow/agreement.py", "start", None),
    ("agreement: collect it, read back", "distgrow/agreement.py", "mean_loss", "train_step"),
    ("reseed per micro-batch", "distgrow/", "_reseed", None),
    ("hyperparameters into the optimizer", "distgrow/", "_apply_hyperparameters", None),
    ("sharding the global batch", "distgrow/data/order.py", "shard_global_batch", None),
)


def _paired(fn: Callable[[], Any], base: Callable[[], Any], number: int = 500) -> float:
    """Seconds ``fn`` takes beyond ``base``: the median of 21 differences, each pair timed
    back to back (so a change of load falls on both)."""
    fn(), base()
    return statistics.median(
        timeit.timeit(fn, number=number) / number - timeit.timeit(base, number=number) / number
        for _ in range(21)
    )


def _pieces(trainer: Trainer, setting: Any, order: torch.Tensor, batch: int) -> str:
    """Each piece of work ``train_step`` does that a hand-written loop does not, timed alone
    (``timeit``), against the median update; see ``--pieces``."""
    indices = order[:batch]
    shard = indices[: batch // trainer.world]
    data = trainer.data.train
    transformed = getattr(data, "transformed", lambda: None)()
    labels = getattr(data, "y", None)
    if transformed is None or labels is None:
        return f"  batch {batch}: --pieces needs an in-memory data set kept transformed."
    total = torch.zeros((), dtype=torch.float64)
    loss = torch.tensor(0.5)
    x, y = data.batch(shard, 0)
    leaf = torch.zeros((), requires_grad=True)  # stands for the model: the loss's graph
    band = nn.Parameter(torch.zeros(3))
    flags = torch.zeros(4, 2)

    def carried() -> None:  # TorchBackend.carry, the backward's extra term, _carried
        values = torch.cat((total.reshape(1).to(flags.dtype), flags[0]))
        band.grad = None
        (leaf * 1.0 + torch.dot(band, values)).backward()
        grad, band.grad = band.grad, None
        if grad is not None:
            (grad.to(torch.float64) * 2).tolist()

    def agreement() -> None:
        trainer.agreement.start(total)
        trainer.agreement.mean_loss()

    def micro_step() -> None:
        trainer.backend.begin_update(1, 1)
        with trainer.backend.micro_step(sync=True):
            pass

    def nothing() -> None:
        pass

    def shard_batch() -> None:
        shard_split(indices, setting, rank=trainer.rank, align=trainer.align)

    def hyperparameters() -> None:
        trainer._apply_hyperparameters(setting)

    def accumulator() -> None:
        torch.zeros((), dtype=torch.float64).add_(loss)

    def fetch() -> None:
        data.batch(shard, 0)

    def gather() -> None:
        transformed[shard], labels[shard]

    def to_device() -> None:
        x.to(trainer.device), y.to(trainer.device)

    def graph() -> None:
        (leaf * 1.0).backward()

    pieces: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("hyperparameters into the optimizer", hyperparameters, nothing),
        ("sharding the global batch", shard_batch, nothing),
        ("the loss accumulator (zeros, +=)", accumulator, nothing),
        ("begin_update, micro_step", micro_step, nothing),
        ("data: batch() beyond the plain gather", fetch, gather),
        ("inputs .to(device), 2 tensors", to_device, nothing),
        ("checkpoint clock", trainer._checkpoint_clock_ran_out, nothing),
        ("agreement, 1 process (start + mean_loss)", agreement, nothing),
        ("agreement, 2 ranks (the carrier, beyond the backward)", carried, graph),
    ]
    timings = {label: _paired(fn, base) * 1e6 for label, fn, base in pieces}
    update = (
        statistics.median(
            timeit.repeat(lambda: trainer.train_step(indices, setting), number=10, repeat=7)
        )
        / 10
        * 1e6
    )
    lines = [f"  batch {batch}: median update {update:,.0f} µs (train_step, 1 process)"]
    for label, micros in timings.items():
        lines.append(f"    {label:54s} {micros:7.1f} µs  {100 * micros / update:5.2f} %")
    one = sum(v for k, v in timings.items() if "2 ranks" not in k)
    lines.append(f"    {'sum, 1 process':54s} {one:7.1f} µs  {100 * one / update:5.2f} %")
    two = sum(timings.values())
    lines.append(f"    {'sum, 2 ranks (+ the carrier)':54s} {two:7.1f} µs")
    return "\n".join(lines)


def _profile(trainer: Trainer, setting: Any, order: torch.Tensor, batch: int, steps: int) -> str:
    """cProfile over ``steps`` updates after a warm-up; a table of where the time went."""
    n_batches = len(order) // batch
    for step in range(5):
        trainer.train_step(order[step * batch : (step + 1) * batch], setting)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    for step in range(5, 5 + steps):
        pos = (step % n_batches) * batch
        trainer.train_step(order[pos : pos + batch], setting)
    profiler.disable()
    wall = time.perf_counter() - started
    stats: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[3] for k, v in stats.items() if k[2] == "train_step")
    lines = [f"  batch {batch}: {1000 * wall / steps:.2f} ms per update (under cProfile)"]
    accounted = 0.0
    for label, where, name, caller in _PARTS:
        seconds = 0.0
        for (path, _line, function), value in stats.items():
            if where not in path or (name is not None and function != name):
                continue
            callers = value[4]
            if caller is None:
                seconds += value[3]
            else:  # only the time spent in calls from `caller`
                seconds += sum(c[3] for k, c in callers.items() if k[2] == caller)
        accounted += seconds
        lines.append(f"    {label:42s} {100 * seconds / total:5.1f} %")
    rest = 100 * (total - accounted) / total
    lines.append(f"    {'train_step own Python and the rest':42s} {rest:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=1, choices=(1, 2), help="gloo ranks")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 640, 3200])
    parser.add_argument("--steps", type=int, default=10, help="updates per timed block")
    parser.add_argument("--reps", type=int, default=30, help="timed blocks per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--backend",
        choices=("torch", "fsdp"),
        default="torch",
        help="both sides under DDP (torch) or FSDP2 (fsdp: fully_shard)",
    )
    parser.add_argument(
        "--agreement",
        choices=("carried", "all-reduce", "none"),
        default="carried",
        help="fsdp: the per-update agreement carried by the reduce-scatter (what distgrow "
        "does), its own all-reduce (before the carrier), or none (a floor, not a valid run)",
    )
    parser.add_argument(
        "--pieces",
        action="store_true",
        help="time each piece of distgrow's own per-update work alone (1 process)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="also time a second copy of the plain loop in the same rotation (A/A): the resolution",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile distgrow's update instead (rank 0)"
    )
    args = parser.parse_args(argv)
    if args.pieces and args.world != 1:
        print("--pieces times the pieces in 1 process. Fix: drop --world.")
        return 2
    bad = [b for b in args.batches if b % args.world]
    if bad:
        print(f"--batches {bad} are not multiples of --world {args.world}. Fix: pick multiples.")
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        if args.world == 1:
            _worker(0, 1, port, args, out)
        else:
            mp.start_processes(
                _worker,
                args=(args.world, port, args, out),
                nprocs=args.world,
                join=True,
                start_method="spawn",
            )
        ratios, rates, cpu_ratios, profiles = torch.load(Path(out) / "result.pt")
    data = "Fashion-MNIST" if FASHION.is_dir() else "synthetic data of Fashion-MNIST's shape"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    if args.pieces or args.profile:
        print(
            f"distgrow's own work per update, each piece timed alone (timeit), "
            f"{args.backend} backend, {args.threads} thread(s), {data}; load average {load}"
            if args.pieces
            else f"cProfile of Trainer.train_step, {args.backend} backend, {args.world} "
            f"process(es), {args.threads} thread(s) each, {data}, {args.steps} updates; "
            f"load average {load}"
        )
        for text in profiles.values():
            print(text)
        return 0
    print(
        f"{args.backend} backend (agreement {args.agreement}), {args.world} process(es), "
        f"{args.threads} thread(s) each, {data}, "
        f"MLP 784-512-512-10, {args.reps} blocks × {args.steps} updates per side; "
        f"load average at the end {load} on {os.cpu_count()} CPUs"
    )
    for (batch, name), values in ratios.items():
        with contextlib.suppress(statistics.StatisticsError):
            print(
                f"  batch {batch:5d}: plain {statistics.median(rates[(batch, 'plain')]):9.0f} "
                f"samples/s, {name} {statistics.median(rates[(batch, name)]):9.0f} samples/s, "
                f"ratio {statistics.median(values):.3f} "
                f"(blocks {min(values):.3f}-{max(values):.3f}); "
                f"CPU-time ratio {statistics.median(cpu_ratios[(batch, name)]):.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
