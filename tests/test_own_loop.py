"""Growth inside your own loop: distgrow.loop's schedule and batch sampler, and the example.

Unit tests check the sample order the loop API hands out (the same global batches for every
realisation, nothing dropped or repeated at a growth, a mid-epoch resume at another world size
continuing with exactly the samples left). The integration test runs
``examples/own_loop/train_ddp.py`` on 2 gloo ranks and ``distgrow train`` on the same config, and
requires the same parameters bit for bit.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    REPO_ROOT,
    SYN_PLAN,
    communicate_or_fail,
    distgrow_job_env,
    distgrow_job_run,
    free_port,
)
from torch.utils.data import DataLoader, TensorDataset

import distgrow
from distgrow.checkpoint import load_latest
from distgrow.config import Config, ConfigError, config_from_dict
from distgrow.data import epoch_permutation
from distgrow.loop import (
    GrowthBatchSampler,
    GrowthSchedule,
    MicroBatchCollate,
    ScheduleError,
    Update,
)
from distgrow.planner import GrowthPolicy

N = 1033  # the training samples of SYN_PLAN (1291 - 258 held out)
EXAMPLE = REPO_ROOT / "examples" / "own_loop"


def config(max_workers: int, **sections: dict[str, Any]) -> Config:
    """SYN_PLAN (batch 32 for epoch 1, then 64) with ``max_workers`` and some sections merged."""
    tree = copy.deepcopy(SYN_PLAN)
    tree["growth"]["max_workers"] = max_workers
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
    return config_from_dict(tree, source="test_own_loop")


# Step-interval milestones put the growths inside epochs: batch 32 → 64 after 40 baseline
# updates (epoch 2, 7 updates in), → 128 after 70 (epoch 3).
MID_EPOCH = {"schedule": {"interval": "step", "milestones": [40, 70]}}


def all_updates(schedule: GrowthSchedule) -> list[Update]:
    return list(schedule)


def global_view(updates_of_ranks: list[list[Update]]) -> list[tuple[int, int, list[int]]]:
    """(epoch, position, global batch) per update, after checking the ranks agree on it and
    that their micro-batches, put in chunk order, are the global batch."""
    out = []
    for per_rank in zip(*updates_of_ranks, strict=True):
        first = per_rank[0]
        assert {(u.epoch, u.position, u.step, u.setting) for u in per_rank} == {
            (first.epoch, first.position, first.step, first.setting)
        }
        chunks = sorted((m.chunk, m.indices.tolist()) for u in per_rank for m in u.micro_batches)
        assert [c for c, _ in chunks] == list(range(first.workers * first.accum_steps))
        assert [i for _, part in chunks for i in part] == first.indices.tolist()
        out.append((first.epoch, first.position, first.indices.tolist()))
    return out


def job(cfg: Config, world: int) -> list[GrowthSchedule]:
    return [GrowthSchedule(cfg, N, rank, world) for rank in range(world)]


# --------------------------------------------------------------------------------------------
# The sample order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sections", [{}, MID_EPOCH], ids=["epoch-growth", "mid-epoch-growth"])
def test_the_same_global_batches_for_every_realisation(sections: dict[str, Any]) -> None:
    views, splits, seeds = {}, {}, {}
    for world in (1, 2, 4):
        ranks = [all_updates(s) for s in job(config(world, **sections), world)]
        views[world] = global_view(ranks)
        splits[world] = sorted({(u.workers, u.micro_batch, u.accum_steps) for u in ranks[0]})
        # Dropout seeds follow the samples: chunk k of an update has the same seed everywhere.
        seeds[world] = sorted(
            (u.step, m.chunk, m.seed) for updates in ranks for u in updates for m in u.micro_batches
        )
    assert views[1] == views[2] == views[4]
    assert seeds[1] == seeds[2] == seeds[4]
    if not sections:
        assert splits == {
            1: [(1, 8, 4), (1, 8, 8)],
            2: [(2, 8, 2), (2, 8, 4)],
            4: [(4, 8, 1), (4, 8, 2)],
        }
        assert len(views[1]) == 33 + 17 + 17


@pytest.mark.parametrize("world", [1, 4])
def test_growth_inside_an_epoch_drops_and_repeats_no_sample(world: int) -> None:
    schedule = GrowthSchedule(config(world, **MID_EPOCH), N, 0, world)
    updates = all_updates(schedule)
    batches = [(u.epoch, u.global_batch) for u in updates]
    # Growths inside epochs 2 and 3, at the update the policy names.
    assert (1, 32) in batches and (1, 64) in batches and (2, 64) in batches
    assert (2, 128) in batches
    for epoch in range(3):
        mine = [u for u in updates if u.epoch == epoch]
        order = torch.cat([u.indices for u in mine])
        assert torch.equal(order, epoch_permutation(N, 3, epoch))  # each sample once, in order
        assert [u.position for u in mine] == [
            0,
            *torch.tensor([u.samples for u in mine]).cumsum(0)[:-1].tolist(),
        ]
    # The settings are those GrowthPolicy gives, asked at the same points.
    policy = GrowthPolicy(config(world, **MID_EPOCH), N, min_workers=world)
    assert [u.setting for u in updates] == [policy.setting(u.epoch, u.position) for u in updates]
    assert schedule.done and schedule.samples_seen == 3 * N and schedule.step == len(updates)


def test_partial_last_batch_leaves_empty_micro_batches_that_still_sync() -> None:
    last = [all_updates(s)[32] for s in job(config(2), 2)]  # epoch 1's last: 9 samples
    assert last[0].samples == 9 and last[0].last_in_epoch
    sizes = {
        (m.chunk, m.indices.numel(), m.seed is None, m.sync) for u in last for m in u.micro_batches
    }
    assert sizes == {
        (0, 3, False, False),
        (1, 3, False, False),
        (2, 3, False, True),
        (3, 0, True, True),
    }
    assert last[0].loss_scale == 2 / 9


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("after", [5, 33, 40, 52], ids=lambda k: f"after-{k}")
@pytest.mark.parametrize("then", [1, 4])
def test_resume_mid_epoch_at_another_world_size(after: int, then: int) -> None:
    reference = global_view([all_updates(s) for s in job(config(4, **MID_EPOCH), 2)])
    first = job(config(4, **MID_EPOCH), 2)
    done = []
    for schedule in first:
        handed = iter(schedule)
        done.append([next(handed) for _ in range(after)])
    state = first[0].state_dict()
    assert state == first[1].state_dict()
    assert state["step"] == after
    resumed = job(config(4, **MID_EPOCH), then)
    for schedule in resumed:
        schedule.load_state_dict(state)
    rest = [all_updates(s) for s in resumed]
    assert global_view(done) + global_view(rest) == reference
    assert rest[0][0].step == after and resumed[0].samples_seen == 3 * N
    assert {u.workers for u in rest[0]} == {then}


def test_sampler_read_ahead_does_not_move_the_state() -> None:
    schedule = GrowthSchedule(config(1, **MID_EPOCH), N, 0, 1)
    before = schedule.state_dict()
    sampler = GrowthBatchSampler(schedule)
    assert len(list(sampler)) == len(sampler) == 33 * 4  # epoch 1: 33 updates × 4 steps
    assert schedule.state_dict() == before
    updates = schedule.updates()
    for _ in range(10):
        next(updates)
    # A new iterator starts where the schedule stands.
    ahead = list(sampler)
    assert ahead[0] == schedule.remaining()[0].micro_batches[0].indices.tolist()
    assert len(ahead) == (33 - 10) * 4
    assert schedule.state_dict()["step"] == 10


def test_plateau_schedule_needs_the_metric_and_grows_on_it() -> None:
    plateau = {
        "schedule": {"type": "plateau", "patience": 0, "factor": 0.5, "monitor": "train_loss"}
    }
    schedule = GrowthSchedule(config(1, **plateau), N, 0, 1)
    epochs = schedule.epochs()
    next(epochs)
    list(schedule.updates())
    with pytest.raises(ScheduleError, match="end_epoch"):
        next(epochs)
    schedule = GrowthSchedule(config(1, **plateau), N, 0, 1)
    with pytest.raises(ScheduleError, match="needs the epoch's train_loss"):
        schedule.end_epoch()
    batches = []
    for _ in schedule.epochs():
        batches.append({u.global_batch for u in schedule.updates()})
        # Never better: with patience 0 every epoch after the first cuts, so the batch doubles.
        fired = schedule.end_epoch(1.0)
        saved = schedule.state_dict()
        assert fired == (len(batches) > 1)
        # A resume after end_epoch replays the plateau decision.
        again = GrowthSchedule(config(1, **plateau), N, 0, 1)
        again.load_state_dict(saved)
        if not again.done:
            assert again.remaining()[0].setting == schedule.remaining()[0].setting
    assert batches == [{32}, {32}, {64}]


def test_flat_iteration_with_a_plateau_schedule() -> None:
    plateau = {"schedule": {"type": "plateau", "patience": 0, "factor": 0.5, "monitor": "val_loss"}}
    schedule = GrowthSchedule(config(1, **plateau), N)
    batches: dict[int, set[int]] = {}
    for update in schedule:
        batches.setdefault(update.epoch, set()).add(update.global_batch)
        if update.last_in_epoch:
            schedule.end_epoch(float("nan"))  # a NaN never improves: a cut every epoch
    assert batches == {0: {32}, 1: {64}, 2: {128}}
    assert schedule.state_dict()["policy"]["rung"] == 3


def test_a_plan_wider_than_the_job_keeps_its_batch_with_more_accumulation() -> None:
    cfg = config(4)  # the plan starts at 4 workers × 8 × 1; the job has 2
    narrow = [all_updates(s) for s in job(cfg, 2)]
    wide = [all_updates(s) for s in job(cfg, 4)]
    assert global_view(narrow) == global_view(wide)
    assert {(u.workers, u.accum_steps) for u in narrow[0]} == {(2, 2), (2, 4)}
    with pytest.raises(ScheduleError, match=r"wants 4 workers .* Fix: launch 4 workers"):
        list(GrowthSchedule(config(4, growth={"max_accum_steps": 1}), N, 0, 2))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ScheduleError, match="rank 2 of world_size 2"):
        GrowthSchedule(config(2), N, 2, 2)
    with pytest.raises(ConfigError, match="growth.max_workers"):
        GrowthSchedule(config(2), N, 0, 3)
    state = GrowthSchedule(config(1), N).state_dict()
    with pytest.raises(ScheduleError, match="1033 samples, this schedule's has 1000"):
        GrowthSchedule(config(1), 1000).load_state_dict(state)
    schedule = GrowthSchedule(config(1), N)
    with pytest.raises(ScheduleError, match="epoch 1 is not finished"):
        for _ in schedule.epochs():
            next(schedule.updates())


@pytest.mark.integration
def test_the_package_exports_it_lazily() -> None:
    assert distgrow.GrowthSchedule is GrowthSchedule
    assert distgrow.GrowthBatchSampler is GrowthBatchSampler
    code = "import sys, distgrow; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Through a DataLoader
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_dataloader_yields_the_micro_batches_of_the_updates(loader_workers: int) -> None:
    features = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
    dataset = TensorDataset(features, torch.arange(N))
    schedule = GrowthSchedule(config(2, **MID_EPOCH), N, 1, 2)
    loader = DataLoader(
        dataset,
        batch_sampler=GrowthBatchSampler(schedule),
        collate_fn=MicroBatchCollate(dataset),
        num_workers=loader_workers,
    )
    seen = []
    for _ in schedule.epochs():
        batches = iter(loader)
        for update in schedule.updates():
            for micro in update.micro_batches:
                x, y = next(batches)
                assert torch.equal(y, micro.indices)
                assert x.shape == (micro.indices.numel(), 3) and x.dtype == torch.float32
                assert torch.equal(x, features[micro.indices])
                seen.append(y)
        assert next(batches, None) is None  # the loader ends with the epoch
    # Rank 1's half of every epoch, empty micro-batches included.
    assert sum(int(y.numel()) for y in seen) == sum(
        sum(m.indices.numel() for u in all_updates(s) for m in u.micro_batches)
        for s in [GrowthSchedule(config(2, **MID_EPOCH), N, 1, 2)]
    )
    assert any(y.numel() == 0 for y in seen)


def test_empty_collate_keeps_structure() -> None:
    dataset = [{"x": torch.ones(2, 2), "y": (torch.tensor(1), torch.zeros(3))}]
    empty = MicroBatchCollate(dataset)([])
    assert empty["x"].shape == (0, 2, 2)
    assert empty["y"][0].shape == (0,) and empty["y"][1].shape == (0, 3)


# --------------------------------------------------------------------------------------------
# The example against `distgrow train`
# --------------------------------------------------------------------------------------------


def run_example(cfg: Path, saved: Path) -> str:
    """``examples/own_loop/train_ddp.py CONFIG`` on 2 gloo ranks; returns its output."""
    env = {**distgrow_job_env(), "OMP_NUM_THREADS": "1"}  # distgrow's run.threads=1
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(EXAMPLE / "train_ddp.py"),
        str(cfg),
        f"--save={saved}",
        "--loader-workers=1",  # worker processes and prefetching, as with real data
    ]
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return communicate_or_fail(proc, 240, "examples/own_loop/train_ddp.py", expect=0)


@pytest.mark.integration
def test_example_ddp_loop_ends_with_distgrows_parameters(tmp_path: Path) -> None:
    cfg = EXAMPLE / "config.yaml"
    saved = tmp_path / "own.pt"
    out = run_example(cfg, saved)
    assert "epoch 3: " in out and "67 updates, batch 64" in out

    run_dir = tmp_path / "distgrow"
    distgrow_job_run(
        2, [str(cfg), f"run.output_dir={run_dir}", "logging.progress=off"], timeout=240
    )
    found = load_latest(run_dir)
    assert found is not None
    want = found[1]["model"]
    got = torch.load(saved, weights_only=True)
    assert found[1]["step"] == 67
    # Bit for bit: the same samples, split, seeds, loss scaling, DDP buckets and one thread.
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # And training moved them (the comparison is not of two untouched initialisations).
    torch.manual_seed(3)
    assert not torch.equal(want["1.weight"], torch.nn.Linear(20, 32).weight)


@pytest.mark.integration
def test_example_grows_adaptively_where_distgrow_train_does(tmp_path: Path) -> None:
    """growth.mode=adaptive with AdamW's β₂ half-life and weight-decay timescale: the loop
    measures the noise scale (DdpNoiseProbe), reports it (observe_noise), and grows at the
    updates, inside epochs, where ``distgrow train`` grows, ending with its parameters."""
    cfg = EXAMPLE / "adaptive.yaml"
    saved = tmp_path / "own.pt"
    out = run_example(cfg, saved)
    own = [
        int(line.split(":")[0].split()[1]) for line in out.splitlines() if "adaptive_growth" in line
    ]
    run_dir = tmp_path / "distgrow"
    distgrow_job_run(
        2, [str(cfg), f"run.output_dir={run_dir}", "logging.progress=off"], timeout=240
    )
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    growths = [r for r in events if r.get("event") == "growth"]
    assert [r["step"] for r in growths] == own and len(own) >= 2
    assert [r["global_batch"] for r in growths] == [64, 128]
    assert all(r["samples_seen"] % N for r in growths)  # inside an epoch, not at its end
    found = load_latest(run_dir)
    assert found is not None
    want, got = found[1]["model"], torch.load(saved, weights_only=True)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    torch.manual_seed(3)
    assert not torch.equal(want["1.weight"], torch.nn.Linear(20, 32).weight)
