"""``distgrow estimate``: the throughput model, the plan's predicted cost, chain node-hours, the
N-nodes-from-a-probe-file path, the command, and the report's predicted-against-measured plot.

Unit tests use a synthetic timing profile whose numbers make every prediction exact by hand;
one integration test runs the real timing probe (2 gloo ranks) on a tiny synthetic job.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from distgrow.cli import main
from distgrow.planner import Phase, Plan, Split
from distgrow.predict.estimate import epoch_ends, predict_phase_times, predict_plan
from distgrow.predict.profile import (
    ProfileError,
    Throughput,
    TimingProfile,
    WorldRow,
    fit_line,
    read_profile,
)


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own probe cache (never the user's ~/.cache)."""
    home = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "distgrow" / "probe"


def profile() -> TimingProfile:
    """A micro-step of m samples takes 1 ms + 0.1 ms·m; the step 2 ms; a forward 0.5 ms +
    0.01 ms·m; 2 workers double the micro-step and all-reduce in 3 ms, 4 in 5 ms."""
    return TimingProfile(
        device="cpu: test",
        threads=1,
        cores=2,
        backend="torch",
        dist_backend="gloo",
        micro_rows=[(100, 0.011), (200, 0.021), (400, 0.041)],
        step_s=0.002,
        eval_rows=[(100, 0.0015), (500, 0.0055)],
        checkpoint_s=0.01,
        world_micro_batch=100,
        world_rows=[
            WorldRow(2, 1, compute_s=0.022, sync_s=0.025, init_s=0.1),
            WorldRow(4, 1, compute_s=0.044, sync_s=0.049, init_s=0.2),
        ],
        grad_bytes=1000,
        cold_start_s=3.0,
        data_load_s=1.0,
        val_size=1000,
        micro_cpu_rows=[(100, 0.001), (200, 0.002), (400, 0.004)],
        step_cpu_s=0.0005,
    )


def two_phase_plan() -> Plan:
    """Epoch 0–1 at 200 × 1 worker (10 updates), epoch 1–2 at 800 = 2 workers × 200 × 2."""

    def phase(start: float, split: Split, updates: int) -> Phase:
        return Phase(
            start, start + 1, split, 0.1, 0.1, 0.9, 1.0, updates, updates * split.global_batch,
            capped=False,
        )  # fmt: skip

    phases = [phase(0, Split(200, 1, 200, 1), 10), phase(1, Split(800, 2, 200, 2), 5)]
    return Plan("grow_batch", "multistep", 2000, 2, 200, phases, 15, 20, 6000)


# -- the model ---------------------------------------------------------------------------------


def test_the_fitted_line_and_the_measured_rows_give_exact_times() -> None:
    model = Throughput.fit(profile())
    assert model.a == pytest.approx(0.001, abs=1e-12)
    assert model.b == pytest.approx(0.0001, abs=1e-12)
    assert model.micro_step_s(300) == pytest.approx(0.031)  # between measured rows
    assert model.micro_step_s(800) == pytest.approx(0.081)  # beyond them: a + b·m
    assert model.forward_s(300) == pytest.approx(0.0035)


def test_a_negative_intercept_is_refitted_through_the_origin() -> None:
    a, b = fit_line([(1.0, 0.0), (2.0, 2.0)])  # y = -2 + 2x has no meaning as a time
    assert a == 0.0
    assert b == pytest.approx(4.0 / 5.0)


def test_an_update_is_contention_times_the_micro_steps_and_step_plus_the_all_reduce() -> None:
    model = Throughput.fit(profile())
    # 2 workers: ×2 (0.022 / 0.011), 2 micro-steps of 200 + the step, + 3 ms all-reduce.
    assert model.update_s(200, 2, 2, per_node=2) == pytest.approx(2 * (2 * 0.021 + 0.002) + 0.003)
    # One worker per node: nothing shared, the all-reduce still paid.
    assert model.update_s(200, 1, 2, per_node=1) == pytest.approx(0.021 + 0.002 + 0.003)
    assert model.update_s(200, 1, 1, per_node=1) == pytest.approx(0.023)


def test_the_ring_model_fits_the_measured_all_reduces_and_extrapolates() -> None:
    model = Throughput.fit(profile())
    # α + β/2 = 3 ms and 3α + 3β/4 = 5 ms: β = 16/3 ms, α = 1/3 ms.
    assert model.ring_beta == pytest.approx(0.016 / 3)
    assert model.ring_alpha == pytest.approx(0.001 / 3)
    assert model.allreduce_s(2) == pytest.approx(0.003)  # measured
    assert model.allreduce_s(8) == pytest.approx(7 * 0.001 / 3 + 7 / 8 * 0.016 / 3)  # = 7 ms
    assert model.allreduce_s(8) == pytest.approx(0.007)


def test_cpu_seconds_use_the_cpu_rows() -> None:
    model = Throughput.fit(profile(), clock="cpu")
    assert model.update_s(200, 1, 1, per_node=1) == pytest.approx(0.002 + 0.0005)


def test_epoch_ends_inside_a_phase() -> None:
    assert epoch_ends(0.0, 1.0, 3) == 1
    assert epoch_ends(0.5, 2.5, 3) == 2  # epochs 1 and 2
    assert epoch_ends(2.0, 3.0, 3) == 1
    assert epoch_ends(0.2, 0.7, 3) == 0


# -- a plan's cost -----------------------------------------------------------------------------


def test_a_plan_costs_its_updates_validations_checkpoints_and_relaunch() -> None:
    pred = predict_plan(
        two_phase_plan(), Throughput.fit(profile()), variant="grow_batch", val_size=1000,
        per_node=2, piece_cap=500,
    )  # fmt: skip
    first, second = pred.phases
    # 10 updates of 23 ms; a validation (2 chunks of 500: 2 × 5.5 ms) and a checkpoint.
    assert first.wall_s == pytest.approx(10 * 0.023 + 0.011 + 0.01)
    # 5 updates of 91 ms; validation (×2 contention, 1 chunk per rank), the epoch's checkpoint,
    # the growth's checkpoint, and the relaunch: a cold worker (3 s) + the 2-rank rendezvous.
    assert second.update_s == pytest.approx(0.091)
    assert second.relaunch_s == pytest.approx(3.1)
    assert second.wall_s == pytest.approx(5 * 0.091 + 2 * 0.0055 + 0.01 + 0.01 + 3.1)
    assert pred.wall_s == pytest.approx(0.251 + 3.586)
    assert pred.startup_s == pytest.approx(4.0)  # cold worker + the data's load
    assert pred.worker_hours == pytest.approx((0.251 + 2 * 3.586 + 4.0) / 3600)


def test_chain_bills_each_span_its_nodes_and_allocation_the_widest_throughout() -> None:
    pred = predict_plan(
        two_phase_plan(), Throughput.fit(profile()), variant="grow_batch", val_size=1000,
        per_node=1, piece_cap=500,
    )  # fmt: skip
    second = 5 * 0.047 + 0.0055 + 0.01 + 0.01 + 3.1  # one worker per node: no contention
    assert pred.phases[1].wall_s == pytest.approx(second)
    assert pred.spans() == [(1, pytest.approx(4.0 + 0.251)), (2, pytest.approx(second))]
    assert pred.chain_node_hours == pytest.approx((4.251 + 2 * second) / 3600)
    assert pred.allocation_node_hours == pytest.approx(2 * (4.0 + 0.251 + second) / 3600)
    assert pred.chain_node_hours < pred.allocation_node_hours


def test_a_growing_plateau_ladder_cannot_be_predicted() -> None:
    plan = two_phase_plan()
    plan.ladder = True
    with pytest.raises(ValueError, match="only known while training"):
        predict_plan(
            plan, Throughput.fit(profile()), variant="grow_batch", val_size=0, per_node=1,
            piece_cap=500,
        )  # fmt: skip


def test_measured_phases_are_predicted_with_the_plans_arithmetic() -> None:
    phases = [
        {"start_epoch": 0.0, "workers": 1, "micro_batch": 200, "accum_steps": 1, "updates": 10},
        {"start_epoch": 1.0, "workers": 2, "micro_batch": 200, "accum_steps": 2, "updates": 5},
    ]
    got = predict_phase_times(
        phases, Throughput.fit(profile()), epochs=2, dataset_size=2000, val_size=1000,
        per_node=2, piece_cap=500,
    )  # fmt: skip
    # As the plan's phases, less the relaunch (a run measures inside one job).
    assert got == [pytest.approx(0.251), pytest.approx(3.586 - 3.1)]


# -- the command -------------------------------------------------------------------------------


def test_the_micro_batches_timed_span_the_plans_doubling_with_both_ends() -> None:
    from distgrow.predict.verb import micro_batches, world_sizes

    plan = two_phase_plan()
    plan.phases[1] = replace(plan.phases[1], split=Split(6400, 2, 3200, 1))
    plan.phases[0] = replace(plan.phases[0], split=Split(32, 1, 32, 1))
    assert micro_batches({"grow_batch": plan}) == [32, 64, 128, 256, 512, 1024, 2048, 3200]
    assert micro_batches({"grow_batch": plan}, most=3) == [32, 512, 3200]
    assert world_sizes(None, {"grow_batch": plan}, per_node=8) == [2]
    assert world_sizes("1,2,4", {"grow_batch": plan}, per_node=8) == [2, 4]
    with pytest.raises(ValueError, match="Fix: e.g. --workers-to-time 2,4"):
        world_sizes("2,x", {"grow_batch": plan}, per_node=8)


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {name: synthetic_classification, synthetic_samples: 3000, synthetic_features: 8}\n"
        "model: {name: mlp, hidden: [16]}\n"
        "growth: {base_batch: 32, micro_batch: 32, max_dataset_fraction: null}\n"
        "schedule: {type: multistep, milestones: [1, 2], gamma: 0.25}\n"
        f"run: {{epochs: 3, threads: 1, output_dir: {tmp_path / 'out'}}}\n"
    )
    return path


def _profile_file(tmp_path: Path) -> Path:
    return profile().save(tmp_path / "node.json")


def test_n_nodes_from_a_probe_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", str(_config_file(tmp_path)), "--probe", str(_profile_file(tmp_path))]
    assert main([*argv, "--nodes", "4", "--workers-per-node", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["nodes"], out["per_node"]) == (4, 2)
    preds = {p["variant"]: p for p in out["predictions"]}
    assert set(preds) == {"decay_lr", "grow_batch", "hybrid"}
    grow = preds["grow_batch"]
    widest = max(p["workers"] for p in grow["phases"])
    assert widest == 8  # 4 nodes × 2 workers: growth.max_workers
    model = Throughput.fit(profile())
    for p in grow["phases"]:  # each phase's update is the model's, all-reduce extrapolated
        want = model.update_s(p["micro_batch"], p["accum_steps"], p["workers"], 2)
        assert p["update_s"] == pytest.approx(want)
    last = grow["phases"][-1]
    assert last["update_s"] == pytest.approx(
        2 * (last["accum_steps"] * model.micro_step_s(last["micro_batch"]) + 0.002) + 0.007
    )
    startup_plus_wall = grow["startup_s"] + grow["wall_s"]
    assert grow["allocation_node_hours"] == pytest.approx(4 * startup_plus_wall / 3600)
    assert grow["chain_node_hours"] < grow["allocation_node_hours"]
    assert preds["decay_lr"]["updates"] > grow["updates"]


def test_the_chains_tasks_per_node_shape_the_node_hours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["estimate", str(_config_file(tmp_path)), "--probe", str(_profile_file(tmp_path))]
    shape = ["growth.max_workers=4", "launch.chain.tasks_per_node=2", "--json"]
    assert main([*argv, *shape]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["per_node"] == 2
    grow = next(p for p in out["predictions"] if p["variant"] == "grow_batch")
    assert max(p["workers"] for p in grow["phases"]) == 4  # 2 nodes at the widest
    assert grow["allocation_node_hours"] == pytest.approx(
        2 * (grow["startup_s"] + grow["wall_s"]) / 3600
    )


def test_the_estimate_prints_the_model_and_the_three_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["estimate", str(_config_file(tmp_path)), "--probe", str(_profile_file(tmp_path))]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "measured at 100, 200, 400 (interpolated between), beyond 1.000 ms + 100.000 µs" in out
    assert "model: 2 workers on the node (measured): micro-step ×2.00" in out
    for variant in ("decay_lr ", "grow_batch ", "hybrid "):
        assert any(line.startswith(variant) for line in out.splitlines())
    assert "grow_batch vs decay_lr: wall-clock" in out
    assert "chain node-h" in out


def test_estimate_is_a_verb_of_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "estimate" in capsys.readouterr().out


def test_nodes_without_a_probe_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["estimate", str(_config_file(tmp_path)), "--nodes", "4"]) == 2
    err = capsys.readouterr().err
    assert "--nodes 4: needs --probe FILE" in err and "Fix:" in err


def test_a_file_that_is_not_a_timing_profile_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "memory.json"
    bad.write_text(json.dumps({"version": 2, "rows": []}))
    assert main(["estimate", str(_config_file(tmp_path)), "--probe", str(bad)]) == 2
    assert "not a distgrow timing profile" in capsys.readouterr().err
    with pytest.raises(ProfileError, match="cannot read it"):
        read_profile(tmp_path / "missing.json")


def test_a_profile_survives_its_file(tmp_path: Path) -> None:
    back = read_profile(_profile_file(tmp_path))
    assert back == profile()


# -- the report's plot -------------------------------------------------------------------------


def test_the_predicted_against_measured_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib (distgrow[report]) is not installed")
    from distgrow.report.predicted import PhasePoints, plot_predicted

    path = tmp_path / "predicted_vs_measured.png"
    points = [PhasePoints("grow_batch", [0.3, 0.5], [0.251, 0.486], [200, 800])]
    plot_predicted(points, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the timing probe, for real ----------------------------------------------------------------


def test_the_timing_cache_is_keyed_by_the_threads_too(tmp_path: Path) -> None:
    from distgrow import startup
    from distgrow.config import load_config
    from distgrow.predict import measure

    config = str(_config_file(tmp_path))
    one = load_config(config, ["run.threads=1"])
    two = load_config(config, ["run.threads=2"])
    data = startup.load_data(one)
    cpu = pytest.importorskip("torch").device("cpu")
    path_one = measure.timing_path(measure.timing_identity(one, data, cpu))
    path_two = measure.timing_path(measure.timing_identity(two, data, cpu))
    assert path_one != path_two
    assert path_one.name.startswith("timing-")


@pytest.mark.integration
def test_a_real_estimate_measures_two_gloo_ranks_and_caches_them(
    tmp_path: Path,
    cache_home: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distgrow.predict import measure

    monkeypatch.setattr(measure, "MIN_TIME_S", 0.05)  # the fixed repetitions suffice here
    config = str(_config_file(tmp_path))
    argv = ["estimate", config, "--workers-to-time", "2", "--json"]
    assert main([*argv, "--save", str(tmp_path / "timing.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"].startswith("measured now")
    saved = read_profile(tmp_path / "timing.json")
    assert [w.workers for w in saved.world_rows] == [2]
    assert saved.world_rows[0].sync_s > 0 and saved.cold_start_s > 0
    assert all(math.isfinite(p["wall_s"]) and p["wall_s"] > 0 for p in out["predictions"])
    assert main(argv) == 0  # the second time from the cache
    assert json.loads(capsys.readouterr().out)["profile"].startswith("cached in")
    assert list(cache_home.glob("timing-*.json"))
