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
from distgrow.schedules import PlateauTrigger, build_schedule, plateau_ratio_after

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
