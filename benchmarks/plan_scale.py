"""How long ``make_plan`` takes against the run's length: 10^3 to 10^9 baseline updates.

The Trainer and ``distgrow launch`` build the plan at every start, resume and relaunch, on
every rank, so its cost is paid by every start of a long run. For each case the data set is
sized so the ``decay_lr`` baseline has 10^k updates, and the plan is timed in this process
(median of ``--repeats``, the realiser's memo cleared before each). ``--walk N`` also times
the update-by-update walk the planner used before (tests/test_plan_scale.py keeps it as the
oracle) up to N baseline updates, and checks both give the same plan::

    python benchmarks/plan_scale.py                 # 10^3 … 10^9, both cases
    python benchmarks/plan_scale.py --walk 1000000  # and the walk up to 10^6 updates
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distgrow.config import load_config  # noqa: E402
from distgrow.core import split  # noqa: E402
from distgrow.planner import Plan, make_plan  # noqa: E402


def step_cosine(updates: int) -> tuple[str | None, list[str], int, int]:
    """lm_tiny's per-step cosine (warm-up, then down to 0) on 8 to 64 workers, memory-capped."""
    n = updates * 8 // 2  # B0 = 8, 2 epochs
    overrides = [
        f"data.size={n}", "schedule.eta_min=0", "growth.max_workers=64",
        "growth.micro_batch=8", "growth.max_micro_batch=32", "growth.max_accum_steps=64",
    ]  # fmt: skip
    return str(ROOT / "configs" / "lm_tiny.yaml"), overrides, n, 8


def token_wsd(updates: int) -> tuple[str | None, list[str], int, int]:
    """A per-token WSD pre-training run: 4096-token sequences, B0 = 256, warm-ups of LR and
    batch over the first 0.2 %, the last 20 % decaying, 64 to 256 workers, the batch capped at
    16384 sequences (64 M tokens)."""
    n, seq = updates * 256, 4096
    tokens = n * seq
    overrides = [
        f"data.size={n}", "schedule.type=wsd", "schedule.interval=tokens",
        f"data.seq_len={seq}", "run.epochs=1", f"schedule.warmup={tokens // 500}",
        f"schedule.decay_length={tokens // 5}", "optim.name=adamw", "optim.lr=0.0003",
        "growth.base_batch=256", "growth.max_workers=256", "growth.micro_batch=4",
        "growth.max_micro_batch=8", "growth.rampup_start_batch=64",
        "growth.rampup_increment=64", f"growth.rampup_samples={max(n // 500, 64)}",
        "growth.max_global_batch=16384",
    ]  # fmt: skip
    return None, overrides, n, 64


CASES = {"step-cosine": step_cosine, "token-wsd": token_wsd}
"""name: the run with (about) this many baseline updates: (config file, overrides, N, world)."""


def _time(fn: Callable[[], Plan], repeats: int) -> tuple[float, float, Plan]:
    wall, cpu = [], []
    plan = None
    for _ in range(repeats):
        split._realise.cache_clear()
        w, c = time.perf_counter(), time.process_time()
        plan = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    assert plan is not None
    return statistics.median(wall), statistics.median(cpu), plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument("--max-exp", type=int, default=9, help="up to 10^this updates")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--walk", type=int, default=0, help="also time the walk up to this")
    parser.add_argument("--json", action="store_true", help="one JSON line per row")
    args = parser.parse_args()
    if args.walk:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_plan_scale import as_json, reference_plan
    if not args.json:
        print(f"{'case':12} {'baseline updates':>16} {'phases':>7} {'wall s':>8} {'cpu s':>8}"
              f"{'  walk s':>9}")  # fmt: skip
    for case in args.cases.split(","):
        for exp in range(3, args.max_exp + 1):
            path, overrides, n, world = CASES[case](10**exp)
            cfg = load_config(path, overrides)
            wall, cpu, plan = _time(lambda: make_plan(cfg, n, world), args.repeats)  # noqa: B023
            walk = None
            if (plan.baseline_total_updates or 0) <= args.walk:
                walk, _, old = _time(lambda: reference_plan(cfg, n, world), 1)  # noqa: B023
                assert as_json(old) == as_json(plan), f"{case} 10^{exp}: plans differ"
            row = {"case": case, "baseline_updates": plan.baseline_total_updates,
                   "phases": len(plan.phases), "wall_s": wall, "cpu_s": cpu,
                   "walk_s": walk}  # fmt: skip
            if args.json:
                print(json.dumps(row))
                continue
            walked = "" if walk is None else f"{walk:9.2f}"
            print(f"{case:12} {plan.baseline_total_updates:>16,} {len(plan.phases):>7} "
                  f"{wall:8.3f} {cpu:8.3f}{walked}")  # fmt: skip


if __name__ == "__main__":
    main()
