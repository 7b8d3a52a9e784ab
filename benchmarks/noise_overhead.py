"""What measuring the noise scale costs per update, on 2 gloo ranks on this machine.

Three ways to run the same updates (an MLP, ``--accum`` micro-steps under ``no_sync``, the
trainer's loss convention, SGD), interleaved in blocks so that load on the machine hits all
alike:

=========  =================================================================================
plain      DDP without a communication hook.
torch-hook torch's own Python ``allreduce_hook``: what any Python hook costs, norms or not.
hook       the noise hook (:mod:`distgrow.backends.noise_hook`): two squared norms per bucket.
hook+ar    the hook and the per-update all-reduce of the local norms (3 float64), read on the
           host, and one :class:`distgrow.noise.NoiseScaleEstimator` update: what the trainer
           adds with ``noise.every=1`` (:mod:`distgrow.noise_meter`).
hook+ar/N  the same on every N-th update only (``--every N``, 10 by default; ``noise.every=N``):
           the other updates run the hook inactive (averaging only, no norms, no all-reduce).
ddp        what training under DDP does (no hook): every micro-step under ``no_sync``, then
           :func:`~distgrow.backends.noise_hook.all_reduce_measured` (one flat all-reduce with
           the norms before and after), the 3-number all-reduce and the estimator update, on
           every update (``noise.every=1``).
ddp/N      the same on every N-th update; the others are plain DDP (``noise.every=N``).
=========  =================================================================================

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/noise_overhead.py --steps 60 --blocks 5

It prints each mode's median and mean update time (wall clock, and rank 0's process CPU time,
which a loaded machine distorts less) and the overheads in per cent of ``plain``. Read the
means for the ``/N`` modes: their median is an unmeasured update's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from distgrow.backends.noise_hook import (
    NoiseHookState,
    all_reduce_local_norm,
    all_reduce_measured,
    mean_local_norm,
    register,
)
from distgrow.noise import NoiseScaleEstimator

MODES = ("plain", "torch-hook", "hook", "hook+ar", "hook+ar/N", "ddp", "ddp/N")
WORLD = 2


def _worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        gen = torch.Generator().manual_seed(rank)
        micro = args.batch // (WORLD * args.accum)
        global_samples = micro * WORLD * args.accum
        inputs = torch.randn(args.accum, micro, args.features, generator=gen)
        labels = torch.randint(10, (args.accum, micro), generator=gen)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.blocks):
            for mode in MODES:
                torch.manual_seed(0)
                layers: list[nn.Module] = []
                width = args.features
                for hidden in args.hidden:
                    layers += [nn.Linear(width, hidden), nn.ReLU()]
                    width = hidden
                ddp = DistributedDataParallel(nn.Sequential(*layers, nn.Linear(width, 10)))
                state, estimator = NoiseHookState(), NoiseScaleEstimator()
                if mode == "torch-hook":
                    ddp.register_comm_hook(None, allreduce_hook)
                elif mode.startswith("hook"):
                    register(ddp, state)
                optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
                for step in range(args.steps + 2):
                    dist.barrier()
                    started, cpu_started = time.perf_counter(), time.process_time()
                    measured = not mode.endswith("/N") or step % args.every == 0
                    itself = mode.startswith("ddp") and measured  # averages its gradients
                    state.reset()
                    state.active = measured
                    for k in range(args.accum):
                        sync = k == args.accum - 1 and not itself
                        with contextlib.nullcontext() if sync else ddp.no_sync():
                            loss = nn.functional.cross_entropy(
                                ddp(inputs[k]), labels[k], reduction="sum"
                            )
                            (loss * (WORLD / global_samples)).backward()
                    if mode.startswith("hook+ar") and measured:
                        small = all_reduce_local_norm(
                            state, micro * args.accum, global_samples, torch.device("cpu")
                        )
                        assert small is not None
                        estimator.update(
                            small[0], small[1], float(state.global_sq_norm()), global_samples
                        )
                    if itself:
                        local, global_sq = all_reduce_measured(list(ddp.parameters()), None)
                        small = mean_local_norm(
                            local, micro * args.accum, global_samples, None, torch.device("cpu")
                        )
                        assert small is not None
                        estimator.update(small[0], small[1], float(global_sq), global_samples)
                    optimizer.step()
                    optimizer.zero_grad()
                    if step >= 2:  # the first updates build DDP's buckets
                        times[mode].append(time.perf_counter() - started)
                        cpu[mode].append(time.process_time() - cpu_started)
        if rank == 0:
            torch.save((times, cpu), Path(out) / "times.pt")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the medians and overheads."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=784)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--batch", type=int, default=128, help="global batch per update")
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60, help="timed updates per block")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument(
        "--every", type=int, default=10, help="the /N modes measure every N-th update"
    )
    args = parser.parse_args(argv)
    if args.batch % (WORLD * args.accum):
        print(f"--batch ({args.batch}) must be a multiple of 2 × --accum ({WORLD * args.accum}).")
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker, args=(port, args, out), nprocs=WORLD, join=True, start_method="spawn"
        )
        times, cpu = torch.load(Path(out) / "times.pt")
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu.items()}
    means = {mode: statistics.fmean(values) for mode, values in times.items()}
    cpu_means = {mode: statistics.fmean(values) for mode, values in cpu.items()}
    params = sum(
        a * b + b for a, b in zip([args.features, *args.hidden], [*args.hidden, 10], strict=True)
    )
    print(
        f"2 gloo ranks, MLP {args.features}-{'-'.join(map(str, args.hidden))}-10 "
        f"({params} parameters), batch {args.batch} = 2 × {args.batch // (2 * args.accum)} × "
        f"{args.accum}, {len(times['plain'])} updates per mode"
    )
    for mode in MODES:
        overhead = 100 * (medians[mode] / medians["plain"] - 1)
        cpu_overhead = 100 * (cpu_medians[mode] / cpu_medians["plain"] - 1)
        mean_over = 100 * (means[mode] / means["plain"] - 1)
        cpu_mean_over = 100 * (cpu_means[mode] / cpu_means["plain"] - 1)
        print(
            f"  {mode.replace('/N', f'/{args.every}'):10s} "
            f"median wall {1000 * medians[mode]:8.2f} ms/update {overhead:+7.2f} %"
            f"   rank-0 CPU {1000 * cpu_medians[mode]:8.2f} ms {cpu_overhead:+7.2f} %"
            f"   | mean wall {1000 * means[mode]:8.2f} ms {mean_over:+7.2f} %"
            f"   rank-0 CPU {1000 * cpu_means[mode]:8.2f} ms {cpu_mean_over:+7.2f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
