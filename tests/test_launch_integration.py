"""The launch controller with the real trainer: 1 -> 2 -> 4 workers under torchrun and mpirun.

Each run trains a small MLP on synthetic data for 3 epochs with a multistep schedule whose two
cuts (×0.5 at epochs 1 and 2) become batch growth 32 -> 64 -> 128 at a micro-batch of 32, so
the plan needs 1, then 2, then 4 workers. The workers exit 75 at each growth, the controller
relaunches them wider with ``run.resume=true``, and the finished run must match a one-process
run of the same plan (1 worker, accumulating 1, 2, then 4 micro-batches): the global batches
and their order do not depend on how they are split.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, write_config

from distgrow.config import load_config
from distgrow.launch import run_controller

pytestmark = pytest.mark.integration

GROWING: dict[str, Any] = {
    "run": {"name": "grow", "epochs": 3, "seed": 3, "device": "cpu"},
    "data": {"name": "synthetic_classification", "synthetic_samples": 2048},
    "model": {"name": "mlp", "hidden": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "schedule": {"type": "multistep", "milestones": [1, 2], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 4},
    "logging": {"progress": "lines"},
}


def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("SLURM_", "OMPI_", "PMI_", "PET_")) or name in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
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
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "event"]


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same plan in one process (growth.max_workers=1: the batch grows by accumulation)."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config, run_dir = config_for(tmp_path, "ref", launcher="none")
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clean(monkeypatch)
        code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)
    return summary(run_dir)


LAUNCHERS = [
    "torchrun",
    pytest.param(
        "mpirun",
        marks=pytest.mark.skipif(
            shutil.which("mpirun") is None, reason="needs mpirun: apt-get install openmpi-bin"
        ),
    ),
]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_controller_grows_real_training_1_2_4(
    tmp_path: Path, clean_env: None, reference: dict[str, Any], launcher: str
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

    done = summary(run_dir)
    assert done["status"] == "completed"
    assert done["world_size"] == 4
    assert done["total_updates"] == done["planned_total_updates"] == reference["total_updates"]
    assert done["samples_seen"] == reference["samples_seen"]
    # Same global batches in the same order: the split over workers changes only the rounding.
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4, abs=1e-6)
    assert done["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4, abs=1e-6)
