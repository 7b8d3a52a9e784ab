"""Growth from the measured noise scale: ``growth.mode=adaptive`` and ``growth.noise_cap``.

Decisions first as a pure function of a scripted B_simple sequence (:class:`NoiseRule`, the
growth policy), then real runs on synthetic data: growth fires, the cap holds the batch and
hands the decay to the LR, a resume logs and decides bit for bit as the uninterrupted run, and
under ``distgrow train`` a growth that needs more workers goes through ``resize.json``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import SYN_PLAN, assert_same_model, distgrow_job_run, write_config
from test_report import TINY, mask, read_png
from test_trainer import records, syn_config, train

from distgrow.adaptive import NoiseRule
from distgrow.checkpoint import list_checkpoints, load_latest
from distgrow.config import ConfigError, dump_config, load_config
from distgrow.exits import EXIT_OK
from distgrow.planner import GrowthPolicy, make_plan
from distgrow.plots import COLOURS
from distgrow.report import compare
from distgrow.trainer import TrainError

pytestmark = pytest.mark.usefixtures("one_thread")


def rule(**kw: Any) -> NoiseRule:
    args: dict[str, Any] = dict(
        adaptive=True, ratio=1.0, patience=2, factor=2.0, noise_cap=None, min_updates=0
    )
    args.update(kw)
    return NoiseRule(**args)


def decide(r: NoiseRule, values: Sequence[float | None], batch: int) -> list[tuple[int, int, int]]:
    """Feed ``values``; the batch follows the growths asked for. (evaluation, from, to)."""
    out = []
    for b_simple in values:
        decision = r.evaluate(b_simple, 1_000, batch)
        if decision is not None:
            out.append((decision.evaluation, decision.batch, decision.target))
            batch = decision.target
    return out


# --------------------------------------------------------------------------------------------
# The rule, on scripted measurements
# --------------------------------------------------------------------------------------------


def test_growth_needs_patience_consecutive_evaluations_above_the_ratio() -> None:
    values = [None, 40.0, 20.0, 40.0, 40.0, 100.0, 100.0, 100.0, 130.0, 300.0]
    # 32: 40 > 32 once, broken by 20, then twice in a row at 4 and 5 → 64 at evaluation 5;
    # 64: 100, 100 → 128 at 7; 128: 100 is below, 130 and 300 above → 256 at 10.
    assert decide(rule(), values, 32) == [(5, 32, 64), (7, 64, 128), (10, 128, 256)]
    # A ratio of 2 needs B_simple > 2B: 40 is not above 64; 100, 100 are → 64 at 7; then
    # 100 is not above 128, 130 and 300 are → 128 at 10.
    assert decide(rule(ratio=2.0), values, 32) == [(7, 32, 64), (10, 64, 128)]
    # No patience (1): the first value above grows.
    assert decide(rule(patience=1), values, 32)[0] == (2, 32, 64)


def test_unsettled_measurements_do_not_count_and_the_factor_applies() -> None:
    r = rule(min_updates=50, factor=1.5)
    assert r.evaluate(500.0, 49, 32) is None and r.streak == 0  # the average has not settled
    assert r.evaluate(500.0, 50, 32) is None and r.streak == 1
    decision = r.evaluate(500.0, 60, 32)
    assert decision is not None and decision.target == 48 and decision.streak == 2
    assert r.streak == 0  # the streak starts over at the new batch


def test_the_noise_cap_follows_the_last_settled_measurement() -> None:
    r = rule(adaptive=False, noise_cap=2.0, min_updates=10)
    assert r.evaluate(100.0, 5, 32) is None and r.cap is None  # not settled: no cap yet
    r.evaluate(100.4, 10, 32)
    assert r.cap == 200 and r.b_simple == 100.4
    r.evaluate(None, 11, 32)
    assert r.cap == 200  # a value that cannot be formed leaves the cap as it was
    r.evaluate(37.9, 12, 32)
    assert r.cap == 75


def test_rule_state_round_trip_continues_exactly() -> None:
    values = [40.0, 50.0, 20.0, 70.0, 90.0, 150.0, 140.0, 10.0, 300.0, 400.0, 600.0]
    straight = decide(rule(), values, 32)
    first = rule()
    done = decide(first, values[:4], 32)
    second = rule()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    batch = done[-1][2] if done else 32
    rest = decide(second, values[4:], batch)
    assert done + rest == straight and len(straight) >= 2


# --------------------------------------------------------------------------------------------
# The growth policy: realisation, the LR, the limits, the cap
# --------------------------------------------------------------------------------------------


def policy(*overrides: str) -> GrowthPolicy:
    cfg = load_config(
        None,
        [
            "data.name=synthetic_classification",
            "optim.lr=0.1",
            "optim.momentum=0.9",
            "schedule.type=multistep",
            "schedule.milestones=[2,4]",
            "schedule.gamma=0.5",
            "growth.base_batch=32",
            "growth.max_dataset_fraction=null",
            "growth.adaptive.patience=1",
            "growth.adaptive.min_updates=0",
            "run.epochs=6",
            *overrides,
        ],
    )
    return GrowthPolicy(cfg, 1000)


def test_adaptive_lr_is_the_schedule_never_above_lr0() -> None:
    p = policy("growth.mode=adaptive", "growth.max_global_batch=128")
    assert (p.setting(0).global_batch, p.setting(0).lr) == (32, 0.1)
    # Without growth the batch stays and the LR decays as written (decay_lr).
    assert p.setting(2).lr == pytest.approx(0.05) and p.setting(2).global_batch == 32
    p.observe_noise(100.0, 10)  # 100 > 32: grow to 64
    assert [e[0] for e in p.take_events()] == ["adaptive_growth"]
    s = p.setting(2)
    # r = 0.5, B = 64 = B*: lr = min(lr0, lr0·r·B/B0) = 0.1, the noise scale on the path.
    assert (s.global_batch, s.lr) == (64, pytest.approx(0.1))
    p.observe_noise(100.0, 11)  # 100 > 64: grow to 128, past B* = 64 at epoch 2
    p.take_events()
    s = p.setting(2)
    assert (s.global_batch, s.lr) == (128, pytest.approx(0.1))  # never above lr0: below path
    s = p.setting(4)  # r = 0.25, B* = 128: on the path again
    assert s.lr == pytest.approx(0.1)
    # At the cap (128): a growth asked for is refused once, and the LR carries the decay.
    p.observe_noise(1000.0, 12)
    p.observe_noise(1000.0, 13)
    events = p.take_events()
    assert [e[0] for e in events] == ["adaptive_at_limit"]
    assert events[0][1]["limit"] == 128 and events[0][1]["b_simple"] == 1000.0
    p2 = policy(
        "growth.mode=adaptive",
        "growth.max_global_batch=128",
        "schedule.milestones=[2,4,6]",
        "run.epochs=8",
    )
    p2.load_state_dict(p.state_dict())
    assert p2.setting(6).global_batch == 128 and p2.setting(6).capped
    # lr0·r·B/B0 with r = 0.125 (the schedule asks for 256): the hybrid.
    assert p2.setting(6).lr == pytest.approx(0.1 * 0.25 * 128 / 32 / 2)


def test_noise_cap_holds_grow_batch_and_the_lr_takes_the_rest() -> None:
    p = policy("growth.mode=grow_batch", "growth.noise_cap=1.5", "growth.adaptive.every=1")
    assert p.setting(2).global_batch == 64  # not measured yet: the schedule's batch
    p.observe_noise(50.0, 10)  # cap ⌊1.5 × 50⌋ = 75: 128 at epoch 4 would exceed it
    assert p.take_events() == []
    s = p.setting(4)
    assert s.global_batch == 75 and s.capped  # as far as the cap: the largest split ≤ 75
    assert s.lr == pytest.approx(0.1 * 0.25 * 75 / 32)  # lr0·r·B/B0: the LR takes the rest
    (name, values), *_ = p.take_events()
    assert name == "noise_cap"
    assert (values["cap_batch"], values["b_simple"], values["schedule_batch"]) == (75, 50.0, 128)
    p.setting(4)
    assert p.take_events() == []  # said once while it holds
    p.observe_noise(200.0, 11)  # cap 300: lifted, the batch follows the schedule again
    s = p.setting(4)
    assert s.global_batch == 128 and not s.capped
    assert [e[0] for e in p.take_events()] == ["noise_cap_lifted"]


def test_the_plan_shows_the_ladder_and_the_possible_cap() -> None:
    cfg = load_config(
        "configs/fashion_mnist_mlp.yaml", ["growth.mode=adaptive", "growth.max_global_batch=2048"]
    )
    plan = make_plan(cfg, 60_000)
    assert plan.ladder and plan.total_updates is None and plan.baseline_total_updates
    assert [p.global_batch for p in plan.phases] == [128, 256, 512, 1024, 2048]
    assert plan.phases[-1].capped and not any(p.capped for p in plan.phases[:-1])
    assert any("decided at run time" in n for n in plan.notes)
    cap = make_plan(load_config("configs/fashion_mnist_mlp.yaml", ["growth.noise_cap=2"]), 60_000)
    assert any("possible cap" in n and "2 × the noise scale" in n for n in cap.notes)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("growth.noise_cap=0", "growth.noise_cap = 0"),
        ("growth.factor=1", "growth.factor = 1"),
        ("growth.adaptive.patience=0", "growth.adaptive.patience = 0"),
        ("growth.adaptive.ratio=-1", "growth.adaptive.ratio = -1"),
        ("noise.ema_decay=1", "noise.ema_decay = 1"),
    ],
)
def test_bad_values_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_adaptive_needs_the_measurement() -> None:
    with pytest.raises(ConfigError, match=r"noise\.measure = 'off'.*Fix: set noise\.measure=auto"):
        load_config(None, ["growth.mode=adaptive", "noise.measure=off"])
    with pytest.raises(ConfigError, match=r"caps grow_batch .*not growth\.mode=decay_lr"):
        load_config(None, ["growth.mode=decay_lr", "growth.noise_cap=2"])


# --------------------------------------------------------------------------------------------
# Real runs (one process, synthetic data; the batch accumulates micro-batches of 8)
# --------------------------------------------------------------------------------------------

ADAPTIVE = (
    "growth.mode=adaptive",
    "growth.adaptive.every=5",
    "growth.adaptive.min_updates=5",
    "growth.adaptive.patience=2",
    "run.epochs=3",
)


def noise_series(run_dir: Path, after: int = 0) -> list[tuple[Any, ...]]:
    keys = ("noise/grad_sq", "noise/trace_cov", "noise/b_simple", "noise/b_simple_window")
    return [
        (r["step"], *(r[k] for k in keys)) for r in records(run_dir, "step") if r["step"] > after
    ]


def decisions(run_dir: Path, after: int = 0) -> list[dict[str, Any]]:
    wanted = ("adaptive_growth", "adaptive_at_limit", "noise_cap", "noise_cap_lifted", "growth")
    out = []
    for r in records(run_dir, "event"):
        if r["event"] in wanted and r["step"] > after:
            out.append(
                {k: v for k, v in r.items() if k not in ("time", "wall_s", "finished_phase")}
            )
    return out


def test_adaptive_growth_fires_in_a_real_run(tmp_path: Path) -> None:
    code, trainer = train(syn_config(tmp_path / "run", *ADAPTIVE))
    assert code == EXIT_OK
    grown = [e for e in decisions(tmp_path / "run") if e["event"] == "adaptive_growth"]
    assert grown, "no adaptive growth"
    first = grown[0]
    assert first["b_simple"] > first["batch"] and first["streak"] == 2
    assert first["step"] % 5 == 0 and first["realised"] == 2 * first["batch"]
    steps = records(tmp_path / "run", "step")
    after = [r for r in steps if r["step"] > first["step"]]
    assert after[0]["global_batch"] == first["realised"]  # from the next update on
    assert all(r["lr"] <= 0.05 + 1e-12 for r in steps)  # never above lr0
    # The measured series is there, with the one-worker micro-batch source.
    assert all(r["noise/measured"] == 5 for r in steps)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["noise"]["source"] == "micro"
    assert summary["noise"]["measured_updates"] == trainer.state.step


def test_resume_continues_the_noise_series_and_the_decisions_bit_for_bit(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = (*ADAPTIVE, "run.checkpoint_every_steps=12", "run.keep_checkpoints=20")
    code, _ = train(syn_config(straight, *extra))
    assert code == EXIT_OK
    # Update 12: mid log window (every 5) and between two evaluations (every 5).
    ckpt = next(p for p in list_checkpoints(straight) if p.name == "ckpt-000000012.pt")
    resumed.mkdir()
    (resumed / ckpt.name).write_bytes(ckpt.read_bytes())
    code, _ = train(syn_config(resumed, *extra, "run.resume=true"))
    assert code == EXIT_OK
    want = noise_series(straight, after=12)
    assert want and noise_series(resumed, after=12) == want  # floats equal, bit for bit
    want_events = decisions(straight, after=12)
    assert any(e["event"] == "adaptive_growth" for e in want_events)
    assert decisions(resumed, after=12) == want_events


def test_noise_cap_stops_grow_batch_and_the_report_can_find_it(tmp_path: Path) -> None:
    # The schedule grows 32 → 64 at epoch 1; a cap of 0.1 × B_simple is far below 64.
    cap = ("growth.noise_cap=0.1", "growth.adaptive.every=5", "growth.adaptive.min_updates=5")
    code, _ = train(syn_config(tmp_path / "run", *cap))
    assert code == EXIT_OK
    events = decisions(tmp_path / "run")
    assert [e["event"] for e in events] == ["noise_cap"]
    fired = events[0]
    assert fired["cap_batch"] == math.floor(0.1 * fired["b_simple"]) < 64
    assert fired["schedule_batch"] == 64 and fired["epoch"] == 2
    epoch2 = [r for r in records(tmp_path / "run", "step") if r["epoch"] == 2]
    assert {r["global_batch"] for r in epoch2} == {32}
    assert [r["lr"] for r in epoch2] == pytest.approx([0.025] * len(epoch2))  # the hybrid


def test_measuring_is_off_by_default_and_says_once_when_it_cannot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, trainer = train(syn_config(tmp_path / "off"))
    assert code == EXIT_OK and trainer.noise is None
    assert not any(k.startswith("noise/") for r in records(tmp_path / "off", "step") for k in r)
    # One worker without accumulation (micro-batches of 32 and 64 hold whole batches).
    one = ("noise.measure=on", "growth.micro_batch=32", "growth.max_micro_batch=64")
    code, trainer = train(syn_config(tmp_path / "one", *one, "logging.progress=lines"))
    assert code == EXIT_OK and trainer.noise is not None
    assert trainer.noise.estimator.updates == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("noise scale: not measured at a global batch of 32") == 1


# --------------------------------------------------------------------------------------------
# Under `distgrow train`: a growth that needs a second worker asks for it through resize.json
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_adaptive_growth_to_more_workers_relaunches_and_measures_under_ddp(
    tmp_path: Path,
) -> None:
    # Micro-batches of at most 12 and no accumulation: 24 runs as 2 × 12 (and 3 × 8); the first
    # growth asks for 48, and the largest split on at most 3 workers is 36 = 3 × 12.
    config = write_config(tmp_path / "syn.yaml", SYN_PLAN)
    run_dir = tmp_path / "run"
    args = [
        str(config),
        f"run.output_dir={run_dir}",
        "growth.max_workers=3",
        "growth.base_batch=24",
        "growth.micro_batch=12",
        "growth.max_micro_batch=12",
        "growth.max_accum_steps=1",
        "logging.every_steps=5",
        *ADAPTIVE,
    ]
    # torchrun exits 1 whatever its workers did; its report names the workers' status.
    out = distgrow_job_run(2, args, expect=None, timeout=300).stdout
    assert "needs 3 workers" in out and "exitcode  : 75" in out
    info = json.loads((run_dir / "resize.json").read_text())
    assert (info["need_workers"], info["have_workers"], info["global_batch"]) == (3, 2, 36)
    grown = [e for e in decisions(run_dir) if e["event"] == "adaptive_growth"]
    assert len(grown) == 1 and grown[0]["realised"] == 36 and grown[0]["step"] == info["step"]
    distgrow_job_run(3, [*args, "--resume"], expect=0, timeout=300)
    steps = records(run_dir, "step")
    assert {r["workers"] for r in steps} == {2, 3}
    # An epoch's last, partial batch may leave one rank alone with samples: not measured.
    assert all(r["noise/measured"] in (4, 5) and r["noise/b_simple"] > 0 for r in steps)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["noise"]["source"] == "ddp" and summary["world_size"] == 3


# --------------------------------------------------------------------------------------------
# `distgrow compare` with the adaptive variant, and the report's noise-scale plot
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_compare_trains_adaptive_and_plots_the_noise_scale(
    tmp_path: Path, config_writer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    tiny = [
        *TINY,
        "growth.micro_batch=8",
        "growth.max_micro_batch=8",  # accumulation: one process measures from micro-batches
        "growth.adaptive.every=5",
        "growth.adaptive.min_updates=5",
        "growth.adaptive.patience=2",
    ]
    config = config_writer(yaml.safe_load(dump_config(load_config(None, tiny))))
    out = compare(
        config,
        variants=("decay_lr", "adaptive"),
        out_dir=tmp_path / "cmp",
        echo=lambda line: None,
        python=sys.executable,
    )
    data = json.loads((out / "summary.json").read_text())
    rows = {r["label"]: r for r in data["runs"]}
    assert list(rows) == ["decay_lr", "adaptive"]
    assert rows["adaptive"]["growth_mode"] == "adaptive"
    assert rows["adaptive"]["total_updates"] < rows["decay_lr"]["total_updates"]
    (noise,) = data["noise"]  # only the adaptive run measured it
    assert noise["label"] == "adaptive" and noise["measured"]["source"] == "micro"
    grown = [d for d in noise["decisions"] if d["event"] == "adaptive_growth"]
    assert grown and all(d["b_simple"] > d["batch"] for d in grown)
    report = (out / "report.md").read_text()
    assert "## Noise scale" in report and f"grew {grown[0]['batch']} → " in report
    assert data["plots"]["noise_scale"] == "noise_scale.png"
    image = read_png(out / "noise_scale.png")
    assert mask(image, COLOURS["adaptive"]).sum() > 50
    assert mask(image, COLOURS["decay_lr"]).sum() == 0


def test_adaptive_that_could_never_measure_is_refused(tmp_path: Path) -> None:
    # One worker, the base batch in one micro-batch: no second batch size, ever.
    cfg = syn_config(tmp_path / "run", "growth.mode=adaptive", "growth.max_micro_batch=32")
    with pytest.raises(TrainError, match=r"growth\.max_micro_batch below growth\.base_batch"):
        train(cfg)


@pytest.mark.integration
def test_two_ranks_resume_the_ddp_measured_series_bit_for_bit(tmp_path: Path) -> None:
    config = write_config(tmp_path / "syn.yaml", SYN_PLAN)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = [
        "growth.max_workers=2",
        "logging.every_steps=5",
        "run.checkpoint_every_steps=12",
        "run.keep_checkpoints=20",
        *ADAPTIVE,
    ]
    distgrow_job_run(2, [str(config), f"run.output_dir={straight}", *extra], timeout=300)
    ckpt = next(p for p in list_checkpoints(straight) if p.name == "ckpt-000000012.pt")
    resumed.mkdir()
    (resumed / ckpt.name).write_bytes(ckpt.read_bytes())
    distgrow_job_run(2, [str(config), f"run.output_dir={resumed}", *extra, "--resume"], timeout=300)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["noise"]["source"] == "ddp"
    want = noise_series(straight, after=12)
    assert want and noise_series(resumed, after=12) == want
    assert decisions(resumed, after=12) == decisions(straight, after=12)


@pytest.mark.integration
def test_measuring_on_two_ranks_leaves_the_training_bit_identical(tmp_path: Path) -> None:
    # Measured updates run their micro-steps under no_sync and average the gradients
    # themselves (all_reduce_measured): on 2 ranks the same sums as DDP's, bit for bit.
    config = write_config(tmp_path / "syn.yaml", SYN_PLAN)
    common = ["growth.max_workers=2", "growth.max_micro_batch=16", "noise.every=3"]
    runs = {}
    for measure in ("on", "off"):
        out = tmp_path / measure
        distgrow_job_run(
            2, [str(config), f"run.output_dir={out}", f"noise.measure={measure}", *common]
        )
        runs[measure] = out
    summary = json.loads((runs["on"] / "summary.json").read_text())
    assert summary["noise"]["source"] == "ddp" and summary["noise"]["measured_updates"] > 0
    assert "noise" not in json.loads((runs["off"] / "summary.json").read_text())
    found = {m: load_latest(out) for m, out in runs.items()}
    assert found["on"] is not None and found["off"] is not None
    assert_same_model(found["on"][1]["model"], found["off"][1]["model"], exact=True)
    assert_same_model(
        found["on"][1]["optimizer"]["state"][0],
        found["off"][1]["optimizer"]["state"][0],
        exact=True,
    )
