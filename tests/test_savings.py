"""Per-phase throughput accounting and the savings math (measured and estimated)."""

from __future__ import annotations

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
    tracker.record_update(128, 3.0)
    tracker.tick()
    state = tracker.state_dict()

    clock.now += 1000.0  # the job is down, then relaunched
    resumed = PhaseTracker(clock)
    resumed.load_state_dict(state)
    clock.now += 7.0  # start-up of the new process: not in the phase either
    resumed.start()
    clock.now += 2.0
    resumed.record_update(128, 2.0)
    resumed.tick()
    (phase,) = resumed.phases
    assert (phase.updates, phase.samples) == (2, 256)
    assert phase.wall_s == pytest.approx(6.0)
    assert phase.train_s == pytest.approx(5.0)


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


def test_record_update_before_begin_is_a_bug() -> None:
    with pytest.raises(RuntimeError, match="before begin"):
        PhaseTracker().record_update(1, 1.0)


def phase(batch: int, samples: int, train_s: float, *, world: int = 1) -> dict[str, object]:
    return PhaseStats(
        index=0,
        split=Split(batch, world, batch, 1),
        lr=0.1,
        momentum=0.9,
        start_epoch=0.0,
        start_step=0,
        world_size=world,
        samples=samples,
        train_s=train_s,
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
    batch, rate, world, exact = reference_throughput(summary["phases"], 128)  # type: ignore[arg-type]
    assert (batch, rate, world, exact) == (640, pytest.approx(20_000.0), 4, False)
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
    rate=st.floats(1.0, 1e6),
    samples=st.integers(1, 10**8),
    overhead=st.floats(0.0, 1e4),
)
def test_a_run_that_never_grew_estimates_itself(rate: float, samples: int, overhead: float) -> None:
    train_s = samples / rate
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
