"""``distgrow compare``, ``distgrow report`` and ``distgrow sweep``: the verbs that train runs
side by side (each a real ``distgrow train`` process, run by :func:`distgrow.launch.run_subprocess`
in :mod:`distgrow.report.training`) and hand the finished run directories to
:func:`~distgrow.report.render.build_report`.

A run directory under ``OUT/runs/`` is reused (finished) or resumed (unfinished) only when the
config it was trained with equals the one this command resolves; anything else is refused,
naming the difference, unless ``force`` retrains it.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from distgrow.config import Config, ConfigError, load_config
from distgrow.exits import EXIT_NONFINITE
from distgrow.planner import make_plan
from distgrow.report.render import (
    REPORT_FILE,
    build_report,
    report_title,
)
from distgrow.report.runs import (
    ReportError,
    RunData,
    load_run,
    read_summary,
)
from distgrow.report.seeds import group_by_seed
from distgrow.report.sweep import SWEEP_FILES, write_sweep
from distgrow.report.training import (
    Echo,
    check_reuse,
    discard,
    disk_failure,
    stopped_error,
    train_process,
    writing,
)
from distgrow.rundir import RunDir
from distgrow.wandb_logger import log_compare

VARIANTS = ("decay_lr", "grow_batch", "hybrid", "grow_batch_lr", "grow_momentum", "adaptive")
"""What ``compare`` can train; ``hybrid`` is ``grow_batch`` with a cap that binds; ``adaptive``
grows when the measured noise scale says so (``growth.mode=adaptive``)."""
DEFAULT_VARIANTS = ("decay_lr", "grow_batch", "hybrid")


def default_report_dir(name: str, kind: str = "") -> Path:
    """``reports/<name>[-<kind>]-<YYYYmmdd-HHMMSS>`` under the current directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("reports") / "-".join(part for part in (name, kind, stamp) if part)


def hybrid_cap(cfg: Config, dataset_size: int) -> int:
    """A ``growth.max_global_batch`` that makes ``grow_batch`` fall back to LR decay.

    Piecewise schedules: the first grown batch of the uncapped plan when the plan grows at
    least twice (the paper's hybrid: 128 → 640, then the LR); with a single growth, a cap
    between the two batches. Continuous schedules (exponential, time-based, cosine), whose
    batch grows a little at many updates: the grown batch nearest the geometric middle of the
    uncapped path, so the batch carries about half the decay (in log scale) and the LR the rest.

    Raises:
        ReportError: the plan never grows (a constant schedule), so there is no hybrid.
    """
    from dataclasses import replace

    from distgrow.planner import GrowthPolicy

    grow = replace(cfg, growth=replace(cfg.growth, mode="grow_batch"))
    plan = make_plan(grow, dataset_size)
    batches = sorted({p.global_batch for p in plan.phases})
    if len(batches) < 2:
        raise ReportError(
            f"the grow_batch plan of this config never grows the batch (it stays at "
            f"{batches[0] if batches else '?'}), so a hybrid cannot be formed. Fix: use a "
            "decaying schedule, or leave hybrid out of --variants."
        )
    schedule = GrowthPolicy(grow, dataset_size).schedule
    candidates = []
    if schedule is not None and schedule.continuous and len(batches) >= 3:
        middle = math.sqrt(batches[0] * batches[-1])
        candidates.append(min(batches[1:-1], key=lambda b: abs(math.log(b / middle))))
    elif len(batches) >= 3:
        candidates.append(batches[1])
    candidates.append((batches[0] + batches[1]) // 2)
    for cap in candidates:
        capped = replace(grow, growth=replace(grow.growth, max_global_batch=cap))
        if any(p.capped for p in make_plan(capped, dataset_size).phases):
            return cap
    raise ReportError(
        f"no cap between {batches[0]} and {batches[1]} forces the fall-back to LR decay for "
        "this config. Fix: leave hybrid out of --variants."
    )


def variant_overrides(cfg: Config, variant: str, dataset_size: int) -> list[str]:
    """The dotted overrides that turn the base config into ``variant``.

    Raises:
        ReportError: an unknown variant, or a hybrid the plan cannot form.
    """
    if variant not in VARIANTS:
        raise ReportError(
            f"unknown variant {variant!r}. Fix: use some of {', '.join(VARIANTS)} "
            "(comma-separated)."
        )
    if variant == "hybrid":
        return [
            "growth.mode=grow_batch",
            f"growth.max_global_batch={hybrid_cap(cfg, dataset_size)}",
        ]
    return [f"growth.mode={variant}"]


def parse_list(text: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    """``"32,64,128"`` → ``[32, 64, 128]``; errors name the bad item.

    Raises:
        ReportError: an empty list or an item that does not parse.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ReportError(f"{what} is empty. Fix: give a comma-separated list, e.g. 32,64,128.")
    out = []
    for item in items:
        try:
            out.append(kind(item))
        except ValueError:
            raise ReportError(
                f"{what}: {item!r} is not a {kind.__name__}. Fix: e.g. 32,64,128 or 0.01,0.1."
            ) from None
    return out


# --------------------------------------------------------------------------------------------
# Running a training
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The verbs
# --------------------------------------------------------------------------------------------


def seed_list(seeds: str | None, repeats: int | None, first: int) -> list[int] | None:
    """The seeds of ``--seeds 0,1,2`` or ``--repeats N`` (N seeds from ``first``, the
    config's ``run.seed``); None when neither is given (one run per variant, as before).

    Raises:
        ReportError: both given, a seed listed twice, or fewer than one repeat.
    """
    if seeds is not None and repeats is not None:
        raise ReportError(
            f"--seeds {seeds} and --repeats {repeats} both say which seeds to train. "
            "Fix: give one of them."
        )
    if repeats is not None:
        if repeats < 1:
            raise ReportError(f"--repeats {repeats} must be >= 1. Fix: e.g. --repeats 3.")
        return [first + i for i in range(repeats)]
    if seeds is None:
        return None
    chosen = parse_list(seeds, int, "--seeds")
    if len(set(chosen)) != len(chosen):
        raise ReportError(f"--seeds lists one twice ({seeds}). Fix: once each, e.g. 0,1,2.")
    return chosen


def _run_name(variant: str, seed: int | None) -> str:
    """``OUT/runs/<name>``: the variant, and ``-seed<k>`` when several seeds are trained."""
    return variant if seed is None else f"{variant}-seed{seed}"


def _resolve_compare(
    config: str | Path,
    overrides: Sequence[str],
    cfg: Config,
    plan_overrides: Mapping[str, list[str]],
    seeds: Sequence[int] | None,
    out: Path,
) -> list[tuple[str, str, int | None, RunDir, Config, list[str]]]:
    """Every (variant, seed) run: its name, directory, resolved config and overrides.

    Raises:
        ConfigError: a variant's config is invalid (before anything runs).
    """
    resolved = []
    for variant, extra in plan_overrides.items():
        for seed in seeds if seeds is not None else [None]:
            name = _run_name(variant, seed)
            run_overrides = [
                *overrides,
                *extra,
                *([f"run.seed={seed}"] if seed is not None else []),
                f"run.name={cfg.run.name}-{name}",
            ]
            run_dir = RunDir(out / "runs" / name)
            try:
                run_cfg = load_config(config, [*run_overrides, f"run.output_dir={run_dir}"])
            except ConfigError as err:
                raise ConfigError(f"variant {variant} ({' '.join(extra)}): {err}") from err
            resolved.append((name, variant, seed, run_dir, run_cfg, run_overrides))
    return resolved


def compare(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    out_dir: str | Path | None = None,
    force: bool = False,
    seeds: Sequence[int] | None = None,
    echo: Echo = print,
    python: str = sys.executable,
) -> Path:
    """Train each variant on the same config and data (and seeds), then write the report.

    Args:
        config: The YAML config.
        overrides: Dotted overrides applied to every variant.
        variants: Some of :data:`VARIANTS`, in table order.
        out_dir: The report directory (default :func:`default_report_dir`); runs go to
            ``OUT/runs/<variant>``, their output to ``OUT/logs/<variant>.log``. Running again
            with the same directory and config reuses finished runs and resumes unfinished ones.
        force: Retrain the runs in ``OUT/runs`` that were trained with another config (they
            are deleted first); without it such a directory is refused.
        seeds: Train every variant on each of these seeds (``run.seed``), in
            ``OUT/runs/<variant>-seed<k>``; the report adds each variant's mean and spread, the
            difference to the baseline with its 95% interval paired by seed, and a verdict.
            None: one run per variant on the config's seed.
        echo: Where progress lines go (the trainings' own output goes to the terminal).
        python: The interpreter that runs ``-m distgrow train``.

    Returns:
        The report directory.

    Raises:
        ConfigError: the config or a variant's config is invalid (before anything runs).
        ReportError: a bad variant list, runs of another config in ``OUT`` (without
            ``force``), or a training that failed (exit_code 1) or was stopped by a signal.
    """
    cfg = load_config(config, overrides)
    if not variants:
        raise ReportError(f"no variants given. Fix: e.g. --variants {','.join(DEFAULT_VARIANTS)}.")
    if len(set(variants)) != len(variants):
        raise ReportError(f"--variants lists one twice ({','.join(variants)}). Fix: once each.")
    n = cfg.expected_train_size()
    plan_overrides = {v: variant_overrides(cfg, v, n) for v in variants}
    out = Path(out_dir) if out_dir is not None else default_report_dir(cfg.run.name)
    resolved = _resolve_compare(config, overrides, cfg, plan_overrides, seeds, out)
    stale = check_reuse([(r[0], r[3], r[4]) for r in resolved], force=force, verb="compare")
    made_out = not out.exists()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    on = "" if seeds is None else f" × seeds {','.join(map(str, seeds))}"
    echo(f"distgrow compare: {', '.join(variants)}{on} on {config}; report in {out}")
    for name, variant, _, run_dir, _, run_overrides in resolved:
        # One W&B group per compare, a job type per variant: wandb.init reads them from its
        # own variables, so they label the runs without entering the config reuse compares.
        env = {"WANDB_RUN_GROUP": out.resolve().name, "WANDB_JOB_TYPE": variant}
        _train_one(config, name, run_dir, run_overrides, stale, out, made_out, echo, python, env)
    groups: dict[str, dict[int, RunData]] = {}
    for _, variant, seed, run_dir, _, _ in resolved:
        groups.setdefault(variant, {})[cfg.run.seed if seed is None else seed] = load_run(
            run_dir.path, variant
        )
    command = shlex.join(
        ["distgrow", "compare", str(config), *overrides, "--variants", ",".join(variants)]
        + (["--seeds", ",".join(map(str, seeds))] if seeds is not None else [])
    )
    summary = build_report(
        [next(iter(runs.values())) for runs in groups.values()],
        out,
        title=cfg.run.name,
        command=command,
        notes=_hybrid_note(plan_overrides),
        seed_runs=groups if seeds is not None else None,
    )
    echo(f"distgrow compare: report written to {out / REPORT_FILE}")
    log_compare(cfg, summary, out, echo=echo)
    return out


def _hybrid_note(plan_overrides: Mapping[str, list[str]]) -> list[str]:
    if "hybrid" not in plan_overrides:
        return []
    cap = plan_overrides["hybrid"][1].split("=", 1)[1]
    return [
        f"hybrid = grow_batch with growth.max_global_batch={cap}: the batch stops there and "
        "the learning rate carries the rest of the decay"
    ]


def _run_child(
    config: str | Path,
    name: str,
    what: str,
    run_dir: RunDir,
    run_overrides: list[str],
    stale: Mapping[str, list[str]],
    out: Path,
    made_out: bool,
    echo: Echo,
    python: str,
    env: Mapping[str, str] | None = None,
) -> tuple[int, Path]:
    """Train (or reuse, or resume) one run of a compare or sweep as a child process.

    A signal or a full disk ends the whole verb (:class:`ReportError`); otherwise the child's
    exit status and its log are returned for the caller to judge.
    """
    log = out / "logs" / f"{name}.log"
    with writing(out):
        if name in stale:
            discard(run_dir, log, stale[name], f"[{name}]", echo)
        outcome = train_process(
            config, run_overrides, run_dir, log, prefix=f"[{name}]", echo=echo, python=python,
            env=env,
        )  # fmt: skip
    if outcome.signal is not None:
        raise stopped_error(outcome, what, log, out)
    full = disk_failure(outcome, what, log, run_dir, out, made_out)
    if full is not None:
        raise full
    return outcome.returncode, log


def _train_one(
    config: str | Path,
    name: str,
    run_dir: RunDir,
    run_overrides: list[str],
    stale: Mapping[str, list[str]],
    out: Path,
    made_out: bool,
    echo: Echo,
    python: str,
    env: Mapping[str, str],
) -> None:
    """Train (or reuse, or resume) one compare run; a failure is one :class:`ReportError`."""
    code, log = _run_child(
        config, name, f"the {name} run", run_dir, run_overrides, stale, out, made_out, echo,
        python, env,
    )  # fmt: skip
    if code != 0:
        raise ReportError(
            f"the {name} run failed with exit status {code}; its output "
            f"is in {log}. Fix the cause, then rerun the same command with --out {out}: "
            "finished runs are reused, this one resumes.",
            exit_code=1,
        )


def report(
    run_dirs: Sequence[str | Path],
    *,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
    echo: Echo = print,
) -> Path:
    """Rebuild a report from finished run directories (``distgrow report``).

    A ``compare`` output folder stands for the runs in its ``runs/``. Runs whose configs differ
    only in ``run.seed`` (and name and folder) are seeds of one variant and are grouped as
    ``compare --seeds`` groups them (:func:`~distgrow.report.seeds.group_by_seed`): the tables
    show each variant's lowest seed and the *Seeds* section the mean, spread and paired 95%
    interval over all of them. One run per variant gives the report as before.

    Raises:
        ReportError: a directory is not a finished run, or the baseline is ambiguous.
    """
    paths = [run for p in run_dirs for run in _compare_runs(Path(p))]
    names = [p.resolve().name for p in paths]
    # Two runs named alike (two "grow_batch" folders of different reports) get their parent's
    # name in front so that the table and the legends tell them apart.
    labels = [
        n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}"
        for p, n in zip(paths, names, strict=True)
    ]
    runs = [load_run(p, label) for p, label in zip(paths, labels, strict=True)]
    groups, why_not = group_by_seed(runs)
    # A run's label (or folder) names its variant once the runs are grouped by seed.
    label_of = {r.label: r.label for r in runs}
    if groups is not None:
        variant_at = {run.path: v for v, seeds in groups.items() for run in seeds.values()}
        label_of = {r.label: variant_at[r.path] for r in runs}
    base_label = None
    if baseline is not None:
        wanted = Path(baseline).resolve()
        match = [label_of[r.label] for r in runs if r.path.resolve() == wanted]
        base_label = match[0] if match else label_of.get(baseline, baseline)
    out = Path(out_dir) if out_dir is not None else default_report_dir(report_title(runs), "report")
    command = shlex.join(["distgrow", "report", *map(str, run_dirs)])
    if groups is not None:
        seeds = sorted({s for g in groups.values() for s in g})
        echo(
            f"distgrow report: {len(runs)} runs are {len(groups)} variant(s) × seeds "
            f"{', '.join(map(str, seeds))}: grouped by seed as compare --seeds groups them"
        )
        firsts = [next(iter(g.values())) for g in groups.values()]
        build_report(firsts, out, baseline=base_label, command=command, seed_runs=groups)
    else:
        notes = [why_not] if why_not else []
        build_report(runs, out, baseline=base_label, command=command, notes=notes)
    echo(f"distgrow report: written to {out / REPORT_FILE}")
    return out


def _compare_runs(path: Path) -> list[Path]:
    """``[path]``, or for a ``compare`` output folder (``runs/`` and no run of its own) the run
    folders in ``runs/``, the variants in :data:`VARIANTS` order."""
    runs = path / "runs"
    if not runs.is_dir() or RunDir(path).config.is_file():
        return [path]

    def order(run: Path) -> tuple[int, str]:
        variant = re.sub(r"-seed-?\d+$", "", run.name)
        return (VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS), run.name)

    found = sorted((p for p in runs.iterdir() if p.is_dir()), key=order)
    if not found:
        raise ReportError(
            f"{runs} holds no run folders. Fix: give the finished run directories themselves."
        )
    return found


# --------------------------------------------------------------------------------------------
# Sweep: batch size × learning rate
# --------------------------------------------------------------------------------------------


def _sweep_name(batch: int, lr: float, seed: int | None = None) -> str:
    name = "b{}_lr{}".format(batch, re.sub(r"[^0-9a-zA-Z.-]", "_", f"{lr:g}"))
    return name if seed is None else f"{name}-seed{seed}"


_SweepPoint = tuple[int, float, int | None]


def _resolve_sweep(
    config: str | Path,
    overrides: Sequence[str],
    cfg: Config,
    points: Sequence[_SweepPoint],
    out: Path,
) -> list[tuple[str, RunDir, Config, list[str]]]:
    """Every sweep run: its name, directory, resolved config and overrides.

    Raises:
        ConfigError: a point's config is invalid (before anything runs).
    """
    resolved = []
    for b, lr, seed in points:
        name = _sweep_name(b, lr, seed)
        run_overrides = [
            *overrides,
            "growth.mode=decay_lr",
            f"growth.base_batch={b}",
            f"optim.lr={lr!r}",
            "growth.max_global_batch=null",
            *([f"run.seed={seed}"] if seed is not None else []),
            f"run.name={cfg.run.name}-{name}",
        ]
        run_dir = RunDir(out / "runs" / name)
        try:
            run_cfg = load_config(config, [*run_overrides, f"run.output_dir={run_dir}"])
        except ConfigError as err:
            raise ConfigError(f"sweep point batch {b}, lr {lr:g}: {err}") from err
        resolved.append((name, run_dir, run_cfg, run_overrides))
    return resolved


def sweep(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    batch_sizes: Sequence[int],
    lrs: Sequence[float],
    out_dir: str | Path | None = None,
    force: bool = False,
    seeds: Sequence[int] | None = None,
    echo: Echo = print,
    python: str = sys.executable,
) -> Path:
    """Train every (batch size, LR) pair at a fixed batch and plot the final losses.

    Each run is ``distgrow train CONFIG OVERRIDES growth.mode=decay_lr growth.base_batch=B
    optim.lr=LR growth.max_global_batch=null`` (the config's schedule is kept: add
    ``schedule.type=constant`` for seed 003's constant-LR question, and ``run.epochs=...`` to
    keep it short). A run whose loss diverges is recorded as diverged, not as a failure.
    Runs in ``OUT/runs`` are reused as :func:`compare` reuses them (same config only; ``force``
    retrains the others). With ``seeds``, every pair is trained on each seed
    (``OUT/runs/b<B>_lr<LR>-seed<k>``) and the sweep shows each pair's mean ± standard
    deviation over the seeds that completed.

    Returns:
        The sweep directory (``sweep.png``, ``sweep.md``, ``sweep.json``, ``runs/``, ``logs/``).

    Raises:
        ConfigError: a pair's config is invalid (checked for all before anything runs).
        ReportError: empty grids, runs of another config in ``OUT`` (without ``force``), runs
            that failed for another reason than divergence, or a signal that stopped one.
    """
    if not batch_sizes or not lrs:
        raise ReportError("the sweep needs --batch-sizes and --lrs. Fix: e.g. 32,64 and 0.01,0.1.")
    cfg = load_config(config, overrides)
    each: list[int | None] = list(seeds) if seeds is not None else [None]
    points = [(b, lr, s) for b in batch_sizes for lr in lrs for s in each]
    out = Path(out_dir) if out_dir is not None else default_report_dir(cfg.run.name, "sweep")
    resolved = _resolve_sweep(config, overrides, cfg, points, out)
    stale = check_reuse([r[:3] for r in resolved], force=force, verb="sweep")
    made_out = not out.exists()
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    on = "" if seeds is None else f" × {len(seeds)} seeds"
    echo(
        f"distgrow sweep: {len(points)} runs ({len(batch_sizes)} batch sizes × {len(lrs)} LRs{on})"
    )
    results = []
    failed = []
    for (b, lr, seed), (name, run_dir, _, run_overrides) in zip(points, resolved, strict=True):
        row = _sweep_run(config, name, run_dir, run_overrides, stale, out, made_out, echo, python)
        row = {"batch": b, "lr": lr, **({"seed": seed} if seed is not None else {}), **row}
        if row["status"] == "failed":
            what = f"batch {b}, lr {lr:g}" + ("" if seed is None else f", seed {seed}")
            failed.append(f"{what} (exit {row['exit_code']}, log {out / 'logs' / name}.log)")
        results.append(row)
    command = ["distgrow", "sweep", str(config), *overrides,
               "--batch-sizes", ",".join(map(str, batch_sizes)),
               "--lrs", ",".join(f"{lr:g}" for lr in lrs)]  # fmt: skip
    command += ["--seeds", ",".join(map(str, seeds))] if seeds is not None else []
    write_sweep(results, batch_sizes, lrs, out, command=shlex.join(command))
    echo(f"distgrow sweep: written to {out / SWEEP_FILES['markdown']}")
    if failed:
        raise ReportError(
            f"{len(failed)} sweep run(s) failed: {'; '.join(failed)}. The sweep files show the "
            f"others. Fix the cause and rerun with --out {out}: finished runs are reused.",
            exit_code=1,
        )
    return out


def _sweep_run(
    config: str | Path,
    name: str,
    run_dir: RunDir,
    run_overrides: list[str],
    stale: Mapping[str, list[str]],
    out: Path,
    made_out: bool,
    echo: Echo,
    python: str,
) -> dict[str, Any]:
    """Train (or reuse) one sweep run; its result row (completed, diverged or failed)."""
    code, _ = _run_child(
        config, name, f"the sweep run {name}", run_dir, run_overrides, stale, out, made_out,
        echo, python,
    )  # fmt: skip
    row: dict[str, Any] = {"run_dir": str(run_dir), "exit_code": code}
    if code == 0:
        s = read_summary(run_dir)
        row.update(
            status="completed",
            train_loss=s.train_loss,
            val_loss=s.val_loss,
            val_acc=s.val_acc,
            total_updates=s.total_updates,
            wall_s=s.wall_s,
        )
    elif code == EXIT_NONFINITE:
        row.update(status="diverged", train_loss=None, val_loss=None, val_acc=None)
    else:
        row.update(status="failed", train_loss=None, val_loss=None, val_acc=None)
    return row
