"""The launch controller with the real trainer: 1 -> 2 -> 4 workers under torchrun and mpirun.

Each run trains a small MLP on synthetic data for 3 epochs with a multistep schedule whose two
cuts (×0.5 at epochs 1 and 2) become batch growth 32 -> 64 -> 128 at a micro-batch of 32, so
the plan needs 1, then 2, then 4 workers. The workers exit 75 at each growth, the controller
relaunches them wider with ``run.resume=true``, and the finished run must match a one-process
run of the same plan (1 worker, accumulating 1, 2, then 4 micro-batches): the global batches
and their order do not depend on how they are split. "Match" means: the worker count of each
epoch is the plan's, ``samples_seen`` is exactly epochs × N at each epoch's end, and the final
checkpoints hold the same tensors (to float rounding: the sums run in another order).

The same comparison holds for a run in which one worker is killed (SIGKILL) mid-epoch, and for
the elastic mode, in which torchrun agents join a running job instead of a relaunch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    LOCAL_LAUNCHERS,
    REPO_ROOT,
    assert_same_model,
    clear_launcher_env,
    communicate_or_fail,
    free_port,
    rank_pids,
    write_config,
)

from distgrow.checkpoint import load_latest
from distgrow.config import load_config
from distgrow.launch import run_controller
from distgrow.metrics import read_jsonl

pytestmark = pytest.mark.integration

GROWING: dict[str, Any] = {
    # One intra-op thread in every process: the one-process reference and 4 workers on 2 cores
    # would otherwise round differently (see test_distributed.py).
    "run": {"name": "grow", "epochs": 3, "seed": 3, "device": "cpu", "threads": 1},
    "data": {"name": "synthetic_classification", "synthetic_samples": 2048},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1, 2], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 4},
    "logging": {"progress": "lines"},
}
PLANNED_WORKERS = [1, 2, 4]  # per epoch

# How long one controller run may take here (2 cores, 3-4 launches of up to 4 processes).
RUN_TIMEOUT_S = 420


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No launcher variables from the outside; gloo on the loopback (INFRA.md)."""
    _clean(monkeypatch)


def config_for(tmp_path: Path, name: str, **launch: Any) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    tree = {
        **GROWING,
        "run": {**GROWING["run"], "output_dir": str(run_dir)},
        "launch": {"master_port": free_port(), "max_restarts": 0, **launch},
    }
    return write_config(tmp_path / f"{name}.yaml", tree), run_dir


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "event"]


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def epoch_ends(run_dir: Path) -> list[tuple[int, int, int]]:
    """(epoch, samples_seen, workers) of each epoch record, in the order they were written."""
    return [
        (r["epoch"], r["samples_seen"], r["workers"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "epoch"
    ]


def train_size(config: Path) -> int:
    return load_config(config).data.expected_train_size()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same plan in one process (growth.max_workers=1: the batch grows by accumulation)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config, run_dir = config_for(tmp_path, "ref", launcher="none")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clean(monkeypatch)
        code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)
    n = train_size(config)
    assert epoch_ends(run_dir) == [(1, n, 1), (2, 2 * n, 1), (3, 3 * n, 1)]
    return run_dir


def assert_same_training(run_dir: Path, reference: Path, config: Path) -> None:
    """The run is the reference's plan, realised on 1, 2, 4 workers: same samples, same model."""
    n = train_size(config)
    assert epoch_ends(run_dir) == [
        (epoch, epoch * n, workers) for epoch, workers in enumerate(PLANNED_WORKERS, start=1)
    ]
    done, want = summary(run_dir), summary(reference)
    assert done["status"] == "completed"
    assert done["world_size"] == 4
    assert done["total_updates"] == done["planned_total_updates"] == want["total_updates"]
    assert done["samples_seen"] == want["samples_seen"] == 3 * n
    found, expected = load_latest(run_dir), load_latest(reference)
    assert found is not None and expected is not None
    got, ref = found[1], expected[1]
    assert got["step"] == ref["step"] == done["total_updates"]
    assert_same_model(got["model"], ref["model"])
    # The optimizer's momentum buffers too: the next update would be the same.
    for key, state in ref["optimizer"]["state"].items():
        torch.testing.assert_close(
            got["optimizer"]["state"][key]["momentum_buffer"],
            state["momentum_buffer"],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("launcher", LOCAL_LAUNCHERS)
def test_controller_grows_real_training_1_2_4(
    tmp_path: Path, clean_env: None, reference: Path, launcher: str
) -> None:
    config, run_dir = config_for(tmp_path, launcher, launcher=launcher)
    lines: list[str] = []
    code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)

    logs = sorted(p.name for p in (run_dir / "launch").glob("attempt-*.log"))
    assert logs == ["attempt-01-1w.log", "attempt-02-2w.log", "attempt-03-4w.log"]
    asked = [
        json.loads((run_dir / "launch" / f"attempt-0{n}.resize.json").read_text()) for n in (1, 2)
    ]
    assert [(r["have_workers"], r["need_workers"], r["epoch"]) for r in asked] == [
        (1, 2, 1),
        (2, 4, 2),
    ]
    starts = [
        (e["event"], e["world_size"]) for e in events(run_dir) if e["event"] in ("start", "resume")
    ]
    assert starts == [("start", 1), ("resume", 2), ("resume", 4)]
    assert_same_training(run_dir, reference, config)


def launch_process(config: Path, *overrides: str) -> subprocess.Popen[str]:
    """``distgrow launch CONFIG ...`` as its own process (its own session, for cleanup)."""
    return subprocess.Popen(
        [sys.executable, "-m", "distgrow", "launch", str(config), *overrides],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = RUN_TIMEOUT_S) -> str:
    """Wait for the controller; on a timeout kill everything and fail with its output."""
    return communicate_or_fail(proc, timeout, "distgrow launch")


def test_a_killed_worker_is_relaunched_from_the_checkpoint_and_nothing_is_lost(
    tmp_path: Path, clean_env: None, reference: Path
) -> None:
    config, run_dir = config_for(tmp_path, "killed", launcher="torchrun", max_restarts=1)
    proc = launch_process(config, "logging.every_steps=1")
    killed: list[int] = []

    def kill_rank_1_in_the_two_worker_phase() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            steps = [
                r
                for r in _records(run_dir / "metrics.jsonl")
                if r.get("kind") == "step" and r["workers"] == 2
            ]
            ranks = rank_pids(proc.pid)
            if steps and 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)  # one rank, not the launcher
                killed.append(steps[-1]["step"])
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_rank_1_in_the_two_worker_phase, daemon=True)
    watcher.start()
    out = finish(proc)
    watcher.join(timeout=10)
    assert proc.returncode == 0, out
    assert killed and 52 < killed[0] < 78, out  # inside epoch 2 (updates 53-78), on 2 workers

    launch = run_dir / "launch"
    logs = sorted(p.name for p in launch.glob("attempt-*.log"))
    assert logs == [
        "attempt-01-1w.log",
        "attempt-02-2w.log",
        "attempt-03-2w.log",  # the restart after the crash: same width, from the checkpoint
        "attempt-04-4w.log",
    ], out
    assert "restart 1 of 1 from the newest checkpoint" in out
    starts = [
        (e["event"], e["world_size"], Path(e.get("checkpoint", "")).name)
        for e in events(run_dir)
        if e["event"] in ("start", "resume")
    ]
    assert starts == [
        ("start", 1, ""),
        ("resume", 2, "ckpt-000000052.pt"),
        ("resume", 2, "ckpt-000000052.pt"),  # the epoch-1 checkpoint again: nothing lost
        ("resume", 4, "ckpt-000000078.pt"),
    ]
    # Epoch 2 was cut short and redone: each epoch still ends once, with exactly e × N samples.
    assert_same_training(run_dir, reference, config)


def test_elastic_torchrun_grows_in_place_1_2_4(
    tmp_path: Path, clean_env: None, reference: Path
) -> None:
    # The workers wait for the new agents at each growth point (elastic_wait_s), so the phases
    # fall where the plan puts them whatever the machine's speed; without the wait they would
    # go on accumulating until the agents join, with the same result.
    config, run_dir = config_for(
        tmp_path, "elastic", launcher="torchrun", elastic=True, elastic_wait_s=300
    )
    out = finish(launch_process(config))
    assert "done: 1 launch(es)" in out, out

    launch = run_dir / "launch"
    agents = sorted(p.name for p in launch.glob("attempt-*.log"))
    assert agents == [f"attempt-01-agent-{k}.log" for k in range(4)], out
    asks = sorted(p.name for p in launch.glob("*.resize.json"))
    assert asks == ["attempt-01-ask-2.resize.json", "attempt-01-ask-4.resize.json"], out
    starts = [
        (e["event"], e["world_size"], Path(e.get("checkpoint", "")).name)
        for e in events(run_dir)
        if e["event"] in ("start", "resume")
    ]
    # 1, 2, then 4 workers; the two agents started for 4 may join one after the other (a round
    # of 3 workers, which waits for the 4th: 128 samples do not split over 3).
    assert starts[0] == ("start", 1, ""), out
    worlds = [world for _, world, _ in starts]
    assert worlds == sorted(worlds) and worlds[-1] == 4 and 2 in worlds, out
    assert {name for _, _, name in starts[1:]} == {"ckpt-000000052.pt", "ckpt-000000078.pt"}
    # torchrun stopped the workers with SIGTERM at each membership change: clean stops at the
    # growth points, where the workers were waiting for the new ones.
    stops = {(e["signal"], e["step"]) for e in events(run_dir) if e["event"] == "stopped"}
    assert stops == {("SIGTERM", 52), ("SIGTERM", 78)}, out
    # Each growth is logged once, at the width it trained at: not also at the old width while
    # the workers waited for the new ones.
    growths = [
        (e["step"], e["global_batch"], e["workers"])
        for e in events(run_dir)
        if e["event"] == "growth"
    ]
    assert growths == [(52, 64, 2), (78, 128, 4)], out
    # ... and said so: the expected restart, not a stop the user must resume by hand.
    said = (launch / "attempt-01-agent-0.log").read_text()
    assert "The 2 workers asked for are joining; torchrun restarts" in said, said
    assert "The 4 workers asked for are joining; torchrun restarts" in said, said
    assert "Resume with the same command" not in said, said
    assert_same_training(run_dir, reference, config)


def _records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics file that is being written."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            break
    return records
