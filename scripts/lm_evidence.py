#!/usr/bin/env python3
"""The language-model evidence of docs/lm.md: decay_lr against grow_batch (sqrt and linear rule)
on configs/lm_small.yaml, on both corpora and several seeds, and the table it prints.

    bash scripts/lm_corpora.sh                      # runs/tokens/code.bin, prose.bin
    python scripts/lm_evidence.py                   # the short budget (2 x 192 windows)
    python scripts/lm_evidence.py --budget full     # the config as it is (2 x 1280 windows)
    python scripts/lm_evidence.py --print-only      # the table of the runs already made

Each (corpus, rule) is one ``distgrow compare`` into ``reports/lm_small-<budget>-<corpus>-<rule>``
(sqrt: decay_lr and grow_batch; linear: grow_batch, since decay_lr does not depend on the rule).
``distgrow compare`` reuses finished runs and resumes unfinished ones, so running this again
after an interruption continues; ``--print-only`` trains nothing. Every run is pinned to one
CPU thread (``run.threads=1``): float results depend on the thread count, and one thread per
process shares a busy machine best. The figures are each run's ``summary.json``: the final
validation loss (nats/token, the last epoch's) and the updates it made.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/lm_small.yaml"
BUDGETS = {
    # 2 epochs of 192 windows of 256 tokens: 98 k training tokens, 96 baseline updates at B0 = 4.
    "short": ["data.limit_train=192", "data.size=192", "data.limit_val=64"],
    "full": [],
}
RULES = {"sqrt": "decay_lr,grow_batch", "linear": "grow_batch"}


def report_dir(budget: str, corpus: str, rule: str) -> Path:
    """Where one (corpus, rule) compare writes its runs and report."""
    return REPO / "reports" / f"lm_small-{budget}-{corpus}-{rule}"


def compare_argv(budget: str, corpus: str, rule: str, seeds: str) -> list[str]:
    """The ``distgrow compare`` command of one (corpus, rule)."""
    return [
        sys.executable,
        "-m",
        "distgrow",
        "compare",
        CONFIG,
        f"data.path=runs/tokens/{corpus}.bin",
        *BUDGETS[budget],
        "run.threads=1",
        "logging.wandb.mode=disabled",
        f"growth.rule={rule}",
        "--variants",
        RULES[rule],
        "--seeds",
        seeds,
        "--out",
        str(report_dir(budget, corpus, rule).relative_to(REPO)),
    ]


def summary(budget: str, corpus: str, rule: str, variant: str, seed: int) -> dict | None:
    """A finished run's summary.json, or None if it is not there (not run, or unfinished)."""
    path = report_dir(budget, corpus, rule) / "runs" / f"{variant}-seed{seed}" / "summary.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("status") != "completed":
        return None
    # The first epoch's validation loss (half the tokens), from the run's metrics.jsonl.
    records = (path.parent / "metrics.jsonl").read_text().splitlines()
    epochs = [r for r in map(json.loads, records) if r.get("kind") == "epoch"]
    data["first_epoch_val_loss"] = epochs[0]["val_loss"] if epochs else None
    return data


def table(budget: str, corpora: list[str], seeds: list[int]) -> str:
    """Final validation loss and updates of every run, each rule's mean difference to decay_lr,
    and which rule ended closer to it on average over corpora and seeds."""
    rows = [
        "| corpus | seed | run | val loss after epoch 1 | final val loss (nats/token) "
        "| Δ vs decay_lr | updates |",
        "|---|---|---|---|---|---|---|",
    ]
    deltas: dict[str, list[float]] = {"sqrt": [], "linear": []}
    for corpus in corpora:
        for seed in seeds:
            base = summary(budget, corpus, "sqrt", "decay_lr", seed)
            runs = [("decay_lr", base)] + [
                (f"grow_batch {rule}", summary(budget, corpus, rule, "grow_batch", seed))
                for rule in RULES
            ]
            for name, run in runs:
                if run is None:
                    rows.append(f"| {corpus} | {seed} | {name} | | (not finished) | | |")
                    continue
                delta = ""
                if base is not None and name != "decay_lr":
                    diff = run["val_loss"] - base["val_loss"]
                    deltas[name.split()[1]].append(diff)
                    delta = f"{diff:+.3f}"
                first = run["first_epoch_val_loss"]
                rows.append(
                    f"| {corpus} | {seed} | {name} | {'' if first is None else f'{first:.3f}'} | "
                    f"{run['val_loss']:.3f} | {delta} | {run['total_updates']} |"
                )
    lines = [*rows, ""]
    for rule, values in deltas.items():
        if values:
            lines.append(
                f"grow_batch {rule}: mean Δ vs decay_lr {statistics.fmean(values):+.3f} nats/token "
                f"over {len(values)} (corpus, seed) pairs, range {min(values):+.3f} to "
                f"{max(values):+.3f}"
            )
    if deltas["sqrt"] and len(deltas["sqrt"]) == len(deltas["linear"]):
        # Lower is better: a run below decay_lr beat it, it is not "farther" from it.
        pairs = list(zip(deltas["sqrt"], deltas["linear"], strict=True))
        linear_lower = sum(lin < sq for sq, lin in pairs)
        lines.append(
            f"linear ended lower than sqrt in {linear_lower} of {len(pairs)} pairs "
            f"(mean linear - sqrt {statistics.fmean(lin - sq for sq, lin in pairs):+.3f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--corpora", default="code,prose", help="token files in runs/tokens/")
    parser.add_argument("--seeds", default="0,1", help="comma-separated run.seed values")
    parser.add_argument("--print-only", action="store_true", help="train nothing; print")
    args = parser.parse_args(argv)
    corpora = [c for c in args.corpora.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.print_only:
        for corpus in corpora:
            if not (REPO / "runs" / "tokens" / f"{corpus}.bin").is_file():
                print(
                    f"lm_evidence: runs/tokens/{corpus}.bin is missing; make it first: "
                    "bash scripts/lm_corpora.sh",
                    file=sys.stderr,
                )
                return 2
        for corpus in corpora:
            for rule in RULES:
                command = compare_argv(args.budget, corpus, rule, args.seeds)
                print("$", " ".join(command[2:]), flush=True)
                if subprocess.run(command, cwd=REPO).returncode != 0:
                    print(f"lm_evidence: the compare of {corpus}/{rule} failed", file=sys.stderr)
                    return 1
    print(table(args.budget, corpora, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
