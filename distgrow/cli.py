"""The ``distgrow`` command: a few verbs, each taking a config file and dotted overrides.

    distgrow plan CONFIG [key=value ...] [--json]
    distgrow config [CONFIG] [key=value ...]      the resolved config, or every key documented
    distgrow train CONFIG [key=value ...] [--resume]

Errors in the config are printed as one line naming the key, the value and the fix, with exit
status 2 (the same as a usage error), before anything runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from distgrow.config import ConfigError, describe_fields, dump_config, load_config
from distgrow.planner import Plan, make_plan

EXIT_USAGE = 2


def _fmt_epoch(x: float) -> str:
    if math.isnan(x):
        return "-"
    return str(int(x)) if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def _fmt_lr(lr: float, lr_end: float) -> str:
    if math.isclose(lr, lr_end, rel_tol=1e-9):
        return f"{lr:.4g}"
    return f"{lr:.4g}→{lr_end:.4g}"


def format_plan(plan: Plan) -> str:
    """A readable table of the plan's phases and the totals against the baseline."""
    first = "rung" if plan.ladder else "epochs"
    updates = "updates/epoch" if plan.ladder else "updates"
    header = [first, "batch", "workers", "micro", "accum", "lr", "momentum", "noise", updates]
    rows = []
    for p in plan.phases:
        where = (
            str(p.rung) if plan.ladder else f"{_fmt_epoch(p.start_epoch)}–{_fmt_epoch(p.end_epoch)}"
        )
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
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"plan: growth.mode={plan.mode}, schedule={plan.schedule}, N={plan.dataset_size:,}, "
        f"epochs={plan.epochs}, B0={plan.base_batch}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if any(p.capped for p in plan.phases):
        lines.append("* batch capped: the learning rate carries the rest of the decay (hybrid)")
    if plan.total_updates is not None and plan.baseline_total_updates is not None:
        ratio = plan.update_ratio or math.nan
        lines.append(
            f"total updates: {plan.total_updates:,}   decay_lr baseline: "
            f"{plan.baseline_total_updates:,}   ratio: {ratio:.2f}× fewer "
            f"({1 - plan.total_updates / plan.baseline_total_updates:.1%} saved)"
        )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, cfg.data.expected_train_size())
    if args.json:
        print(json.dumps(plan.to_json(), indent=2, allow_nan=False))
    else:
        print(format_plan(plan))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
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
"""


def _cmd_train(args: argparse.Namespace) -> int:
    # Imported here: planning and config printing never load torch.
    from distgrow import trainer

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    return trainer.run(load_config(args.config, overrides))


def _cmd_launch(args: argparse.Namespace) -> int:
    from distgrow.launch import main_launch

    return main_launch(args.config, list(args.overrides), args.dry_run)


_LAUNCH_EPILOG = """\
For each span of the plan with one worker count, the launcher (launch.launcher: torchrun,
deepspeed, horovodrun, mpirun, srun inside a SLURM allocation; auto picks from the
environment) starts that many `distgrow train` workers. When they exit 75 (more workers
needed) it relaunches wider from the checkpoint; a crash is retried from the last checkpoint up
to launch.max_restarts times. SIGTERM, SIGINT and SIGUSR1 (SLURM pre-emption) are forwarded to
the workers and never followed by a relaunch. Each attempt's output goes to
<run dir>/launch/attempt-NN-<workers>w.log.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distgrow",
        description="Don't decay the learning rate, increase the batch size.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("config", nargs="?" if name == "config" else None, help="a YAML config")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
        return p

    p = verb("plan", "Print the batch-growth plan of a config against its decay_lr baseline.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_plan)
    p = verb("config", "Print the resolved config, or every setting with its documentation.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``distgrow`` console script and ``python -m distgrow``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"distgrow: config error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
