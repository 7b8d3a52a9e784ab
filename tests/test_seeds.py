"""Several seeds: the interval arithmetic against hand-computed numbers, the report's Seeds
section and plot from made-up runs, ``compare --seeds``/``--repeats`` and ``sweep --seeds``
with a stand-in for the trainings, and the measured savings handed to W&B through a fake
``wandb`` module (no network)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_report import BASE, FakeExecutor, fake_run, mask, read_png, rgb

from distgrow import plots, wandb_logger
from distgrow.config import dump_config, load_config
from distgrow.launch import Outcome
from distgrow.report import (
    ReportError,
    build_report,
    compare,
    load_run,
    report,
    seed_list,
    training,
    verbs,
)
from distgrow.report.seeds import group_by_seed, mean_interval, t_975, verdict

SEEDS = [0, 1, 2]
ACC = {
    "decay_lr": [0.90, 0.91, 0.92],
    "grow_batch": [0.905, 0.912, 0.921],  # +0.5, +0.2, +0.1 points
    "hybrid": [0.89, 0.905, 0.90],  # -1.0, -0.5, -2.0 points
}
WALL = {"decay_lr": 60.0, "grow_batch": 30.0, "hybrid": 40.0}
VARIANT_OVERRIDES = {
    "decay_lr": ["growth.mode=decay_lr"],
    "grow_batch": ["growth.mode=grow_batch"],
    "hybrid": ["growth.mode=grow_batch", "growth.max_global_batch=250"],
}


# --- the arithmetic ------------------------------------------------------------------------


def test_t_quantiles_match_the_table_and_the_expansion() -> None:
    assert t_975(1) == 12.706 and t_975(2) == 4.303 and t_975(30) == 2.042
    # Exact values: t(0.975; 40) = 2.0211, t(0.975; 120) = 1.9799.
    assert t_975(40) == pytest.approx(2.0211, abs=1e-3)
    assert t_975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        t_975(0)


def test_mean_interval_is_the_student_t_interval() -> None:
    mean, low, high = mean_interval([1.0, 2.0, 3.0])  # sd 1, n 3
    half = 4.303 / math.sqrt(3)
    assert (mean, low, high) == (2.0, pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert mean_interval([5.0]) == (5.0, None, None)


def test_verdict_says_yes_no_or_cannot_tell() -> None:
    tol = 0.005
    assert (
        verdict(-0.004, 0.01, tol, "val_acc", 3)
        == "within 0.5 points of the baseline: yes (3 seeds)"
    )
    assert (
        verdict(-0.03, -0.006, tol, "val_acc", 3)
        == "within 0.5 points of the baseline: no (3 seeds)"
    )
    assert (
        verdict(-0.03, 0.007, tol, "val_acc", 3)
        == "within 0.5 points of the baseline: cannot tell with 3 seeds"
    )
    assert "cannot tell with 1 seed (an interval needs two or more)" in verdict(
        None, None, tol, "val_acc", 1
    )
    assert verdict(-0.01, 0.0, 0.02, "val_loss", 2).startswith("within 0.02 in loss")


def test_seed_list_from_seeds_or_repeats() -> None:
    assert seed_list("0,1,2", None, 0) == [0, 1, 2]
    assert seed_list(None, 3, 7) == [7, 8, 9]
    assert seed_list(None, None, 0) is None
    with pytest.raises(ReportError, match="--seeds 0,1 and --repeats 2 both"):
        seed_list("0,1", 2, 0)
    with pytest.raises(ReportError, match="--seeds lists one twice"):
        seed_list("0,0", None, 0)
    with pytest.raises(ReportError, match="--repeats 0 must be >= 1"):
        seed_list(None, 0, 0)


# --- the report ----------------------------------------------------------------------------


def seeded_runs(root: Path, skip: tuple[str, int] | None = None) -> None:
    """OUT/runs/<variant>-seed<k> as ``compare --seeds 0,1,2`` leaves them (made up)."""
    for variant, accs in ACC.items():
        for seed, acc in zip(SEEDS, accs, strict=True):
            if (variant, seed) == skip:
                continue
            name = f"{variant}-seed{seed}"
            overrides = [
                *VARIANT_OVERRIDES[variant],
                f"run.seed={seed}",
                f"run.name=toy-{name}",
                f"run.output_dir={root / name}",
            ]
            fake_run(root, name, overrides, wall_s=WALL[variant], final_acc=acc)


def groups(root: Path) -> dict[str, dict[int, Any]]:
    return {v: {s: load_run(root / f"{v}-seed{s}", v) for s in SEEDS} for v in ("decay_lr", *ACC)}


def test_the_report_gives_means_spreads_paired_intervals_and_verdicts(tmp_path: Path) -> None:
    seeded_runs(tmp_path / "runs")
    g = groups(tmp_path / "runs")
    first = [g[v][0] for v in ACC]
    summary = build_report(first, tmp_path / "report", seed_runs=g)
    seeds = json.loads((tmp_path / "report" / "summary.json").read_text())["seeds"]
    assert seeds == json.loads(json.dumps(summary["seeds"]))
    assert seeds["seeds"] == SEEDS and seeds["baseline"] == "decay_lr"
    by = {v["label"]: v for v in seeds["variants"]}
    assert by["grow_batch"]["mean"] == pytest.approx(statistics.fmean(ACC["grow_batch"]))
    assert by["grow_batch"]["std"] == pytest.approx(statistics.stdev(ACC["grow_batch"]))
    # Paired by seed: +0.5, +0.2, +0.1 points; mean 0.2667, sd 0.2082; t(2) = 4.303.
    d = by["grow_batch"]["difference"]
    assert d["per_seed"] == pytest.approx([0.005, 0.002, 0.001])
    assert d["mean"] == pytest.approx(0.0026667, abs=1e-7)
    assert (d["low"], d["high"]) == (
        pytest.approx(-0.002505, abs=1e-6),
        pytest.approx(0.007838, abs=1e-6),
    )
    assert d["verdict"] == "within 0.5 points of the baseline: yes (3 seeds)"
    # Made-up runs: 60 s against 30 s on every seed, so 2.00× with no spread.
    assert (d["wall_ratio_mean"], d["wall_ratio_low"], d["wall_ratio_high"]) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0),
    )  # fmt: skip
    h = by["hybrid"]["difference"]
    assert (h["low"], h["high"]) == (
        pytest.approx(-0.030642, abs=1e-6),
        pytest.approx(0.007308, abs=1e-6),
    )
    assert h["verdict"] == "within 0.5 points of the baseline: cannot tell with 3 seeds"
    assert "difference" not in by["decay_lr"]
    # Measured savings per seed, against the baseline of the same seed.
    base_updates = g["decay_lr"][1].summary.total_updates
    row = by["grow_batch"]["per_seed"][1]
    assert row["measured"]["updates_ratio"] == pytest.approx(
        base_updates / g["grow_batch"][1].summary.total_updates
    )
    assert row["measured"]["updates_ratio"] > 1.5
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Seeds" in md and "seeds 0, 1, 2" in md
    assert (
        "| grow_batch | 3 | 91.27% ± 0.80 pp | 496 | 2.42× fewer | 2.00× faster [2.00×, 2.00×] |"
        in md
    )
    assert (
        "+0.27 pp [-0.25 pp, +0.78 pp] | within 0.5 points of the baseline: yes (3 seeds) |" in md
    )
    assert "cannot tell with 3 seeds" in md
    assert "the **Seeds** section gives all 3 seeds" in md
    assert "![final val acc of each seed" in md


def test_the_seed_plot_draws_every_seed_where_its_value_is(tmp_path: Path) -> None:
    points = [plots.SeedPoints(v, SEEDS, accs, plots.COLOURS[v]) for v, accs in ACC.items()]
    fig = plots.plot_seeds(points, "val_acc", tmp_path / "seeds.png")
    image = read_png(tmp_path / "seeds.png")
    ax = fig.axes[0]
    height = fig.canvas.get_width_height()[1]
    for i, (v, accs) in enumerate(ACC.items()):
        assert mask(image, plots.COLOURS[v]).sum() > 50, v
        for acc in accs:
            px, py = ax.transData.transform((i, acc))
            row, col = round(float(height - py)), round(float(px))
            window = image[row - 2 : row + 3, col - 2 : col + 3]
            assert (abs(window - rgb(plots.COLOURS[v])) < 0.1).all(axis=-1).any(), (v, acc)


# --- compare --seeds -----------------------------------------------------------------------


def test_compare_with_seeds_trains_what_is_missing_and_reuses_the_rest(
    tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "cmp"
    seeded_runs(out / "runs", skip=("hybrid", 2))
    monkeypatch.setattr(verbs, "hybrid_cap", lambda cfg, n: 250)

    class Trains(FakeExecutor):
        def __init__(self, outcome: Outcome) -> None:
            super().__init__(outcome)
            self.envs: list[dict[str, str]] = []

        def __call__(self, argv: list[str], *args: Any, **kwargs: Any) -> Outcome:
            self.envs.append(args[0])
            outcome = super().__call__(argv, *args, **kwargs)
            overrides = [a for a in argv[4:] if "=" in a]
            run_dir = Path(dict(a.split("=", 1) for a in overrides)["run.output_dir"])
            fake_run(run_dir.parent, run_dir.name, overrides, wall_s=40.0, final_acc=0.90)
            return outcome

    executor = Trains(Outcome(0))
    monkeypatch.setattr(training, "run_subprocess", executor)
    lines: list[str] = []
    compare(config, out_dir=out, seeds=SEEDS, echo=lines.append)
    assert len(executor.argvs) == 1  # only hybrid on seed 2 was missing
    argv = executor.argvs[0]
    assert "run.seed=2" in argv and "run.name=toy-hybrid-seed2" in argv
    # W&B's own variables put the run in the compare's group, with its variant as job type.
    assert executor.envs[0]["WANDB_RUN_GROUP"] == "cmp"
    assert executor.envs[0]["WANDB_JOB_TYPE"] == "hybrid"
    assert sum("already finished" in line for line in lines) == 8
    data = json.loads((out / "summary.json").read_text())
    assert data["command"].endswith("--seeds 0,1,2")
    assert [r["run_dir"] for r in data["runs"]] == [str(out / "runs" / f"{v}-seed0") for v in ACC]
    hybrid = next(v for v in data["seeds"]["variants"] if v["label"] == "hybrid")
    assert [r[data["metric"]] for r in hybrid["per_seed"]] == [0.89, 0.905, 0.90]
    assert (out / "seeds.png").is_file() and data["plots"]["seeds"] == "seeds.png"


def test_the_cli_takes_seeds_and_repeats(
    tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from distgrow.cli import main

    config = config_writer(yaml.safe_load(dump_config(load_config(None, [*BASE, "run.seed=5"]))))
    import distgrow.report as report

    seen: list[Any] = []
    monkeypatch.setattr(report, "compare", lambda *a, **k: seen.append(k["seeds"]))
    monkeypatch.setattr(report, "sweep", lambda *a, **k: seen.append(k["seeds"]))
    assert main(["compare", str(config), "--repeats", "3"]) == 0
    assert main(["compare", str(config), "--seeds", "0,4"]) == 0
    assert main(["compare", str(config)]) == 0
    assert (
        main(["sweep", str(config), "--batch-sizes", "32", "--lrs", "0.1", "--seeds", "1,2"]) == 0
    )
    assert seen == [[5, 6, 7], [0, 4], None, [1, 2]]
    assert main(["compare", str(config), "--seeds", "1,1"]) == 2
    assert "--seeds lists one twice (1,1)" in capsys.readouterr().err


FAKE_TRAIN = """#!/usr/bin/env python3
# Stands in for `python -m distgrow train`: the final loss encodes the batch, LR and seed;
# seed 1 at lr 1 diverges (exit 65).
import json, pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[4:] if "=" in a)
lr, batch, seed = float(args["optim.lr"]), int(args["growth.base_batch"]), int(args["run.seed"])
if lr == 1.0 and seed == 1:
    print("loss is nan"); sys.exit(65)
out = pathlib.Path(args["run.output_dir"]); out.mkdir(parents=True)
loss = batch / 100 + lr + seed / 10
(out / "summary.json").write_text(json.dumps({"status": "completed", "train_loss": loss,
    "val_loss": loss + 0.1, "val_acc": None, "total_updates": 1000 // batch, "wall_s": 1.0,
    "epochs": 1, "samples_seen": 1000, "worker_seconds": 1.0, "world_size": 1,
    "growth_mode": "decay_lr", "base_batch": batch, "dataset_size": 1000}))
"""


def test_sweep_with_seeds_shows_mean_and_spread(tmp_path: Path, config_writer: Any) -> None:
    import stat

    from distgrow.report import sweep

    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "sweep"
    sweep(config, batch_sizes=[32], lrs=[0.1, 1.0], out_dir=out, seeds=[0, 1, 2],
          echo=lambda _: None, python=str(fake))  # fmt: skip
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "b32_lr0.1-seed0", "b32_lr0.1-seed1", "b32_lr0.1-seed2",
        "b32_lr1-seed0", "b32_lr1-seed2",
    ]  # fmt: skip  # seed 1 at lr 1 diverged before writing anything
    data = json.loads((out / "sweep.json").read_text())
    means = {(m["batch"], m["lr"]): m for m in data["means"]}
    # val loss = 0.32 + lr + seed/10 + 0.1: seeds 0,1,2 → mean +0.1, sd 0.1.
    assert means[(32, 0.1)]["val_loss"] == pytest.approx(0.62)
    assert means[(32, 0.1)]["val_loss_std"] == pytest.approx(0.1)
    assert means[(32, 1.0)]["completed"] == 2 and means[(32, 1.0)]["val_loss"] == pytest.approx(
        1.52
    )
    assert data["best"] == {"batch": 32, "lr": 0.1, "val_loss": pytest.approx(0.62)}
    md = (out / "sweep.md").read_text()
    assert "| 32 | 0.6200 ± 0.1000 | 1.5200 ± 0.1414 (2 of 3 seeds;" in md


# --- W&B -----------------------------------------------------------------------------------


class FakeRun:
    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []
        self.finished = 0

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.logged.append(data)

    def finish(self) -> None:
        self.finished += 1


class FakeWandb(types.ModuleType):
    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.runs: list[FakeRun] = []
        self.fail = fail

    def init(self, **kwargs: Any) -> FakeRun:
        self.inits.append(kwargs)
        if self.fail is not None:
            raise self.fail
        self.runs.append(FakeRun())
        return self.runs[-1]

    class Table:
        def __init__(self, columns: list[str], data: list[list[Any]]) -> None:
            self.columns, self.data = columns, data

    class Image:
        def __init__(self, path: str, caption: str | None = None) -> None:
            self.path, self.caption = path, caption


def test_each_variant_run_gains_the_measured_savings_and_the_report_is_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seeded_runs(tmp_path / "runs")
    g = groups(tmp_path / "runs")
    out = tmp_path / "cmp-1"
    summary = build_report([g[v][0] for v in ACC], out, seed_runs=g)
    ids = {}
    for v in ACC:
        for s in SEEDS:
            if (v, s) != ("hybrid", 1):  # trained without W&B: left alone
                ids[(v, s)] = wandb_logger.read_or_create_run_id(tmp_path / "runs" / f"{v}-seed{s}")
    fake = FakeWandb()
    cfg = load_config(None, BASE)
    assert wandb_logger.log_compare(cfg, summary, out, wandb=fake, echo=lambda _: None)
    assert len(fake.inits) == 8 + 1
    by_id = {i["id"]: (i, r) for i, r in zip(fake.inits, fake.runs, strict=True)}
    init, run = by_id[ids[("grow_batch", 2)]]
    assert (init["group"], init["job_type"], init["mode"], init["resume"]) == (
        "cmp-1", "grow_batch", "offline", "allow",
    )  # fmt: skip
    base = g["decay_lr"][2].summary
    mine = g["grow_batch"][2].summary
    assert run.summary["savings/measured/updates_ratio"] == pytest.approx(
        base.total_updates / mine.total_updates
    )
    assert run.summary["savings/measured/wall_ratio"] == pytest.approx(60.0 / 30.0)
    assert run.summary["savings/measured/metric_delta"] == pytest.approx(0.921 - 0.92)
    assert run.summary["savings/measured/seeds/verdict"] == (
        "within 0.5 points of the baseline: yes (3 seeds)"
    )
    assert run.summary["savings/measured/seeds/low"] == pytest.approx(-0.002505, abs=1e-6)
    assert run.summary["savings/measured/seeds/wall_ratio_mean"] == pytest.approx(2.0)
    assert run.summary["compare/seed"] == 2 and run.finished == 1
    _, base_run = by_id[ids[("decay_lr", 0)]]
    assert not any(k.startswith("savings/measured/updates") for k in base_run.summary)
    # The report's own run: the tables and every plot.
    report_init, report_run = fake.inits[-1], fake.runs[-1]
    assert report_init["job_type"] == "report" and report_init["dir"] == str(out)
    assert report_init["id"] == (out / "wandb_run_id.txt").read_text().strip()
    (logged,) = report_run.logged
    table = logged["report/runs"]
    assert [row[0] for row in table.data] == list(ACC)
    assert table.data[1][table.columns.index("updates_ratio")] == pytest.approx(
        summary["runs"][1]["measured"]["updates_ratio"]
    )
    seeds_table = logged["report/seeds"]
    assert len(seeds_table.data) == 9 and seeds_table.columns[:3] == ["variant", "seed", "final"]
    images = {k: v.path for k, v in logged.items() if k.startswith("plots/")}
    assert images["plots/seeds"] == str(out / "seeds.png")
    assert set(images) == {f"plots/{k}" for k in summary["plots"]}


def test_w_and_b_off_or_failing_never_fails_the_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wandb_logger, "_shown_notices", set())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    summary: dict[str, Any] = {
        "runs": [],
        "plots": {},
        "command": "x",
        "metric": "val_acc",
        "baseline": None,
    }
    fake = FakeWandb()
    off = load_config(None, [*BASE, "logging.wandb.mode=disabled"])
    assert not wandb_logger.log_compare(off, summary, tmp_path, wandb=fake)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not wandb_logger.log_compare(load_config(None, BASE), summary, tmp_path, wandb=fake)
    assert fake.inits == []
    monkeypatch.delenv("WANDB_MODE")
    lines: list[str] = []
    failing = FakeWandb(fail=RuntimeError("no disk"))
    assert not wandb_logger.log_compare(
        load_config(None, BASE), summary, tmp_path, wandb=failing, echo=lines.append
    )
    assert len(lines) == 1 and "RuntimeError: no disk" in lines[0] and "is complete" in lines[0]


@pytest.mark.integration
def test_real_wandb_offline_groups_the_runs_and_takes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real wandb, offline: a variant's training run lands in the group compare names
    through W&B's own variables, and log_compare resumes it and writes the report's run."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    root = tmp_path / "runs"
    for v in ("decay_lr", "grow_batch"):
        fake_run(root, v, VARIANT_OVERRIDES[v], wall_s=WALL[v], final_acc=ACC[v][0])
    monkeypatch.setenv("WANDB_RUN_GROUP", "cmp-1")
    monkeypatch.setenv("WANDB_JOB_TYPE", "grow_batch")
    cfg = load_config(None, BASE)
    logger = wandb_logger.WandbLogger(wandb, cfg, root / "grow_batch")
    try:
        assert (logger.run.group, logger.run.job_type) == ("cmp-1", "grow_batch")
    finally:
        logger.close()
    monkeypatch.delenv("WANDB_RUN_GROUP")
    monkeypatch.delenv("WANDB_JOB_TYPE")
    runs = [load_run(root / v, v) for v in ("decay_lr", "grow_batch")]
    out = tmp_path / "cmp-1"
    summary = build_report(runs, out)
    lines: list[str] = []
    assert wandb_logger.log_compare(cfg, summary, out, echo=lines.append), lines
    report_id = (out / "wandb_run_id.txt").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{report_id}")), "no offline report run"
    run_id = (root / "grow_batch" / "wandb_run_id.txt").read_text().strip()
    assert len(list((root / "grow_batch" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_the_training_run_takes_the_group_and_job_type_compare_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeWandb()
    cfg = load_config(None, BASE)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    monkeypatch.delenv("WANDB_JOB_TYPE", raising=False)
    wandb_logger.WandbLogger(fake, cfg, tmp_path / "alone")
    monkeypatch.setenv("WANDB_RUN_GROUP", "cmp-1")
    monkeypatch.setenv("WANDB_JOB_TYPE", "hybrid")
    wandb_logger.WandbLogger(fake, cfg, tmp_path / "in-compare")
    assert [(i["group"], i["job_type"]) for i in fake.inits] == [(None, None), ("cmp-1", "hybrid")]


@pytest.mark.integration
def test_compare_trains_every_variant_on_every_seed_for_real(
    tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_report import TINY

    monkeypatch.chdir(tmp_path)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, TINY))))
    out = tmp_path / "cmp"
    lines: list[str] = []
    compare(config, variants=["decay_lr", "grow_batch"], seeds=[0, 1], out_dir=out,
            echo=lines.append, python=sys.executable)  # fmt: skip
    finals, walls = {}, {}
    for v in ("decay_lr", "grow_batch"):
        for s in (0, 1):
            run_dir = out / "runs" / f"{v}-seed{s}"
            assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"] == s
            run_summary = json.loads((run_dir / "summary.json").read_text())
            finals[(v, s)], walls[(v, s)] = run_summary["val_acc"], run_summary["wall_s"]
    assert finals[("decay_lr", 0)] != finals[("decay_lr", 1)]  # the seed did change the run
    seeds = json.loads((out / "summary.json").read_text())["seeds"]
    grow = next(v for v in seeds["variants"] if v["label"] == "grow_batch")
    assert [r["val_acc"] for r in grow["per_seed"]] == [finals[("grow_batch", s)] for s in (0, 1)]
    assert [r["updates"] for r in grow["per_seed"]] == [70, 70]
    diffs = [finals[("grow_batch", s)] - finals[("decay_lr", s)] for s in (0, 1)]
    d = grow["difference"]
    assert d["mean"] == pytest.approx(statistics.fmean(diffs))
    half = 12.706 * statistics.stdev(diffs) / math.sqrt(2)  # t(0.975; 1 degree of freedom)
    assert (d["low"], d["high"]) == (
        pytest.approx(d["mean"] - half),
        pytest.approx(d["mean"] + half),
    )
    assert d["updates_ratio_mean"] == pytest.approx(120 / 70)
    ratios = [walls[("decay_lr", s)] / walls[("grow_batch", s)] for s in (0, 1)]
    assert d["wall_ratio_mean"] == pytest.approx(statistics.fmean(ratios))
    assert d["verdict"].startswith("within 0.5 points of the baseline:")
    assert read_png(out / "seeds.png").std() > 0.05
    # distgrow report over the compare's folder, later, gives the same Seeds section.
    later = report([out], out_dir=tmp_path / "later", echo=lambda _: None)
    assert json.loads((later / "summary.json").read_text())["seeds"] == seeds
    again: list[str] = []
    compare(config, variants=["decay_lr", "grow_batch"], seeds=[0, 1], out_dir=out,
            echo=again.append)  # fmt: skip
    assert sum("already finished" in line for line in again) == 4


# --- distgrow report over seeded runs ------------------------------------------------------

TWO_BY_THREE = {"decay_lr": [0.88, 0.90, 0.93], "grow_batch": [0.87, 0.905, 0.92]}


def two_variants_three_seeds(root: Path) -> list[Path]:
    """``compare --variants decay_lr,grow_batch --seeds 0,1,2`` as it leaves its runs (made up),
    seed-major, so that a variant's seeds are not next to each other."""
    made = []
    for seed in SEEDS:
        for variant, accs in TWO_BY_THREE.items():
            name = f"{variant}-seed{seed}"
            overrides = [
                *VARIANT_OVERRIDES[variant],
                f"run.seed={seed}",
                f"run.name=toy-{name}",
                f"run.output_dir={root / name}",
            ]
            made.append(fake_run(root, name, overrides, wall_s=WALL[variant], final_acc=accs[seed]))
    return made


def test_report_groups_the_runs_of_a_seeded_compare_by_variant(tmp_path: Path) -> None:
    runs = two_variants_three_seeds(tmp_path / "cmp" / "runs")
    lines: list[str] = []
    out = report(runs, out_dir=tmp_path / "again", echo=lines.append)
    data = json.loads((out / "summary.json").read_text())
    # One row per variant in the tables (its lowest seed), named as compare names it.
    assert [r["label"] for r in data["runs"]] == ["decay_lr", "grow_batch"]
    assert [r["run_dir"] for r in data["runs"]] == [str(runs[0]), str(runs[1])]
    assert data["baseline"] == "decay_lr"
    section = data["seeds"]
    assert section["seeds"] == SEEDS and section["baseline"] == "decay_lr"
    by = {v["label"]: v for v in section["variants"]}
    assert list(by) == ["decay_lr", "grow_batch"]
    for variant, accs in TWO_BY_THREE.items():
        assert by[variant]["n"] == 3
        assert by[variant]["mean"] == pytest.approx(sum(accs) / 3)
        assert [r["val_acc"] for r in by[variant]["per_seed"]] == accs
    # Paired by seed: -1.0, +0.5, -1.0 points.
    grow, decay = TWO_BY_THREE["grow_batch"], TWO_BY_THREE["decay_lr"]
    diffs = [g - d for g, d in zip(grow, decay, strict=True)]
    assert by["grow_batch"]["difference"]["mean"] == pytest.approx(sum(diffs) / 3)
    md = (out / "report.md").read_text()
    mean = sum(TWO_BY_THREE["grow_batch"]) / 3
    assert f"| grow_batch | 3 | {mean * 100:.2f}% ± " in md
    assert "the **Seeds** section gives all 3 seeds" in md
    assert lines[0] == (
        "distgrow report: 6 runs are 2 variant(s) × seeds 0, 1, 2: grouped by seed as compare "
        "--seeds groups them"
    )
    # The same numbers and text as the report compare itself writes over these runs.
    g = {v: {s: load_run(tmp_path / "cmp" / "runs" / f"{v}-seed{s}", v) for s in SEEDS}
         for v in TWO_BY_THREE}  # fmt: skip
    compared = build_report(
        [g[v][0] for v in g], tmp_path / "cmp", seed_runs=g, command=data["command"]
    )
    assert section == json.loads(json.dumps(compared["seeds"]))
    seeds_md = md[md.index("## Seeds") : md.index("## ", md.index("## Seeds") + 3)]
    assert seeds_md in (tmp_path / "cmp" / "report.md").read_text()
    # The compare's output folder stands for its runs; the baseline may be any of its seeds.
    out2 = report([tmp_path / "cmp"], out_dir=tmp_path / "folder", baseline=str(runs[2]))
    folder = json.loads((out2 / "summary.json").read_text())
    assert folder["seeds"] == section and folder["baseline"] == "decay_lr"


def test_report_of_one_seed_per_variant_or_repeated_seeds_is_not_grouped(
    tmp_path: Path,
) -> None:
    runs = two_variants_three_seeds(tmp_path / "runs")
    one_seed = [runs[2], runs[3]]  # decay_lr-seed1, grow_batch-seed1
    out = report(one_seed, out_dir=tmp_path / "one", echo=lambda _: None)
    data = json.loads((out / "summary.json").read_text())
    # The report as it was before runs were grouped: build_report over the runs themselves.
    before = build_report(
        [load_run(p) for p in one_seed], tmp_path / "before", command=data["command"]
    )
    assert "seeds" not in data and data["notes"] == before["notes"]
    assert [r["label"] for r in data["runs"]] == ["decay_lr-seed1", "grow_batch-seed1"]
    md = (out / "report.md").read_text()
    assert md == (tmp_path / "before" / "report.md").read_text() and "## Seeds" not in md
    # A second copy of a run (same config and seed) leaves the seeds unknown: not grouped.
    copy = tmp_path / "copy" / "grow_batch-seed2"
    shutil.copytree(runs[5], copy)
    out = report([*runs[:4], runs[5], copy], out_dir=tmp_path / "dup", baseline=str(runs[0]))
    data = json.loads((out / "summary.json").read_text())
    assert "seeds" not in data and len(data["runs"]) == 6
    assert data["notes"][0] == (
        f"not grouped by seed: {runs[5]} and {copy} have the same config and seed 2; each run "
        "is shown on its own"
    )


def test_group_by_seed_keeps_single_seeds_and_refuses_an_unknown_seed(tmp_path: Path) -> None:
    runs = [load_run(p) for p in two_variants_three_seeds(tmp_path / "runs")]
    # grow_batch on seed 1 only: its group has n = 1, decay_lr keeps its three seeds.
    groups, why_not = group_by_seed([runs[4], runs[3], runs[0], runs[2]])  # seed-major order
    assert why_not is None and groups is not None
    assert {v: list(g) for v, g in groups.items()} == {"decay_lr": [0, 1, 2], "grow_batch": [1]}
    assert groups["grow_batch"][1].path == runs[3].path
    # A run whose config.yaml is gone has no known seed: nothing is grouped, and the note says why.
    runs[3].config = {}
    groups, why_not = group_by_seed(runs)
    assert groups is None
    assert why_not == (
        f"not grouped by seed: {runs[3].path} has no run.seed in its config.yaml, so its seed "
        "is unknown; each run is shown on its own"
    )
