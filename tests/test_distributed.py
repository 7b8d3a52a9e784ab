"""Real multi-process jobs: 1-4 gloo ranks on the CPU, started by torchrun.

* the same plan realised as 1 worker × 4 accumulation steps, 2 × 2 and 4 × 1 ends with the same
  parameters (an MLP with dropout, and a CNN with ghost batch norm and its running statistics);
* a resume at another world size (2 → 1 → 4 ranks) ends where an uninterrupted run does;
* a job killed with SIGKILL mid-epoch resumes from its last checkpoint to the same parameters;
* SIGTERM to one rank, or SIGUSR1 to a single process, stops training after the current update
  with a checkpoint at that exact point (exit 143 / 138 on every rank), and a resume, at any
  world size, ends where an uninterrupted run does with every epoch's samples counted once;
* a plan that needs more workers exits 75 with ``resize.json``, and a relaunch with them
  finishes the run;
* Fashion-MNIST, end to end, reaches an accuracy only a working trainer reaches.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    SYN_PLAN,
    SYN_UPDATES,
    assert_same_model,
    distgrow_job_run,
    distgrow_job_start,
    kill_process_tree,
    rank_pids,
    write_config,
)

from distgrow.checkpoint import list_checkpoints, load_checkpoint, load_latest
from distgrow.metrics import read_jsonl

pytestmark = pytest.mark.integration

FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent

SYN: dict[str, Any] = {**SYN_PLAN, "logging": {"every_steps": 10}}  # see conftest.SYN_PLAN

# 300 Fashion-MNIST images through a CNN whose batch norms are ghost batch norms of 4: every
# micro-batch of 8 holds two ghost batches; the partial batches leave empty micro-batches.
# lr 0.01: at 0.05 this network is chaotic early on (max-pool near-ties): even 1 × 16 × 2
# against 1 × 8 × 4 in one process, the same sums in another order, drift apart by 1e-2 in 15
# updates. At 0.01 it is calmer, but not calm enough for a rounding tolerance: see FLIP_FRACTION.
GHOST: dict[str, Any] = {
    "run": {"name": "ghost", "epochs": 2, "seed": 1, "threads": 1},
    "data": {"name": "fashion_mnist", "limit_train": 300, "limit_val": 100},
    "model": {"name": "cnn", "ghost_batch": 4},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
    "growth": {
        "base_batch": 32,
        "micro_batch": 8,
        "max_micro_batch": 8,
        "max_dataset_fraction": None,
    },
    "logging": {"every_steps": 5},
}

# How far the ghost-BN realisations may end apart, as a fraction of how far each tensor moved
# in the last epoch. Every micro-batch's gradient is bit for bit the same in 1 × 8 × 4, 2 × 8 × 2
# and 4 × 8 × 1 (same samples, parameters, kernels and dropout seeds); only the order of their
# sum differs (accumulation in one process, gloo's all-reduce across ranks), so one update
# agrees to float32 rounding. This CNN's ReLU gates and max-pool choices turn a rounding
# difference into a different gradient wherever a value lies within an ulp of the boundary, and
# where that happens depends on the CPU's kernels. Measured with these 15 updates (issue #11):
# 4e-5 of the movement when nothing flips; when something does, up to 1.2e-2 under
# ATEN_CPU_CAPABILITY=avx2 (2 ranks) and 1.7e-2 under ONEDNN_MAX_CPU_ISA=SSE41 (4 ranks: 9.6e-5
# in features.0.weight, as on the AMD EPYC of the issue). A wrong loss scale of 1.25 ends 0.74
# of the movement away; a lost micro-batch takes a quarter of every update's gradient.
FLIP_FRACTION = 0.05


def assert_same_training(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], before: dict[str, torch.Tensor]
) -> None:
    """``got`` ends where ``want`` does, up to FLIP_FRACTION of ``want``'s last movement.

    Args:
        got: The state dict of another realisation.
        want: The single worker's final state dict.
        before: The single worker's state dict one epoch earlier.
    """
    assert got.keys() == want.keys()
    for name, value in want.items():
        if not value.is_floating_point():
            assert torch.equal(got[name], value), name
            continue
        moved = float((value - before[name]).abs().max())
        assert moved > 0, f"{name} did not move in the last epoch: nothing to compare"
        # 1e-6 absolute: the rounding floor for a tensor that barely moved (as assert_same_model).
        allowed = FLIP_FRACTION * moved + 1e-6
        off = float((got[name] - value).abs().max())
        assert off <= allowed, (
            f"{name}: {off:.3g} from the single worker, more than {FLIP_FRACTION} of the "
            f"{moved:.3g} it moved in the last epoch"
        )


needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(),
    reason=f"Fashion-MNIST not at {FASHION} (apt install dataset-fashion-mnist)",
)


def train_job(
    nproc: int,
    config: Path,
    run_dir: Path,
    *overrides: str,
    expect: int | None = 0,
    timeout: float = 240,
) -> str:
    """Run ``distgrow train`` on ``nproc`` ranks (growth.max_workers = nproc); its output."""
    args = [
        str(config),
        f"run.output_dir={run_dir}",
        f"growth.max_workers={nproc}",
        *overrides,
    ]
    return distgrow_job_run(nproc, args, expect=expect, timeout=timeout).stdout


def final_state(run_dir: Path) -> dict[str, Any]:
    found = load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]


def splits(run_dir: Path) -> set[tuple[int, int, int]]:
    return {
        (r["workers"], r["micro_batch"], r["accum_steps"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "step"
    }


@pytest.fixture(scope="module")
def syn_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "syn.yaml", SYN)


@pytest.fixture(scope="module")
def syn_reference(syn_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic plan on 2 ranks (2×8×2, then 2×8×4), uninterrupted."""
    run_dir = tmp_path_factory.mktemp("syn") / "ref2"
    train_job(2, syn_config, run_dir)
    return run_dir


def test_accumulation_and_workers_are_interchangeable(
    syn_config: Path, syn_reference: Path, tmp_path: Path
) -> None:
    runs = {2: syn_reference}
    for nproc in (1, 4):
        runs[nproc] = tmp_path / f"w{nproc}"
        train_job(nproc, syn_config, runs[nproc])
    assert splits(runs[1]) == {(1, 8, 4), (1, 8, 8)}
    assert splits(runs[2]) == {(2, 8, 2), (2, 8, 4)}
    assert splits(runs[4]) == {(4, 8, 1), (4, 8, 2)}
    states = {n: final_state(d) for n, d in runs.items()}
    assert {s["step"] for s in states.values()} == {SYN_UPDATES}
    assert_same_model(states[2]["model"], states[1]["model"])
    assert_same_model(states[4]["model"], states[1]["model"])
    # Validation sees the same parameters, so it reports the same numbers.
    accs = {n: json.loads((d / "summary.json").read_text())["val_acc"] for n, d in runs.items()}
    assert len(set(accs.values())) == 1 and accs[1] > 0.5


@pytest.mark.parametrize("nproc", [2, 4])
def test_ghost_batch_norm_is_interchangeable(
    nproc: int, tmp_path: Path, ghost_single: tuple[Path, Path]
) -> None:
    config, single = ghost_single
    run_dir = tmp_path / f"w{nproc}"
    train_job(nproc, config, run_dir)
    accum = 4 // nproc
    assert splits(run_dir) == {(nproc, 8, accum), (nproc, 8, 2 * accum)}
    want, got = final_state(single), final_state(run_dir)
    assert got["step"] == want["step"] == 10 + 5
    first_epoch = load_checkpoint(list_checkpoints(single)[-2])
    assert first_epoch["step"] == 10
    # Parameters and the running statistics: merged across ranks as one worker accumulates them.
    assert any(".running_var" in name for name in want["model"])
    assert_same_training(got["model"], want["model"], first_epoch["model"])


@pytest.fixture(scope="module")
def ghost_single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if not FASHION.is_dir():
        pytest.skip(f"Fashion-MNIST not at {FASHION} (apt install dataset-fashion-mnist)")
    base = tmp_path_factory.mktemp("ghost")
    config = write_config(base / "ghost.yaml", GHOST)
    train_job(1, config, base / "w1")
    return config, base / "w1"


def test_resume_at_other_world_sizes(syn_config: Path, syn_reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_job(2, syn_config, run_dir, "run.epochs=1")
    out = train_job(1, syn_config, run_dir, "run.epochs=2", "--resume")
    assert "resuming from" in out and "on 1 worker(s)" in out
    train_job(4, syn_config, run_dir, "--resume")
    assert splits(run_dir) == {(2, 8, 2), (1, 8, 8), (4, 8, 2)}
    got, want = final_state(run_dir), final_state(syn_reference)
    assert got["step"] == SYN_UPDATES and got["samples_seen"] == 3 * 1033
    assert_same_model(got["model"], want["model"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["total_updates"] == SYN_UPDATES
    # Worker-seconds add up each process's wall-clock × its world size.
    assert summary["worker_seconds"] > summary["wall_s"]


def _latest_step_record(metrics: Path) -> dict[str, Any] | None:
    if not metrics.exists():
        return None
    last = None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written right now
            continue
        if record.get("kind") == "step":
            last = record
    return last


def _wait_until(condition: Callable[[], bool], proc: Any, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the job ended (status {proc.returncode}) too early:\n{log.read_text()}")
        if time.monotonic() > deadline:
            kill_process_tree(proc.pid)
            pytest.fail(f"timed out waiting for the job:\n{log.read_text()}")
        time.sleep(0.01)


def test_sigkill_mid_epoch_then_resume(
    syn_config: Path, syn_reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    log = tmp_path / "killed.log"
    args = [str(syn_config), f"run.output_dir={run_dir}", "growth.max_workers=2"]
    with log.open("w") as output:
        proc = distgrow_job_start(2, [*args, "logging.every_steps=1"], output)
        try:
            # Past the epoch-1 checkpoint (step 33) and into epoch 2, then kill everything.
            def into_epoch_two() -> bool:
                record = _latest_step_record(run_dir / "metrics.jsonl")
                return record is not None and record["epoch"] == 2 and record["step"] > 34

            _wait_until(into_epoch_two, proc, log)
            victims = kill_process_tree(proc.pid)
            proc.wait(timeout=30)
        finally:
            kill_process_tree(proc.pid)
    assert len(victims) >= 3  # torchrun and its two workers
    assert not (run_dir / "summary.json").exists()
    # Killed between checkpoints: updates were done that the resume has to redo. (Normally in
    # epoch 2 after ckpt-33; a starved poller may land in epoch 3, which proves the same.)
    newest = list_checkpoints(run_dir)[-1]
    killed_at = _latest_step_record(run_dir / "metrics.jsonl")
    assert killed_at is not None
    assert int(newest.stem.split("-")[1]) < killed_at["step"] < SYN_UPDATES

    out = train_job(2, syn_config, run_dir, "--resume")
    assert f"resuming from {newest}" in out
    # Same world size, same order of operations: the very same bits.
    assert_same_model(
        final_state(run_dir)["model"], final_state(syn_reference)["model"], exact=True
    )


def test_more_workers_needed_exits_75_then_a_relaunch_finishes(
    syn_config: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    # Micro-batches of 32 on at most 2 workers: batch 32 fits one worker, 64 needs two.
    growth = ["growth.micro_batch=32", "growth.max_micro_batch=32"]
    args = [str(syn_config), f"run.output_dir={run_dir}", "growth.max_workers=2", *growth]
    out = distgrow_job_run(1, args, expect=75).stdout
    assert "needs 2 workers" in out
    info = json.loads((run_dir / "resize.json").read_text())
    assert info["need_workers"] == 2 and info["have_workers"] == 1
    assert (info["epoch"], info["step"], info["exit_code"]) == (1, 33, 75)
    assert Path(info["checkpoint"]).exists()

    distgrow_job_run(2, [*args, "--resume"], expect=0)
    assert not (run_dir / "resize.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_updates"] == SYN_UPDATES
    assert summary["final_setting"] == {
        "global_batch": 64,
        "workers": 2,
        "micro_batch": 32,
        "accum_steps": 1,
    }


@needs_fashion
def test_fashion_mnist_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = train_job(
        2,
        REPO / "configs" / "fashion_mnist_mlp.yaml",
        run_dir,
        "data.limit_train=12000",
        "run.epochs=2",
        "schedule.milestones=[1]",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    # Measured 0.84 here; chance is 0.10 and a trainer whose updates go wrong stays far below.
    assert summary["val_acc"] >= 0.80, out
    assert summary["total_updates"] == 94 + 19 == summary["planned_total_updates"]
    assert summary["growth_events"] == 1


def _stop_with_signal_mid_epoch_two(
    nproc: int, config: Path, run_dir: Path, log: Path, signum: int
) -> tuple[int, str]:
    """Start a job, and once it is into epoch 2 send ``signum`` to its last rank only."""
    args = [str(config), f"run.output_dir={run_dir}", f"growth.max_workers={nproc}"]
    with log.open("w") as output:
        proc = distgrow_job_start(nproc, [*args, "logging.every_steps=1"], output)
        try:

            def into_epoch_two() -> bool:
                record = _latest_step_record(run_dir / "metrics.jsonl")
                return record is not None and record["epoch"] == 2 and record["step"] > 36

            _wait_until(into_epoch_two, proc, log)
            target = proc.pid if nproc == 1 else rank_pids(proc.pid)[nproc - 1]
            os.kill(target, signum)
            status = proc.wait(timeout=120)
        finally:
            kill_process_tree(proc.pid)
    return status, log.read_text()


def _epoch_ends(run_dir: Path) -> list[tuple[int, int]]:
    return [
        (r["epoch"], r["samples_seen"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "epoch"
    ]


@pytest.mark.parametrize(
    ("nproc", "signum", "resume_on"),
    [(2, signal.SIGTERM, 2), (1, signal.SIGUSR1, 2)],
    ids=["sigterm-to-rank-1-of-2", "sigusr1-to-1-process-resumed-on-2"],
)
def test_a_stop_signal_checkpoints_the_exact_update_and_resumes(
    syn_config: Path,
    syn_reference: Path,
    tmp_path: Path,
    nproc: int,
    signum: int,
    resume_on: int,
) -> None:
    run_dir = tmp_path / "run"
    status, out = _stop_with_signal_mid_epoch_two(
        nproc, syn_config, run_dir, tmp_path / "stopped.log", signum
    )
    name, code = signal.Signals(signum).name, 128 + signum
    if nproc == 1:
        assert status == code, out
    else:
        # torchrun exits 1 whatever its workers did; its report names the workers' status. The
        # signal reached rank 1 only: rank 0 stopped after the same update, with the same status.
        assert status == 1, out
        assert out.count(f"exitcode  : {code}") == nproc, out
    assert f"stopped by {name} after update" in out, out

    state = final_state(run_dir)
    assert state["reason"] == "signal"
    assert state["epoch"] == 1 and 0 < state["position"] < 1033  # mid epoch 2, between updates
    assert state["samples_seen"] == 1033 + state["position"]
    stopped = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "stopped"]
    assert len(stopped) == 1
    assert (stopped[0]["signal"], stopped[0]["exit_code"]) == (name, code)
    assert (stopped[0]["step"], stopped[0]["position"]) == (state["step"], state["position"])
    assert f"after update {state['step']:,} (epoch 2, {state['position']:,} of 1,033" in out

    resumed = train_job(resume_on, syn_config, run_dir, "--resume")
    step = int(state["step"])
    assert f"resuming from {run_dir / f'ckpt-{step:09d}.pt'}" in resumed
    assert _epoch_ends(run_dir) == [(1, 1033), (2, 2066), (3, 3099)]
    got, want = final_state(run_dir), final_state(syn_reference)
    assert got["step"] == SYN_UPDATES
    # Same world size and order of operations as the reference: the very same bits; a process
    # that started alone sums its micro-batches in another order: equal to rounding.
    assert_same_model(got["model"], want["model"], exact=nproc == 2)
