"""The noise-scale conversion, the realisation rules, the hybrid, and the update counts."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from distgrow.config import Config, ConfigError, load_config
from distgrow.planner import (
    ACCUM_WINDOW,
    NEAR_IDEAL,
    SPLIT_FIELDS,
    GrowthPolicy,
    Limits,
    Realisation,
    Split,
    make_plan,
    preferred_micro_batch,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CIFAR = CONFIGS / "cifar10_wrn16_4.yaml"


def cifar(*overrides: str) -> Config:
    return load_config(CIFAR, list(overrides))


# ---------------------------------------------------------------------------------------------
# The paper's numbers (METHOD.md §2)
# ---------------------------------------------------------------------------------------------


def test_paper_increase_batch_caps_off() -> None:
    plan = make_plan(cifar("growth.max_dataset_fraction=null"), 50_000)
    assert [p.global_batch for p in plan.phases] == [128, 640, 3200, 16000]
    assert [(p.start_epoch, p.end_epoch) for p in plan.phases] == [
        (0, 60), (60, 120), (120, 160), (160, 200)
    ]  # fmt: skip
    assert [p.lr for p in plan.phases] == pytest.approx([0.1] * 4)
    # 60·⌈50000/128⌉ + 60·⌈50000/640⌉ + 40·⌈50000/3200⌉ + 40·⌈50000/16000⌉
    assert plan.total_updates == 60 * 391 + 60 * 79 + 40 * 16 + 40 * 4 == 29_000
    assert plan.baseline_total_updates == 200 * 391 == 78_200
    assert not any(p.capped for p in plan.phases)
    for p in plan.phases:
        assert p.workers * p.micro_batch * p.accum_steps == p.global_batch
        assert p.micro_batch % 128 == 0  # whole ghost batches
        assert p.workers <= 8 and p.micro_batch <= 1024


def test_phases_hold_one_split_and_plan_json_writes_it_flat() -> None:
    plan = make_plan(cifar("growth.max_dataset_fraction=null"), 50_000)
    assert [p.split.global_batch for p in plan.phases] == [128, 640, 3200, 16000]
    # A new phase at each change of split (the LR is constant): neighbours differ as records.
    assert all(a.split != b.split for a, b in zip(plan.phases, plan.phases[1:], strict=False))
    rows = plan.to_json()["phases"]
    # `distgrow plan --json` keeps its flat keys, in their old place after the epochs.
    assert list(rows[0])[:6] == ["start_epoch", "end_epoch", *SPLIT_FIELDS]
    assert all("split" not in row for row in rows)
    assert [Split.from_flat(row) for row in rows] == [p.split for p in plan.phases]
    assert str(plan.phases[0].split) == f"{plan.phases[0].workers}×128×1"


def test_preferred_micro_batch_is_micro_batch_else_base_batch() -> None:
    assert preferred_micro_batch(cifar("growth.micro_batch=256").growth) == 256
    assert preferred_micro_batch(cifar("growth.micro_batch=null").growth) == 128
    assert (
        Limits.from_config(cifar("growth.micro_batch=null").growth, cifar().model, 1000).micro_batch
        == 128
    )


def test_paper_hybrid_memory_cap_640() -> None:
    plan = make_plan(cifar("growth.max_global_batch=640"), 50_000)
    assert [p.global_batch for p in plan.phases] == [128, 640, 640, 640]
    assert [p.lr for p in plan.phases] == pytest.approx([0.1, 0.1, 0.02, 0.004])
    assert plan.total_updates == 60 * 391 + 140 * 79 == 34_520
    assert [p.capped for p in plan.phases] == [False, False, True, True]


def test_paper_larger_initial_lr() -> None:
    plan = make_plan(
        cifar("growth.mode=grow_batch_lr", "growth.lr_scale=5", "growth.max_dataset_fraction=null"),
        50_000,
    )
    first = plan.phases[0]
    assert (first.global_batch, first.lr) == (640, pytest.approx(0.5))
    # noise scale relative to the baseline's start stays on the user's path
    assert [p.noise for p in plan.phases] == pytest.approx([1, 0.2, 0.04, 0.008])


def test_paper_larger_momentum() -> None:
    plan = make_plan(
        cifar("growth.mode=grow_momentum", "growth.momentum=0.98", "growth.lr_scale=5",
              "growth.max_dataset_fraction=null"),
        50_000,
    )  # fmt: skip
    first = plan.phases[0]
    assert (first.global_batch, first.lr, first.momentum) == (3200, pytest.approx(0.5), 0.98)
    # ε/(B(1−m)): 0.5/(3200·0.02) == 0.1/(128·0.1)
    assert first.lr / (first.global_batch * (1 - first.momentum)) == pytest.approx(0.1 / 12.8)
    assert plan.total_updates is not None and plan.total_updates < 2_500


def test_covtype_plateau_ladder() -> None:
    cfg = load_config(CONFIGS / "covtype_bottleneck.yaml")
    plan = make_plan(cfg, 435_759)
    assert plan.ladder and plan.total_updates is None
    batches = [p.global_batch for p in plan.phases]
    assert batches[:5] == [256, 1280, 6400, 32000, 43575]  # ×5 while under N/10
    lrs = [p.lr for p in plan.phases]
    assert lrs[:4] == pytest.approx([6e-4] * 4)
    # past the cap the LR takes the decay: r = 0.2**4 with B = 43575 instead of 256/0.2**4
    assert lrs[4] == pytest.approx(6e-4 * 0.2**4 * 43575 / 256)
    assert lrs[5] / lrs[4] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# Realisation
# ---------------------------------------------------------------------------------------------


def brute_force(lim: Limits, target: int, floor_workers: int) -> int:
    """The largest batch any allowed split reaches, by enumeration of every split."""
    best = 0
    max_micro = lim.max_micro_batch or target
    top = max_micro // lim.multiple * lim.multiple
    # one pass holds the largest allowed micro-batch (a multiple of `multiple`) on every worker
    one_pass_capacity = lim.max_workers * (top if lim.max_micro_batch else 10**12)
    for w in range(max(floor_workers, lim.min_workers), lim.max_workers + 1):
        # the documented window: at most ACCUM_WINDOW steps beyond the fewest that fit
        fewest = math.ceil(min(target, lim.cap) / (w * top)) if top else 1
        accum_range = range(1, min(lim.max_accum_steps or 10**9, fewest + ACCUM_WINDOW) + 1)
        for micro in range(lim.multiple, max_micro + 1, lim.multiple):
            for a in accum_range:
                b = w * micro * a
                if b > min(target, lim.cap):
                    break
                if a > 1 and min(target, lim.cap) <= one_pass_capacity:
                    break  # accumulation only when one pass of every worker cannot hold it
                best = max(best, b)
    return best


@settings(max_examples=400, deadline=None)
@given(
    target=st.integers(1, 400),
    max_workers=st.integers(1, 6),
    micro=st.integers(1, 40),
    max_micro=st.one_of(st.none(), st.integers(1, 60)),
    max_accum=st.one_of(st.none(), st.integers(1, 6)),
    multiple=st.sampled_from([1, 1, 2, 4]),
    floor_workers=st.integers(1, 3),
)
def test_realise_is_largest_exact_split(
    target: int,
    max_workers: int,
    micro: int,
    max_micro: int | None,
    max_accum: int | None,
    multiple: int,
    floor_workers: int,
) -> None:
    assume(max_micro is None or micro <= max_micro)
    assume(floor_workers <= max_workers)
    lim = Limits(
        cap=10**6, max_workers=max_workers, micro_batch=micro, max_micro_batch=max_micro,
        max_accum_steps=max_accum, multiple=multiple,
    )  # fmt: skip
    got = lim.realise(target, floor_workers)
    expected = kept = brute_force(lim, target, floor_workers)
    # the previous worker count is kept unless it leaves the batch over NEAR_IDEAL below target
    coarse = floor_workers > 1 and kept < (1 - NEAR_IDEAL) * target
    if coarse:
        expected = max(kept, brute_force(lim, target, 1))
    if expected == 0:
        assert got is None
        return
    assert got is not None
    assert got.workers * got.micro_batch * got.accum_steps == got.global_batch
    assert (floor_workers if got.global_batch == kept else 1) <= got.workers <= max_workers
    assert got.workers >= floor_workers or coarse
    # within NEAR_IDEAL of the target whenever some allowed split is
    if brute_force(lim, target, 1) >= (1 - NEAR_IDEAL) * target:
        assert got.global_batch >= (1 - NEAR_IDEAL) * target
    assert got.micro_batch % multiple == 0
    assert max_micro is None or got.micro_batch <= max_micro
    assert max_accum is None or got.accum_steps <= max_accum
    assert got.global_batch == expected


def test_one_pass_capacity_counts_the_rounded_memory_limit() -> None:
    # max_micro_batch 55 in multiples of 2 holds 54: five workers hold 270 < 272 in one pass,
    # so accumulation is allowed and 4 x 34 x 2 reaches the target exactly (found by Hypothesis).
    lim = Limits(cap=10**6, max_workers=5, micro_batch=1, max_micro_batch=55,
                 max_accum_steps=None, multiple=2)  # fmt: skip
    assert lim.realise(272) == Realisation(272, 4, 34, 2)
    assert brute_force(lim, 272, 1) == 272


def test_workers_first_then_micro_then_accumulation() -> None:
    lim = Limits(cap=10**6, max_workers=4, micro_batch=32, max_micro_batch=64,
                 max_accum_steps=None, multiple=1)  # fmt: skip
    assert lim.realise(32) == Realisation(32, 1, 32, 1)
    assert lim.realise(96) == Realisation(96, 3, 32, 1)  # add workers at the preferred size
    assert lim.realise(128) == Realisation(128, 4, 32, 1)
    assert lim.realise(256) == Realisation(256, 4, 64, 1)  # then grow the micro-batch
    assert lim.realise(512) == Realisation(512, 4, 64, 2)  # accumulate only at both limits
    assert lim.realise(64) == Realisation(64, 2, 32, 1)
    assert lim.realise(64, floor_workers=3) == Realisation(64, 4, 16, 1)  # workers never drop


def test_rounding_down_when_no_exact_split() -> None:
    lim = Limits(cap=10**6, max_workers=3, micro_batch=10, max_micro_batch=10,
                 max_accum_steps=2, multiple=1)  # fmt: skip
    # 3 workers × 10 × 2 = 60 is the hardware's most; 61 rounds down to it
    assert lim.realise(61) == Realisation(60, 3, 10, 2)
    assert lim.realise(1000) == Realisation(60, 3, 10, 2)


def test_base_batch_that_cannot_be_split_is_a_config_error() -> None:
    cfg = load_config(None, ["growth.base_batch=100", "growth.max_workers=8"])
    with pytest.raises(ConfigError, match="cannot be split exactly over 8 workers.*96 or 104"):
        GrowthPolicy(cfg, 10_000, min_workers=8)
    with pytest.raises(ConfigError, match="the job has 9 workers"):
        GrowthPolicy(cfg, 10_000, min_workers=9)


# ---------------------------------------------------------------------------------------------
# Properties over random schedules and limits
# ---------------------------------------------------------------------------------------------

schedules = st.one_of(
    st.builds(
        lambda ms, g: [
            "schedule.type=multistep",
            f"schedule.milestones={ms}",
            f"schedule.gamma={g}",
        ],
        st.lists(st.integers(1, 11), min_size=1, max_size=4, unique=True).map(sorted),
        st.sampled_from([0.5, 0.2, 0.1, 0.3]),
    ),
    st.builds(
        lambda s, g: ["schedule.type=step", f"schedule.step_size={s}", f"schedule.gamma={g}"],
        st.integers(1, 5),
        st.sampled_from([0.5, 0.2]),
    ),
    st.builds(
        lambda g: ["schedule.type=exponential", f"schedule.gamma={g}"],
        st.sampled_from([0.9, 0.7, 0.5]),
    ),
    st.builds(
        lambda d: ["schedule.type=time_based", f"schedule.decay={d}"],
        st.sampled_from([0.01, 0.1, 0.5]),
    ),
    st.just(["schedule.type=cosine", "schedule.eta_min=0.001"]),
    st.just(["schedule.type=constant"]),
    st.builds(
        lambda floor: ["schedule.type=linear", f"schedule.eta_min={floor}"],
        st.sampled_from([0.0, 0.01]),
    ),
    st.builds(
        lambda tau: ["schedule.type=inverse_sqrt", f"schedule.timescale={tau}"],
        st.sampled_from([0.5, 2, 5]),
    ),
    st.builds(
        lambda length, shape: [
            "schedule.type=wsd",
            f"schedule.decay_length={length}",
            f"schedule.decay_shape={shape}",
        ],
        st.sampled_from([1, 3]),
        st.sampled_from(["linear", "cosine", "sqrt"]),
    ),
)


@settings(max_examples=120, deadline=None)
@given(
    sched=schedules,
    interval=st.sampled_from(["epoch", "step"]),
    n=st.integers(100, 3000),
    b0=st.sampled_from([4, 8, 12, 16, 32]),
    max_workers=st.integers(1, 6),
    max_micro=st.one_of(st.none(), st.sampled_from([16, 32, 48, 64])),
    max_accum=st.one_of(st.none(), st.integers(1, 8)),
    max_global=st.one_of(st.none(), st.sampled_from([64, 100, 256])),
    fraction=st.one_of(st.none(), st.sampled_from([0.1, 0.25, 0.5])),
    momentum=st.sampled_from([0.0, 0.9]),
    mode=st.sampled_from(["grow_batch", "decay_lr", "grow_batch_lr"]),
    ghost=st.sampled_from(["null", "null", "2", "4"]),
)
def test_noise_limits_monotonicity_and_counts(
    sched: list[str],
    interval: str,
    n: int,
    b0: int,
    max_workers: int,
    max_micro: int | None,
    max_accum: int | None,
    max_global: int | None,
    fraction: float | None,
    momentum: float,
    mode: str,
    ghost: str,
) -> None:
    epochs = 12
    assume(max_global is None or max_global >= b0)
    overrides = [
        *sched, f"schedule.interval={interval}", f"run.epochs={epochs}", "optim.lr=0.1",
        f"optim.momentum={momentum}", f"growth.mode={mode}", "growth.lr_scale=2",
        f"growth.base_batch={b0}", f"growth.max_workers={max_workers}",
        f"growth.micro_batch={min(b0, max_micro or b0)}",
        f"growth.max_micro_batch={'null' if max_micro is None else max_micro}",
        f"growth.max_accum_steps={'null' if max_accum is None else max_accum}",
        f"growth.max_global_batch={'null' if max_global is None else max_global}",
        f"growth.max_dataset_fraction={'null' if fraction is None else fraction}",
        f"model.ghost_batch={ghost}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    try:
        policy = GrowthPolicy(cfg, n)
    except ConfigError:
        assume(False)  # B0 not realisable under these limits: a config error, tested elsewhere
        return
    lim = policy.limits
    noise0 = 0.1 / (b0 * (1 - momentum))
    prev_batch, prev_workers, updates = 0, 0, 0
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            r = policy.ratio(epoch, position)
            # the noise scale follows the user's schedule exactly, at every update
            assert s.lr / (s.global_batch * (1 - s.momentum)) == pytest.approx(noise0 * r, rel=1e-9)
            # the realisation is exact and within every limit
            assert s.workers * s.micro_batch * s.accum_steps == s.global_batch
            assert s.global_batch <= max(lim.cap, b0)
            assert s.workers <= max_workers
            assert max_micro is None or s.micro_batch <= max_micro
            assert max_accum is None or s.accum_steps <= max_accum
            assert s.micro_batch % lim.multiple == 0
            if s.accum_steps > 1:
                assert max_micro is not None and s.global_batch > max_workers * max_micro
            # the batch never shrinks; the workers only when the previous count would leave
            # the batch more than NEAR_IDEAL below B* (ghost batches over many workers)
            assert s.global_batch >= prev_batch
            if s.workers < prev_workers:
                target = min(math.floor(s.ideal_batch * (1 + 1e-9)), lim.cap)
                kept = replace(lim, min_workers=prev_workers).realise(target)
                assert kept is None or kept.global_batch < (1 - NEAR_IDEAL) * target
            # the LR never exceeds its start
            assert s.lr <= policy.lr_unit * policy.start_batch**policy.exponent * (1 + 1e-9)
            if mode == "decay_lr":
                assert s.global_batch == policy.start_batch or policy.start_batch > lim.cap
                assert s.lr == pytest.approx(0.1 * r)
            prev_batch, prev_workers = s.global_batch, s.workers
            updates += 1
            position += s.global_batch if interval == "step" else n
            if interval == "epoch":
                updates += math.ceil(n / s.global_batch) - 1
    plan = make_plan(cfg, n)
    assert plan.total_updates == updates == sum(p.updates for p in plan.phases)
    assert sum(p.samples for p in plan.phases) == epochs * n
    assert plan.baseline_total_updates == epochs * math.ceil(n / b0)
    assert plan.total_updates <= plan.baseline_total_updates or mode == "decay_lr"


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True).map(sorted),
    cap=st.sampled_from([None, 200, 1000, 5000]),
)
def test_lr_fixed_until_the_batch_is_capped(cuts: list[int], cap: int | None) -> None:
    """×5 cuts with an exactly realisable batch: LR stays lr0 until the cap, then decays ×5."""
    cfg = load_config(None, [
        "schedule.type=multistep", f"schedule.milestones={cuts}", "schedule.gamma=0.2",
        "run.epochs=8", "growth.base_batch=8", "growth.max_dataset_fraction=null",
        f"growth.max_global_batch={'null' if cap is None else cap}", "optim.lr=0.1",
    ])  # fmt: skip
    plan = make_plan(cfg, 100_000)
    for p in plan.phases:
        if p.capped:
            assert cap is not None and p.global_batch == cap and p.lr < 0.1
            assert p.lr == pytest.approx(0.1 * p.noise * p.global_batch / 8)
        else:
            assert p.lr == pytest.approx(0.1)
            assert p.global_batch == pytest.approx(8 / p.noise)
    capped = [p.capped for p in plan.phases]
    assert capped == sorted(capped)  # once capped, capped for good


def test_policy_resume_replays_the_same_decisions() -> None:
    cfg = load_config(CONFIGS / "covtype_bottleneck.yaml", ["schedule.patience=1"])
    metrics = [1.0, 0.9, 0.9, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7]
    a = GrowthPolicy(cfg, 435_759)
    for m in metrics[:5]:
        a.end_epoch(m)
    b = GrowthPolicy(cfg, 435_759)
    b.load_state_dict(a.state_dict())
    for epoch, m in enumerate(metrics[5:], start=5):
        assert a.setting(epoch) == b.setting(epoch)
        assert a.end_epoch(m) == b.end_epoch(m)
    assert a.setting(20) == b.setting(20)
    assert a.rung >= 2  # the test exercised real growth events


def test_plateau_growth_fires_with_the_trigger() -> None:
    cfg = load_config(CONFIGS / "covtype_bottleneck.yaml")
    policy = GrowthPolicy(cfg, 435_759)
    batches = []
    for m in [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.5]:
        policy.end_epoch(m)
        batches.append(policy.setting(0).global_batch)
    # patience 3: epochs 2-5 don't improve, the 4th of them (epoch 5) grows ×5; epoch 6
    # improves, 7-10 don't, epoch 10 grows again
    assert batches == [256, 256, 256, 256, 1280, 1280, 1280, 1280, 1280, 6400]


def test_min_workers_is_respected() -> None:
    with pytest.raises(ConfigError, match="cannot be split exactly over 4 workers.*=512,"):
        make_plan(cifar(), 50_000, min_workers=4)  # 128 is one ghost batch: one worker only
    cfg = cifar("growth.max_dataset_fraction=null", "model.ghost_batch=null")
    plan = make_plan(cfg, 50_000, min_workers=4)
    assert all(p.workers >= 4 for p in plan.phases)
    assert [p.global_batch for p in plan.phases][:2] == [128, 640]


def test_every_shipped_config_plans() -> None:
    files = sorted(CONFIGS.glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(f)
        plan = make_plan(cfg, cfg.data.expected_train_size())
        assert plan.phases, f
        first = f.read_text().splitlines()[0]
        assert first.startswith("#"), f"{f.name} must start with a comment giving its command"
        assert "distgrow " in f.read_text(), f"{f.name} must show the command that runs it"


def test_phase_counts_for_step_interval_cover_all_samples() -> None:
    cfg = load_config(CONFIGS / "ionosphere_time_based.yaml")
    plan = make_plan(cfg, 235)
    assert plan.total_samples == 50 * 235 == sum(p.samples for p in plan.phases)
    assert plan.baseline_total_updates == 50 * math.ceil(235 / 28)
    assert plan.total_updates is not None and plan.total_updates < plan.baseline_total_updates
    batches = [p.global_batch for p in plan.phases]
    assert batches == sorted(batches) and batches[0] == 28
    # 1/(1 + 0.002 t) at the last update, t = 449.x baseline steps: B* ≈ 28 · 1.9
    assert batches[-1] == math.floor(28 * (1 + 0.002 * plan.phases[-1].start_epoch * 9) + 1e-9)
    assert list(itertools.pairwise(batches)) == [(b, b + 1) for b in batches[:-1]]


# ---------------------------------------------------------------------------------------------
# The cap, update by update
# ---------------------------------------------------------------------------------------------


def update_flags(policy: GrowthPolicy, epochs: int) -> list[tuple[bool, int]]:
    """(does the cap bind, global batch) for every update of the run, by walking the policy."""
    n, per_step = policy.dataset_size, policy.cfg.schedule.interval == "step"
    flags = []
    for epoch in range(epochs):
        position = 0
        while position < n:
            s = policy.setting(epoch, position)
            # the cap binds when the whole batch B* would be above it (B* rounds down first)
            ideal = s.ideal_batch
            binds = math.isinf(ideal) or math.floor(ideal * (1 + 1e-9)) > policy.limits.cap
            steps = 1 if per_step else math.ceil(n / s.global_batch)
            flags += [(binds, s.global_batch)] * steps
            position += s.global_batch if per_step else n
    return flags


@settings(max_examples=80, deadline=None)
@given(
    sched=schedules,
    interval=st.sampled_from(["epoch", "step"]),
    n=st.integers(100, 2000),
    b0=st.sampled_from([4, 8, 16]),
    cap=st.integers(17, 120),
)
def test_plan_marks_exactly_the_updates_where_the_cap_binds(
    sched: list[str], interval: str, n: int, b0: int, cap: int
) -> None:
    cfg = load_config(None, [
        *sched, f"schedule.interval={interval}", "run.epochs=10", "optim.lr=0.1",
        f"growth.base_batch={b0}", "growth.max_dataset_fraction=null",
        f"growth.max_global_batch={cap}",
    ])  # fmt: skip
    expected = update_flags(GrowthPolicy(cfg, n), 10)
    plan = make_plan(cfg, n)
    got = [(p.capped, p.global_batch) for p in plan.phases for _ in range(p.updates)]
    assert got == expected
    for p in plan.phases:
        if p.capped:  # the LR carries the rest: it ends below lr0 · B/B0
            assert p.lr_end <= 0.1 * p.global_batch / b0 * (1 + 1e-12)


def test_time_based_reaching_the_cap_is_flagged() -> None:
    """The issue's reproduction: ionosphere, per-step time-based decay, cap 40."""
    from distgrow.cli import format_plan

    cfg = load_config(CONFIGS / "ionosphere_time_based.yaml", ["growth.max_global_batch=40"])
    plan = make_plan(cfg, 235)
    capped = [p for p in plan.phases if p.capped]
    assert len(capped) == 1 and capped[0] is plan.phases[-1]
    # B* = 28 (1 + 0.002 t) reaches 41 at t = 232.14 baseline updates (9 per epoch): the first
    # capped update is the first at t >= 232.14; the one before it is the last uncapped one
    epoch = math.floor(capped[0].start_epoch)
    t = epoch * 9 + round((capped[0].start_epoch - epoch) * 235) / 28
    assert 232.14 <= t < 232.14 + 40 / 28
    assert plan.phases[-2].global_batch == 40 and not plan.phases[-2].capped
    assert capped[0].lr_end < capped[0].lr < 0.1
    table = format_plan(plan)
    assert "40*" in table and "* batch capped" in table
    # vs B*: B/B* at the phase's last update, where the LR is lr0 · B/B*
    assert capped[0].batch_to_ideal == pytest.approx(capped[0].lr_end / 0.1)
    last_row = next(line for line in table.splitlines() if "40*" in line)
    assert last_row.split()[-1] == f"-{1 - capped[0].lr_end / 0.1:.1%}" == "-24.7%"
    assert table.splitlines()[2].split()[-1] == "-3.3%"  # 28 until B* reaches 29: 28/28.96


def test_coarse_splits_keep_the_lr_near_lr0() -> None:
    """The issue's case: 8 workers, micro-batches in ghost batches of 32, per-step time-based.

    With the workers held at 8, B* = 511.97 was realised as 256 (the LR at 0.5·lr0); a split
    at another worker count reaches 480, the largest multiple of 32 below B*.
    """
    cfg = cifar("schedule.type=time_based", "schedule.decay=0.0001", "schedule.interval=step",
                "model.ghost_batch=32", "growth.micro_batch=32",
                "growth.max_dataset_fraction=null")  # fmt: skip
    policy = GrowthPolicy(cfg, 50_000)
    # B* = 128 (1 + 1e-4 t) = 511.97 at t = 29_998.4 baseline updates (391 per epoch)
    t = (511.97 / 128 - 1) / 1e-4
    epoch = int(t // 391)
    position = round((t - epoch * 391) * 128)
    plan = make_plan(cfg, 50_000)
    at = [p for p in plan.phases if p.start_epoch <= epoch + position / 50_000 < p.end_epoch]
    assert at[0].global_batch == 480 and not at[0].capped
    for p in plan.phases:
        # at most NEAR_IDEAL below B* at the workers kept, else one ghost batch (B ≥ B* − 32);
        # 1/B more because B* is rounded down to a whole target first
        bound = min(1 - NEAR_IDEAL, p.global_batch / (p.global_batch + 32))
        assert p.batch_to_ideal >= bound - 1 / p.global_batch, p
        assert p.lr_end >= 0.1 * p.batch_to_ideal * (1 - 1e-9)
    assert min(p.lr_end for p in plan.phases) > 0.08  # the old plan fell to 0.05 (= 0.5·lr0)
    # ε(t)/B(t) = lr0·r(t)/B0 at every update, whatever the split
    for epoch in range(0, 200, 7):
        for position in (0, 24_960):
            s = policy.setting(epoch, position)
            assert s.lr / s.global_batch == pytest.approx(0.1 * s.ratio / 128, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The rule (linear / sqrt), warm-ups, decays to zero, samples and tokens
# ---------------------------------------------------------------------------------------------


def walk(policy: GrowthPolicy, epochs: int) -> list[tuple[int, int, Any]]:
    """(epoch, position, setting) of every update of the run, update by update."""
    out = []
    for epoch in range(epochs):
        position = 0
        while position < policy.dataset_size:
            s = policy.setting(epoch, position)
            out.append((epoch, position, s))
            position += s.global_batch
    return out


@settings(max_examples=120, deadline=None)
@given(
    sched=schedules,
    rule=st.sampled_from(["linear", "sqrt"]),
    optim=st.sampled_from(["sgd", "adam", "adamw", "rmsprop"]),
    interval=st.sampled_from(["epoch", "step", "samples"]),
    warmup=st.sampled_from([0, 1, 2]),
    cap=st.sampled_from([None, 40, 100]),
    n=st.integers(100, 1500),
    b0=st.sampled_from([4, 8]),
    max_workers=st.integers(1, 4),
)
def test_each_rule_keeps_its_identity_at_every_update(
    sched: list[str], rule: str, optim: str, interval: str, warmup: int, cap: int | None,
    n: int, b0: int, max_workers: int,
) -> None:  # fmt: skip
    """ε/B^p = lr0·r(t)/B0^p at every update, warm-up and hybrid included (p = 1 or 1/2)."""
    # t in samples: warm-up and wsd lengths scaled to stay within the run
    scale = {"epoch": 1, "step": math.ceil(n / b0), "samples": n}[interval]
    sched = [
        f"schedule.decay_length={float(x.split('=')[1]) * scale}"
        if x.startswith("schedule.decay_length")
        else x
        for x in sched
    ]
    cfg = load_config(None, [
        *sched, f"schedule.interval={interval}", "run.epochs=6", "optim.lr=0.1",
        f"optim.name={optim}", f"growth.rule={rule}", f"schedule.warmup={warmup * scale}",
        f"growth.base_batch={b0}", f"growth.max_workers={max_workers}",
        "growth.max_dataset_fraction=null",
        f"growth.max_global_batch={'null' if cap is None else cap}",
    ])  # fmt: skip
    policy = GrowthPolicy(cfg, n)
    p = 1.0 if rule == "linear" else 0.5
    prev = 0
    for epoch, position, s in walk(policy, 6):
        r = policy.ratio(epoch, position)
        assert s.ratio == pytest.approx(r, rel=1e-12)
        assert s.lr / s.global_batch**p == pytest.approx(0.1 * r / b0**p, rel=1e-9, abs=1e-15)
        assert s.global_batch >= prev
        prev = s.global_batch
        if s.warmup:  # the warm-up is never converted: the batch stays at B0
            assert policy.time(epoch, position) < warmup * scale
            assert s.global_batch == b0 and not s.capped
        if s.capped:
            assert s.ideal_batch > policy.limits.cap
        elif s.global_batch == s.ideal_batch:  # the batch carries the whole decay
            warm, decay = policy.warmup_factor(epoch, position), policy.decay_ratio(epoch, position)
            assert s.lr == pytest.approx(0.1 * warm * decay ** (1 - p))


def test_sqrt_rule_multiplies_the_lr_by_the_root_of_each_cut() -> None:
    """Seesaw: where the schedule cuts the LR by α, sqrt cuts it by √α and grows B by 1/α."""
    cfg = cifar("optim.name=adam", "optim.momentum=0", "schedule.gamma=0.25",
                "growth.max_dataset_fraction=null", "growth.max_global_batch=2048")  # fmt: skip
    plan = make_plan(cfg, 50_000)
    assert plan.rule == "sqrt"  # auto, for adam
    assert [p.global_batch for p in plan.phases] == [128, 512, 2048, 2048]
    # ×0.25 cuts: LR 0.1 → 0.05 → 0.025 while B keeps up (√0.25 = 0.5 each), then the cap:
    # r = 0.25³ at B = 2048 = B0·16: ε = 0.1 · r · √16 = 0.00625
    assert [p.lr for p in plan.phases] == pytest.approx([0.1, 0.05, 0.025, 0.00625])
    assert [p.capped for p in plan.phases] == [False, False, False, True]
    for p in plan.phases:
        assert p.lr / math.sqrt(p.global_batch) == pytest.approx(0.1 * p.noise / math.sqrt(128))
    linear = make_plan(replace(cfg, growth=replace(cfg.growth, rule="linear")), 50_000)
    assert linear.rule == "linear"
    assert [p.lr for p in linear.phases] == pytest.approx([0.1, 0.1, 0.1, 0.025])


def test_auto_rule_is_linear_for_sgd_and_adamw_and_sqrt_for_adam_and_rmsprop() -> None:
    # adamw: linear since docs/lm.md's language-model evidence (growth.GrowthConfig.rule).
    for name, rule in (("sgd", "linear"), ("adam", "sqrt"), ("adamw", "linear"),
                       ("rmsprop", "sqrt")):  # fmt: skip
        cfg = load_config(None, [f"optim.name={name}"])
        assert cfg.growth.resolved_rule(name) == rule
        assert GrowthPolicy(cfg, 1000).rule == rule
    assert load_config(None, ["optim.name=adam", "growth.rule=linear"]).growth.rule == "linear"


def test_hybrid_fallback_is_the_same_under_both_rules() -> None:
    """Capped at 640, the batch stops at the same place; the LR takes the rest by its rule."""
    for rule, p in (("linear", 1.0), ("sqrt", 0.5)):
        plan = make_plan(cifar("growth.max_global_batch=640", f"growth.rule={rule}"), 50_000)
        assert [q.global_batch for q in plan.phases] == [128, 640, 640, 640]
        assert [q.capped for q in plan.phases] == [False, False, True, True]
        for q in plan.phases:
            assert q.lr / q.global_batch**p == pytest.approx(0.1 * q.noise / 128**p)
        assert plan.cap_from_epoch == 120
        assert any("capped at 640 from epoch 120 (hybrid)" in note for note in plan.notes)


def test_lr_warmup_stays_at_the_base_batch_then_the_decay_converts() -> None:
    cfg = cifar("schedule.type=cosine", "schedule.warmup=5", "schedule.warmup_start=0.1",
                "growth.max_dataset_fraction=null", "model.ghost_batch=null",
                "growth.micro_batch=16", "growth.max_workers=1")  # fmt: skip
    policy = GrowthPolicy(cfg, 50_000)
    for epoch in range(5):
        s = policy.setting(epoch)
        assert s.warmup and s.global_batch == 128 and not s.capped
        assert s.lr == pytest.approx(0.1 * (0.1 + 0.9 * epoch / 5))
    after = policy.setting(5)
    assert not after.warmup and after.global_batch == 128 and after.lr == pytest.approx(0.1)
    # the cosine's clock starts at the warm-up's end, over the 195 epochs left
    d = (1 + math.cos(math.pi * 60 / 195)) / 2
    s = policy.setting(65)
    assert s.ratio == pytest.approx(d) and s.global_batch == math.floor(128 / d)
    plan = make_plan(cfg, 50_000)
    assert plan.phases[0].warmup and (plan.phases[0].start_epoch, plan.phases[0].end_epoch) == (
        0,
        5,
    )
    assert not any(p.warmup for p in plan.phases[1:])
    assert any("LR warm-up (linear) over the first 5 epochs" in note for note in plan.notes)


def test_decays_to_zero_are_capped_and_the_plan_says_where() -> None:
    """cosine, linear and wsd to 0: B* is unbounded, the cap takes over, the LR goes to 0."""
    from distgrow.cli import format_plan

    for sched in (["schedule.type=cosine"], ["schedule.type=linear"],
                  ["schedule.type=wsd", "schedule.decay_length=40"]):  # fmt: skip
        cfg = cifar(*sched, "schedule.eta_min=0", "schedule.warmup=2",
                    "growth.max_dataset_fraction=null", "growth.max_global_batch=1024")  # fmt: skip
        plan = make_plan(cfg, 50_000)
        last = plan.phases[-1]
        assert last.capped and last.global_batch == 1024
        # at the last epoch (t = 199): r is the schedule's, the LR the hybrid's
        policy = GrowthPolicy(cfg, 50_000)
        r = policy.ratio(199)
        assert 0 < r < 128 / 1024 and last.lr_end == pytest.approx(0.1 * r * 1024 / 128)
        assert policy.ratio(200) == 0 and policy.setting(200).capped  # t = end: B* = ∞
        assert plan.cap_from_epoch == next(p.start_epoch for p in plan.phases if p.capped)
        table = format_plan(plan)
        assert f"capped at 1024 from epoch {plan.cap_from_epoch:.4g} (hybrid)" in table
        assert "reaches 0 at t = 200 epochs" in table


def megatron_rampup_batch(consumed: int, start: int, inc: int, samples: int, final: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, in plain integers."""
    if consumed >= samples:
        return final
    per_increment = samples / ((final - start) // inc)
    return start + int(consumed / per_increment) * inc


@pytest.mark.parametrize("mode", ["grow_batch", "decay_lr"])
def test_batch_warmup_is_realised_exactly_on_its_own_and_with_growth(mode: str) -> None:
    cfg = cifar(f"growth.mode={mode}", "model.ghost_batch=16", "growth.micro_batch=16",
                "growth.rampup_start_batch=32", "growth.rampup_increment=16",
                "growth.rampup_samples=60000", "growth.max_dataset_fraction=null")  # fmt: skip
    policy = GrowthPolicy(cfg, 50_000)
    seen_sizes = []
    for epoch, position, s in walk(policy, 3):
        consumed = epoch * 50_000 + position
        assert s.global_batch == megatron_rampup_batch(consumed, 32, 16, 60_000, 128)
        assert s.rampup == (consumed < 60_000)
        assert s.lr == pytest.approx(0.1)  # the LR of B0 throughout (epoch < 60: r = 1)
        seen_sizes.append(s.global_batch)
    assert sorted(set(seen_sizes)) == [32, 48, 64, 80, 96, 112, 128]
    plan = make_plan(cfg, 50_000)
    ramp = [p for p in plan.phases if p.rampup]
    assert [p.global_batch for p in ramp] == [32, 48, 64, 80, 96, 112]
    assert sum(p.samples for p in ramp) >= 60_000
    later = [p.global_batch for p in plan.phases if not p.rampup]
    # growth after the ramp; or the plain baseline: B0, the LR cut at each milestone
    assert later == ([128, 640, 3200, 16000] if mode == "grow_batch" else [128] * 4)
    assert any("batch warm-up: 32 → 128 in steps of 16" in note for note in plan.notes)


def test_batch_warmup_sizes_must_split_exactly() -> None:
    cfg = cifar("growth.rampup_start_batch=32", "growth.rampup_samples=1000")
    with pytest.raises(ConfigError, match="batch warm-up's batch 32 .*multiples of 128"):
        GrowthPolicy(cfg, 50_000)  # ghost batches of 128


def test_intervals_in_samples_and_tokens_follow_the_same_path() -> None:
    """t counted in data: the same r at every sample, however the batch is realised."""
    n, b0 = 12_800, 128
    steps = cifar("schedule.type=multistep", "schedule.milestones=[300, 500]",
                  "schedule.interval=step", "run.epochs=8",
                  "growth.max_dataset_fraction=null")  # fmt: skip
    samples = cifar("schedule.type=multistep", f"schedule.milestones=[{300 * b0}, {500 * b0}]",
                    "schedule.interval=samples", "run.epochs=8",
                    "growth.max_dataset_fraction=null")  # fmt: skip
    tokens = cifar("schedule.type=multistep",
                   f"schedule.milestones=[{300 * b0 * 512}, {500 * b0 * 512}]",
                   "schedule.interval=tokens", "data.seq_len=512", "run.epochs=8",
                   "growth.max_dataset_fraction=null")  # fmt: skip
    plans = [make_plan(c, n) for c in (steps, samples, tokens)]
    rows = [[(p.start_epoch, p.end_epoch, p.split, p.lr) for p in plan.phases] for plan in plans]
    assert rows[0] == rows[1] == rows[2]
    assert [p.global_batch for p in plans[1].phases] == [128, 640, 3200]
    # other realisations (workers, ghost batches, micro-batches) keep r(t) per sample
    other = replace(samples, growth=replace(samples.growth, max_workers=2, micro_batch=256),
                    model=replace(samples.model, ghost_batch=64))  # fmt: skip
    a, b = GrowthPolicy(samples, n), GrowthPolicy(other, n)
    for epoch, position in itertools.product(range(8), (0, 640, 6400, 12_672)):
        assert a.ratio(epoch, position) == b.ratio(epoch, position)
        assert a.time(epoch, position) == epoch * n + position
    tok = GrowthPolicy(tokens, n)
    assert tok.time(3, 640) == (3 * n + 640) * 512


def test_adam_adjustments_follow_the_batch() -> None:
    cfg = cifar("optim.name=adamw", "optim.momentum=0", "optim.weight_decay=0.1",
                "growth.rule=sqrt",  # the square-root forms below (auto is linear for adamw)
                "optim.betas=[0.9, 0.95]", "growth.beta2_half_life=true",
                "growth.weight_decay_timescale=true", "growth.max_dataset_fraction=null",
                "growth.max_global_batch=3200")  # fmt: skip
    plan = make_plan(cfg, 50_000)
    assert plan.adjustments == ["beta2_half_life", "weight_decay_timescale"]
    policy = GrowthPolicy(cfg, 50_000)
    for epoch in (0, 70, 130, 170, 199):
        s = policy.setting(epoch)
        k = s.global_batch / 128
        assert s.beta2 is not None and s.weight_decay is not None
        assert s.beta2 == pytest.approx(0.95**k)  # half-life in samples: ln 2 / -ln β₂ · B
        half_life = math.log(0.5) / math.log(s.beta2) * s.global_batch
        assert half_life == pytest.approx(math.log(0.5) / math.log(0.95) * 128)
        # AdamW's per-sample shrink ε·λ/B equals the baseline's lr0·r·λ0/B0
        assert s.lr * s.weight_decay / s.global_batch == pytest.approx(0.1 * s.ratio * 0.1 / 128)
        assert s.weight_decay == pytest.approx(0.1 * math.sqrt(k))  # sqrt rule: λ0·√(B/B0)
    off = GrowthPolicy(cifar("optim.name=adamw", "optim.momentum=0"), 50_000).setting(130)
    assert off.beta2 is None and off.weight_decay is None


def test_plateau_ladder_under_the_sqrt_rule() -> None:
    """Each plateau cut ×0.2: the batch ×5 and the LR ×√0.2 while under N/10, then the hybrid."""
    cfg = load_config(CONFIGS / "covtype_bottleneck.yaml", ["growth.rule=sqrt",
                                                            "schedule.warmup=3"])  # fmt: skip
    plan = make_plan(cfg, 435_759)
    assert plan.rule == "sqrt"
    assert [p.global_batch for p in plan.phases][:5] == [256, 1280, 6400, 32000, 43575]
    for k, p in enumerate(plan.phases):
        assert p.noise == pytest.approx(0.2**k)  # rows are after the warm-up: r = d
        assert p.lr / math.sqrt(p.global_batch) == pytest.approx(6e-4 * 0.2**k / 16)
    assert [p.lr for p in plan.phases][:4] == pytest.approx(
        [6e-4 * 0.2 ** (k / 2) for k in range(4)]
    )


# ---------------------------------------------------------------------------------------------
# An unset growth.max_workers is the job's world size (issue #11 item 7)
# ---------------------------------------------------------------------------------------------

FASHION = CONFIGS / "fashion_mnist_mlp.yaml"


def test_unset_max_workers_is_the_job_world_size() -> None:
    cfg = load_config(FASHION, [])
    assert cfg.growth.max_workers is None  # the config leaves it unset; so does the default
    for world in (1, 2, 4):
        limits = Limits.from_config(cfg.growth, cfg.model, 60_000, min_workers=world)
        assert limits.max_workers == world
    # torchrun --nproc_per_node=2: the plan grows on the two workers started, and never beyond.
    plan = make_plan(cfg, 60_000, min_workers=2)
    assert [(p.global_batch, p.workers) for p in plan.phases] == [
        (128, 2),
        (640, 2),
        (3200, 2),
    ]
    policy = GrowthPolicy(cfg, 60_000, min_workers=2)
    assert policy.limits.max_workers == 2


def test_unset_max_workers_counts_in_the_hardware_cap() -> None:
    cfg = load_config(
        FASHION,
        [
            "growth.max_micro_batch=256",
            "growth.max_accum_steps=2",
            "growth.max_dataset_fraction=null",
        ],
    )
    # world size × max_micro_batch × max_accum_steps: 3 × 256 × 2
    assert Limits.from_config(cfg.growth, cfg.model, 60_000, min_workers=3).cap == 1536


def test_a_max_workers_set_below_the_world_size_still_refuses() -> None:
    cfg = load_config(FASHION, ["growth.max_workers=1"])
    with pytest.raises(ConfigError, match=r"the job has 2 workers but growth.max_workers is 1\."):
        Limits.from_config(cfg.growth, cfg.model, 60_000, min_workers=2)


def test_the_plan_table_says_where_the_worker_limit_comes_from() -> None:
    from distgrow.cli import format_plan

    unset = load_config(FASHION, [])
    lines = format_plan(make_plan(unset, 60_000, 2), unset.growth, world_size=2).splitlines()
    assert lines[0].endswith(", B0=128, rule=linear")
    assert lines[1] == "max_workers: unset → the job's world size (2 here)"
    cfg = load_config(FASHION, ["growth.max_workers=4"])
    lines = format_plan(make_plan(cfg, 60_000), cfg.growth).splitlines()
    assert lines[1] == "max_workers: 4 (growth.max_workers)"
    assert "max_workers" not in format_plan(make_plan(cfg, 60_000))
