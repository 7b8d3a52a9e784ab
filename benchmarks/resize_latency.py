"""How long a job takes to grow: from the workers' resize exit to the wider job's first step.

Runs ``distgrow launch`` for real on this machine, a few times per mode, with a small config
whose plan grows 1 -> 2 -> 4 workers (synthetic data, a small MLP: the training itself takes
a fraction of a second, so the run is mostly growth). For each growth it reads the run's
``metrics.jsonl`` (every record carries ``time``, the wall clock) and splits the latency:

=====================  ======================================================================
component              from -> to
=====================  ======================================================================
launcher start         rank 0 asked for workers (``need_workers`` event: the resize exit, or
                       the elastic request) -> the new rank 0 process was born. Includes the
                       old job's exit, the controller's relaunch and the launcher's own start
                       (relaunch), or the new torchrun agent's start, the rendezvous and the
                       restart of the workers (elastic).
interpreter + imports  process birth -> ``distgrow.startup.run`` entered (Python, torch; for
                       a worker forked by the spawn server: the config load only).
data load              -> data set loaded.
process-group init     -> ``torch.distributed`` process group joined (gloo rendezvous).
model + optimizer      -> model built and wrapped (DDP), optimizer made: torch 2.13 imports its
                       compiler (``torch._dynamo``) at the first optimizer, most of this.
checkpoint load        -> newest checkpoint read by rank 0, broadcast, loaded (``resume``).
first step             -> the first update of the wider job completed (``step`` record).
=====================  ======================================================================

Modes, side by side: ``relaunch-preload`` (the default on one machine, ``launch.preload``:
the controller's spawn server, which imported torch once, forks the wider job's launcher and
workers), ``relaunch-torchrun`` (``launch.preload=false``) and ``relaunch-mpirun`` (the
controller relaunches the launcher wider after the workers exit 75), and ``elastic-torchrun``
(``launch.elastic=true``: a torchrun agent joins the running job; the workers wait for it,
``launch.elastic_wait_s``, so that the growth happens at the planned point and the latency is
comparable).

The row "after the old workers stopped" is the part of the latency that remains when the
old workers keep training while the new agent starts (elastic with ``elastic_wait_s=0``): from
the ``stopped`` event (torchrun's SIGTERM at the membership change) to the first step. For a
relaunch it equals the total (the workers stop when they ask).

It also measures the cost of the trainer's per-update stop-signal check: the stop votes ride on
the loss all-reduce (2 float64 instead of 1), against a separate scalar all-reduce per update,
both over 2 gloo ranks and against the median update time of the 2-worker phase.

Wall clock moves with whatever else runs on the machine, so the benchmark also reports the CPU
seconds of each whole run (every process of it) and of each cold-start piece alone (what a
quiet machine with a free core per process would take in wall clock), and the load average.

Usage (the numbers in docs/launch.md came from this)::

    .venv/bin/python benchmarks/resize_latency.py --reps 3 --json runs/bench/resize_latency.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

CONFIG: dict[str, Any] = {
    "run": {"name": "resize-bench", "epochs": 3, "seed": 3, "device": "cpu", "threads": 1},
    "data": {"name": "synthetic_classification", "synthetic_samples": 2048},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1, 2], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 4},
    "logging": {"progress": "off", "every_steps": 1, "wandb": {"mode": "disabled"}},
}

MODES: dict[str, dict[str, Any]] = {
    "relaunch-preload": {"launcher": "torchrun", "preload": True},
    "relaunch-torchrun": {"launcher": "torchrun", "preload": False},
    "relaunch-mpirun": {"launcher": "mpirun"},
    "elastic-torchrun": {"launcher": "torchrun", "elastic": True, "elastic_wait_s": 300},
}

COMPONENTS = [
    ("launcher start", "asked", "process_start"),
    ("interpreter + imports", "process_start", "main"),
    ("data load", "main", "data_loaded"),
    ("process-group init", "data_loaded", "backend_ready"),
    ("model + optimizer", "backend_ready", "trainer_ready"),
    ("checkpoint load", "trainer_ready", "resumed"),
    ("first step", "resumed", "first_step"),
]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_once(mode: str, workdir: Path, timeout: float, samples: int) -> tuple[Path, float]:
    """One real ``distgrow launch`` of the benchmark config with ``samples`` samples.

    Returns:
        Its run directory, and the CPU seconds (user + system) of all its processes.

    Raises:
        RuntimeError: the launch failed or timed out (its output is in the message).
    """
    run_dir = workdir / "run"
    tree = {
        **CONFIG,
        "data": {**CONFIG["data"], "synthetic_samples": samples},
        "run": {**CONFIG["run"], "output_dir": str(run_dir)},
        "launch": {"master_port": free_port(), "max_restarts": 0, **MODES[mode]},
    }
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PET_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    before = _children_cpu_s()
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgrow", "launch", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        raise RuntimeError(f"{mode}: timed out after {timeout} s\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{mode}: distgrow launch exited {proc.returncode}\n{out[-4000:]}")
    # Every process of the run was waited for by its parent, so the children's usage holds all.
    return run_dir, _children_cpu_s() - before


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


CPU_PROBES: dict[str, str] = {
    # What each cold start pays before its first update, one process alone.
    "torchrun agent: python + import torch.distributed.run": "import torch.distributed.run",
    "cold worker: python + import distgrow.startup": "import distgrow.startup",
    "first optimizer: import torch._dynamo (after the above)": (
        "import distgrow.startup; import time; t = time.process_time(); import torch._dynamo; "
        "print(time.process_time() - t)"
    ),
    "preload (the spawn server's imports, once per run, before the first launch)": (
        "from distgrow.launch.spawn import preload; preload()"
    ),
}


def measure_cpu(reps: int) -> dict[str, float]:
    """CPU seconds (user + system) of each cold-start piece, the fewest over ``reps`` runs.

    CPU time, unlike wall clock, barely moves with the load other processes put on the
    machine: on a quiet machine with a core free for each process, the wall clock of these
    single-threaded imports is about their CPU time.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    found: dict[str, float] = {}
    for name, code in CPU_PROBES.items():
        times = []
        for _ in range(reps):
            before = _children_cpu_s()
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.strip()
            # The compiler's import alone: the process prints its own CPU time for it.
            times.append(float(out) if out else _children_cpu_s() - before)
        found[name] = min(times)
    return found


def growths(run_dir: Path) -> list[dict[str, float]]:
    """The timestamps of each growth of a finished run (see the module's table)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    found: list[dict[str, float]] = []
    for i, record in enumerate(records):
        if record.get("event") != "need_workers":
            continue
        asked, need = float(record["time"]), int(record["need_workers"])
        if found and found[-1]["to"] == need:
            continue  # asked again by an intermediate elastic round: the first ask counts
        later = records[i + 1 :]
        resume = next(
            r for r in later if r.get("event") == "resume" and int(r.get("world_size", 0)) >= need
        )
        after = later[later.index(resume) + 1 :]
        first = next(r for r in after if r.get("kind") == "step")
        marks = resume["startup"]
        # Elastic: the old workers went on (or waited) until torchrun stopped them.
        stops = [r for r in later[: later.index(resume)] if r.get("event") == "stopped"]
        stopped = float(stops[-1]["time"]) if stops else asked
        found.append(
            {
                "from": float(record["have_workers"]),
                "to": float(need),
                "asked": asked,
                "stopped": stopped,
                "process_start": float(marks["process_start"]),
                "main": float(marks["main"]),
                "data_loaded": float(marks["data_loaded"]),
                "backend_ready": float(marks["backend_ready"]),
                "trainer_ready": float(marks["trainer_ready"]),
                "resumed": float(resume["time"]),
                "first_step": float(first["time"]),
            }
        )
    return found


def update_seconds(run_dir: Path, workers: int) -> float:
    """Median wall-clock between consecutive updates of the ``workers``-worker phase."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [
        float(r["time"]) for r in records if r.get("kind") == "step" and r["workers"] == workers
    ]
    gaps = [b - a for a, b in itertools.pairwise(times) if b > a]
    return statistics.median(gaps) if gaps else float("nan")


def allreduce_worker(iterations: int) -> None:
    """Under torchrun: time the loss all-reduce (1 float64), the same carrying the stop votes
    (2, what the trainer does), and a separate scalar all-reduce (max) per update."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    cases = {
        "loss_s": (torch.zeros(1, dtype=torch.float64), dist.ReduceOp.SUM),
        "loss_and_votes_s": (torch.zeros(2, dtype=torch.float64), dist.ReduceOp.SUM),
        "separate_check_s": (torch.zeros((), dtype=torch.float64), dist.ReduceOp.MAX),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(50):  # warm up
        for tensor, op in cases.values():
            dist.all_reduce(tensor, op=op)
    for _ in range(5):  # interleaved rounds: a drifting load affects all three alike
        for name, (tensor, op) in cases.items():
            start = time.perf_counter()
            for _ in range(iterations // 5):
                dist.all_reduce(tensor, op=op)
            times[name].append((time.perf_counter() - start) / (iterations // 5))
    if dist.get_rank() == 0:
        print(json.dumps({name: statistics.median(t) for name, t in times.items()}), flush=True)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def measure_allreduce(iterations: int = 2000) -> dict[str, float]:
    """Seconds per all-reduce over 2 gloo ranks on this machine (see allreduce_worker)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            __file__,
            "--allreduce-worker",
            str(iterations),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("{"))
    return {name: float(value) for name, value in json.loads(line).items()}


def table(results: dict[str, list[dict[str, float]]], cpu: dict[str, list[float]]) -> str:
    """Mean seconds of each component per mode, over every growth of every repetition; the
    mean CPU seconds of a whole run (every process of it) per mode."""
    modes = list(results)
    header = ["component (mean s)", *modes]
    rows = []
    for name, start, end in COMPONENTS:
        row = [name]
        for mode in modes:
            values = [g[end] - g[start] for g in results[mode]]
            row.append(f"{statistics.mean(values):.2f}" if values else "-")
        rows.append(row)
    totals = ["total: resize exit -> first step"]
    for mode in modes:
        values = [g["first_step"] - g["asked"] for g in results[mode]]
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        totals.append(f"{statistics.mean(values):.2f}{spread}" if values else "-")
    rows.append(totals)
    paused = ["  of it, after the old workers stopped"]
    for mode in modes:
        values = [g["first_step"] - g["stopped"] for g in results[mode]]
        paused.append(f"{statistics.mean(values):.2f}" if values else "-")
    rows.append(paused)
    rows.append(["growths measured", *[str(len(results[m])) for m in modes]])
    rows.append(
        ["CPU s per run (all processes)", *[f"{statistics.mean(cpu[m]):.1f}" for m in modes]]
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="runs per mode (default 3)")
    parser.add_argument(
        "--modes", nargs="+", choices=list(MODES), default=list(MODES), help="modes to run"
    )
    parser.add_argument("--json", type=Path, help="also write the raw timestamps here")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument(
        "--samples",
        type=int,
        default=2048,
        help="synthetic samples (default 2048): more make each span train longer, so that the "
        "standby launcher of launch.preload has imported torch before the resize",
    )
    parser.add_argument("--allreduce-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker)
    modes = [m for m in args.modes if MODES[m]["launcher"] != "mpirun" or shutil.which("mpirun")]
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    updates: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    # Interleaved (mode A, B, C, A, B, C, ...): a machine whose load drifts affects all alike.
    for rep in range(args.reps):
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix=f"distgrow-bench-{mode}-") as tmp:
                started = time.monotonic()
                run_dir, cpu_s = run_once(mode, Path(tmp), args.timeout, args.samples)
                cpu[mode].append(cpu_s)
                found = growths(run_dir)
                results[mode].extend(found)
                updates[mode].append(update_seconds(run_dir, 2))
                print(
                    f"rep {rep + 1}/{args.reps} {mode}: {time.monotonic() - started:.1f} s "
                    f"({cpu_s:.1f} CPU s), "
                    + ", ".join(
                        f"{g['from']:.0f}->{g['to']:.0f} {g['first_step'] - g['asked']:.2f} s"
                        for g in found
                    ),
                    flush=True,
                )
    allreduce = measure_allreduce()
    cold = measure_cpu(3)
    print()
    print(table(results, cpu))
    print("\nCPU seconds of each cold-start piece (one process alone, fewest of 3):")
    for name, seconds in cold.items():
        print(f"  {name}: {seconds:.2f}")
    update = statistics.median([u for us in updates.values() for u in us])
    extra = allreduce["loss_and_votes_s"] - allreduce["loss_s"]
    separate = allreduce["separate_check_s"]
    print(
        f"\nstop-signal check (2 gloo ranks), against the median update of the 2-worker phase "
        f"({update * 1e3:.1f} ms):\n"
        f"  the votes ride on the loss all-reduce: {allreduce['loss_s'] * 1e6:.0f} µs -> "
        f"{allreduce['loss_and_votes_s'] * 1e6:.0f} µs ({extra * 1e6:+.0f} µs, "
        f"{extra / update:+.2%} of an update)\n"
        f"  a separate scalar all-reduce per update would cost {separate * 1e6:.0f} µs "
        f"({separate / update:.1%} of an update)"
    )
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU(s), load average " + " ".join(f"{x:.2f}" for x in load))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "growths": results,
                    "update_s": updates,
                    "allreduce_s": allreduce,
                    "cpu_s_per_run": cpu,
                    "cold_start_cpu_s": cold,
                    "samples": args.samples,
                    "loadavg": load,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
