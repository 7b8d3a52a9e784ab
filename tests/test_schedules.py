"""LR schedules as r(t), checked against torch's schedulers; the plateau trigger, differentially."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distgrow.config import ScheduleConfig, load_config
from distgrow.planner import GrowthPolicy
from distgrow.schedules import (
    PlateauTrigger,
    Warmup,
    build_schedule,
    build_user_schedule,
    plateau_ratio_after,
)

LR0 = 0.1


def torch_lrs(make: object, epochs: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=LR0)
    sched = make(opt)  # type: ignore[operator]
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(
    ("cfg", "make"),
    [
        (
            ScheduleConfig(type="step", step_size=7, gamma=0.5),
            lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        ),
        (
            ScheduleConfig(type="multistep", milestones=[5, 12, 30], gamma=0.2),
            lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 12, 30], gamma=0.2),
        ),
        (
            ScheduleConfig(type="exponential", gamma=0.93),
            lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.93),
        ),
        (
            ScheduleConfig(type="cosine", t_max=40, eta_min=0.001),
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=40, eta_min=0.001),
        ),
        (
            ScheduleConfig(type="cosine", t_max=30, eta_min=0.0),  # to zero, then flat there
            lambda o: torch.optim.lr_scheduler.SequentialLR(
                o,
                [
                    torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30),
                    torch.optim.lr_scheduler.ConstantLR(o, factor=1e-300, total_iters=10**9),
                ],
                milestones=[30],
            ),
        ),
        (
            ScheduleConfig(type="linear", t_max=25, eta_min=0.002),
            lambda o: torch.optim.lr_scheduler.LinearLR(
                o, start_factor=1.0, end_factor=0.02, total_iters=25
            ),
        ),
        (
            ScheduleConfig(type="linear", t_max=40),  # to zero at the end
            lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: max(0.0, 1 - s / 40)),
        ),
    ],
)
def test_ratio_matches_torch_scheduler(cfg: ScheduleConfig, make: object) -> None:
    sched = build_schedule(cfg, LR0, horizon=40)
    ours = [LR0 * sched.ratio(t) for t in range(40)]
    torch.testing.assert_close(ours, torch_lrs(make, 40), rtol=1e-9, atol=1e-12)


def test_time_based_is_keras_decay() -> None:
    sched = build_schedule(ScheduleConfig(type="time_based", decay=0.002), LR0, horizon=450)
    for t in (0, 1, 10, 449):
        assert sched.ratio(t) == pytest.approx(1 / (1 + 0.002 * t), rel=1e-15)
    assert sched.continuous


def test_cosine_stays_at_floor_after_t_max() -> None:
    sched = build_schedule(ScheduleConfig(type="cosine", eta_min=0.01), LR0, horizon=10)
    assert sched.ratio(10) == pytest.approx(0.1)
    assert sched.ratio(25) == pytest.approx(0.1)  # no warm restart
    with pytest.raises(ValueError, match="eta_min"):
        build_schedule(ScheduleConfig(type="cosine", eta_min=0.5), LR0, horizon=10)


def test_ratios_never_increase() -> None:
    for cfg in (
        ScheduleConfig(type="step", step_size=3, gamma=0.3),
        ScheduleConfig(type="exponential", gamma=0.9),
        ScheduleConfig(type="time_based", decay=0.1),
        ScheduleConfig(type="cosine"),
    ):
        s = build_schedule(cfg, LR0, horizon=30)
        values = [s.ratio(t / 4) for t in range(0, 160)]
        assert values[0] == pytest.approx(1.0)
        assert all(b <= a + 1e-15 for a, b in itertools.pairwise(values))


def torch_plateau_cut_epochs(
    metrics: list[float], lr0: float, **kw: object
) -> tuple[list[int], list[float]]:
    """Epochs (1-based, as the trigger counts) where torch's ReduceLROnPlateau changed the LR."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kw)  # type: ignore[arg-type]
    cuts, lrs = [], []
    for epoch, m in enumerate(metrics, start=1):
        before = opt.param_groups[0]["lr"]
        sched.step(m)
        after = opt.param_groups[0]["lr"]
        if after != before:
            cuts.append(epoch)
        lrs.append(after)
    return cuts, lrs


metric_values = st.one_of(
    st.floats(min_value=-5, max_value=5, allow_nan=False),
    st.sampled_from([1.0, 1.0, 0.5, 0.5, 2.0, math.nan]),  # repeats make plateaus; NaN too
)


def policy_for(lr0: float, kw: dict[str, object], eps: float, mode: str) -> GrowthPolicy:
    """A plateau GrowthPolicy (``decay_lr`` or ``grow_batch``) with ReduceLROnPlateau's kw."""
    overrides = [f"schedule.{k}={v}" for k, v in kw.items()]
    overrides += ["schedule.type=plateau", f"schedule.plateau_eps={eps}", f"optim.lr={lr0}",
                  f"growth.mode={mode}", "growth.base_batch=8",
                  "growth.max_dataset_fraction=null"]  # fmt: skip
    return GrowthPolicy(load_config(None, overrides), 10**9)


@settings(max_examples=300, deadline=None)
@given(
    metrics=st.lists(metric_values, min_size=1, max_size=60),
    mode=st.sampled_from(["min", "max"]),
    patience=st.integers(0, 5),
    factor=st.sampled_from([0.1, 0.2, 0.5, 0.9]),
    threshold=st.sampled_from([0.0, 1e-4, 0.01, 0.2]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    cooldown=st.integers(0, 3),
    min_lr=st.sampled_from([0.0, 1e-3, 0.004, 0.05]),
    eps=st.sampled_from([0.0, 1e-8, 1e-3, 0.02]),
    lr0=st.sampled_from([0.1, 1.0]),
    growth=st.sampled_from(["decay_lr", "grow_batch"]),
)
def test_plateau_trigger_fires_exactly_where_torch_cuts(
    metrics: list[float],
    mode: str,
    patience: int,
    factor: float,
    threshold: float,
    threshold_mode: str,
    cooldown: int,
    min_lr: float,
    eps: float,
    lr0: float,
    growth: str,
) -> None:
    """The answers of the public API equal torch's cuts, also once min_lr or eps blocks them."""
    kw = dict(mode=mode, patience=patience, factor=factor, threshold=threshold,
              threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr)  # fmt: skip
    expected_cuts, expected_lrs = torch_plateau_cut_epochs(metrics, lr0, eps=eps, **kw)
    cfg = ScheduleConfig(type="plateau", plateau_eps=eps, **kw)  # type: ignore[arg-type]
    trigger = PlateauTrigger.from_config(cfg, lr0)
    policy = policy_for(lr0, kw, eps, growth)
    fired, ended, lrs, policy_lrs = [], [], [], []
    for epoch, m in enumerate(metrics, start=1):
        if trigger.step(m):
            fired.append(epoch)
        if policy.end_epoch(m):
            ended.append(epoch)
        lrs.append(trigger.lr)
        # the noise scale the policy follows is torch's LR: lr0 · r at the policy's rung
        policy_lrs.append(lr0 * policy.ratio(epoch))
        assert policy.rung == len(ended)
    assert fired == expected_cuts
    assert ended == expected_cuts
    torch.testing.assert_close(lrs, expected_lrs, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(policy_lrs, expected_lrs, rtol=1e-12, atol=1e-15)
    after = plateau_ratio_after(len(fired), factor=factor, lr0=lr0, min_lr=min_lr, eps=eps)
    torch.testing.assert_close([lr0 * after], expected_lrs[-1:], rtol=1e-12, atol=1e-15)
    if growth == "decay_lr":
        got = [policy.setting(0).lr]
        torch.testing.assert_close(got, expected_lrs[-1:], rtol=1e-12, atol=1e-15)


def test_plateau_answers_stop_at_min_lr() -> None:
    """The issue's smallest case (lr0 = 1): torch cuts after the 2nd and 3rd values only."""
    metrics = [1.0, 1.02, 1.021, 1.02, 1.02]
    kw = dict(mode="min", factor=0.2, patience=0, threshold=0.01, threshold_mode="abs",
              cooldown=0, min_lr=0.05)  # fmt: skip
    cuts, lrs = torch_plateau_cut_epochs(metrics, 1.0, **kw)
    assert cuts == [2, 3]
    assert lrs == pytest.approx([1.0, 0.2, 0.05, 0.05, 0.05])  # 0.2 · 0.2 = 0.04 < min_lr
    cfg = ScheduleConfig(type="plateau", **kw)  # type: ignore[arg-type]
    trigger = PlateauTrigger.from_config(cfg, 1.0)
    assert [trigger.step(m) for m in metrics] == [False, True, True, False, False]
    policy = policy_for(1.0, kw, 1e-8, "grow_batch")
    assert [policy.end_epoch(m) for m in metrics] == [False, True, True, False, False]
    assert policy.rung == 2 and policy.setting(5).global_batch == 8 * 20  # r = 0.05


def test_plateau_trigger_built_directly_starts_from_the_worst_value() -> None:
    up = PlateauTrigger(mode="max", patience=0, factor=0.5)
    assert up.best == -math.inf
    # rising accuracy improves every epoch; the flat one is the first bad epoch
    assert [up.step(m) for m in [0.5, 0.6, 0.7, 0.7]] == [False, False, False, True]
    assert up.best == 0.7 and up.lr == 0.5
    down = PlateauTrigger(mode="min", patience=0)
    assert down.best == math.inf
    assert [down.step(m) for m in [3.0, 2.0, 2.0]] == [False, False, True]


def test_plateau_trigger_state_round_trips() -> None:
    cfg = ScheduleConfig(type="plateau", patience=2, cooldown=1)
    a = PlateauTrigger.from_config(cfg, LR0)
    seq = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8]
    for m in seq[:5]:
        a.step(m)
    b = PlateauTrigger.from_config(cfg, LR0)
    b.load_state_dict(a.state_dict())
    assert [a.step(m) for m in seq[5:]] == [b.step(m) for m in seq[5:]]
    # By hand: bad epochs 3, 4, 5 -> fires at the 5th (3 > patience 2); the cooldown epoch
    # resets the count; bad epochs 7, 8, 9 -> fires at the 9th.
    fresh = PlateauTrigger.from_config(cfg, LR0)
    assert [fresh.step(m) for m in seq] == [False, False, False, False, True, False, False, False,
                                           True, False]  # fmt: skip


def test_warmup_then_cosine_matches_torch_sequential_lr() -> None:
    """LinearLR warm-up for 5, then CosineAnnealingLR on its own clock (torch's SequentialLR)."""
    cfg = ScheduleConfig(type="cosine", warmup=5, warmup_start=0.1, t_max=30, eta_min=0.001)
    sched = build_user_schedule(cfg, LR0, horizon=35)
    ours = [LR0 * sched.ratio(t) for t in range(35)]

    def make(o: torch.optim.Optimizer) -> object:
        warm = torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=5)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=0.001)
        return torch.optim.lr_scheduler.SequentialLR(o, [warm, cos], milestones=[5])

    torch.testing.assert_close(ours, torch_lrs(make, 35), rtol=1e-9, atol=1e-12)
    # the planner's split: the warm-up is the LR-only part, the decay the converted part
    assert [sched.warmup_factor(t) for t in (0, 2.5, 5, 9)] == pytest.approx([0.1, 0.55, 1, 1])
    assert sched.decay_ratio(3) == 1.0 and sched.decay_ratio(5 + 30) == pytest.approx(0.01)


def test_inverse_sqrt_after_warmup_is_fairseqs() -> None:
    """fairseq's inverse_sqrt: lr0·step/W during the warm-up, then lr0·sqrt(W/step)."""
    w = 8
    cfg = ScheduleConfig(type="inverse_sqrt", warmup=w)
    sched = build_user_schedule(cfg, LR0, horizon=100)
    ours = [LR0 * sched.ratio(t) for t in range(100)]
    fairseq = lambda s: s / w if s < w else math.sqrt(w / s)  # noqa: E731
    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.LambdaLR(o, fairseq), 100)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)
    # with its own timescale: transformers' get_inverse_sqrt_schedule, 1/sqrt((t + τ - W)/τ)
    own = build_user_schedule(ScheduleConfig(type="inverse_sqrt", warmup=4, timescale=10), LR0, 50)
    assert own.ratio(24) == pytest.approx(1 / math.sqrt((24 + 10 - 4) / 10))


def test_wsd_is_flat_then_decays_in_its_shape() -> None:
    for shape, mid in (("linear", 0.5), ("cosine", 0.5), ("sqrt", 1 - math.sqrt(0.5))):
        cfg = ScheduleConfig(type="wsd", decay_length=20, decay_shape=shape)  # type: ignore[arg-type]
        s = build_schedule(cfg, LR0, horizon=100)
        assert s.ratio(0) == s.ratio(80) == 1.0
        assert s.ratio(90) == pytest.approx(mid)
        assert s.ratio(100) == 0.0 and s.ratio(150) == 0.0
    s = build_schedule(ScheduleConfig(type="wsd", decay_length=10, eta_min=0.01), LR0, 50)
    assert s.ratio(45) == pytest.approx(0.1 + 0.9 * 0.5) and s.ratio(50) == pytest.approx(0.1)
    quarter = build_schedule(ScheduleConfig(type="wsd", decay_length=20, decay_shape="cosine"),
                             LR0, 100)  # fmt: skip
    assert quarter.ratio(85) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


def test_exponential_warmup_is_geometric() -> None:
    warm = Warmup(length=4, start=0.01, shape="exponential")
    values = [warm.factor(t) for t in range(6)]
    assert values[0] == pytest.approx(0.01) and values[4:] == [1.0, 1.0]
    steps = [b / a for a, b in itertools.pairwise(values[:5])]
    assert steps == pytest.approx([100 ** (1 / 4)] * 4)  # the same factor every unit of t


every_type = st.one_of(
    st.builds(lambda s, g: ScheduleConfig(type="step", step_size=s, gamma=g),
              st.floats(0.5, 20), st.floats(0.05, 0.95)),
    st.builds(lambda g: ScheduleConfig(type="exponential", gamma=g), st.floats(0.5, 0.999)),
    st.builds(lambda d: ScheduleConfig(type="time_based", decay=d), st.floats(0, 2)),
    st.builds(lambda f: ScheduleConfig(type="cosine", eta_min=f), st.sampled_from([0, 0.01])),
    st.builds(lambda f: ScheduleConfig(type="linear", eta_min=f), st.sampled_from([0, 0.01])),
    st.builds(lambda tau: ScheduleConfig(type="inverse_sqrt", timescale=tau), st.floats(0.1, 50)),
    st.builds(lambda d, shape: ScheduleConfig(type="wsd", decay_length=d, decay_shape=shape),
              st.floats(1, 30), st.sampled_from(["linear", "cosine", "sqrt"])),
    st.just(ScheduleConfig(type="constant")),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    cfg=every_type,
    warmup=st.sampled_from([0.0, 3.0, 7.5]),
    shape=st.sampled_from(["linear", "exponential"]),
    start=st.sampled_from([0.0, 0.05, 0.5]),
)
def test_every_type_warms_up_then_only_decays(
    cfg: ScheduleConfig, warmup: float, shape: str, start: float
) -> None:
    """w(t) rises to 1 by the warm-up's end and stays; d(t) starts at 1 and never rises."""
    if shape == "exponential" and start == 0.0:
        start = 0.05
    cfg = ScheduleConfig(**{**cfg.__dict__, "warmup": warmup, "warmup_shape": shape,
                            "warmup_start": start})  # fmt: skip
    sched = build_user_schedule(cfg, LR0, horizon=40)
    ts = [t / 4 for t in range(0, 200)]
    warm = [sched.warmup_factor(t) for t in ts]
    decay = [sched.decay_ratio(t) for t in ts]
    assert all(b >= a - 1e-15 for a, b in itertools.pairwise(warm))
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(decay))
    assert all(w == 1.0 for t, w in zip(ts, warm, strict=True) if t >= warmup)
    assert all(d == 1.0 for t, d in zip(ts, decay, strict=True) if t <= warmup)
    assert all(0.0 <= d <= 1.0 for d in decay)
    assert warm[0] == pytest.approx(start if warmup else 1.0)
    for t in ts:
        assert sched.ratio(t) == sched.warmup_factor(t) * sched.decay_ratio(t)


@pytest.mark.parametrize(
    ("overrides", "make"),
    [
        (
            ["schedule.type=cosine", "schedule.eta_min=0.0005"],
            lambda o, T: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=0.0005),
        ),
        (
            ["schedule.type=linear"],
            lambda o, T: torch.optim.lr_scheduler.LinearLR(o, 1.0, 1e-12, total_iters=T),
        ),
        (
            ["schedule.type=inverse_sqrt", "schedule.timescale=7"],
            lambda o, T: torch.optim.lr_scheduler.LambdaLR(o, lambda s: (7 / (7 + s)) ** 0.5),
        ),
        (
            ["schedule.type=cosine", "schedule.warmup=12", "schedule.warmup_start=0.25"],
            lambda o, T: torch.optim.lr_scheduler.SequentialLR(
                o,
                [
                    torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, total_iters=12),
                    torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T - 12),
                ],
                milestones=[12],
            ),
        ),
    ],
)
def test_decay_lr_baseline_follows_torchs_scheduler_update_by_update(
    overrides: list[str], make: object
) -> None:
    """The decay_lr path (interval=step, B0 fixed) gives torch's LR at every update."""
    n, b0, epochs = 640, 32, 4  # 20 updates per epoch, 80 in all
    cfg = load_config(None, [*overrides, "schedule.interval=step", f"run.epochs={epochs}",
                             f"optim.lr={LR0}", "growth.mode=decay_lr",
                             f"growth.base_batch={b0}"])  # fmt: skip
    policy = GrowthPolicy(cfg, n)
    ours = [policy.setting(e, k * b0).lr for e in range(epochs) for k in range(n // b0)]
    expected = torch_lrs(lambda o: make(o, 80), 80)  # type: ignore[operator]
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-12)
