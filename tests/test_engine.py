"""One engine: the schedule decides each update when asked, for ``distgrow train`` and own loops.

Unit checks of the lazy schedule (a noise decision takes effect at the next update, inside the
epoch; its state resumes at another world size; a sampler's stale read-ahead is refused), of
``Update.apply_to`` (Adam's β₂ and weight decay), and that the trainer's loop and its loader feed
follow the one schedule. The 2-rank parity of the own-loop example with ``distgrow train`` under
``growth.mode: adaptive`` is in test_own_loop.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
import torch
from test_formats import write_syn_npz
from test_trainer import records, syn_config, train

from distgrow.engine import UpdateHook, run_update
from distgrow.exits import EXIT_OK
from distgrow.loop import (
    GrowthSchedule,
    MicroBatch,
    ScheduleError,
    Update,
    resplit_policy_state,
)
from distgrow.planner import GrowthPolicy, Split

N = 1033  # the training split of syn_config's 1291 samples
ADAPTIVE = (
    "growth.mode=adaptive",
    "growth.adaptive.every=5",
    "growth.adaptive.min_updates=5",
    "growth.adaptive.patience=2",
)


def take(schedule: GrowthSchedule, n: int) -> list[tuple[int, int, int, int]]:
    """(epoch, position, step, global batch) of the next ``n`` updates."""
    return [
        (u.epoch, u.position, u.step, u.global_batch)
        for u in (schedule.next_update() for _ in range(n))
    ]


def grow_at_10(schedule: GrowthSchedule) -> list[str]:
    """Ten updates with a noise scale far above the batch reported at 5 and 10."""
    names = []
    for _ in range(2):
        take(schedule, 5)
        names += [name for name, _ in schedule.observe_noise(1e6, schedule.step)]
    return names


def test_a_noise_decision_takes_effect_at_the_next_update_inside_the_epoch(
    tmp_path: Path,
) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path, *ADAPTIVE), N, 0, 1)
    assert grow_at_10(schedule) == ["adaptive_growth"]  # patience 2: at the second report
    assert take(schedule, 2) == [(0, 320, 10, 64), (0, 384, 11, 64)]  # epoch 1 of 33 updates
    # A noise scale below the batch decides nothing: the base batch all the way.
    quiet = GrowthSchedule(syn_config(tmp_path, *ADAPTIVE), N, 0, 1)
    for _ in range(6):
        take(quiet, 5)
        assert quiet.observe_noise(10.0, quiet.step) == []
    assert {u.global_batch for u in quiet.updates()} == {32}


@pytest.mark.parametrize("then", [1, 2])
def test_the_state_after_a_decision_resumes_at_any_world_size(tmp_path: Path, then: int) -> None:
    cfg = syn_config(tmp_path, *ADAPTIVE, "growth.max_workers=2")
    schedule = GrowthSchedule(cfg, N, 0, 2)
    grow_at_10(schedule)
    take(schedule, 3)
    state = schedule.state_dict()
    want = list(schedule.updates())
    again = GrowthSchedule(cfg, N, 0, then)
    again.load_state_dict(state)
    got = list(again.updates())
    assert [u.global_batch for u in got] == [u.global_batch for u in want]
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(got, want, strict=True))
    assert got[0].step == 13 and got[0].global_batch == 64


def test_a_read_ahead_that_a_decision_made_stale_is_refused(tmp_path: Path) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path, *ADAPTIVE), N, 0, 1)
    take(schedule, 5)
    schedule.observe_noise(1e6, 5)
    take(schedule, 5)
    ahead = schedule.remaining()  # what a DataLoader's sampler reads: batch 32 ahead
    assert {u.global_batch for u in ahead} == {32}
    assert schedule.observe_noise(1e6, 10)[0][0] == "adaptive_growth"
    with pytest.raises(ScheduleError, match=r"read update 11 ahead .* Fix: make a new iter"):
        schedule.next_update()
    assert schedule.step == 10  # nothing handed out
    assert schedule.remaining()[0].global_batch == 64  # a new read follows the decision
    assert schedule.next_update().global_batch == 64


def test_apply_to_writes_lr_momentum_and_adams_beta2_and_weight_decay(tmp_path: Path) -> None:
    cfg = syn_config(
        tmp_path,
        *ADAPTIVE,
        "optim.name=adamw",
        "optim.momentum=0",
        "optim.weight_decay=0.01",
        "growth.beta2_half_life=true",
        "growth.weight_decay_timescale=true",
    )
    schedule = GrowthSchedule(cfg, N, 0, 1)
    grow_at_10(schedule)
    update = schedule.next_update()
    assert update.global_batch == 64
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1.0, weight_decay=0.01)
    update.apply_to(optimizer)
    group = optimizer.param_groups[0]
    assert update.setting.beta2 == pytest.approx(0.999**2)  # β₂0^(B/B0): its half-life kept
    assert group["betas"] == (0.9, update.setting.beta2) and "momentum" not in group
    assert group["lr"] == update.lr and group["weight_decay"] == update.setting.weight_decay
    assert update.setting.weight_decay != 0.01
    sgd = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0, momentum=0.5)
    plain = GrowthSchedule(syn_config(tmp_path), N, 0, 1).next_update()
    plain.apply_to(sgd)
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (0.05, 0.9)


def test_the_trainer_and_its_loader_feed_follow_the_one_schedule(tmp_path: Path) -> None:
    code, trainer = train(syn_config(tmp_path / "run", "run.epochs=1"))
    assert code == EXIT_OK
    schedule = trainer.schedule
    assert schedule.policy is trainer.policy  # its checkpoints hold the schedule's decisions
    assert (schedule.epoch, schedule.position, schedule.step) == (1, 0, trainer.state.step)
    assert schedule.samples_seen == trainer.state.samples_seen == N


class Recorder(UpdateHook):
    """Writes each call into ``calls``; holds the sync when asked to."""

    def __init__(self, name: str, calls: list[str], holds: bool = False) -> None:
        self.name, self.calls, self.holds = name, calls, holds

    def begin_update(self, update: Update) -> None:
        self.calls.append(f"{self.name}.begin")

    def holds_sync(self, update: Update) -> bool:
        return self.holds

    def before_last_backward(self, update: Update, total: torch.Tensor) -> None:
        self.calls.append(f"{self.name}.last {float(total):.6g}")

    def after_micro_step(self, update: Update, micro: MicroBatch) -> None:
        self.calls.append(f"{self.name}.after {micro.chunk}")

    def end_update(self, update: Update) -> None:
        self.calls.append(f"{self.name}.end")


@pytest.mark.parametrize("holds", [False, True])
def test_run_update_scales_syncs_seeds_and_calls_the_hooks_in_order(
    tmp_path: Path, holds: bool
) -> None:
    # 9 samples as 2 workers × 2 micro-steps (chunks of 3, 3, 3, 0): rank 1 has chunks 1 and 3.
    cfg = syn_config(tmp_path, "growth.max_workers=2")
    schedule = GrowthSchedule(cfg, N, 1, 2)
    update = schedule.make_update(0, 0, 0, schedule.policy.setting(0, 0), torch.arange(9))
    calls: list[str] = []
    seeds: list[int] = []
    syncs: list[bool] = []

    def micro_step(sync: bool) -> contextlib.nullcontext[None]:
        syncs.append(sync)
        return contextlib.nullcontext()

    def loss_of(micro: MicroBatch) -> torch.Tensor:
        calls.append(f"forward {micro.indices.tolist()}")
        return micro.indices.double().sum()

    total = run_update(
        update,
        loss_of,
        micro_step=micro_step,
        backward=lambda loss: calls.append(f"backward {float(loss):.6g}"),
        reseed=seeds.append,
        hooks=[Recorder("a", calls), Recorder("b", calls, holds)],
    )
    layout = [(m.chunk, m.indices.tolist()) for m in update.micro_batches]
    assert layout == [(1, [3, 4, 5]), (3, [])]
    assert update.loss_scale == 2 / 9 and float(total) == pytest.approx(12 * 2 / 9)
    assert syncs == [False, not holds]  # the all-reduce on the last micro-step, unless held
    assert seeds == [update.micro_batches[0].seed] and update.micro_batches[1].seed is None
    scaled = f"{12 * 2 / 9:.6g}"
    assert calls == [
        "a.begin", "b.begin",
        "forward [3, 4, 5]", f"backward {scaled}", "a.after 1", "b.after 1",
        "forward []", f"a.last {scaled}", f"b.last {scaled}", "backward 0",
        "a.after 3", "b.after 3",
        "a.end", "b.end",
    ]  # fmt: skip


def test_the_loader_feed_follows_an_adaptive_growth_mid_epoch(tmp_path: Path) -> None:
    """data.feed=loader under growth.mode=adaptive (refused before): the loader reads anew
    after a decision, and the run ends with the in-memory run's parameters, bit for bit."""
    write_syn_npz(tmp_path / "d.npz")
    common = ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", *ADAPTIVE, "run.epochs=2"]
    code_a, a = train(syn_config(tmp_path / "memory", *common))
    code_b, b = train(
        syn_config(tmp_path / "loader", *common, "data.feed=loader", "data.loader_workers=1")
    )
    assert code_a == code_b == EXIT_OK and a.feed is None and b.feed is not None
    assert b.feed.read_here == 0  # every micro-batch came from the loader, after the growth too
    grown = [r for r in records(tmp_path / "loader", "event") if r["event"] == "growth"]
    assert grown and grown[0]["samples_seen"] % N  # inside an epoch
    assert a.state.growth_events == b.state.growth_events
    want, got = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_one_rule_resplits_a_saved_batch_for_another_world_size() -> None:
    """``distgrow train`` and own loops resume at another world size through one function."""
    realised = {96: Split(96, 3, 32, 1), 100: Split(96, 3, 32, 1), 64: None}

    class Limits:
        def realise(self, batch: int) -> Split | None:
            return realised[batch]

    policy = cast(GrowthPolicy, SimpleNamespace(limits=Limits()))
    saved = {"current": asdict(Split(96, 2, 48, 1)), "other": 1}
    same, note = resplit_policy_state(saved, 2, 2, policy, 16)
    assert same == saved and note is None  # the same world size: untouched
    state, note = resplit_policy_state(saved, 2, 3, policy, 16)
    assert state == {"current": asdict(Split(96, 3, 32, 1)), "other": 1} and note is None
    assert saved["current"] == asdict(Split(96, 2, 48, 1))  # the caller's state is not changed
    odd = {"current": asdict(Split(100, 2, 50, 1))}
    state, note = resplit_policy_state(odd, 2, 3, policy, 2)
    assert state["current"]["global_batch"] == 96
    assert (
        note
        == "the saved global batch 100 cannot be realised on 3 workers; continuing with 96 = 3×32×1"
    )
    with pytest.raises(ScheduleError, match=r"global batch \(64\) cannot be split over 3 workers"):
        resplit_policy_state({"current": asdict(Split(64, 2, 32, 1))}, 2, 3, policy, 16)
