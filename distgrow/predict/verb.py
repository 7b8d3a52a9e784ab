"""``distgrow estimate``: what decay_lr, grow_batch and the hybrid will cost, before they run.

From the timing profile of this node (measured once and cached; see
:mod:`distgrow.predict.measure`) or one measured on another machine (``--probe FILE``, with
``--nodes N`` for N such nodes), the fitted model (:mod:`distgrow.predict.profile`) predicts
each variant's training wall-clock, start-up, worker-hours and the SLURM node-hours of
``launch.slurm: chain`` against one allocation held for the whole run
(:mod:`distgrow.predict.estimate`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from distgrow.config import Config, ConfigError, load_config
from distgrow.exits import EXIT_USAGE
from distgrow.planner import Plan, make_plan
from distgrow.predict.estimate import RunPrediction, format_predictions, predict_plan
from distgrow.predict.profile import (
    VAL_CHUNK,
    ProfileError,
    Throughput,
    TimingProfile,
    read_profile,
)

VARIANTS = ("decay_lr", "grow_batch", "hybrid")

EPILOG = """\
Measured (on this node, once, then cached under ~/.cache/distgrow/probe/timing-*.json; or read
from --probe FILE): a micro-step's time at the plan's micro-batches, the optimizer step, a
validation forward, a checkpoint, the gradient all-reduce and the node's core sharing with 2, 4,
... processes of the config's backend (--workers-to-time), a cold worker's start, the data load.
Modelled: interpolation between the measured micro-batches, a + b*m beyond them, the ring all-reduce
alpha*(W-1) + beta*(W-1)/W beyond the measured worker counts and across nodes (the network
between nodes is not measured), no overlap of the all-reduce with the backward, no queue wait.

--probe FILE --nodes N: the prediction for N nodes like the one FILE was measured on (copy the
timing file `distgrow estimate` prints on that node); growth.max_workers becomes N x the workers
per node (--workers-per-node, else launch.chain.tasks_per_node or gpus_per_node, else the node's
GPUs, else its cores).
"""


class EstimateError(ValueError):
    """An estimate that cannot run as asked; the message names the value and the fix."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``distgrow estimate`` (besides CONFIG and the overrides)."""
    p.add_argument("--probe", metavar="FILE", help="a timing profile measured on another node")
    p.add_argument("--nodes", type=int, metavar="N", help="predict for N nodes of that kind")
    p.add_argument("--workers-per-node", type=int, metavar="P", help="workers on each node")
    p.add_argument(
        "--workers", type=int, default=1, metavar="N", help="the job's world size (as in plan)"
    )
    p.add_argument(
        "--workers-to-time",
        metavar="LIST",
        help="worker counts to time as a process group on this node, e.g. 2,4 (default: the "
        "plan's, up to the node's workers; 1 times none)",
    )
    p.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    p.add_argument("--save", metavar="FILE", help="also write the timing profile to FILE")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _positive(value: int | None, flag: str, example: str) -> None:
    if value is not None and value < 1:
        raise EstimateError(f"{flag} {value}: must be 1 or more. Fix: e.g. {flag} {example}.")


def variant_configs(cfg: Config, dataset_size: int) -> dict[str, Config]:
    """decay_lr, grow_batch and the hybrid of ``cfg`` (as ``distgrow compare`` trains them)."""
    from distgrow.report import ReportError
    from distgrow.report.verbs import hybrid_cap

    out = {v: replace(cfg, growth=replace(cfg.growth, mode=v)) for v in ("decay_lr", "grow_batch")}
    try:
        cap = hybrid_cap(cfg, dataset_size)
        grow = out["grow_batch"]
        out["hybrid"] = replace(grow, growth=replace(grow.growth, max_global_batch=cap))
    except ReportError:
        pass  # no growth to cap: no hybrid
    return out


def per_node_of(cfg: Config, args: argparse.Namespace) -> int | None:
    """Workers per node as given: the option, else the chain's shape (None: neither)."""
    chain = cfg.launch.chain
    for value in (args.workers_per_node, chain.tasks_per_node, chain.gpus_per_node or None):
        if value:
            return int(value)
    return None


def world_sizes(text: str | None, plans: dict[str, Plan], per_node: int) -> list[int]:
    """The worker counts to time: ``--workers-to-time``, else the plans' (up to a node)."""
    if text:
        try:
            sizes = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            sizes = [0]
        if not sizes or min(sizes) < 1:
            raise EstimateError(
                f"--workers-to-time {text!r}: a comma-separated list of worker counts of 1 or "
                "more. Fix: e.g. --workers-to-time 2,4."
            )
        return sorted({s for s in sizes if s > 1})
    found = {min(p.workers, per_node) for plan in plans.values() for p in plan.phases}
    return sorted(w for w in found if w > 1)


def micro_batches(plans: dict[str, Plan], most: int = 8) -> list[int]:
    """The micro-batches to time: the plans' range, doubling, both ends included."""
    used = sorted({p.micro_batch for plan in plans.values() for p in plan.phases})
    lo, hi = used[0], used[-1]
    sizes = [lo]
    while sizes[-1] * 2 < hi:
        sizes.append(sizes[-1] * 2)
    sizes = sorted({*sizes, hi})
    if len(sizes) > most:  # keep both ends and an even spread
        step = (len(sizes) - 1) / (most - 1)
        sizes = sorted({sizes[round(i * step)] for i in range(most)})
    return sizes


def _plans(cfg: Config, workers: int) -> dict[str, Plan]:
    n = cfg.expected_train_size()
    return {v: make_plan(c, n, min_workers=workers) for v, c in variant_configs(cfg, n).items()}


def _measured_profile(
    cfg: Config, args: argparse.Namespace, plans: dict[str, Plan], per_node: int
) -> tuple[TimingProfile, str, Config]:
    """This node's profile: the cache's, else measured now (and cached)."""
    from distgrow import probe, startup
    from distgrow.predict import measure

    started = time.perf_counter()
    data = startup.load_data(cfg)
    load_s = time.perf_counter() - started
    device = probe.probe_device(cfg)
    if cfg.growth.max_micro_batch == "auto":
        found = probe.cached_limit(cfg, data)
        limit = found[0] if found else None
        cfg = replace(cfg, growth=replace(cfg.growth, max_micro_batch=limit))
        plans.update(_plans(cfg, args.workers))
    path = measure.timing_path(measure.timing_identity(cfg, data, device))
    sizes = world_sizes(args.workers_to_time, plans, per_node)
    if not args.refresh and path.exists():
        try:
            cached = read_profile(path)
            timed = {w.workers for w in cached.world_rows}
            if set(sizes) <= timed and set(micro_batches(plans)) <= {
                m for m, _ in cached.micro_rows
            }:
                return cached, f"cached in {path} (--refresh measures again)", cfg
        except ProfileError:
            pass  # measured again
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    say(f"estimate: timing {device} (micro-batches {micro_batches(plans)}, workers {sizes or [1]})")
    profile = measure.measure_timing(
        cfg, data, micro_batches=micro_batches(plans), world_sizes=sizes, data_load_s=load_s,
        echo=say,
    )  # fmt: skip
    profile.save(path)
    return profile, f"measured now, saved to {path}", cfg


def predict_all(
    plans: dict[str, Plan], model: Throughput, cfg: Config, per_node: int, val_size: int
) -> list[RunPrediction]:
    """Each variant's prediction (a plateau plan that grows is left out, with a note)."""
    cap = cfg.growth.max_micro_batch
    piece = min(VAL_CHUNK, cap) if isinstance(cap, int) else VAL_CHUNK
    out = []
    for variant, plan in plans.items():
        try:
            pred = predict_plan(
                plan, model, variant=variant, val_size=val_size, per_node=per_node, piece_cap=piece
            )
        except ValueError as err:
            print(f"distgrow: estimate: {variant}: {err}", file=sys.stderr)
            continue
        out.append(pred)
    return out


def describe_model(model: Throughput, per_node: int, nodes: int) -> list[str]:
    """What was measured and what each piece of the model is, in numbers."""
    p = model.profile
    ms = [m for m, _ in p.micro_rows]
    lines = [
        f"model: micro-step measured at {', '.join(map(str, ms))} (interpolated between), beyond "
        f"{model.a * 1e3:.3f} ms + {model.b * 1e6:.3f} µs/sample (fitted); optimizer step "
        f"{p.step_s * 1e3:.3f} ms; checkpoint "
        f"{p.checkpoint_s * 1e3:.1f} ms; validation forward {model.eval_a * 1e3:.3f} ms + "
        f"{model.eval_b * 1e6:.3f} µs/sample (measured)",
    ]
    for w in p.world_rows:
        lines.append(
            f"model: {w.workers} workers on the node (measured): micro-step ×"
            f"{model.contention(w.workers):.2f}, all-reduce of {p.grad_bytes / 2**20:.2f} MiB "
            f"{w.allreduce_s * 1e3:.3f} ms, rendezvous {w.init_s:.2f} s"
        )
    lines.append(
        f"model: all-reduce beyond the measured counts (modelled, ring): "
        f"{model.ring_alpha * 1e3:.3f} ms·(W−1) + {model.ring_beta * 1e3:.3f} ms·(W−1)/W"
        + (" — across nodes the network is not measured" if nodes > 1 else "")
    )
    lines.append(
        f"model: start-up {p.cold_start_s:.2f} s cold worker + {p.data_load_s:.2f} s data "
        f"(measured); a relaunch pays the cold start and the rendezvous; {per_node} worker(s) "
        f"per node, {nodes} node(s)"
    )
    return lines


def run_estimate(args: argparse.Namespace) -> int:
    """``distgrow estimate``: see the module's docstring."""
    from distgrow.backends import BackendError
    from distgrow.state import TrainError

    try:
        return _run(args)
    except ConfigError:
        raise  # the command's own config-error line
    except (EstimateError, ProfileError, TrainError, BackendError, ValueError, OSError) as err:
        # ValueError and OSError: a missing or malformed data set (as `distgrow probe` says).
        print(f"distgrow: error: {err}", file=sys.stderr)
        return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    for value, flag, example in (
        (args.nodes, "--nodes", "4"),
        (args.workers_per_node, "--workers-per-node", "8"),
        (args.workers, "--workers", "2"),
    ):
        _positive(value, flag, example)
    if args.nodes is not None and args.probe is None:
        raise EstimateError(
            f"--nodes {args.nodes}: needs --probe FILE, the timing profile of one such node. "
            "Fix: run `distgrow estimate CONFIG` on a node, copy the timing file it names, and "
            "give it here with --probe."
        )
    cfg = load_config(args.config, args.overrides)
    profile: TimingProfile | None = None
    if args.probe is not None:
        profile = read_profile(args.probe)
        source = f"read from {args.probe}"
    given = per_node_of(cfg, args)
    per_node = given or (profile.workers_per_node if profile else 1)
    nodes = args.nodes or 1
    if args.nodes is not None:
        workers = nodes * per_node
        cfg = replace(cfg, growth=replace(cfg.growth, max_workers=workers))
    if cfg.growth.max_micro_batch == "auto" and profile is not None:
        cfg = replace(cfg, growth=replace(cfg.growth, max_micro_batch=profile.max_micro_batch))
    plans = _plans(cfg, args.workers)
    if args.nodes is None and given is None:
        # No shape given: one node, which every worker of the plans shares.
        per_node = max(p.workers for plan in plans.values() for p in plan.phases)
    if profile is None:
        profile, source, cfg = _measured_profile(cfg, args, plans, per_node)
    if args.save:
        profile.save(Path(args.save))
    model = Throughput.fit(profile)
    preds = predict_all(plans, model, cfg, per_node, profile.val_size)
    if args.json:
        cpu: dict[str, float] = {}
        if profile.micro_cpu_rows:  # CPU seconds inside updates: what load disturbs least
            cpu_model = Throughput.fit(profile, clock="cpu")
            cpu_preds = predict_all(plans, cpu_model, cfg, per_node, profile.val_size)
            cpu = {p.variant: p.train_s for p in cpu_preds}
        out: dict[str, Any] = {
            "config": args.config,
            "profile": source,
            "device": profile.device,
            "nodes": nodes,
            "per_node": per_node,
            "model": model.to_json(),
            "predictions": [{**p.to_json(), "train_cpu_s": cpu.get(p.variant)} for p in preds],
        }
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    print(f"estimate: {args.config} on {profile.device}; timing profile {source}")
    for line in describe_model(model, per_node, nodes):
        print(line)
    for line in format_predictions(preds):
        print(line)
    return 0
