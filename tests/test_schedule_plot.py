"""``schedule_noise.png``: the batch, the LR and the measured B_simple of each run on one axis of
samples seen, drawn from the run's own step records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distgrow.report import build_report, load_run, schedule_plot
from distgrow.report.runs import RunData
from distgrow.rundir import Summary


def _records() -> list[dict[str, Any]]:
    """Step records of a run that grows 32 → 160 after its 4th update, with B_simple rising, plus
    records the plot must skip (an event, an epoch record, a step without a measurement)."""
    out: list[dict[str, Any]] = [{"kind": "event", "event": "start", "step": 0}]
    seen = 0
    for step in range(1, 9):
        batch = 32 if step <= 4 else 160
        lr = 0.1 if batch == 32 else 0.1 * (1 + step) / 10
        seen += batch
        record = {"kind": "step", "step": step, "samples_seen": seen, "global_batch": batch}
        record["lr"] = lr
        if step != 3:
            record["noise/b_simple"] = 20.0 * step
        out.append(record)
    out.append({"kind": "epoch", "epoch": 1, "step": 8, "samples_seen": seen, "lr": 9.0})
    return out


def _run(label: str, records: list[dict[str, Any]]) -> RunData:
    summary = Summary(
        status="completed",
        epochs=1,
        total_updates=8,
        samples_seen=1_280,
        wall_s=1.0,
        worker_seconds=1.0,
        world_size=1,
        growth_mode="grow_batch",
        base_batch=32,
        dataset_size=1_280,
    )
    return RunData(label, Path("/nonexistent"), summary, records)


def test_the_plotted_series_are_the_logged_values(tmp_path: Path) -> None:
    records = _records()
    steps = [r for r in records if r["kind"] == "step"]
    run = _run("grow_batch", records)
    series = schedule_plot.series_of(run)
    assert series.samples == [r["samples_seen"] for r in steps]
    assert series.batch == [r["global_batch"] for r in steps]
    assert series.lr == [r["lr"] for r in steps]
    measured = [r for r in steps if "noise/b_simple" in r]
    assert series.noise_samples == [r["samples_seen"] for r in measured]
    assert series.b_simple == [r["noise/b_simple"] for r in measured]

    fig = schedule_plot.plot_schedule_noise([series], tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax_b, ax_lr = fig.axes[:2]
    lines_b = {line.get_label(): line for line in ax_b.get_lines()}
    batch_line = lines_b["grow_batch: batch"]
    noise_line = lines_b["grow_batch: B_simple"]
    assert list(batch_line.get_xdata()) == series.samples
    assert list(batch_line.get_ydata()) == [32] * 4 + [160] * 4
    assert list(noise_line.get_xdata()) == series.noise_samples
    assert list(noise_line.get_ydata()) == [20.0 * s for s in (1, 2, 4, 5, 6, 7, 8)]
    (lr_line,) = ax_lr.get_lines()
    assert list(lr_line.get_ydata()) == series.lr
    # one time axis: the two panels share x
    assert ax_b.get_shared_x_axes().joined(ax_b, ax_lr)


def test_the_report_writes_it_for_runs_with_step_records(tmp_path: Path) -> None:
    from test_report import fake_run

    root = tmp_path / "runs"
    base = fake_run(root, "decay_lr", ["growth.mode=decay_lr"], wall_s=6.0, final_acc=0.9)
    grow = fake_run(root, "grow_batch", ["growth.mode=grow_batch"], wall_s=3.0, final_acc=0.9)
    for path in (base, grow):  # fake_run writes epoch records only: add the step records
        lines = (path / "metrics.jsonl").read_text().splitlines()
        steps = [line.replace('"kind": "epoch"', '"kind": "step"') for line in lines[1:]]
        (path / "metrics.jsonl").write_text("\n".join([*lines, *steps]) + "\n")
    out = tmp_path / "report"
    summary = build_report([load_run(base), load_run(grow)], out)
    assert summary["plots"]["schedule_noise"] == "schedule_noise.png"
    assert (out / "schedule_noise.png").stat().st_size > 1_000
    assert "(schedule_noise.png)" in (out / "report.md").read_text()


def test_nothing_is_drawn_without_step_records(tmp_path: Path) -> None:
    run = _run("decay_lr", [{"kind": "epoch", "epoch": 1, "samples_seen": 10, "lr": 0.1}])
    assert schedule_plot.write([run], ["#000000"], tmp_path) is None
    assert not (tmp_path / "schedule_noise.png").exists()


def test_report_names_the_new_plots_in_words() -> None:
    """report.md captions the schedule/noise and predicted-vs-measured plots, not their keys."""
    from distgrow.report.markdown import _plot_lines

    lines = _plot_lines(
        {"schedule_noise": "schedule_noise.png", "predicted_vs_measured": "p.png"}, "val_acc"
    )
    assert (
        "![global batch, learning rate and measured B_simple against samples seen]"
        "(schedule_noise.png)" in lines
    )
    assert "![each phase's wall-clock: predicted (distgrow estimate) and measured](p.png)" in lines
