"""Weights & Biases behind the metrics seam: one W&B run per job, written by rank 0 only.

:func:`open_wandb_logger` returns a :class:`WandbLogger` on rank 0 and a
:class:`~distgrow.metrics.NullLogger` everywhere else, and also (after saying why, once) when
``logging.wandb.mode`` is ``disabled`` (or the environment has ``WANDB_MODE=disabled``, wandb's
own switch), when ``wandb`` is not installed, or when W&B cannot start: training never depends
on W&B.

What W&B receives (and the tests check through a fake ``wandb`` module):

* ``wandb.init`` once, with the run name, project, entity, tags, ``mode`` (``offline`` by
  default: the run is written under ``RUN_DIR/wandb`` and uploaded later with ``wandb sync``),
  ``dir=RUN_DIR``, the resolved config plus the plan as ``config``, and ``id`` with
  ``resume="allow"``. The id is kept in ``RUN_DIR/wandb_run_id.txt``, written before
  ``init``, so a resumed or relaunched job continues the same W&B run.
* ``run.log(metrics, step=updates)``: the step is the global number of parameter updates, so it
  is the same on every rank and never goes back; a record whose step is below one already
  logged (a resume replaying updates after its checkpoint) is not sent again.
  Curves: ``train/loss``, ``val/loss``, ``val/acc``, ``schedule/{global_batch, lr, momentum,
  workers, micro_batch, accum_steps}``, ``noise/*`` (the measured noise scale, when measured:
  docs/noise.md), ``throughput/{samples_per_s,
  samples_per_s_per_worker}``, ``progress/{epoch, samples_seen, wall_s}``, and at each growth
  the finished phase's ``phase/{samples_per_s, samples_per_s_per_worker, global_batch}``.
* ``run.summary.update(...)`` at the end: updates, samples, wall-clock, start-up,
  worker-seconds and -hours, GPU-hours (on GPUs), final metrics, the plan's baseline updates,
  per-phase throughput (``phases/<i>/...``) and the savings with their method
  (``savings/estimated/...``).
* ``run.finish()`` at :meth:`WandbLogger.close`.
* Under ``distgrow compare``: the group and job type from W&B's own ``WANDB_RUN_GROUP`` and
  ``WANDB_JOB_TYPE``, which compare sets per variant; after the report, :func:`log_compare`
  adds ``savings/measured/...`` to each variant's run and writes one ``report`` run with the
  report's tables (``wandb.Table``) and plots (``wandb.Image``).

Secrets never pass through here: W&B reads its key from its own environment or login; the
config holds none, and nothing from the environment is logged.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

from distgrow.config import Config
from distgrow.metrics import Logger, NullLogger
from distgrow.rundir import METRICS_FILE, SUMMARY_FILE, WANDB_RUN_ID_FILE, RunDir
from distgrow.savings import PHASE_MEASURES, SUMMARY_MEASURES

RUN_ID_FILE = WANDB_RUN_ID_FILE
"""The run id's file in the run directory (named by :mod:`distgrow.rundir`)."""

_INSTALL_FIX = (
    "Fix: pip install 'distgrow[wandb]' (or pip install wandb), or set "
    "logging.wandb.mode=disabled to switch W&B off and silence this notice."
)

_shown_notices: set[str] = set()


def notice_once(key: str, text: str, echo: Callable[[str], None]) -> None:
    """Say ``text`` the first time ``key`` comes up in this process."""
    if key not in _shown_notices:
        _shown_notices.add(key)
        echo(text)


def read_or_create_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory; a new one is made and saved on first use.

    Raises:
        ValueError: the file holds something that is not a W&B run id.
    """
    path = RunDir(run_dir).wandb_run_id
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            raise ValueError(
                f"{path} holds {run_id!r}, not a W&B run id (letters, digits, '-', '_'). "
                f"Fix: delete {path} to start a new W&B run, or restore the id."
            )
        return run_id
    run_id = uuid.uuid4().hex[:16]
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


def wandb_config(cfg: Config, plan: Mapping[str, Any] | None) -> dict[str, Any]:
    """The config handed to ``wandb.init``: the resolved config tree, and the plan."""
    config: dict[str, Any] = cfg.to_dict()
    if plan is not None:
        config["plan"] = dict(plan)
    return config


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


_SCHEDULE_KEYS = ("global_batch", "lr", "momentum", "workers", "micro_batch", "accum_steps")


def wandb_metrics(record: Mapping[str, Any], dataset_size: int | None = None) -> dict[str, Any]:
    """The history values logged for one metrics record (empty: nothing to log).

    Args:
        record: A record of ``metrics.jsonl`` (``kind`` step, epoch or event).
        dataset_size: N; with it ``progress/epoch`` is fractional (samples seen / N).
    """
    kind, event = record.get("kind"), record.get("event")
    out: dict[str, Any] = {}
    if kind == "event" and event not in ("growth", "resplit", "end"):
        return out
    if kind == "event" and event == "end":
        phases = record.get("phases") or []
        if phases:  # the last phase's throughput, as the growth events give the others
            out.update(_phase_metrics(phases[-1]))
        return out
    for key in _SCHEDULE_KEYS:
        if _number(record.get(key)):
            out[f"schedule/{key}"] = record[key]
    if kind == "step" and _number(record.get("train_loss")):
        out["train/loss"] = record["train_loss"]
    if kind == "step":  # the measured gradient noise scale (distgrow.noise_meter)
        out.update({k: v for k, v in record.items() if k.startswith("noise/") and _number(v)})
    if kind == "epoch":
        for key, name in (
            ("train_loss", "train/epoch_loss"),
            ("val_loss", "val/loss"),
            ("val_acc", "val/acc"),
            ("epoch_wall_s", "progress/epoch_wall_s"),
        ):
            if _number(record.get(key)):
                out[name] = record[key]
    if kind in ("step", "epoch") and _number(record.get("samples_per_s")):
        rate = float(record["samples_per_s"])
        out["throughput/samples_per_s"] = rate
        workers = record.get("workers")
        if _number(workers) and workers:
            out["throughput/samples_per_s_per_worker"] = rate / float(workers)
    samples = record.get("samples_seen")
    if _number(samples):
        out["progress/samples_seen"] = samples
        if dataset_size:
            out["progress/epoch"] = samples / dataset_size
    if _number(record.get("wall_s")):
        out["progress/wall_s"] = record["wall_s"]
    if kind == "event" and isinstance(record.get("finished_phase"), Mapping):
        out.update(_phase_metrics(record["finished_phase"]))
    return out


def _phase_metrics(phase: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("samples_per_s", "samples_per_s_per_worker", "global_batch"):
        if _number(phase.get(key)):
            out[f"phase/{key}"] = phase[key]
    return out


_SUMMARY_KEYS = (
    *SUMMARY_MEASURES,
    "growth_events",
    "growth_mode",
    "device",
    "planned_total_updates",
    "baseline_total_updates",
    "update_ratio_vs_baseline",
)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif value is not None and not isinstance(value, list | tuple):
        out[prefix] = value


def wandb_summary(end: Mapping[str, Any]) -> dict[str, Any]:
    """The run summary set from the ``end`` record (the contents of ``summary.json``)."""
    out: dict[str, Any] = {k: end[k] for k in _SUMMARY_KEYS if end.get(k) is not None}
    for key in ("val_acc", "val_loss", "train_loss"):
        if end.get(key) is not None:
            out[f"final/{key}"] = end[key]
    for phase in end.get("phases") or []:
        index = phase.get("index", 0)
        for key in PHASE_MEASURES:
            if phase.get(key) is not None:
                out[f"phases/{index}/{key}"] = phase[key]
    savings = end.get("savings")
    if isinstance(savings, Mapping):
        _flatten("savings", savings, out)
    held = end.get("held")
    if isinstance(held, Mapping) and held:
        # What the SLURM jobs held (allocated CPU/GPU-hours), beside the worker-hours used.
        _flatten("held", held, out)
        for job in held.get("jobs") or []:
            _flatten(f"held/jobs/{job.get('index', 0)}", job, out)
    return out


class WandbLogger:
    """A :class:`~distgrow.metrics.Logger` that writes one W&B run (build it on rank 0 only).

    Args:
        wandb: The imported ``wandb`` module (a fake one in tests).
        cfg: The resolved config.
        run_dir: The run directory (holds the run id file and, offline, the W&B files).
        plan: The plan as JSON (``Plan.to_json()``), logged with the config.
    """

    def __init__(
        self, wandb: Any, cfg: Config, run_dir: Path, plan: Mapping[str, Any] | None = None
    ) -> None:
        w = cfg.logging.wandb
        self.run_id = read_or_create_run_id(run_dir)
        self.dataset_size = int(plan["dataset_size"]) if plan else None
        self.run = wandb.init(
            project=w.project,
            entity=w.entity,
            name=cfg.run.name,
            tags=list(w.tags),
            # W&B's own variables, set by `distgrow compare` for each variant; passed on
            # explicitly because wandb reads its environment once per process.
            group=os.environ.get("WANDB_RUN_GROUP") or None,
            job_type=os.environ.get("WANDB_JOB_TYPE") or None,
            config=wandb_config(cfg, plan),
            id=self.run_id,
            resume="allow",
            mode=w.mode,
            dir=str(run_dir),
        )
        # A resumed W&B run already holds steps up to run.step; W&B refuses lower ones.
        resumed = bool(getattr(self.run, "resumed", False))
        start = getattr(self.run, "step", 0) if resumed else 0
        self.last_step = int(start) if _number(start) else 0
        self.skipped = 0
        self._finished = False

    def log(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "event" and record.get("event") in ("start", "resume"):
            if _number(record.get("world_size")):
                self.run.summary.update({"world_size": record["world_size"]})
            return
        if record.get("kind") == "event" and record.get("event") == "end":
            self.run.summary.update(wandb_summary(record))
        metrics = wandb_metrics(record, self.dataset_size)
        step = record.get("step")
        if not metrics or not _number(step):
            return
        if step < self.last_step:
            self.skipped += 1  # already in the W&B run from before the resume
            return
        self.run.log(metrics, step=int(step))
        self.last_step = int(step)

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self.run.finish()


def open_wandb_logger(
    cfg: Config,
    run_dir: Path,
    *,
    rank: int,
    plan: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> Logger:
    """The W&B logger of this process: a real one on rank 0, a null one elsewhere.

    Args:
        cfg: The resolved config (``logging.wandb``).
        run_dir: The run directory.
        rank: This process's global rank; only rank 0 touches W&B.
        plan: The plan as JSON, logged with the config.
        echo: Where the one-time notices go (rank 0's console).

    Returns:
        A :class:`WandbLogger`, or a :class:`~distgrow.metrics.NullLogger` after a notice
        saying why (disabled, not installed, or W&B failed to start).
    """
    if rank != 0:
        return NullLogger()
    mode = cfg.logging.wandb.mode
    # WANDB_MODE=disabled is wandb's own switch for a whole environment (CI, test suites);
    # wandb.init ignores it when a mode is passed, so it is honoured here.
    env_off = os.environ.get("WANDB_MODE") == "disabled"
    if mode == "disabled" or env_off:
        why = "WANDB_MODE=disabled in the environment" if env_off else "logging.wandb.mode=disabled"
        notice_once(
            "disabled",
            f"distgrow: W&B logging is off ({why}); {METRICS_FILE} and {SUMMARY_FILE} are "
            "written as always.",
            echo,
        )
        return NullLogger()
    try:
        import wandb
    except ImportError:
        notice_once(
            "missing",
            f"distgrow: wandb is not installed, so this run is not logged to W&B "
            f"(logging.wandb.mode={mode}); everything else works. {_INSTALL_FIX}",
            echo,
        )
        return NullLogger()
    try:
        logger = WandbLogger(wandb, cfg, run_dir, plan)
    except Exception as err:  # W&B must never stop training: say why and go on without it
        fix = (
            "Fix: run `wandb login` or set WANDB_API_KEY, or use logging.wandb.mode=offline "
            "(sync later with `wandb sync`)."
            if mode == "online"
            else "Fix: check the W&B error above, or set logging.wandb.mode=disabled."
        )
        notice_once(
            "failed",
            f"distgrow: W&B could not start in mode {mode} ({type(err).__name__}: {err}); "
            f"training goes on without W&B. {fix}",
            echo,
        )
        return NullLogger()
    where = (
        f"{run_dir / 'wandb'} (upload later: wandb sync {run_dir / 'wandb'}/offline-run-*)"
        if mode == "offline"
        else f"project {cfg.logging.wandb.project}"
    )
    echo(f"distgrow: W&B run {logger.run_id} ({mode}) in {where}")
    return logger


# --------------------------------------------------------------------------------------------
# What ``distgrow compare`` measured, added to the runs it trained
# --------------------------------------------------------------------------------------------


def measured_summary(
    measured: Mapping[str, Any] | None,
    difference: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The summary keys a compare adds to one variant's W&B run.

    Args:
        measured: The run's measured savings against the baseline of its seed
            (:meth:`distgrow.savings.Savings.to_dict`), or None (the baseline itself).
        difference: With several seeds, the variant's paired difference to the baseline
            (:func:`distgrow.report.seeds.seed_section`): mean, 95% interval, verdict.
        seed: The run's seed, when the compare trained several.

    Returns:
        ``savings/measured/<key>`` for each measured number and the method,
        ``savings/measured/seeds/<key>`` for the difference over the seeds, ``compare/seed``.
    """
    out: dict[str, Any] = {}
    for key, value in (measured or {}).items():
        if _number(value) or (isinstance(value, str) and key in ("method", "kind")):
            out[f"savings/measured/{key}"] = value
    for key in (
        *("n", "mean", "low", "high", "updates_ratio_mean", "verdict", "better_is"),
        *("wall_ratio_mean", "wall_ratio_low", "wall_ratio_high"),
    ):
        value = (difference or {}).get(key)
        if _number(value) or isinstance(value, str):
            out[f"savings/measured/seeds/{key}"] = value
    if seed is not None:
        out["compare/seed"] = seed
    return out


def _compare_runs(summary: Mapping[str, Any]) -> list[tuple[Path, str, dict[str, Any]]]:
    """(run directory, variant, summary keys) of every run a compare report covers."""
    seeds = summary.get("seeds")
    if not seeds:
        return [
            (Path(row["run_dir"]), str(row["label"]), measured_summary(row.get("measured")))
            for row in summary["runs"]
        ]
    return [
        (
            Path(r["run_dir"]),
            str(v["label"]),
            measured_summary(r.get("measured"), v.get("difference"), r["seed"]),
        )
        for v in seeds["variants"]
        for r in v["per_seed"]
    ]


_TABLE_COLUMNS = (
    "label", "growth_mode", "val_acc", "val_loss", "total_updates", "wall_s", "worker_seconds",
)  # fmt: skip
_SEED_COLUMNS = ("variant", "seed", "final", "updates", "difference_mean", "low", "high", "verdict")


def report_tables(summary: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """The report's tables as (columns, rows) for ``wandb.Table``: ``runs`` (the main
    table, with the measured ratios) and, with several seeds, ``seeds`` (one row per run)."""
    ratios = ("updates_ratio", "wall_ratio", "worker_seconds_ratio", "metric_delta")
    runs = [
        [row.get(k) for k in _TABLE_COLUMNS] + [(row.get("measured") or {}).get(k) for k in ratios]
        for row in summary["runs"]
    ]
    tables = {"runs": ([*_TABLE_COLUMNS, *ratios], runs)}
    seeds = summary.get("seeds")
    if seeds:
        rows = []
        for v in seeds["variants"]:
            d = v.get("difference") or {}
            for r in v["per_seed"]:
                rows.append(
                    [v["label"], r["seed"], r.get(seeds["metric"]), r.get("updates"),
                     d.get("mean"), d.get("low"), d.get("high"), d.get("verdict")]
                )  # fmt: skip
        tables["seeds"] = (list(_SEED_COLUMNS), rows)
    return tables


def log_compare(
    cfg: Config,
    summary: Mapping[str, Any],
    out: Path,
    *,
    echo: Callable[[str], None] = print,
    wandb: Any = None,
) -> bool:
    """Add what a compare measured to W&B (same mode as the runs: offline by default).

    Each variant's run (found by the id in its run directory; runs trained without W&B are
    left alone) gains ``savings/measured/...`` (:func:`measured_summary`), in the compare's
    group with its variant as job type; one more run of that group (job type ``report``,
    ``dir=OUT``) holds the report's tables as ``wandb.Table`` and its plots as
    ``wandb.Image``. Like training, a compare never fails because of W&B: off, missing or
    failing, it says why once and returns False.

    Args:
        cfg: The compare's resolved config (``logging.wandb``, ``run.name``).
        summary: The report's ``summary.json`` (:func:`distgrow.report.build_report`).
        out: The report directory.
        echo: Where the notices go.
        wandb: The ``wandb`` module (imported when None).
    """
    w = cfg.logging.wandb
    if w.mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return False
    if wandb is None:
        try:
            import wandb
        except ImportError:
            notice_once("missing", f"distgrow: wandb is not installed. {_INSTALL_FIX}", echo)
            return False
    try:
        _log_compare(wandb, cfg, summary, out)
    except Exception as err:  # the report is written: W&B must not turn it into a failure
        notice_once(
            "compare",
            f"distgrow: W&B could not record the compare ({type(err).__name__}: {err}); "
            f"the report in {out} is complete. Fix: check the W&B error, or set "
            "logging.wandb.mode=disabled.",
            echo,
        )
        return False
    echo(f"distgrow: W&B group {out.resolve().name} ({w.mode}): measured savings and the report")
    return True


def _log_compare(wandb: Any, cfg: Config, summary: Mapping[str, Any], out: Path) -> None:
    w = cfg.logging.wandb
    group = out.resolve().name
    common = {"project": w.project, "entity": w.entity, "mode": w.mode, "group": group}
    for run_dir, variant, keys in _compare_runs(summary):
        if not RunDir(run_dir).wandb_run_id.is_file():
            continue  # trained without W&B: nothing to add to
        run = wandb.init(
            id=read_or_create_run_id(run_dir), resume="allow", dir=str(run_dir),
            job_type=variant, **common,
        )  # fmt: skip
        run.summary.update(keys)
        run.finish()
    run = wandb.init(
        id=read_or_create_run_id(out), resume="allow", dir=str(out), job_type="report",
        name=f"{cfg.run.name}-report", tags=list(w.tags),
        config={"command": summary.get("command"), "metric": summary.get("metric"),
                "baseline": summary.get("baseline")},
        **common,
    )  # fmt: skip
    data: dict[str, Any] = {
        f"report/{name}": wandb.Table(columns=columns, data=rows)
        for name, (columns, rows) in report_tables(summary).items()
    }
    for key, file in (summary.get("plots") or {}).items():
        if (out / file).is_file():
            data[f"plots/{key}"] = wandb.Image(str(out / file), caption=key)
    run.log(data)
    run.finish()
