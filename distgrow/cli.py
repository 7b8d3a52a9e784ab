"""The ``distgrow`` command: a few verbs, each taking a config file and dotted overrides.

    distgrow plan CONFIG [key=value ...] [--json] [--workers N]
    distgrow config [CONFIG] [key=value ...]      the resolved config, or every key documented
    distgrow config --schema                      the JSON Schema of config files, for editors
    distgrow train CONFIG [key=value ...] [--resume]
    distgrow compare CONFIG [key=value ...] [--variants LIST] [--out DIR] [--force]
    distgrow report RUN_DIR [RUN_DIR ...] [--baseline RUN_DIR] [--out DIR]
    distgrow sweep CONFIG [key=value ...] --batch-sizes LIST --lrs LIST [--out DIR] [--force]
    distgrow probe CONFIG [key=value ...] [--memory-budget B] [--refresh]
    distgrow estimate CONFIG [key=value ...] [--probe FILE --nodes N] [--json]

Errors in the config are printed as one line naming the key, the value and the fix, with exit
status 2 (the same as a usage error), before anything runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeAlias

from distgrow import report
from distgrow.config import (
    Config,
    ConfigError,
    GrowthConfig,
    describe_fields,
    dump_config,
    json_schema,
    load_config,
)
from distgrow.exits import EXIT_USAGE
from distgrow.extensions import use_environment_cache
from distgrow.planner import ADJUSTMENT_NOTES, RULE_IDENTITIES, Plan, make_plan
from distgrow.report import ReportError


def _fmt_epoch(x: float) -> str:
    if math.isnan(x):
        return "-"
    return str(int(x)) if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def _fmt_lr(lr: float, lr_end: float) -> str:
    if math.isclose(lr, lr_end, rel_tol=1e-9):
        return f"{lr:.4g}"
    return f"{lr:.4g}→{lr_end:.4g}"


def _fmt_gap(batch_to_ideal: float) -> str:
    """How far below B* a phase's batch falls: ``0%`` when it carries the whole decay."""
    gap = 1.0 - batch_to_ideal
    return "0%" if gap < 5e-4 else f"-{gap:.1%}"


def format_plan(plan: Plan, growth: GrowthConfig | None = None, world_size: int = 1) -> str:
    """A readable table of the plan's phases and the totals against the baseline.

    Args:
        plan: The plan.
        growth: Its config's growth section: the header then says where the worker limit
            comes from (an unset ``max_workers`` is the job's world size).
        world_size: The world size the plan was made for.
    """
    first = "rung" if plan.ladder else "epochs"
    updates = "updates/epoch" if plan.ladder else "updates"
    header = [first, "batch", "workers", "micro", "accum", "lr", "momentum", "noise", updates]
    header.append("vs B*")
    rows = []
    for p in plan.phases:
        where = (
            str(p.rung) if plan.ladder else f"{_fmt_epoch(p.start_epoch)}–{_fmt_epoch(p.end_epoch)}"
        )
        where += " w" * p.warmup + " r" * p.rampup
        rows.append(
            [
                where,
                f"{p.global_batch}" + ("*" if p.capped else ""),
                str(p.workers),
                str(p.micro_batch),
                str(p.accum_steps),
                _fmt_lr(p.lr, p.lr_end),
                f"{p.momentum:g}",
                f"{p.noise:.4g}",
                f"{p.updates:,}",
                _fmt_gap(p.batch_to_ideal),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"plan: growth.mode={plan.mode}, schedule={plan.schedule}, N={plan.dataset_size:,}, "
        f"epochs={plan.epochs}, B0={plan.base_batch}, rule={plan.rule}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
    ]
    if growth is not None:
        lines.insert(1, _max_workers_words(growth.max_workers, world_size))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if any(p.capped for p in plan.phases):
        lines.append("* batch capped: the learning rate carries the rest of the decay (hybrid)")
    there = "lr0 · B/B*" if plan.rule == "linear" else "lr0 · √(r · B/B*)"
    lines.append(
        "vs B*: the batch against the ideal B* = B0/r(t) at the phase's farthest update (the LR "
        f"is {there} there)"
    )
    if plan.total_updates is not None and plan.baseline_total_updates is not None:
        ratio = plan.update_ratio or math.nan
        lines.append(
            f"total updates: {plan.total_updates:,}   decay_lr baseline: "
            f"{plan.baseline_total_updates:,}   ratio: {ratio:.2f}× fewer "
            f"({1 - plan.total_updates / plan.baseline_total_updates:.1%} saved)"
        )
    if any(p.warmup for p in plan.phases):
        lines.append("w LR warm-up: the LR rises at the base batch (not converted)")
    if any(p.rampup for p in plan.phases):
        lines.append("r batch warm-up: the batch ramps to B0 at the LR of B0")
    lines.append(f"rule {plan.rule}: {RULE_IDENTITIES[plan.rule]}")
    lines += [f"adjustment: {name}: {ADJUSTMENT_NOTES[name]}" for name in plan.adjustments]
    lines += [f"note: {n}" for n in plan.notes]
    lines += [f"warning: {w}" for w in plan.warnings]  # distgrow/core/risk.py
    return "\n".join(lines)


def _max_workers_words(max_workers: int | None, world_size: int) -> str:
    if max_workers is None:
        return f"max_workers: unset → the job's world size ({world_size} here)"
    return f"max_workers: {max_workers} (growth.max_workers)"


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if cfg.growth.max_micro_batch == "auto":
        cfg = _cached_max_micro_batch(cfg)
    if args.workers < 1:
        raise ConfigError(
            f"--workers {args.workers}: the job's world size must be 1 or more. "
            "Fix: give the number of processes the job starts, e.g. --workers 8."
        )
    plan = make_plan(cfg, cfg.expected_train_size(), min_workers=args.workers)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, allow_nan=False))
    else:
        print(format_plan(plan, cfg.growth, world_size=args.workers))
    return 0


def _cached_max_micro_batch(cfg: Config) -> Config:
    """``growth.max_micro_batch: auto`` from the probe cache of this machine's device, when
    there is one (the plan then notes that it assumed no limit)."""
    from distgrow import probe, startup  # torch, only for auto

    try:
        data = startup.load_data(cfg)
    except (OSError, ValueError) as err:  # no data here: plan without the limit (noted)
        print(f"distgrow: growth.max_micro_batch=auto: not resolved ({err})", file=sys.stderr)
        return cfg
    found = probe.cached_limit(cfg, data)
    if found is None:
        return cfg
    limit, path = found
    print(f"distgrow: growth.max_micro_batch=auto → {limit} (probe cache {path})", file=sys.stderr)
    return replace(cfg, growth=replace(cfg.growth, max_micro_batch=limit))


_PROBE_EPILOG = """\
For the config's model, data, loss, optimizer and backend.precision on this machine's device
(run.device), times a few updates at micro-batches from growth.base_batch upward, doubling,
and stops at out-of-memory, at the memory budget (also when the next micro-batch would pass
it), or at the largest global batch the config allows. Prints samples/s and peak memory per
micro-batch (CUDA: peak allocated; CPU: the growth of the process's peak resident set), the
micro-batch where throughput saturates (the smallest within 5% of the best: growth.micro_batch)
and the largest that fits (growth.max_micro_batch). The result is cached per model and device
under ~/.cache/distgrow/probe/; growth.max_micro_batch=auto reads it.

--memory-budget: a fraction of the device's memory (0.8, 80%) or GiB (a number above 1).
Default: 90% of a GPU's memory; on the CPU 50% of the memory available at the start.
"""


def _cmd_probe(args: argparse.Namespace) -> int:
    from distgrow import probe, startup  # torch
    from distgrow.backends import BackendError
    from distgrow.state import TrainError

    cfg = load_config(args.config, args.overrides)
    try:
        if args.memory_budget is not None:
            probe.parse_budget(args.memory_budget)  # a bad budget fails before the data loads
        data = startup.load_data(cfg)
        probe.run_probe(
            cfg,
            data,
            memory_budget=args.memory_budget,
            refresh=args.refresh,
            steps=args.steps,
            warmup=args.warmup,
        )
    except (probe.ProbeError, TrainError, BackendError, ValueError, OSError) as err:
        # ValueError and OSError: a missing or malformed data set; BackendError: run.device.
        print(f"distgrow: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from distgrow.predict.verb import run_estimate  # torch, when it measures

    return run_estimate(args)


def _cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        if args.config is not None or args.overrides:
            raise ConfigError(
                "--schema describes every config, not one: it takes no CONFIG or overrides. "
                "Fix: run `distgrow config --schema` alone."
            )
        print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return 0
    if args.config is None and not args.overrides:
        for key, tp, default, doc in describe_fields():
            print(f"{key} ({tp}, default {default!r}): {doc}")
        return 0
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


_TRAIN_EPILOG = """\
Runs in one process, or as one rank of a job started by torchrun (torchrun -m distgrow train
...), srun, mpirun or deepspeed's launcher: the rank, world size and rendezvous are read from
the launcher's environment. gloo on the CPU, NCCL on CUDA devices (backend.dist_backend).

The run directory (run.output_dir) receives checkpoints (ckpt-<step>.pt), metrics.jsonl,
summary.json and config.yaml. Without --resume a directory that already holds a run is
refused; with --resume the newest checkpoint is continued (at any world size), and a
directory without checkpoints starts a fresh run.

exit status:
  0   trained to run.epochs
  1   unexpected error (traceback printed)
  2   config, data set, run directory or checkpoint problem: nothing was trained
  65  the loss became NaN/inf: the last good checkpoint is kept; lower optim.lr or set
      optim.grad_clip, then --resume
  75  the plan needs more workers than the job has: a checkpoint and resize.json
      (need_workers, have_workers, epoch, step, checkpoint) are in the run directory;
      relaunch with need_workers workers and --resume
  130 stopped by SIGINT, 138 by SIGUSR1 (SLURM's --signal=USR1@N), 143 by SIGTERM: the
      workers finished the update in progress, agreed to stop after the same one, and
      checkpointed that exact point; --resume (at any world size) continues with nothing
      lost or repeated. A second Ctrl-C stops at once, without a checkpoint.
"""


def _cmd_train(args: argparse.Namespace) -> int:
    # Imported here: planning and config printing never load torch.
    from distgrow import startup

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    return startup.run(load_config(args.config, overrides))


def _cmd_launch(args: argparse.Namespace) -> int:
    from distgrow.launch import main_launch

    return main_launch(args.config, list(args.overrides), args.dry_run)


def _cmd_chain(args: argparse.Namespace) -> int:
    from distgrow.launch.slurm_chain import main_chain

    return main_chain(args.action, args.run_dir)


_LAUNCH_EPILOG = """\
For each span of the plan with one worker count, the launcher (launch.launcher: torchrun,
deepspeed, horovodrun, mpirun, srun inside a SLURM allocation; auto picks from the
environment) starts that many `distgrow train` workers. When they exit 75 (more workers
needed) it relaunches wider from the checkpoint; a crash is retried from the last checkpoint up
to launch.max_restarts times. SIGTERM, SIGINT and SIGUSR1 (SLURM pre-emption) are forwarded to
the workers, which checkpoint and exit 128 + the signal's number; a stop by signal is never
followed by a relaunch, and the controller exits with that status (138 requeues the SLURM
template). Each attempt's output goes to <run dir>/launch/attempt-NN-<workers>w.log.
With launch.elastic=true and torchrun, the job grows without a relaunch: torchrun agents of one
worker each join a running rendezvous (logs attempt-NN-agent-K.log). See docs/launch.md.
On SLURM with launch.slurm=chain, each span is its own job sized to its workers (launch.chain):
run outside SLURM, `distgrow launch` submits the first span; each span submits the next, wider
one (afterok) when its workers ask for more. `distgrow chain status|cancel RUN_DIR`; see
slurm/README.md.
"""


_COMPARE_EPILOG = """\
Each variant is a real `distgrow train` of CONFIG with the same overrides, data and seed:
  decay_lr       the baseline: fixed batch, the LR decays
  grow_batch     the batch grows instead (growth.mode=grow_batch)
  hybrid         grow_batch with growth.max_global_batch set to the first grown batch, so the
                 batch stops there and the LR takes the rest of the decay
  grow_batch_lr  start with LR and batch x growth.lr_scale
  grow_momentum  also raise the momentum to growth.momentum
  adaptive       the batch grows x growth.factor when the measured noise scale says so
                 (growth.mode=adaptive; the report plots B_simple against the batch)
Runs go to OUT/runs/<variant>, their output to OUT/logs/<variant>.log; OUT/report.md,
OUT/summary.json and the PNG plots compare them. Running again with the same --out and the
same config reuses finished runs and resumes unfinished ones; runs of another config are
refused (or, with --force, retrained). OUT defaults to reports/<run.name>-<time>.
--seeds 0,1,2 (or --repeats N) trains every variant on every seed (OUT/runs/<variant>-seed<k>):
the report adds each variant's mean and spread, the difference to decay_lr with a 95% interval
paired by seed, and whether it is within 0.5 points (yes / no / cannot tell); seeds.png.
W&B: the runs of one compare share a group (OUT's name), a job type per variant; each gains
savings/measured/..., and a "report" run holds the report's tables and plots.
"""

_FORCE_HELP = "retrain the runs in OUT/runs that were trained with another config (deletes them)"

_SWEEP_EPILOG = """\
Each (batch, lr) pair is `distgrow train CONFIG ... growth.mode=decay_lr growth.base_batch=B
optim.lr=LR` (the batch stays fixed; the config's LR schedule is kept: add
schedule.type=constant for a constant LR, and run.epochs=N to keep it short). Writes
OUT/sweep.png (final loss against batch size, one line per LR), OUT/sweep.md and
OUT/sweep.json; a diverged run is shown as such. OUT defaults to reports/<run.name>-sweep-<time>.
With --seeds (or --repeats) each pair is trained on every seed and shown as mean ± sd.
"""


def _cmd_compare(args: argparse.Namespace) -> int:
    variants = report.parse_list(args.variants, str, "--variants")
    report.compare(
        args.config, args.overrides, variants=variants, out_dir=args.out, force=args.force,
        seeds=_seeds(args),
    )  # fmt: skip
    return 0


def _seeds(args: argparse.Namespace) -> list[int] | None:
    """``--seeds``/``--repeats`` (N seeds from the config's run.seed), or None."""
    first = 0
    if args.repeats is not None:
        first = load_config(args.config, args.overrides).run.seed
    return report.seed_list(args.seeds, args.repeats, first)


def _cmd_report(args: argparse.Namespace) -> int:
    report.report(args.run_dirs, out_dir=args.out, baseline=args.baseline)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    report.sweep(
        args.config,
        args.overrides,
        batch_sizes=report.parse_list(args.batch_sizes, int, "--batch-sizes"),
        lrs=report.parse_list(args.lrs, float, "--lrs"),
        out_dir=args.out,
        force=args.force,
        seeds=_seeds(args),
    )
    return 0


class _AnyOrder(argparse.ArgumentParser):
    """A verb's parser: options and positionals in any order, as argparse users expect
    (``probe CONFIG run.x=1 --memory-budget 0.5`` and ``probe CONFIG --refresh run.x=1``)."""

    _inside = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._inside:  # parse_known_intermixed_args parses in two passes through here
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _seed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seeds",
        metavar="LIST",
        help="train every run on each of these seeds (run.seed), e.g. 0,1,2: the report gives "
        "means, spreads and 95%% intervals paired by seed",
    )
    p.add_argument("--repeats", type=int, metavar="N", help="N seeds from the config's run.seed on")


_Subparsers: TypeAlias = "argparse._SubParsersAction[_AnyOrder]"


def _verb(sub: _Subparsers, name: str, help_: str) -> argparse.ArgumentParser:
    """A verb that reads a config and its dotted overrides."""
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("config", nargs="?" if name == "config" else None, help="a YAML config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    return p


def _add_run_verbs(sub: _Subparsers) -> None:
    """plan, config, train, launch and chain: one run."""

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return _verb(sub, name, help_)

    p = verb("plan", "Print the batch-growth plan of a config against its decay_lr baseline.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="the job's world size: the split of a job of N processes (an unset "
        "growth.max_workers is N; default 1)",
    )
    p.set_defaults(func=_cmd_plan)
    p = verb("config", "Print the resolved config, or every setting with its documentation.")
    p.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON Schema of config files (for editors: save it and point the YAML "
        "language server at it to complete and check configs)",
    )
    p.set_defaults(func=_cmd_config)
    p = verb("train", "Train a config: the growth plan, realised on torch.distributed.")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in run.output_dir (= run.resume=true)",
    )
    p.epilog = _TRAIN_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_train)
    p = verb("launch", "Start the workers each phase of the plan needs, widening as it grows.")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.epilog = _LAUNCH_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_launch)
    help_ = "A launch.slurm=chain run's SLURM jobs: status (sizes, states, held hours) or cancel."
    p = sub.add_parser("chain", help=help_, description=help_)
    p.add_argument("action", choices=("status", "cancel"), help="show the chain, or stop it")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    p.set_defaults(func=_cmd_chain)


def _add_report_verbs(sub: _Subparsers) -> None:
    """compare, report, sweep (runs side by side) and probe."""

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        return _verb(sub, name, help_)

    p = verb("compare", "Train decay_lr, grow_batch and the hybrid side by side; write a report.")
    p.add_argument(
        "--variants",
        default=",".join(report.DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(report.VARIANTS)} (default: %(default)s)",
    )
    p.add_argument("--out", metavar="DIR", help="the report directory")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    _seed_options(p)
    p.epilog = _COMPARE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_compare)

    help_ = "Rebuild a report (report.md, PNG plots, summary.json) from finished runs."
    p = sub.add_parser("report", help=help_, description=help_)
    p.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="finished run directories, or a compare's --out folder (its runs/); runs that "
        "differ only in run.seed are grouped by seed as compare --seeds groups them",
    )
    p.add_argument(
        "--baseline",
        metavar="RUN_DIR",
        help="the decay_lr run to measure savings against (default: the one decay_lr run; "
        "without one, savings are estimated from each run's throughput at B0)",
    )
    p.add_argument("--out", metavar="DIR", help="the report directory")
    p.set_defaults(func=_cmd_report)

    p = verb("sweep", "Final loss over a grid of batch sizes x learning rates (fixed batch).")
    p.add_argument("--batch-sizes", required=True, metavar="LIST", help="e.g. 32,64,128")
    p.add_argument("--lrs", required=True, metavar="LIST", help="e.g. 0.01,0.1")
    p.add_argument("--out", metavar="DIR", help="the sweep directory")
    p.add_argument("--force", action="store_true", help=_FORCE_HELP)
    _seed_options(p)
    p.epilog = _SWEEP_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_sweep)

    p = verb("probe", "Throughput and peak memory against the micro-batch on this device.")
    p.add_argument("--memory-budget", metavar="B", help="fraction (0.8, 80%%) or GiB (12)")
    p.add_argument("--refresh", action="store_true", help="measure again, ignoring the cache")
    p.add_argument("--steps", type=int, default=5, help="timed updates per micro-batch (5)")
    p.add_argument("--warmup", type=int, default=2, help="updates dropped first (2)")
    p.epilog = _PROBE_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(func=_cmd_probe)

    p = verb(
        "estimate", "Predicted wall-clock, worker- and node-hours of decay_lr, grow_batch, hybrid."
    )
    from distgrow.predict.verb import add_arguments as estimate_arguments

    estimate_arguments(p)
    p.set_defaults(func=_cmd_estimate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distgrow",
        description="Don't decay the learning rate, increase the batch size.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_AnyOrder)
    _add_run_verbs(sub)
    _add_report_verbs(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distgrow`` console script and ``python -m distgrow``."""
    # Torch's JIT extensions (DeepSpeed's ops) are built inside this environment, by this
    # process and every one it starts, unless the user chose TORCH_EXTENSIONS_DIR.
    use_environment_cache()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"distgrow: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ReportError as err:
        print(f"distgrow: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
