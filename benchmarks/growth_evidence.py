"""When batch growth matches ``decay_lr`` and when it loses: multi-seed evidence on four workloads.

Each workload trains every variant on every seed as a real ``distgrow train`` (finished runs
are reused), with the gradient noise scale measured in every run (``noise.measure=on``, one
worker accumulating micro-batches of ``B0/2``, so every variant sees the same measurement and
the same arithmetic). It then prints, per workload and variant, the final metric's mean and
spread, the difference to ``decay_lr`` paired by seed with a 95% Student-t interval, the update
ratio, and per phase the batch, ``B/N``, the LR and the measured ``B_simple`` against the batch.

Usage (hours on the shared 2-core machine under load, ``--jobs 2`` runs two at a time;
``--workloads`` and ``--variants`` pick a part)::

    nice -n 10 .venv/bin/python benchmarks/growth_evidence.py --out /tmp/growth_evidence
    .venv/bin/python benchmarks/growth_evidence.py --out /tmp/growth_evidence --table-only

The workloads (all from shipped configs with overrides, so nothing new is needed to rerun):

* ``digits``: scikit-learn's digits (N = 1,438 after the 20% split), the issue's recipe: MLP
  512-512, SGD 0.1/0.9, B0 128, ×5 cuts at epochs 10 and 20 of 30 (small tabular).
* ``fmnist6k``: the first 6,000 Fashion-MNIST images, flattened (784 features), the same recipe
  (a medium-sized "tabular" set: no larger tabular set is available offline here).
* ``fmnist``: ``configs/fashion_mnist_mlp.yaml`` (N = 60,000), shortened to 4 epochs with the
  cuts at 1 and 2 (images).
* ``lm``: ``configs/lm_tiny.yaml`` (N = 2,048 sequences, AdamW, cosine) with ``growth.rule=sqrt``
  (the rule ``auto`` chose for AdamW when these ran; ``grow_linear`` is the linear rule).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distgrow.report.seeds import mean_interval  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """A config and the overrides that size it for this machine."""

    config: str
    overrides: tuple[str, ...]
    metric: str
    micro: int
    """The micro-batch (B0/2): one worker accumulates, so the noise scale can be measured."""
    spans: tuple[float, ...]
    """Epoch boundaries of the table's phases (the schedule's milestones)."""
    adaptive: tuple[str, ...] = field(default=())
    """Overrides for the noise-driven variants (evaluation spacing for a short run)."""
    variants: tuple[str, ...] = ("decay_lr", "grow_batch", "noise_cap", "adaptive")
    """The variants trained by default (``grow_nocap`` only where the N/10 cap binds)."""


WORKLOADS: dict[str, Workload] = {
    "digits": Workload(
        "configs/fashion_mnist_mlp.yaml",
        ("data.name=digits", "run.epochs=30", "schedule.milestones=[10,20]"),
        "val_acc",
        64,
        (0, 10, 20, 30),
        ("growth.adaptive.every=6", "growth.adaptive.patience=2", "growth.adaptive.min_updates=10"),
        ("decay_lr", "grow_batch", "grow_nocap", "noise_cap", "adaptive"),
    ),
    "fmnist6k": Workload(
        "configs/fashion_mnist_mlp.yaml",
        ("data.limit_train=6000", "run.epochs=30", "schedule.milestones=[10,20]"),
        "val_acc",
        64,
        (0, 10, 20, 30),
        ("growth.adaptive.every=20", "growth.adaptive.patience=2"),
        ("decay_lr", "grow_batch", "grow_nocap", "noise_cap", "adaptive"),
    ),
    "fmnist": Workload(
        "configs/fashion_mnist_mlp.yaml",
        ("run.epochs=4", "schedule.milestones=[1,2]", "data.limit_val=5000"),
        "val_acc",
        64,
        (0, 1, 2, 4),
        ("growth.adaptive.every=20", "growth.adaptive.patience=2"),
    ),
    "lm": Workload(
        "configs/lm_tiny.yaml",
        ("growth.rule=sqrt",),
        "val_loss",
        4,
        (0, 0.5, 1, 1.5, 2),
        ("growth.adaptive.every=10", "growth.adaptive.patience=2"),
        (
            "decay_lr",
            "grow_batch",
            "grow_linear",
            "noise_cap",
            "noise_cap_half",
            "adaptive",
            "adaptive_r2",
        ),
    ),
}

VARIANTS: dict[str, tuple[str, ...]] = {
    "decay_lr": ("growth.mode=decay_lr",),
    "grow_batch": ("growth.mode=grow_batch",),
    "grow_nocap": ("growth.mode=grow_batch", "growth.max_dataset_fraction=null"),
    "noise_cap": ("growth.mode=grow_batch", "growth.noise_cap=1"),
    "noise_cap_half": ("growth.mode=grow_batch", "growth.noise_cap=0.5"),
    "grow_linear": ("growth.mode=grow_batch", "growth.rule=linear"),
    "adaptive": ("growth.mode=adaptive",),
    "adaptive_r2": ("growth.mode=adaptive", "growth.adaptive.ratio=2"),
}
NOISE_DRIVEN = ("noise_cap", "noise_cap_half", "adaptive", "adaptive_r2")

COMMON = (
    "noise.measure=on",
    "run.threads=1",
    "logging.wandb.mode=disabled",
    "logging.progress=off",
    "logging.every_steps=5",
)


def run_dir(out: Path, workload: str, variant: str, seed: int) -> Path:
    return out / workload / f"{variant}-seed{seed}"


def command(out: Path, workload: str, variant: str, seed: int, extra: Sequence[str]) -> list[str]:
    """The ``distgrow train`` command of one run (what the script runs, printed with --dry-run)."""
    w = WORKLOADS[workload]
    args = [
        *w.overrides,
        *COMMON,
        f"growth.micro_batch={w.micro}",
        f"growth.max_micro_batch={w.micro}",
        *VARIANTS[variant],
        *(w.adaptive if variant in NOISE_DRIVEN else ()),
        f"run.seed={seed}",
        f"run.name={workload}_{variant}_{seed}",
        f"run.output_dir={run_dir(out, workload, variant, seed)}",
        *extra,
    ]
    return [sys.executable, "-m", "distgrow", "train", w.config, *args]


def finished(path: Path) -> bool:
    summary = path / "summary.json"
    if not summary.exists():
        return False
    return bool(json.loads(summary.read_text()).get("status") == "completed")


def train(cmd: list[str], path: Path) -> str:
    if finished(path):
        return f"reused {path}"
    path.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{path.name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return f"{'done' if rc == 0 else f'FAILED ({rc})'} {path}"


def records(path: Path) -> list[dict[str, Any]]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def phase_rows(path: Path, spans: Sequence[float]) -> list[dict[str, Any]]:
    """Per span of epochs (the schedule's milestones): the largest batch, B/N, the LR at the
    span's first and last record, the median measured B_simple, and the updates in it."""
    summary = json.loads((path / "summary.json").read_text())
    n = summary["dataset_size"]
    steps = [r for r in records(path) if r.get("kind") == "step"]
    rows = []
    for lo, hi in itertools.pairwise(spans):
        inside = [r for r in steps if lo * n < r["samples_seen"] <= hi * n]
        if not inside:
            continue
        noise = [r["noise/b_simple"] for r in inside if r.get("noise/b_simple") is not None]
        before = [r["step"] for r in steps if r["samples_seen"] <= lo * n]
        batch = max(r["global_batch"] for r in inside)
        rows.append(
            {
                "epochs": f"{lo:g}–{hi:g}",
                "batch": batch,
                "b_over_n": batch / n,
                "lr_first": inside[0]["lr"],
                "lr_last": inside[-1]["lr"],
                "b_simple": statistics.median(noise) if noise else None,
                "updates": inside[-1]["step"] - (before[-1] if before else 0),
                "momentum": inside[-1].get("momentum"),
            }
        )
    return rows


def collect(out: Path, workload: str, variants: Sequence[str], seeds: Sequence[int]) -> dict:
    """Every run's final metric, updates and phases; missing runs are left out."""
    data: dict[str, dict[int, dict[str, Any]]] = {}
    for v in variants:
        for s in seeds:
            path = run_dir(out, workload, v, s)
            if not finished(path):
                continue
            summary = json.loads((path / "summary.json").read_text())
            data.setdefault(v, {})[s] = {
                "metric": summary[WORKLOADS[workload].metric],
                "updates": summary["total_updates"],
                "n": summary["dataset_size"],
                "phases": phase_rows(path, WORKLOADS[workload].spans),
            }
    return data


def summarise(workload: str, data: dict) -> list[dict[str, Any]]:
    """Per variant: mean, sd, paired delta to decay_lr with its 95% interval, update ratio."""
    metric = WORKLOADS[workload].metric
    sign = 1.0 if metric == "val_acc" else -1.0
    scale = 100.0 if metric == "val_acc" else 1.0
    base = data.get("decay_lr", {})
    rows = []
    for v, runs in data.items():
        seeds = sorted(runs)
        values = [runs[s]["metric"] * scale for s in seeds]
        paired = [
            sign * (runs[s]["metric"] - base[s]["metric"]) * scale for s in seeds if s in base
        ]
        updates = statistics.fmean(runs[s]["updates"] for s in seeds)
        base_updates = statistics.fmean(r["updates"] for r in base.values()) if base else math.nan
        mean_d, low, high = mean_interval(paired) if paired else (math.nan, None, None)
        first = runs[seeds[0]]
        rows.append(
            {
                "workload": workload,
                "variant": v,
                "n": first["n"],
                "seeds": seeds,
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
                "delta": mean_d,
                "low": low,
                "high": high,
                "deltas": paired,
                "updates": updates,
                "ratio": base_updates / updates,
                "phases": first["phases"],
                "phases_by_seed": {s: runs[s]["phases"] for s in seeds},
            }
        )
    return rows


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The evidence table: one line per workload and variant, then the phases of seed 0."""
    print(
        "workload  variant     N       mean ± sd        Δ vs decay_lr [95% paired]    "
        "per seed                 updates ratio   B range"
    )
    for r in rows:
        unit = "pp" if WORKLOADS[r["workload"]].metric == "val_acc" else "nats"
        sd = _num(r["sd"], ".2f" if unit == "pp" else ".4f")
        mean = _num(r["mean"], ".2f" if unit == "pp" else ".4f")
        fmt = "+.2f" if unit == "pp" else "+.4f"
        delta = f"{_num(r['delta'], fmt)} [{_num(r['low'], fmt)}, {_num(r['high'], fmt)}] {unit}"
        per_seed = " ".join(_num(d, fmt) for d in r["deltas"])
        batches = [p["batch"] for p in r["phases"]]
        print(
            f"{r['workload']:<9} {r['variant']:<11} {r['n']:>6,} {mean:>7} ± {sd:<6} "
            f"{delta:<30} {per_seed:<24} {r['updates']:>7.0f} {r['ratio']:>5.2f}× "
            f"{min(batches)}–{max(batches)}"
        )
    print(
        "\nphases (first seed): epochs: largest batch (B/N, LR first→last, median measured "
        "B_simple, B/B_simple, updates)"
    )
    for r in rows:
        cells = []
        for p in r["phases"]:
            bs = p["b_simple"]
            ratio = _num(p["batch"] / bs) if bs else "—"
            cells.append(
                f"{p['epochs']}: {p['batch']} ({p['b_over_n']:.3f}N, lr {p['lr_first']:.3g}→"
                f"{p['lr_last']:.3g}, Bs {_num(bs, '.0f')}, B/Bs {ratio}, {p['updates']} upd)"
            )
        print(f"{r['workload']:<9} {r['variant']:<11} " + " | ".join(cells))


def print_markdown(rows: list[dict[str, Any]]) -> None:
    """The docs' evidence table (docs/noise.md): one row per workload and variant."""
    print(
        "| workload | N | variant | largest batch per phase, range (max B/N) | "
        "B_simple per phase (median) | "
        "mean Δ vs decay_lr [95% paired] | per seed | updates ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        unit = "pp" if WORKLOADS[r["workload"]].metric == "val_acc" else "nats"
        if r["variant"] == "decay_lr":  # the baseline: its mean and seed spread
            f = ".2f" if unit == "pp" else ".3f"
            values = " / ".join(_num(v, f) for v in r["values"])
            noise = " / ".join(_num(p["b_simple"], ".0f") for p in r["phases"])
            print(
                f"| {r['workload']} | {r['n']:,} | **decay_lr** | {r['phases'][0]['batch']:,} | "
                f"{noise} | baseline {_num(r['mean'], f)} ± {_num(r['sd'], f)} "
                f"{'%' if unit == 'pp' else 'nats'} (sd) | {values} | 1.00× |"
            )
            continue
        fmt = "+.2f" if unit == "pp" else "+.3f"
        if unit == "nats":  # a loss: shown as the change in loss (positive is worse)
            delta = f"{_num(-r['delta'], fmt)} [{_num(_neg(r['high']), fmt)}, "
            delta += f"{_num(_neg(r['low']), fmt)}] nats"
            seeds = " / ".join(_num(-d, fmt) for d in r["deltas"])
        else:
            delta = f"{_num(r['delta'], fmt)} [{_num(r['low'], fmt)}, {_num(r['high'], fmt)}] pp"
            seeds = " / ".join(_num(d, fmt) for d in r["deltas"])
        batches = [p["batch"] for p in r["phases"]]
        noise = " / ".join(_num(p["b_simple"], ".0f") for p in r["phases"])
        print(
            f"| {r['workload']} | {r['n']:,} | {r['variant']} | {min(batches):,}–{max(batches):,} "
            f"({max(batches) / r['n']:.2f}) | {noise} | {delta} | {seeds} | {r['ratio']:.2f}× |"
        )


def _neg(x: float | None) -> float | None:
    return None if x is None else -x


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/growth_evidence"))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", help="default: each workload's own (Workload.variants)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (1 thread each)")
    parser.add_argument("--table-only", action="store_true", help="read finished runs only")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", action="store_true", help="also print the docs' table")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    picked = [v for v in args.variants.split(",") if v] if args.variants else None
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = [w for w in workloads if w not in WORKLOADS]
    unknown += [v for v in picked or () if v not in VARIANTS]
    if unknown:
        print(
            f"unknown workload or variant: {unknown}. Fix: pick from "
            f"{list(WORKLOADS)} and {list(VARIANTS)}.",
            file=sys.stderr,
        )
        return 2
    variants = {w: list(picked or WORKLOADS[w].variants) for w in workloads}
    jobs = [
        (command(args.out, w, v, s, args.overrides), run_dir(args.out, w, v, s))
        for w in workloads
        for s in seeds
        for v in variants[w]
    ]
    if args.dry_run:
        for cmd, _ in jobs:
            print(" ".join(cmd[1:]))
        return 0
    if not args.table_only:
        os.environ.setdefault("WANDB_MODE", "disabled")
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for line in pool.map(lambda job: train(*job), jobs):
                print(line, flush=True)
    rows = [r for w in workloads for r in summarise(w, collect(args.out, w, variants[w], seeds))]
    print_table(rows)
    if args.markdown:
        print()
        print_markdown(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
