"""Reports: the numbers in summary.json and report.md against the runs they come from, and
the PNGs opened and looked at (size, content, where each schedule's line is)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from distgrow import plots
from distgrow.config import dump_config, load_config
from distgrow.launch import Outcome
from distgrow.planner import make_plan
from distgrow.report import (
    PLOT_FILES,
    ReportError,
    build_report,
    compare,
    config_mismatch,
    hybrid_cap,
    load_run,
    parse_list,
    report,
    run_curve,
    schedule_path,
    sweep,
    training,
    variant_overrides,
    write_sweep,
)
from distgrow.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent
N = 10_000
EPOCHS = 6
BASE = [
    "run.name=toy",
    f"run.epochs={EPOCHS}",
    "data.name=synthetic_classification",
    f"data.synthetic_samples={N + 2500}",  # val_fraction 0.2 leaves N to train
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "schedule.type=multistep",
    "schedule.milestones=[2, 4]",
    "schedule.gamma=0.2",
    "growth.base_batch=50",
    "growth.max_dataset_fraction=null",
]
BLUE, RED, GREEN = (plots.COLOURS[k] for k in ("decay_lr", "grow_batch", "hybrid"))


def fake_run(
    root: Path,
    label: str,
    overrides: list[str],
    *,
    wall_s: float,
    final_acc: float,
    startup_s: float = 1.5,
) -> Path:
    """A finished run directory as the trainer writes it, with made-up timings and accuracy:
    the updates, batches and LRs follow the real plan of the config."""
    cfg = load_config(None, [*BASE, *overrides])
    plan = make_plan(cfg, N)
    run_dir = root / label
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    per_epoch_s = wall_s / EPOCHS
    records: list[dict[str, Any]] = [{"kind": "event", "event": "start", "epoch": 1, "step": 0}]
    step = 0
    phases: list[dict[str, Any]] = []
    for epoch in range(EPOCHS):
        s = make_plan_setting(plan, epoch)
        if not phases or phases[-1]["global_batch"] != s["global_batch"]:
            if phases:
                records.append(
                    {
                        "kind": "event",
                        "event": "growth",
                        "step": step,
                        "samples_seen": epoch * N,
                        **s,
                    }
                )
            phases.append(
                {
                    "index": len(phases),
                    "start_epoch": float(epoch),
                    "start_step": step,
                    "workers": 1,
                    "micro_batch": s["global_batch"],
                    "accum_steps": 1,
                    "lr": s["lr"],
                    "momentum": 0.9,
                    "world_size": 1,
                    "updates": 0,
                    "samples": 0,
                    "train_s": 0.0,
                    "wall_s": 0.0,
                    "worker_seconds": 0.0,
                    "global_batch": s["global_batch"],
                }
            )
        updates = math.ceil(N / s["global_batch"])
        step += updates
        ph = phases[-1]
        ph["updates"] += updates
        ph["samples"] += N
        ph["train_s"] += per_epoch_s * 0.8
        ph["wall_s"] += per_epoch_s
        ph["worker_seconds"] += per_epoch_s
        # Accuracy rises to final_acc along the same path per epoch for every schedule.
        acc = final_acc - 0.3 * (EPOCHS - 1 - epoch) / EPOCHS
        records.append(
            {
                "kind": "epoch",
                "epoch": epoch + 1,
                "step": step,
                "samples_seen": (epoch + 1) * N,
                "wall_s": per_epoch_s * (epoch + 1),
                "train_loss": 1 - acc,
                "val_loss": 1.1 - acc,
                "val_acc": acc,
                **s,
            }
        )
    for ph in phases:
        ph["samples_per_s"] = ph["samples"] / ph["train_s"]
        ph["samples_per_s_per_worker"] = ph["samples_per_s"]
    summary = {
        "status": "completed",
        "epochs": EPOCHS,
        "total_updates": step,
        "samples_seen": N * EPOCHS,
        "train_loss": 1 - final_acc,
        "val_loss": 1.1 - final_acc,
        "val_acc": final_acc,
        "wall_s": wall_s,
        "startup_s": startup_s,
        "train_s": wall_s * 0.8,
        "worker_seconds": wall_s,
        "worker_hours": wall_s / 3600,
        "world_size": 1,
        "growth_mode": cfg.growth.mode,
        "base_batch": 50,
        "dataset_size": N,
        "baseline_total_updates": plan.baseline_total_updates,
        "final_setting": {"global_batch": phases[-1]["global_batch"]},
        "phases": phases,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def make_plan_setting(plan: Any, epoch: int) -> dict[str, Any]:
    phase = next(p for p in plan.phases if p.start_epoch <= epoch < p.end_epoch)
    return {
        "global_batch": phase.global_batch,
        "lr": phase.lr,
        "workers": 1,
        "micro_batch": phase.global_batch,
        "accum_steps": 1,
        "momentum": 0.9,
    }


@pytest.fixture
def three_runs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "runs"
    return [
        fake_run(root, "decay_lr", ["growth.mode=decay_lr"], wall_s=60.0, final_acc=0.90),
        fake_run(root, "grow_batch", ["growth.mode=grow_batch"], wall_s=30.0, final_acc=0.905),
        fake_run(
            root,
            "hybrid",
            ["growth.mode=grow_batch", "growth.max_global_batch=250"],
            wall_s=40.0,
            final_acc=0.895,
        ),
    ]


# --- PNG helpers -----------------------------------------------------------------------------


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    return np.asarray(image[..., :3], dtype=float)  # RGB in [0, 1]


def rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])


def mask(image: np.ndarray, colour: str, tol: float = 0.08) -> np.ndarray:
    return np.all(np.abs(image - rgb(colour)) < tol, axis=-1)


def pixel(fig: Any, ax: Any, x: float, y: float) -> tuple[int, int]:
    """(row, column) in the saved PNG of the data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    height = fig.canvas.get_width_height()[1]
    return round(float(height - py)), round(float(px))


def colour_near(image: np.ndarray, row: int, col: int, colour: str, radius: int = 2) -> bool:
    window = image[row - radius : row + radius + 1, col - radius : col + radius + 1]
    return bool(mask(window, colour).any())


# --- the report from run directories -------------------------------------------------------


def test_summary_json_holds_measured_savings_computed_from_the_runs(
    three_runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    report(three_runs, out_dir=out, echo=lambda _: None)
    data = json.loads((out / "summary.json").read_text())
    assert data["baseline"] == "decay_lr" and data["savings_kind"] == "measured"
    assert data["metric"] == "val_acc"
    rows = {r["label"]: r for r in data["runs"]}
    assert list(rows) == ["decay_lr", "grow_batch", "hybrid"]
    sums = {p.name: json.loads((p / "summary.json").read_text()) for p in three_runs}
    # The plan's numbers: 6 epochs of 10,000 samples; B0 = 50 → 250 → 1250 (hybrid: cap 250).
    assert [rows[k]["total_updates"] for k in rows] == [1200, 496, 560]
    for label in ("grow_batch", "hybrid"):
        m = rows[label]["measured"]
        assert m["kind"] == "measured" and "decay_lr" in m["method"]
        assert m["updates_ratio"] == pytest.approx(1200 / sums[label]["total_updates"])
        assert m["wall_ratio"] == pytest.approx(60.0 / sums[label]["wall_s"])
        assert m["worker_seconds_ratio"] == pytest.approx(60.0 / sums[label]["worker_seconds"])
        assert m["metric_delta"] == pytest.approx(sums[label]["val_acc"] - 0.90)
        est = rows[label]["estimated"]
        assert est["kind"] == "estimated" and est["method"].startswith("estimated:")
        assert est["baseline_updates"] == 1200
    assert rows["decay_lr"]["measured"] is None and rows["decay_lr"]["estimated"] is None
    # The fake runs trained at B0 at different speeds: the report says the machine changed.
    assert (
        "2,500 samples/s and the baseline at 1,250 samples/s (+100%)"
        in (rows["grow_batch"]["throughput_drift"])
    )
    assert any(n.startswith("grow_batch: at the same batch B0=50") for n in data["notes"])
    assert rows["hybrid"]["max_global_batch"] == 250
    assert [p["global_batch"] for p in rows["hybrid"]["phases"]] == [50, 250]
    assert rows["grow_batch"]["startup_s"] == 1.5
    assert data["plots"] == PLOT_FILES


def test_report_md_shows_the_same_numbers(three_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report(three_runs, out_dir=out, echo=lambda _: None)
    md = (out / "report.md").read_text()
    table = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
        for line in md.splitlines()
        if re.match(r"\| (decay_lr|grow_batch|hybrid) \|", line)
    }
    assert table["decay_lr"][:7] == [
        "decay_lr",
        "decay_lr",
        "90.00%",
        "1,200",
        "60.0 s",
        "1.5 s",
        "60.0",
    ]
    assert table["grow_batch"][2:] == [
        "90.50%",
        "496",
        "30.0 s",
        "1.5 s",
        "30.0",
        "2.42× fewer",
        "2.00× faster (not comparable)",  # it ran at B0 twice as fast as the baseline did
        "2.00× less",
        "+0.50 pp",
    ]
    assert table["hybrid"][1] == "grow_batch (cap 250)"
    assert table["hybrid"][7:] == [
        "2.14× fewer",
        "1.50× faster (not comparable)",
        "1.50× less",
        "-0.50 pp",
    ]
    assert "Savings against it are **measured**" in md
    assert "- **measured**: 2.42× fewer updates (1,200 → 496)" in md
    assert "- **estimated**:" in md and "Method: baseline training time" in md
    for file in PLOT_FILES.values():
        assert f"]({file})" in md


def test_pngs_are_real_plots_with_one_colour_per_schedule(
    three_runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    report(three_runs, out_dir=out, echo=lambda _: None)
    sizes = {"schedules": (450, 1100)}
    for key, file in PLOT_FILES.items():
        image = read_png(out / file)
        assert image.shape[:2] == sizes.get(key, (450, 750)), file
        assert image.std() > 0.05, f"{file} is blank"
        counts = {c: int(mask(image, c).sum()) for c in (BLUE, RED, GREEN)}
        assert all(n > 100 for n in counts.values()), (file, counts)
    # Without the hybrid there is no green anywhere: the colours belong to the schedules.
    two = tmp_path / "two"
    report(three_runs[:2], out_dir=two, echo=lambda _: None)
    assert mask(read_png(two / PLOT_FILES["val_vs_epochs"]), GREEN).sum() == 0


def test_each_line_is_drawn_where_its_data_is(three_runs: list[Path], tmp_path: Path) -> None:
    runs = [load_run(p) for p in three_runs]
    colours = {"decay_lr": BLUE, "grow_batch": RED, "hybrid": GREEN}
    curves = [run_curve(r, "val_acc", colours[r.label]) for r in runs]
    for x in ("epochs", "updates", "wall_s"):
        path = tmp_path / f"{x}.png"
        fig = plots.plot_metric(curves, x, "val_acc", path)
        image, ax = read_png(path), fig.axes[0]
        for curve in curves:
            xs = getattr(curve, "wall_s" if x == "wall_s" else x)
            for xv, yv in ((xs[-1], curve.metric[-1]), (xs[1], curve.metric[1])):
                row, col = pixel(fig, ax, xv, yv)
                assert colour_near(image, row, col, colours[curve.label]), (x, curve.label, xv)
        # The baseline's last point (1,200 updates, 60 s) lies right of grow_batch's line end.
        if x != "epochs":
            _, col_base = pixel(fig, ax, getattr(curves[0], x)[-1], curves[0].metric[-1])
            assert not mask(image[:, col_base - 1 : col_base + 2], RED).any()


def test_schedule_plot_shows_the_batch_growing_and_the_hybrid_lr_decaying(
    three_runs: list[Path], tmp_path: Path
) -> None:
    runs = [load_run(p) for p in three_runs]
    xs, batch, lr = schedule_path(runs[2])  # the hybrid, from its config's plan
    assert (xs, batch) == ([0.0, 2.0, 4.0, 6.0], [50, 250, 250, 250])
    assert lr == pytest.approx([0.1, 0.1, 0.02, 0.02])
    colours = [BLUE, RED, GREEN]
    curves = [run_curve(r, "val_acc", c) for r, c in zip(runs, colours, strict=True)]
    path = tmp_path / "schedules.png"
    fig = plots.plot_schedules(curves, path)
    image = read_png(path)
    ax_batch, ax_lr = fig.axes[:2]
    # Mid-phase points, (epoch, batch) and (epoch, lr), where only one schedule is.
    for ax, points in (
        (ax_batch, {BLUE: [(5, 50)], RED: [(5, 1250)], GREEN: [(5, 250)]}),
        (ax_lr, {BLUE: [(3, 0.02), (5, 0.004)], RED: [(5, 0.1)], GREEN: [(5, 0.02)]}),
    ):
        for colour, pts in points.items():
            for xv, yv in pts:
                row, col = pixel(fig, ax, xv, yv)
                assert colour_near(image, row, col, colour), (colour, xv, yv)


def test_without_a_baseline_the_savings_are_estimated_and_say_how(
    three_runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    report(three_runs[1:2], out_dir=out, echo=lambda _: None)
    data = json.loads((out / "summary.json").read_text())
    assert data["baseline"] is None and data["savings_kind"] == "estimated"
    (row,) = data["runs"]
    assert row["measured"] is None
    est = row["estimated"]
    # The fake B0 phase: 20,000 samples in 8 s of updates (2,500/s); 6 s outside updates.
    assert est["details"]["reference_samples_per_s"] == pytest.approx(2500.0)
    assert est["baseline_wall_s"] == pytest.approx(60_000 / 2500 + 6.0)
    assert est["wall_ratio"] == pytest.approx(30.0 / 30.0)
    md = (out / "report.md").read_text()
    assert "savings are **estimated**" in md
    assert "60,000 samples ÷ 2,500 samples/s" in md


def test_report_refuses_unfinished_runs_and_two_baselines(
    three_runs: list[Path], tmp_path: Path
) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(ReportError, match="no summary.json: the run has not finished"):
        report([three_runs[0], unfinished], out_dir=tmp_path / "r1")
    other = fake_run(
        tmp_path / "more", "decay_lr", ["growth.mode=decay_lr"], wall_s=61.0, final_acc=0.9
    )
    with pytest.raises(ReportError, match="2 runs are decay_lr baselines.*--baseline"):
        report([three_runs[0], other], out_dir=tmp_path / "r2")
    out = report(
        [three_runs[0], other, three_runs[1]],
        out_dir=tmp_path / "r3",
        baseline=str(other),
        echo=lambda _: None,
    )
    data = json.loads((out / "summary.json").read_text())
    # Two folders named decay_lr: their parents tell them apart.
    assert data["baseline"] == "more/decay_lr"
    assert [r["label"] for r in data["runs"]] == ["runs/decay_lr", "more/decay_lr", "grow_batch"]


def test_a_config_difference_is_reported(three_runs: list[Path], tmp_path: Path) -> None:
    odd = fake_run(
        tmp_path / "odd",
        "grow_batch",
        ["growth.mode=grow_batch", "optim.lr=0.05"],
        wall_s=30.0,
        final_acc=0.9,
    )
    runs = [load_run(three_runs[0]), load_run(odd)]
    summary = build_report(runs, tmp_path / "r")
    assert summary["runs"][1]["config_differences"] == ["optim.lr (0.05 here, 0.1 in the baseline)"]
    assert "differs from the baseline" in (tmp_path / "r" / "report.md").read_text()


# --- variants ------------------------------------------------------------------------------


def test_hybrid_cap_forces_the_fallback() -> None:
    cfg = load_config(None, BASE)
    assert hybrid_cap(cfg, N) == 250  # 50 → 250 → 1250: stop at 250
    assert variant_overrides(cfg, "hybrid", N) == [
        "growth.mode=grow_batch",
        "growth.max_global_batch=250",
    ]
    one_growth = load_config(None, [*BASE, "schedule.milestones=[3]"])
    assert hybrid_cap(one_growth, N) == 150  # 50 → 250 only: a cap between the two
    fashion = load_config(REPO / "configs" / "fashion_mnist_mlp.yaml")
    assert hybrid_cap(fashion, 60_000) == 640
    with pytest.raises(ReportError, match="never grows the batch"):
        hybrid_cap(load_config(None, [*BASE, "schedule.type=constant"]), N)
    with pytest.raises(ReportError, match="unknown variant 'grow'"):
        variant_overrides(cfg, "grow", N)


def test_parse_list_names_the_bad_item() -> None:
    assert parse_list("32, 64,128", int, "--batch-sizes") == [32, 64, 128]
    with pytest.raises(ReportError, match="--lrs: 'x' is not a float"):
        parse_list("0.1,x", float, "--lrs")


@pytest.mark.integration
def test_compare_stops_at_a_failed_run_and_names_its_log(
    tmp_path: Path, config_writer: Any
) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'loss is nan, stopping'\nexit 3\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "cmp"
    lines: list[str] = []
    with pytest.raises(ReportError, match="decay_lr run failed with exit status 3") as err:
        compare(config, out_dir=out, echo=lines.append, python=str(fake_python))
    assert err.value.exit_code == 1
    assert (out / "logs" / "decay_lr.log").read_text() == "loss is nan, stopping\n"
    # The training's output goes to the terminal as it comes (launch.run_subprocess's tee).
    assert "[decay_lr] loss is nan, stopping" in lines
    assert any(line.startswith("[decay_lr] $ distgrow train") for line in lines)
    assert not (out / "runs" / "grow_batch").exists()  # nothing ran after the failure


def test_compare_checks_every_variant_before_running(tmp_path: Path, config_writer: Any) -> None:
    from distgrow.config import ConfigError

    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    with pytest.raises(ConfigError, match="variant grow_momentum"):
        compare(
            config,
            ["optim.momentum=0.0"],
            variants=["decay_lr", "grow_momentum"],
            out_dir=tmp_path / "x",
            python="/nonexistent",
        )
    assert not (tmp_path / "x").exists()


def finished_compare(out: Path, config: Path) -> None:
    """OUT/runs/<variant> as ``distgrow compare CONFIG --out OUT`` leaves them (made up)."""
    cfg = load_config(config)
    for variant, wall_s, acc in (
        ("decay_lr", 60.0, 0.90),
        ("grow_batch", 30.0, 0.905),
        ("hybrid", 40.0, 0.895),
    ):
        run_dir = out / "runs" / variant
        overrides = [f"run.name=toy-{variant}", f"run.output_dir={run_dir}"]
        overrides += variant_overrides(cfg, variant, N)
        fake_run(out / "runs", variant, overrides, wall_s=wall_s, final_acc=acc)


class FakeExecutor:
    """Stands in for launch.run_subprocess: records the commands, ends each as told."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.argvs: list[list[str]] = []

    def __call__(
        self,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        echo: Callable[[str], None] | None = None,
    ) -> Outcome:
        self.argvs.append(argv)
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as log:
            log.write(f"ran {argv[-1]}\n")
        return self.outcome


def test_compare_reuses_a_run_only_if_its_config_is_the_same(
    tmp_path: Path,
    config_writer: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distgrow.cli import main

    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "cmp"
    finished_compare(out, config)
    executor = FakeExecutor(Outcome(3))
    monkeypatch.setattr(training, "run_subprocess", executor)
    # The same command again: the three finished runs are reused, nothing trains.
    lines: list[str] = []
    compare(config, out_dir=out, echo=lines.append)
    assert executor.argvs == []
    assert sum("already finished" in line for line in lines) == 3
    rows = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["val_acc"] for r in rows] == [0.90, 0.905, 0.895]
    # Another LR: reusing the runs would label their numbers with this command. Refused before
    # anything runs, naming the difference of each run; the runs are left as they were.
    before = (out / "runs" / "grow_batch" / "summary.json").read_text()
    with pytest.raises(ReportError, match=r"3 run\(s\) there were trained with another") as err:
        compare(config, ["optim.lr=0.05"], out_dir=out, echo=lines.append)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert message.count("optim.lr (0.1 there, 0.05 now)") == 3
    assert f"hybrid in {out / 'runs' / 'hybrid'}: optim.lr" in message
    assert "--force" in message
    assert executor.argvs == []
    assert (out / "runs" / "grow_batch" / "summary.json").read_text() == before
    # The verb says it in one line, exit 2.
    assert main(["compare", str(config), "optim.lr=0.05", "--out", str(out)]) == 2
    err_text = capsys.readouterr().err
    assert "optim.lr (0.1 there, 0.05 now)" in err_text and "Traceback" not in err_text
    # --force deletes the run and trains it afresh with the new config (here it fails at once,
    # so the old run is gone and nothing after it ran).
    assert main(["compare", str(config), "optim.lr=0.05", "--out", str(out), "--force"]) == 1
    assert len(executor.argvs) == 1
    argv = executor.argvs[0]
    assert "optim.lr=0.05" in argv and "growth.mode=decay_lr" in argv
    assert "--resume" not in argv
    assert not (out / "runs" / "decay_lr").exists()
    assert (out / "logs" / "decay_lr.log").read_text() == f"ran {argv[-1]}\n"
    assert (out / "runs" / "grow_batch" / "summary.json").is_file()  # not reached yet


def test_a_changed_config_is_named_for_unfinished_runs_too(tmp_path: Path) -> None:
    cfg = load_config(None, BASE)
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    assert config_mismatch(run_dir, cfg) == []  # no run there yet
    run_dir.checkpoint(40).write_bytes(b"")  # an unfinished run: resumed only if it matches
    assert config_mismatch(run_dir, cfg) == [
        "it has no readable config.yaml, so its config cannot be checked"
    ]
    run_dir.config.write_text(dump_config(load_config(None, [*BASE, "run.resume=true"])))
    assert config_mismatch(run_dir, load_config(None, [*BASE, "run.output_dir=elsewhere"])) == []
    assert config_mismatch(run_dir, load_config(None, [*BASE, "run.epochs=7", "run.seed=1"])) == [
        "run.epochs (6 there, 7 now)",
        "run.seed (0 there, 1 now)",
    ]


def test_compare_stops_when_a_signal_stopped_a_training(
    tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "cmp"
    executor = FakeExecutor(Outcome(130, signal.SIGINT))
    monkeypatch.setattr(training, "run_subprocess", executor)
    with pytest.raises(ReportError, match="decay_lr run was stopped by SIGINT") as err:
        compare(config, out_dir=out, echo=lambda _: None)
    assert err.value.exit_code == 130
    assert "resumes from its last checkpoint" in str(err.value)
    assert len(executor.argvs) == 1  # grow_batch and hybrid never started


# --- sweep ---------------------------------------------------------------------------------


def test_sweep_files_show_the_grid_and_diverged_runs(tmp_path: Path) -> None:
    rows = [
        {"batch": 32, "lr": 0.01, "status": "completed", "train_loss": 0.5, "val_loss": 0.6},
        {"batch": 32, "lr": 0.1, "status": "completed", "train_loss": 0.3, "val_loss": 0.4},
        {"batch": 128, "lr": 0.01, "status": "completed", "train_loss": 0.9, "val_loss": 1.0},
        {"batch": 128, "lr": 0.1, "status": "diverged", "train_loss": None, "val_loss": None},
    ]
    data = write_sweep(rows, [32, 128], [0.01, 0.1], tmp_path, command="distgrow sweep x")
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(data))
    assert saved["best"] == {"batch": 32, "lr": 0.1, "val_loss": 0.4}
    md = (tmp_path / "sweep.md").read_text()
    assert "| 32 | 0.6000 | 0.4000 |" in md and "| 128 | 1.0000 | diverged |" in md
    image = read_png(tmp_path / "sweep.png")
    assert image.shape[:2] == (450, 1100) and image.std() > 0.05
    # One line per LR: the first two sweep colours are both drawn.
    assert mask(image, "#1f77b4").sum() > 100 and mask(image, "#d62728").sum() > 100


# --- for real ------------------------------------------------------------------------------

TINY = [
    "run.name=tiny",
    "run.epochs=3",
    "data.name=synthetic_classification",
    "data.synthetic_samples=1600",
    "data.synthetic_features=16",
    "model.hidden=[32]",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "schedule.type=multistep",
    "schedule.milestones=[1, 2]",
    "schedule.gamma=0.5",
    "growth.base_batch=32",
    "growth.max_dataset_fraction=null",
    "logging.every_steps=10",
    "logging.wandb.mode=disabled",
    "run.threads=1",  # two OpenMP threads on a loaded 2-core machine run 10× slower than one
]


@pytest.mark.integration
def test_compare_trains_three_variants_and_reports_them(
    tmp_path: Path,
    config_writer: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, TINY))))
    lines: list[str] = []
    out = compare(config, out_dir=tmp_path / "cmp", echo=lines.append, python=sys.executable)
    data = json.loads((out / "summary.json").read_text())
    rows = {r["label"]: r for r in data["runs"]}
    assert list(rows) == ["decay_lr", "grow_batch", "hybrid"]
    for label, row in rows.items():
        run = json.loads((out / "runs" / label / "summary.json").read_text())
        for key in ("total_updates", "wall_s", "worker_seconds", "val_acc", "startup_s"):
            assert row[key] == run[key], (label, key)
        assert run["samples_seen"] == 1280 * 3
    # 1,280 samples: 32 → 64 → 128, hybrid capped at 64 (the LR takes the last halving).
    assert rows["decay_lr"]["total_updates"] == 3 * 40
    assert rows["grow_batch"]["total_updates"] == 40 + 20 + 10
    assert rows["hybrid"]["total_updates"] == 40 + 20 + 20
    assert rows["hybrid"]["max_global_batch"] == 64
    assert rows["grow_batch"]["measured"]["updates_ratio"] == pytest.approx(120 / 70)
    assert [p["global_batch"] for p in rows["grow_batch"]["phases"]] == [32, 64, 128]
    assert all(p["samples_per_s"] > 0 for p in rows["grow_batch"]["phases"])
    hybrid_records = [json.loads(x) for x in (out / "runs/hybrid/metrics.jsonl").open()]
    last_epoch = [r for r in hybrid_records if r.get("kind") == "epoch"][-1]
    # r = 1/4 at B = 64 = 2·B0: the LR carries the second halving (0.05 · 1/4 · 2).
    assert (last_epoch["global_batch"], last_epoch["lr"]) == (64, pytest.approx(0.025))
    for file in PLOT_FILES.values():
        image = read_png(out / file)
        assert all(mask(image, c).sum() > 50 for c in (BLUE, RED, GREEN)), file
    assert any("report written to" in line for line in lines)
    # Each training's output went to the terminal (behind its variant) and to its log.
    done = "distgrow: done: 70 updates, 3,840 samples"
    assert done in (out / "logs" / "grow_batch.log").read_text()
    assert any(line.startswith(f"[grow_batch] {done}") for line in lines)
    # Run again into the same folder: the finished runs are reused, nothing is retrained.
    again: list[str] = []
    compare(config, out_dir=out, echo=again.append)
    assert sum("already finished" in line for line in again) == 3


# --- the verbs -----------------------------------------------------------------------------


def test_report_verb_writes_the_report_and_names_bad_input(
    three_runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distgrow.cli import main

    out = tmp_path / "out"
    assert main(["report", *map(str, three_runs), "--out", str(out)]) == 0
    assert f"written to {out / 'report.md'}" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["baseline"] == "decay_lr"
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(load_config(None, BASE)))
    assert main(["sweep", str(config), "--batch-sizes", "32,x", "--lrs", "0.1"]) == 2
    assert "--batch-sizes: 'x' is not a int" in capsys.readouterr().err
    assert main(["compare", str(config), "--variants", "decay_lr,grow"]) == 2
    assert "unknown variant 'grow'" in capsys.readouterr().err


FAKE_TRAIN = """#!/usr/bin/env python3
# Stands in for `python -m distgrow train`: diverges (exit 65) at lr 1e6, fails at lr 0.5,
# otherwise writes a summary whose losses encode the batch and the LR.
import json, pathlib, sys
args = dict(a.split("=", 1) for a in sys.argv[4:] if "=" in a)
lr, batch = float(args["optim.lr"]), int(args["growth.base_batch"])
if lr == 1e6:
    print("loss is nan"); sys.exit(65)
if lr == 0.5:
    print("crashed"); sys.exit(1)
out = pathlib.Path(args["run.output_dir"]); out.mkdir(parents=True)
loss = batch / 100 + lr
(out / "summary.json").write_text(json.dumps({"status": "completed", "train_loss": loss,
    "val_loss": loss + 0.1, "val_acc": None, "total_updates": 1000 // batch, "wall_s": 1.0,
    "epochs": 1, "samples_seen": 1000, "worker_seconds": 1.0, "world_size": 1,
    "growth_mode": "decay_lr", "base_batch": batch, "dataset_size": 1000}))
"""


@pytest.mark.integration
def test_sweep_records_diverged_and_failed_runs(tmp_path: Path, config_writer: Any) -> None:
    fake = tmp_path / "python"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    config = config_writer(yaml.safe_load(dump_config(load_config(None, BASE))))
    out = tmp_path / "sweep"
    lines: list[str] = []
    with pytest.raises(
        ReportError, match=r"2 sweep run\(s\) failed: batch 32, lr 0.5 .*; batch 64, lr 0.5"
    ) as err:
        sweep(
            config,
            batch_sizes=[32, 64],
            lrs=[0.01, 0.5, 1e6],
            out_dir=out,
            echo=lines.append,
            python=str(fake),
        )
    assert err.value.exit_code == 1
    data = json.loads((out / "sweep.json").read_text())
    status = {(r["batch"], r["lr"]): r["status"] for r in data["results"]}
    assert status == {
        (32, 0.01): "completed",
        (32, 0.5): "failed",
        (32, 1e6): "diverged",
        (64, 0.01): "completed",
        (64, 0.5): "failed",
        (64, 1e6): "diverged",
    }
    vals = {(r["batch"], r["lr"]): r["val_loss"] for r in data["results"]}
    assert vals[(32, 0.01)] == pytest.approx(0.32 + 0.11) and vals[(64, 0.01)] == pytest.approx(
        0.75
    )
    assert data["best"] == {"batch": 32, "lr": 0.01, "val_loss": pytest.approx(0.43)}
    assert "| 64 | 0.7500 | failed | diverged |" in (out / "sweep.md").read_text()
    assert (out / "logs" / "b32_lr1e_06.log").read_text() == "loss is nan\n"


@pytest.mark.integration
def test_sweep_trains_a_real_grid(
    tmp_path: Path, config_writer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from distgrow.cli import main

    config = config_writer(yaml.safe_load(dump_config(load_config(None, TINY))))
    out = tmp_path / "sweep"
    argv = ["sweep", str(config), "run.epochs=1", "schedule.type=constant"]
    assert main([*argv, "--batch-sizes", "32,128", "--lrs", "0.05", "--out", str(out)]) == 0
    data = json.loads((out / "sweep.json").read_text())
    rows = {(r["batch"], r["lr"]): r for r in data["results"]}
    assert set(rows) == {(32, 0.05), (128, 0.05)}
    for b in (32, 128):
        run = json.loads((out / "runs" / f"b{b}_lr0.05" / "summary.json").read_text())
        assert rows[(b, 0.05)]["val_loss"] == run["val_loss"]
        assert rows[(b, 0.05)]["total_updates"] == 1280 // b == run["total_updates"]
        assert run["growth_mode"] == "decay_lr"
    assert "| 32 |" in (out / "sweep.md").read_text()
    image = read_png(out / "sweep.png")
    assert image.std() > 0.05 and mask(image, "#1f77b4").sum() > 100
    assert f"written to {out / 'sweep.md'}" in capsys.readouterr().out
