"""The Docker image, built for real and run without a network.

The engine, the base image and the image build are ``docker_fixtures.py``'s (shared with
``test_two_nodes.py``). Inside the image with
``--network=none``: the plan matches the host's, a training on the real Fashion-MNIST from
Debian's package learns, and ``distgrow launch`` trains 2 ranks under horovodrun (Horovod) and
under the deepspeed launcher (DeepSpeed ZeRO-0) to the same parameters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, SYN_PLAN, SYN_UPDATES, assert_same_model, write_config
from docker_fixtures import docker_run

from distgrow.checkpoint import load_latest
from distgrow.config import load_config
from distgrow.metrics import read_jsonl
from distgrow.planner import make_plan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

FASHION = "configs/fashion_mnist_mlp.yaml"


def test_the_image_plans_like_the_host(
    image: str, docker_env: dict[str, str], tmp_path: Path
) -> None:
    got = json.loads(docker_run(docker_env, tmp_path, "plan", FASHION, "--json"))
    cfg = load_config(REPO_ROOT / FASHION)
    want = json.loads(json.dumps(make_plan(cfg, cfg.data.expected_train_size()).to_json()))
    assert got == want
    assert got["total_updates"] < got["baseline_total_updates"]  # it does grow the batch


def test_the_image_trains_on_real_fashion_mnist_offline(
    image: str, docker_env: dict[str, str], tmp_path: Path
) -> None:
    tmp_path.chmod(0o777)
    docker_run(docker_env, tmp_path, "train", FASHION, "run.epochs=1", "run.output_dir=/out/fm")
    summary = json.loads((tmp_path / "fm" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["samples_seen"] == 60_000 and summary["total_updates"] == 469  # ⌈60000/128⌉
    assert summary["val_acc"] > 0.80, summary  # one epoch of an MLP on the real data


def _syn_config(out: Path, name: str, backend: dict[str, Any], launcher: str) -> str:
    tree = {
        **SYN_PLAN,
        "run": {**SYN_PLAN["run"], "name": name, "output_dir": f"/out/{name}", "device": "cpu"},
        "growth": {**SYN_PLAN["growth"], "max_workers": 2},
        "backend": backend,
        "launch": {"launcher": launcher, "max_restarts": 0},
        "logging": {"every_steps": 5, "progress": "lines"},
    }
    write_config(out / f"{name}.yaml", tree)
    return f"/out/{name}.yaml"


def test_horovod_and_deepspeed_train_two_ranks_in_the_image_to_the_same_parameters(
    image: str, docker_env: dict[str, str], tmp_path: Path
) -> None:
    tmp_path.chmod(0o777)
    check = docker_run(docker_env, tmp_path, "--check-build", entrypoint="horovodrun")
    for framework in ("PyTorch", "Gloo", "MPI"):
        assert re.search(rf"\[X\] {framework}", check), check
    runs: dict[str, tuple[dict[str, Any], str]] = {
        "hvd": ({"name": "horovod"}, "horovodrun"),
        "ds": ({"name": "deepspeed", "zero_stage": 0}, "deepspeed"),
    }
    states = {}
    for name, (backend, launcher) in runs.items():
        config = _syn_config(tmp_path, name, backend, launcher)
        docker_run(docker_env, tmp_path, "launch", config)
        found = load_latest(tmp_path / name)
        assert found is not None, f"{name}: no checkpoint"
        states[name] = found[1]
        rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "epoch"]
        assert [(r["workers"], r["global_batch"]) for r in rows] == [(2, 32), (2, 64), (2, 64)]
        assert states[name]["step"] == SYN_UPDATES
    # Horovod sums the micro-steps and averages the ranks exactly as DeepSpeed ZeRO-0 does.
    assert_same_model(states["hvd"]["model"], states["ds"]["model"])
