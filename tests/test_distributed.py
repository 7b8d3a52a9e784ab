"""Real multi-process jobs: 1-4 gloo ranks on the CPU, started by torchrun.

* the same plan realised as 1 worker × 4 accumulation steps, 2 × 2 and 4 × 1 ends with the same
  parameters (an MLP with dropout, and a CNN with ghost batch norm and its running statistics);
* a resume at another world size (2 → 1 → 4 ranks) ends where an uninterrupted run does;
* a job killed with SIGKILL mid-epoch resumes from its last checkpoint to the same parameters;
* a plan that needs more workers exits 75 with ``resize.json``, and a relaunch with them
  finishes the run;
* Fashion-MNIST, end to end, reaches an accuracy only a working trainer reaches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    distgrow_job_run,
    distgrow_job_start,
    kill_process_tree,
    write_config,
)

from distgrow.checkpoint import list_checkpoints, load_latest
from distgrow.metrics import read_jsonl

pytestmark = pytest.mark.integration

FASHION = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent

# 1033 training samples (1291 - 258 held out): epoch 1 at batch 32 is 33 updates whose last
# holds 9 samples (micro-batches 3, 3, 3 and an empty one), epochs 2-3 at batch 64 are 17 each.
SYN: dict[str, Any] = {
    # One intra-op thread everywhere: with 2 threads on 1 rank against 1 on each of 2, the CPU
    # kernels round differently, and a small-batch network amplifies that past any tolerance.
    "run": {"name": "syn", "epochs": 3, "seed": 3, "threads": 1},
    "data": {"name": "synthetic_classification", "synthetic_samples": 1291},
    "model": {"name": "mlp", "hidden": [32], "dropout": 0.1},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1], "gamma": 0.5},
    "growth": {
        "base_batch": 32,
        "micro_batch": 8,
        "max_micro_batch": 8,
        "max_dataset_fraction": None,
    },
    "logging": {"every_steps": 10},
}
SYN_UPDATES = 33 + 17 + 17

# 300 Fashion-MNIST images through a CNN whose batch norms are ghost batch norms of 4: every
# micro-batch of 8 holds two ghost batches; the partial batches leave empty micro-batches.
# lr 0.01: at 0.05 this network is chaotic early on (max-pool near-ties): even 1 × 16 × 2
# against 1 × 8 × 4 in one process, the same sums in another order, drift apart by 1e-2 in 15
# updates; at 0.01 they stay within 2e-7, so the comparison tests the trainer, not the chaos.
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


def assert_same_model(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = False
) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if exact or not want[name].is_floating_point():
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


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
    # Parameters and the running statistics: merged across ranks as one worker accumulates them.
    assert any(".running_var" in name for name in want["model"])
    assert_same_model(got["model"], want["model"])


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
