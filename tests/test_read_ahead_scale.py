"""The own loop's read-ahead costs what it reads, not the epoch (distgrow.loop).

A ``GrowthBatchSampler`` over a 10^10-sample epoch hands a ``DataLoader`` its first micro-batches
after building as many updates as it read (counted, not timed); a decision after a partial read
is still refused as before, and a read that had not gone past it follows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_engine import ADAPTIVE, N
from test_trainer import syn_config
from torch.utils.data import DataLoader

import distgrow.loop
from distgrow.data.order import FeistelPermutation
from distgrow.loop import GrowthBatchSampler, GrowthSchedule, MicroBatchCollate, ScheduleError

HUGE = 10**10  # samples in one epoch: token data's scale, far past any list of its updates


class IndexOnly(torch.utils.data.Dataset[torch.Tensor]):
    """A map-style set of ``size`` samples whose sample ``i`` is ``i`` (nothing stored)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ``Update`` records distgrow.loop builds (their positions)."""
    positions: list[int] = []

    class Counted(distgrow.loop.Update):
        def __init__(self, **fields: Any) -> None:
            positions.append(fields["position"])
            super().__init__(**fields)

    monkeypatch.setattr(distgrow.loop, "Update", Counted)
    return positions


def test_a_10_billion_sample_epoch_is_read_a_few_updates_at_a_time(
    tmp_path: Path, built: list[int]
) -> None:
    cfg = syn_config(tmp_path)
    schedule = GrowthSchedule(cfg, HUGE, 0, 1)
    dataset = IndexOnly(HUGE)
    loader = DataLoader(
        dataset, batch_sampler=GrowthBatchSampler(schedule), collate_fn=MicroBatchCollate(dataset)
    )
    batches = iter(loader)
    assert built == [0]  # the first update, read at iter(): nothing of the rest of the epoch
    order = FeistelPermutation(HUGE, cfg.run.seed, 0)  # the epoch's order, computed on the fly
    for k in range(3):
        update = schedule.next_update()
        assert update.global_batch == 32 and update.position == 32 * k
        for micro in update.micro_batches:
            assert next(batches).tolist() == micro.indices.tolist()
        assert torch.equal(update.indices, order[32 * k : 32 * (k + 1)])
    # Three updates handed out (3 built) and three read by the loader (3 built): no more.
    assert sorted(built) == [0, 0, 32, 32, 64, 64]
    assert schedule.read_ahead_holds()  # what was read: nothing past the schedule
    assert len(built) == 6
    next(batches)  # the loader goes on: one update more
    assert sorted(built)[-1] == 96 and len(built) == 7
    assert max(int(i) for i in update.indices) < HUGE and schedule.step == 3


def test_reading_builds_the_updates_read_not_the_rest_of_the_epoch(
    tmp_path: Path, built: list[int]
) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path), N, 0, 1)
    batches = iter(GrowthBatchSampler(schedule))
    read = [next(batches) for _ in range(3 * 4)]  # 3 updates × 4 accumulation steps
    assert built == [0, 32, 64]
    want = [m.indices.tolist() for u in schedule.remaining()[:4] for m in u.micro_batches]
    assert read == want[:12]
    assert len(built) == 3 + 33  # remaining() builds the whole epoch: 33 updates
    assert next(batches) == want[12]  # the read goes on after it, one update more
    assert len(built) == 3 + 33 + 1


def test_a_decision_after_a_partial_read_is_refused_and_a_new_read_follows_it(
    tmp_path: Path,
) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path, *ADAPTIVE), N, 0, 1)
    sampler = GrowthBatchSampler(schedule)
    for _ in range(5):
        schedule.next_update()
    schedule.observe_noise(1e6, 5)
    for _ in range(5):
        schedule.next_update()
    batches = iter(sampler)
    ahead = [next(batches) for _ in range(2 * 4)]  # updates 11 and 12, read at batch 32
    assert [len(b) for b in ahead] == [8] * 8
    assert schedule.observe_noise(1e6, 10)[0][0] == "adaptive_growth"
    assert not schedule.read_ahead_holds()
    with pytest.raises(ScheduleError, match=r"read update 11 ahead .* Fix: make a new iter"):
        schedule.next_update()
    assert schedule.step == 10  # nothing handed out
    batches = iter(sampler)  # a new read follows the decision
    assert schedule.read_ahead_holds()
    update = schedule.next_update()
    assert update.global_batch == 64
    assert [next(batches) for _ in update.micro_batches] == [
        m.indices.tolist() for m in update.micro_batches
    ]


def test_a_read_that_had_not_gone_past_a_decision_follows_it(tmp_path: Path) -> None:
    schedule = GrowthSchedule(syn_config(tmp_path, *ADAPTIVE), N, 0, 1)
    for _ in range(5):
        schedule.next_update()
    schedule.observe_noise(1e6, 5)
    for _ in range(4):
        schedule.next_update()
    batches = iter(GrowthBatchSampler(schedule))  # reads update 10 (batch 32)
    update = schedule.next_update()
    assert [next(batches) for _ in range(4)] == [m.indices.tolist() for m in update.micro_batches]
    assert schedule.observe_noise(1e6, 10)[0][0] == "adaptive_growth"
    assert schedule.read_ahead_holds()  # it read nothing past update 10
    for _ in range(3):  # the same iterator reads on at the decided batch
        update = schedule.next_update()
        assert update.global_batch == 64
        got = [next(batches) for _ in update.micro_batches]
        assert got == [m.indices.tolist() for m in update.micro_batches]
