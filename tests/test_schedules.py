"""LR schedules as r(t), checked against torch's schedulers; the plateau trigger, differentially."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distgrow.config import ScheduleConfig
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
) -> None:
    kw = dict(mode=mode, patience=patience, factor=factor, threshold=threshold,
              threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr)  # fmt: skip
    expected_cuts, expected_lrs = torch_plateau_cut_epochs(metrics, LR0, **kw)
    cfg = ScheduleConfig(type="plateau", **kw)  # type: ignore[arg-type]
    trigger = PlateauTrigger.from_config(cfg)
    fired = 0
    cuts, lrs = [], []
    for epoch, m in enumerate(metrics, start=1):
        before = plateau_ratio_after(fired, factor=factor, lr0=LR0, min_lr=min_lr, eps=1e-8)
        if trigger.step(m):
            fired += 1
        after = plateau_ratio_after(fired, factor=factor, lr0=LR0, min_lr=min_lr, eps=1e-8)
        if after != before:
            cuts.append(epoch)
        lrs.append(LR0 * after)
    assert cuts == expected_cuts
    torch.testing.assert_close(lrs, expected_lrs, rtol=1e-12, atol=1e-15)


def test_plateau_trigger_state_round_trips() -> None:
    cfg = ScheduleConfig(type="plateau", patience=2, cooldown=1)
    a = PlateauTrigger.from_config(cfg)
    seq = [1.0, 0.9, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8]
    for m in seq[:5]:
        a.step(m)
    b = PlateauTrigger.from_config(cfg)
    b.load_state_dict(a.state_dict())
    assert [a.step(m) for m in seq[5:]] == [b.step(m) for m in seq[5:]]
    # By hand: bad epochs 3, 4, 5 -> fires at the 5th (3 > patience 2); the cooldown epoch
    # resets the count; bad epochs 7, 8, 9 -> fires at the 9th.
    fresh = PlateauTrigger.from_config(cfg)
    assert [fresh.step(m) for m in seq] == [False, False, False, False, True, False, False, False,
                                           True, False]  # fmt: skip
