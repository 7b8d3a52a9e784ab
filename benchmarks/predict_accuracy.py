"""Predicted against measured wall-clock: ``distgrow estimate`` checked against real runs.

Issue #26 item 3: for 1, 2 and 4 gloo workers and for every shipped config's short run, this
runs, side by side and in this order for each case:

1. ``distgrow estimate CONFIG OVERRIDES --refresh --json --workers W --workers-to-time W``: the
   timing probe measured now (so that it sees the same machine load as the run after it) and the
   predicted training wall-clock of the case's variant (``growth.mode``);
2. the run itself: ``distgrow train`` (one worker) or ``torchrun --nproc_per_node W -m distgrow
   train`` (W gloo workers), and its ``summary.json``'s ``wall_s`` (from the first update to the
   last: validation and checkpoints included, start-up excluded, which is what is predicted).

It prints one row per case (predicted, measured, error %) and each case's phases, and the load
average around each case (with ``--keep DIR`` each run directory also holds the case's timing
profile as ``timing.json``, so ``distgrow report RUN_DIR`` draws its phases predicted against
measured): on a machine shared with other jobs the measured time moves with
their load, and the prediction moves with the load during its own probe.

A config whose data is not on this machine (CIFAR-10, covtype, the ionosphere file) is listed as
skipped, with the estimate's own error naming what is missing.

Usage (the figures in docs/predict.md came from this)::

    nice -n 10 .venv/bin/python benchmarks/predict_accuracy.py --json runs/bench/predict.json
    nice -n 10 .venv/bin/python benchmarks/predict_accuracy.py --cases workers   # 1, 2, 4 only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["run.threads=1", "logging.wandb.mode=disabled", "logging.progress=off"]


@dataclass(frozen=True)
class Case:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    workers: int = 1
    group: str = "configs"

    @property
    def variant(self) -> str:
        for o in self.overrides:
            if o.startswith("growth.mode="):
                return o.split("=", 1)[1]
        return "grow_batch"


FM_DECAY = ["growth.mode=decay_lr", "run.epochs=1"]
CASES = [
    Case("fashion_mnist_mlp decay_lr, 1 worker", "fashion_mnist_mlp", FM_DECAY, 1, "workers"),
    Case("fashion_mnist_mlp decay_lr, 2 workers", "fashion_mnist_mlp", FM_DECAY, 2, "workers"),
    Case("fashion_mnist_mlp decay_lr, 4 workers", "fashion_mnist_mlp", FM_DECAY, 4, "workers"),
    Case("fashion_mnist_mlp", "fashion_mnist_mlp", ["run.epochs=3", "schedule.milestones=[1,2]"]),
    Case("fashion_mnist_adam", "fashion_mnist_adam", ["run.epochs=2"]),
    Case("lm_tiny", "lm_tiny", ["run.epochs=1"]),
    Case("tokens_tiny", "tokens_tiny", ["run.epochs=1", "data.path=runs/tokens/code.bin"]),
    Case("ionosphere_time_based", "ionosphere_time_based", ["run.epochs=10"]),
    Case(
        "covtype_bottleneck decay_lr",
        "covtype_bottleneck",
        ["growth.mode=decay_lr", "run.epochs=1", "data.limit_train=50000"],
    ),
    Case(
        "cifar10_wrn16_4",
        "cifar10_wrn16_4",
        ["run.epochs=3", "schedule.milestones=[1,2]", "data.limit_train=2048"],
    ),
]


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _python() -> str:
    return sys.executable


def estimate(case: Case, overrides: list[str], save: Path) -> dict[str, Any] | str:
    """The estimate's JSON (its timing profile saved to ``save``), or its error line."""
    argv = [_python(), "-m", "distgrow", "estimate", f"configs/{case.config}.yaml", *overrides]
    argv += ["--refresh", "--json", "--workers", str(case.workers), "--save", str(save)]
    argv += ["--workers-to-time", str(case.workers)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit {done.returncode}"
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def train(case: Case, overrides: list[str], out: Path) -> dict[str, Any] | str:
    """The run's ``summary.json``, or why it failed."""
    args = ["-m", "distgrow", "train", f"configs/{case.config}.yaml", *overrides]
    args.append(f"run.output_dir={out}")
    argv = [_python(), *args]
    if case.workers > 1:  # torchrun -m distgrow train ...
        launcher = ["-m", "torch.distributed.run", "--standalone"]
        argv = [_python(), *launcher, f"--nproc_per_node={case.workers}", *args]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False, env=env)
    summary = out / "summary.json"
    if done.returncode != 0 or not summary.exists():
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        return f"exit {done.returncode}: {lines[-1] if lines else ''}"
    result: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
    return result


def run_case(case: Case, work: Path) -> dict[str, Any]:
    overrides = [*COMMON, *case.overrides]
    row: dict[str, Any] = {"case": case.name, "workers": case.workers, "load_before": _load()}
    out = work / case.name.replace(" ", "_").replace(",", "")
    shutil.rmtree(out, ignore_errors=True)
    timing = work / f"{out.name}.timing.json"
    est = estimate(case, overrides, timing)
    if isinstance(est, str):
        row["skipped"] = est
        return row
    pred = next((p for p in est["predictions"] if p["variant"] == case.variant), None)
    if pred is None:
        row["skipped"] = f"no {case.variant} prediction"
        return row
    summary = train(case, overrides, out)
    if out.is_dir():  # `distgrow report RUN_DIR` then draws predicted_vs_measured.png
        shutil.copyfile(timing, out / "timing.json")
    row["load_after"] = _load()
    if isinstance(summary, str):
        row["skipped"] = f"training failed: {summary}"
        return row
    row["predicted_s"] = pred["wall_s"]
    row["measured_s"] = summary["wall_s"]
    row["error"] = (pred["wall_s"] - summary["wall_s"]) / summary["wall_s"]
    row["updates"] = (pred["updates"], summary["total_updates"])
    for key in ("train_s", "train_cpu_s"):
        guess = pred.get(key)
        got = summary.get(key)
        if guess is not None and got:
            row[key] = (guess, got, (guess - got) / got)
    row["phases"] = [
        {
            "batch": p["global_batch"],
            "workers": p["workers"],
            "predicted_s": p["wall_s"],
            "measured_s": m.get("wall_s"),
        }
        for p, m in zip(pred["phases"], summary.get("phases", []), strict=False)
    ]
    row["run_dir"] = str(out)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", choices=("all", "workers", "configs"), default="all")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--keep", help="keep the run directories here (default: a temp dir)")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if args.cases in ("all", c.group)]
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="predict-acc-"))
    rows = []
    head = f"{'case':<40} {'predicted':>10} {'measured':>10} {'error':>8}  load before/after"
    print(head)
    for case in cases:
        row = run_case(case, work)
        rows.append(row)
        if "skipped" in row:
            print(f"{case.name:<40} skipped: {row['skipped']}", flush=True)
            continue
        print(
            f"{case.name:<40} {row['predicted_s']:>9.2f}s {row['measured_s']:>9.2f}s "
            f"{row['error']:>+8.1%}  {row['load_before']} / {row['load_after']}",
            flush=True,
        )
        for key, what in (("train_s", "inside updates"), ("train_cpu_s", "CPU s inside updates")):
            if key in row:
                guess, got, err = row[key]
                print(f"    {what}: predicted {guess:.2f}, measured {got:.2f} ({err:+.1%})")
        if len(row["phases"]) > 6:  # a continuous schedule: a phase per batch size
            print(f"    {len(row['phases'])} phases (each in --json)")
            continue
        for ph in row["phases"]:
            measured = ph["measured_s"]
            print(
                f"    phase batch {ph['batch']:>6} × {ph['workers']} workers: predicted "
                f"{ph['predicted_s']:.2f} s, measured "
                + ("-" if measured is None else f"{measured:.2f} s"),
                flush=True,
            )
    for what, errors in (
        ("wall-clock", [abs(r["error"]) for r in rows if "error" in r]),
        ("CPU s inside updates", [abs(r["train_cpu_s"][2]) for r in rows if "train_cpu_s" in r]),
    ):
        if errors:
            print(
                f"{what}: {len(errors)} cases, mean |error| {sum(errors) / len(errors):.1%}, "
                f"largest {max(errors):.1%}, within 15%: {sum(e <= 0.15 for e in errors)}"
            )
    print(f"machine: {os.cpu_count()} CPU(s), load average now {_load()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
