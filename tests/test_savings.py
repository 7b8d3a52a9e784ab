"""Per-phase throughput accounting and the savings math (measured and estimated)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distgrow.planner import Split
from distgrow.savings import (
    PhaseStats,
    PhaseTracker,
    SavingsError,
    estimated_savings,
    format_ratio,
    format_seconds,
    measured_savings,
    reference_throughput,
    try_estimated_savings,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def begin(tracker: PhaseTracker, batch: int, *, step: int = 0, world: int = 2) -> object:
    return tracker.begin(
        split=Split(batch, world, batch // world, 1),
        lr=0.1,
        momentum=0.9,
        start_epoch=step / 10,
        start_step=step,
        world_size=world,
    )


def test_tracker_splits_time_and_samples_by_phase() -> None:
    clock = FakeClock()
    tracker = PhaseTracker(clock)
    tracker.start()
    clock.now += 5.0  # before the first phase: counted nowhere
    assert begin(tracker, 128) is None
    for _ in range(3):
        clock.now += 2.0
        tracker.record_update(128, 1.5)  # 0.5 s per update outside train_step (validation)
    finished = begin(tracker, 640, step=3)
    assert isinstance(finished, PhaseStats)
    assert (finished.updates, finished.samples, finished.train_s) == (3, 384, 4.5)
    assert finished.wall_s == pytest.approx(6.0)
    assert finished.worker_seconds == pytest.approx(12.0)  # 2 workers
    assert finished.samples_per_s == pytest.approx(384 / 4.5)
    assert finished.samples_per_s_per_worker == pytest.approx(384 / 4.5 / 2)
    clock.now += 1.0
    tracker.record_update(640, 1.0)
    tracker.tick()
    phases = tracker.to_list()
    assert [p["global_batch"] for p in phases] == [128, 640]
    assert phases[1]["wall_s"] == pytest.approx(1.0)
    assert phases[1]["samples_per_s"] == pytest.approx(640.0)
    assert tracker.train_seconds() == pytest.approx(5.5)


def test_tracker_resumes_from_its_state_without_counting_the_downtime() -> None:
    clock = FakeClock()
    tracker = PhaseTracker(clock)
    tracker.start()
    begin(tracker, 128)
    clock.now += 4.0
    tracker.record_update(128, 3.0, 2.5)
    tracker.tick()
    state = tracker.state_dict()

    clock.now += 1000.0  # the job is down, then relaunched
    resumed = PhaseTracker(clock)
    resumed.load_state_dict(state)
    clock.now += 7.0  # start-up of the new process: not in the phase either
    resumed.start()
    clock.now += 2.0
    resumed.record_update(128, 2.0, 1.25)
    resumed.tick()
    (phase,) = resumed.phases
    assert (phase.updates, phase.samples) == (2, 256)
    assert phase.wall_s == pytest.approx(6.0)
    assert phase.train_s == pytest.approx(5.0)
    assert phase.train_cpu_s == 3.75  # the CPU seconds inside updates survive the resume too
    assert resumed.train_cpu_seconds() == 3.75


def test_a_checkpoint_from_before_cpu_seconds_loads_with_zero() -> None:
    tracker = PhaseTracker(FakeClock())
    tracker.start()
    begin(tracker, 128)
    tracker.record_update(128, 3.0, 2.0)
    (old,) = tracker.state_dict()["phases"]
    del old["train_cpu_s"]  # what an older distgrow wrote
    resumed = PhaseTracker(FakeClock())
    resumed.load_state_dict({"phases": [old]})
    assert resumed.phases[0].train_cpu_s == 0.0 and resumed.phases[0].train_s == 3.0


def test_a_checkpoint_holds_the_phase_time_up_to_the_moment_it_is_taken() -> None:
    clock = FakeClock()
    tracker = PhaseTracker(clock)
    tracker.start()
    begin(tracker, 128)
    clock.now += 100.0
    tracker.record_update(128, 90.0)
    state = tracker.state_dict()  # the trainer's checkpoint: no tick() of its own before it
    assert state["phases"][0]["wall_s"] == pytest.approx(100.0)
    assert state["phases"][0]["worker_seconds"] == pytest.approx(200.0)  # 2 workers
    resumed = PhaseTracker(clock)
    resumed.load_state_dict(state)
    assert resumed.phases[0].wall_s == pytest.approx(100.0)
    # The checkpoint keeps the flat keys of format 1, and the split comes back as one record.
    assert list(state["phases"][0])[:6] == [
        "index", "global_batch", "workers", "micro_batch", "accum_steps", "lr"
    ]  # fmt: skip
    assert resumed.phases == tracker.phases
    assert resumed.phases[0].split == Split(128, 2, 64, 1)


def test_tracker_keeps_the_spread_of_update_times_across_a_resume() -> None:
    times = [0.5, 1.5, 1.0, 2.0, 3.0]
    tracker = PhaseTracker(FakeClock())
    tracker.start()
    begin(tracker, 128)
    for t in times[:2]:
        tracker.record_update(128, t)
    resumed = PhaseTracker(FakeClock())
    resumed.load_state_dict(tracker.state_dict())
    for t in times[2:]:
        resumed.record_update(128, t)
    (phase,) = resumed.phases
    mean = sum(times) / len(times)  # 1.6
    assert phase.update_s_m2 == pytest.approx(sum((t - mean) ** 2 for t in times))  # 3.7
    assert phase.to_dict()["update_s_m2"] == pytest.approx(3.7)


def test_record_update_before_begin_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="before begin"):
        PhaseTracker().record_update(1, 1.0)


def phase(
    batch: int,
    samples: int,
    train_s: float,
    *,
    world: int = 1,
    updates: int | None = None,
    update_s_m2: float = 0.0,
) -> dict[str, object]:
    """A phase of ``samples`` in ``train_s`` s (``samples // batch`` updates unless given)."""
    return PhaseStats(
        index=0,
        split=Split(batch, world, batch, 1),
        lr=0.1,
        momentum=0.9,
        start_epoch=0.0,
        start_step=0,
        world_size=world,
        updates=samples // batch if updates is None else updates,
        samples=samples,
        train_s=train_s,
        update_s_m2=update_s_m2,
    ).to_dict()


def growth_summary(**extra: object) -> dict[str, object]:
    summary: dict[str, object] = {
        "status": "completed",
        "growth_mode": "grow_batch",
        "base_batch": 128,
        "samples_seen": 900_000,
        "total_updates": 3_240,
        "baseline_total_updates": 7_035,
        "wall_s": 40.0,
        "worker_seconds": 40.0,
        "val_acc": 0.90,
        # 300k samples at B0 in 10 s (30,000/s), then 600k in 12 s (50,000/s): 22 s inside
        # updates, 18 s outside (validation, checkpoints).
        "phases": [phase(128, 300_000, 10.0), phase(640, 600_000, 12.0)],
    }
    summary.update(extra)
    return summary


def test_estimate_uses_the_throughput_measured_at_b0_and_says_so() -> None:
    s = estimated_savings(growth_summary())
    # Baseline: 900,000 samples ÷ 30,000/s at B0 = 30 s of updates, + the run's 18 s outside.
    assert s.kind == "estimated"
    assert s.baseline_wall_s == pytest.approx(48.0)
    assert s.baseline_updates == 7_035
    assert s.wall_ratio == pytest.approx(48.0 / 40.0)
    assert s.details["reference_samples_per_s"] == pytest.approx(30_000.0)
    assert s.details["non_training_s"] == pytest.approx(18.0)
    assert s.updates_ratio == pytest.approx(7_035 / 3_240)
    assert "900,000 samples ÷ 30,000 samples/s" in s.method
    assert "B0=128" in s.method and "7,035 counted from the decay_lr plan" in s.method


def test_estimate_with_a_slow_b0_phase_gives_a_larger_saving() -> None:
    s = estimated_savings(
        growth_summary(phases=[phase(128, 100_000, 20.0), phase(640, 800_000, 10.0)])
    )
    # B0 ran at 5,000 samples/s: baseline = 180 s + (40 − 30) s.
    assert s.baseline_wall_s == pytest.approx(190.0)
    assert s.wall_ratio == pytest.approx(190.0 / 40.0)
    assert s.wall_saved_s == pytest.approx(150.0)
    assert s.wall_saved_fraction == pytest.approx(1 - 40 / 190)
    assert s.baseline_worker_seconds == pytest.approx(190.0)


def test_estimate_without_a_b0_phase_uses_the_smallest_batch_and_says_so() -> None:
    summary = growth_summary(
        growth_mode="grow_batch_lr",
        phases=[phase(640, 300_000, 15.0, world=4), phase(3200, 600_000, 15.0, world=4)],
        worker_seconds=160.0,
    )
    ref = reference_throughput(summary["phases"], 128)  # type: ignore[arg-type]
    assert (ref.batch, ref.samples_per_s, ref.world_size, ref.is_base_batch) == (
        640,
        pytest.approx(20_000.0),
        4,
        False,
    )
    assert (ref.updates, ref.samples) == (300_000 // 640, 300_000)
    s = estimated_savings(summary)
    assert "B=640, the smallest batch this run used" in s.method
    assert s.baseline_worker_seconds == pytest.approx((45.0 + 10.0) * 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"growth_mode": "decay_lr"}, "is the decay_lr baseline"),
        ({"phases": []}, "no per-phase throughput"),
        ({"phases": [phase(128, 0, 0.0)]}, "no phase of the run has measured training time"),
        ({"base_batch": None}, "no 'base_batch'"),
    ],
)
def test_estimate_refuses_what_it_cannot_know(change: dict[str, object], message: str) -> None:
    with pytest.raises(SavingsError, match=message):
        estimated_savings(growth_summary(**change))
    assert message in try_estimated_savings(growth_summary(**change))["unavailable"]


def test_estimate_of_a_plateau_run_has_no_baseline_updates() -> None:
    s = estimated_savings(growth_summary(baseline_total_updates=None))
    assert s.baseline_updates is None and s.updates_ratio is None
    assert "plateau" in s.method
    assert s.to_dict()["wall_ratio"] == pytest.approx(1.2)


@given(
    train_s=st.floats(1.0, 1e5),
    updates=st.integers(30, 10**6),
    overhead=st.floats(0.0, 1e4),
)
def test_a_run_that_never_grew_estimates_itself(
    train_s: float, updates: int, overhead: float
) -> None:
    samples = 128 * updates
    s = estimated_savings(
        growth_summary(
            samples_seen=samples,
            wall_s=train_s + overhead,
            phases=[phase(128, samples, train_s)],
        )
    )
    assert s.wall_ratio == pytest.approx(1.0, rel=1e-9)


def baseline_summary(**extra: object) -> dict[str, object]:
    summary: dict[str, object] = {
        "status": "completed",
        "growth_mode": "decay_lr",
        "samples_seen": 900_000,
        "total_updates": 7_035,
        "wall_s": 60.0,
        "worker_seconds": 120.0,
        "val_acc": 0.895,
    }
    summary.update(extra)
    return summary


def test_measured_savings_are_ratios_of_the_two_summaries() -> None:
    s = measured_savings(growth_summary(worker_seconds=80.0), baseline_summary(), "runs/base")
    assert s.kind == "measured"
    assert s.updates_ratio == pytest.approx(7_035 / 3_240)
    assert s.wall_ratio == pytest.approx(1.5)
    assert s.worker_seconds_ratio == pytest.approx(1.5)
    assert s.worker_seconds_saved == pytest.approx(40.0)
    assert s.metric == "val_acc" and s.metric_delta == pytest.approx(0.005)
    assert "runs/base" in s.method and s.method.startswith("measured")
    d = s.to_dict()
    assert d["wall_saved_s"] == pytest.approx(20.0) and d["kind"] == "measured"


def test_measured_savings_compare_losses_for_regression() -> None:
    s = measured_savings(
        growth_summary(val_acc=None, val_loss=0.2), baseline_summary(val_acc=None, val_loss=0.25)
    )
    assert s.metric == "val_loss" and s.metric_delta == pytest.approx(-0.05)


@pytest.mark.parametrize(
    ("run", "base", "message"),
    [
        ({}, {"growth_mode": "grow_batch"}, "compare against the decay_lr baseline"),
        ({}, {"samples_seen": 1}, "did not train on the same data"),
        ({"status": "running"}, {}, "not 'completed'"),
    ],
)
def test_measured_savings_refuse_a_wrong_baseline(
    run: dict[str, object], base: dict[str, object], message: str
) -> None:
    with pytest.raises(SavingsError, match=message):
        measured_savings(growth_summary(**run), baseline_summary(**base))


def test_words() -> None:
    assert format_ratio(2.171, "fewer", "more") == "2.17× fewer"
    assert format_ratio(0.5, "faster", "slower") == "0.50× (2.00× slower)"
    assert format_ratio(None, "a", "b") == "-"
    assert format_seconds(42.13) == "42.1 s"
    assert format_seconds(725) == "12 min 05 s"
    assert format_seconds(3 * 3600 + 4 * 60) == "3 h 04 min"
    assert format_seconds(None) == "-"


@pytest.mark.integration
def test_process_age_counts_from_the_start_of_the_process() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(0.5); "
            "from distgrow.savings import process_age_s; print(process_age_s())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if out.strip() == "None":
        pytest.skip("no /proc on this system")
    assert 0.5 <= float(out) < 30.0


def b0_summary(times: list[float], **extra: object) -> dict[str, object]:
    """A run whose B0=128 phase took ``times`` per update (measured by the tracker), then
    grew to 640 for 600,000 samples in 12 s; 18 s outside updates."""
    clock = FakeClock()
    tracker = PhaseTracker(clock)
    tracker.start()
    begin(tracker, 128, world=1)
    for t in times:
        tracker.record_update(128, t)
    begin(tracker, 640, step=len(times), world=1)
    tracker.record_update(600_000, 12.0)
    phases = tracker.to_list()
    samples = 128 * len(times) + 600_000
    return growth_summary(
        phases=phases, samples_seen=samples, wall_s=sum(times) + 12.0 + 18.0, **extra
    )


def test_estimate_carries_a_95_percent_interval_from_the_b0_update_times() -> None:
    times = [0.09, 0.11] * 50  # mean 0.1 s, sample std 0.01 * sqrt(100 / 99)
    summary = b0_summary(times)
    s = estimated_savings(summary)
    samples = 128 * 100 + 600_000
    train = samples / 1280.0  # 1,280 samples/s at B0: 478.75 s
    assert s.baseline_wall_s == pytest.approx(train + 18.0)
    error = 0.01 * math.sqrt(100 / 99) / math.sqrt(100) / 0.1
    assert s.details["reference_relative_error"] == pytest.approx(error)
    assert s.details["reference_updates"] == 100
    half = 1.96 * error * train
    assert s.baseline_wall_s_low == pytest.approx(train + 18.0 - half)
    assert s.baseline_wall_s_high == pytest.approx(train + 18.0 + half)
    run_wall = 10.0 + 12.0 + 18.0
    d = s.to_dict()
    assert d["wall_ratio_low"] == pytest.approx((train + 18.0 - half) / run_wall)
    assert d["wall_ratio_high"] == pytest.approx((train + 18.0 + half) / run_wall)
    assert "100 updates in 10.0 s" in s.method and "95% interval" in s.method
    assert s.wall_unavailable is None


def test_a_noisier_b0_phase_gives_a_wider_interval() -> None:
    steady = estimated_savings(b0_summary([0.09, 0.11] * 50))
    noisy = estimated_savings(b0_summary([0.05, 0.15] * 50))
    assert steady.baseline_wall_s == pytest.approx(noisy.baseline_wall_s)
    width = [s.baseline_wall_s_high - s.baseline_wall_s_low for s in (steady, noisy)]  # type: ignore[operator]
    assert width[1] == pytest.approx(5 * width[0])


def test_the_interval_pools_several_b0_phases_around_their_common_mean() -> None:
    first, second = [1.0, 2.0, 3.0], [5.0, 7.0]
    tracker = PhaseTracker(FakeClock())
    tracker.start()
    begin(tracker, 128)
    for t in first:
        tracker.record_update(128, t)
    begin(tracker, 128, step=3)  # the same batch again (say, on another worker count)
    for t in second:
        tracker.record_update(128, t)
    ref = reference_throughput(tracker.to_list(), 128)
    times = first + second
    mean = sum(times) / len(times)
    assert ref.updates == 5 and ref.train_s == pytest.approx(18.0)
    assert ref.update_s_m2 == pytest.approx(sum((t - mean) ** 2 for t in times))
    std = math.sqrt(sum((t - mean) ** 2 for t in times) / 4)
    assert ref.relative_error == pytest.approx(std / math.sqrt(5) / mean)


@pytest.mark.parametrize(
    ("times", "words"),
    [
        ([0.1] * 18, "comes from 18 update(s) in 1.80 s"),  # issue #11's 18-update phase
        ([0.01] * 60, "comes from 60 update(s) in 0.60 s"),  # enough updates, too short
    ],
)
def test_estimate_refuses_a_wall_clock_from_too_little_but_keeps_the_updates(
    times: list[float], words: str
) -> None:
    s = estimated_savings(b0_summary(times))
    assert s.baseline_wall_s is None and s.wall_ratio is None
    assert s.baseline_worker_seconds is None and s.worker_seconds_ratio is None
    assert s.wall_ratio_low is None and s.wall_ratio_high is None
    assert s.wall_unavailable is not None and words in s.wall_unavailable
    assert "at least 30 updates and 1 s" in s.wall_unavailable
    assert "baseline wall-clock not estimated" in s.method
    # The update count comes from the plan, not from timings: still exact.
    assert s.baseline_updates == 7_035 and s.updates_ratio == pytest.approx(7_035 / 3_240)
    assert "unavailable" not in try_estimated_savings(b0_summary(times))


def test_an_old_summary_without_the_spread_is_estimated_without_an_interval() -> None:
    summary = growth_summary()
    for p in summary["phases"]:  # type: ignore[attr-defined]
        del p["update_s_m2"]
    s = estimated_savings(summary)
    assert s.baseline_wall_s == pytest.approx(48.0)
    assert s.baseline_wall_s_low is None and s.details["reference_relative_error"] is None
    assert "not recorded, so no interval" in s.method


def test_the_report_line_and_the_wandb_summary_show_the_interval_or_the_refusal() -> None:
    from distgrow.report.markdown import _savings_line
    from distgrow.wandb_logger import wandb_summary

    est = estimated_savings(b0_summary([0.05, 0.15] * 50)).to_dict()
    line = _savings_line(est, "val_acc")
    low, high = est["wall_ratio_low"], est["wall_ratio_high"]
    assert f"{est['wall_ratio']:.2f}× faster" in line
    assert f"95% interval {low:.2f}–{high:.2f}×)" in line
    flat = wandb_summary({"savings": {"estimated": est}})
    assert flat["savings/estimated/wall_ratio_low"] == pytest.approx(low)
    assert flat["savings/estimated/baseline_wall_s_high"] == est["baseline_wall_s_high"]

    # An interval that spans 1.0 says the sign is unknown.
    both = {**est, "wall_ratio": 1.1, "wall_ratio_low": 0.9, "wall_ratio_high": 1.3}
    assert "0.90–1.30×: faster or slower, the measurements cannot tell" in _savings_line(
        both, "val_acc"
    )

    refused = estimated_savings(b0_summary([0.1] * 18)).to_dict()
    line = _savings_line(refused, "val_acc")
    assert "wall-clock and worker-seconds not estimated" in line
    assert "comes from 18 update(s)" in line and "worker-seconds -" not in line
    assert "2.17× fewer updates (7,035 → 3,240)" in line
    flat = wandb_summary({"savings": {"estimated": refused}})
    assert "savings/estimated/wall_ratio" not in flat
    assert "18 update(s)" in flat["savings/estimated/wall_unavailable"]
