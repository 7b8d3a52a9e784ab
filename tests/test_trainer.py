"""The trainer in one process: exactness, the plan's settings, stops, run directory, metrics."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import distgrow_job_argv, tmpfs
from torch import nn

import distgrow.trainer.lifecycle as trainer_module
from distgrow import startup
from distgrow.backends import Backend, BackendError, make_backend
from distgrow.backends.torch_ddp import TorchBackend
from distgrow.checkpoint import list_checkpoints, load_latest
from distgrow.config import Config, ConfigError, load_config
from distgrow.data import epoch_permutation
from distgrow.exits import EXIT_NEED_WORKERS, EXIT_NONFINITE, EXIT_OK
from distgrow.metrics import drop_replayed_records, read_jsonl
from distgrow.planner import Split, make_plan
from distgrow.rundir import ResizeRequest, RunDir, Summary
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.state import RunDirWriteError, TrainState
from distgrow.trainer import (
    Trainer,
    TrainError,
    build_optimizer,
    micro_batch_seed,
)

SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
# 1291 samples keep 1033 for training: 1033 = 32·32 + 9 = 64·16 + 9, so every epoch ends with a
# partial batch whose 9 samples leave trailing micro-batches empty.
N_TRAIN = 1033
REPO = Path(__file__).resolve().parent.parent
STEP_FIELDS = {
    "epoch",
    "step",
    "samples_seen",
    "global_batch",
    "workers",
    "micro_batch",
    "accum_steps",
    "lr",
    "momentum",
    "train_loss",
    "val_loss",
    "val_acc",
    "wall_s",
    "samples_per_s",
}

SUMMARY_KEYS = {
    "status",
    "epochs",
    "total_updates",
    "samples_seen",
    "train_loss",
    "val_loss",
    "val_acc",
    "wall_s",
    "worker_seconds",
    "world_size",
    "growth_events",
    "final_setting",
    "growth_mode",
    "planned_total_updates",
    "baseline_total_updates",
    "update_ratio_vs_baseline",
    "distgrow_version",
    "startup_s",
    "train_s",
    "train_cpu_s",
    "samples_per_s",
    "worker_hours",
    "gpu_hours",
    "device",
    "base_batch",
    "dataset_size",
    "phases",
    "savings",
    "held",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def syn_config(run_dir: Path, *overrides: str) -> Config:
    """A small synthetic job: MLP, SGD + momentum, batch 32 → 64 at epoch 1."""
    base = [
        "data.name=synthetic_classification",
        "data.synthetic_samples=1291",
        "data.synthetic_features=16",
        "model.name=mlp",
        "model.hidden=[32]",
        "optim.lr=0.05",
        "optim.momentum=0.9",
        "schedule.type=multistep",
        "schedule.milestones=[1]",
        "schedule.gamma=0.5",
        "growth.base_batch=32",
        "growth.micro_batch=8",
        "growth.max_micro_batch=8",
        "growth.max_dataset_fraction=null",
        "run.epochs=2",
        f"run.output_dir={run_dir}",
        "logging.every_steps=5",
        "logging.progress='off'",
    ]
    return load_config(None, [*base, *overrides])


def make_trainer(cfg: Config) -> Trainer:
    return Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cpu"), load_data(cfg))


def train(cfg: Config) -> tuple[int, Trainer]:
    trainer = make_trainer(cfg)
    return trainer.train(), trainer


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    found = load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]["model"]


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == kind]


def test_accumulation_equals_one_large_micro_batch(tmp_path: Path) -> None:
    code_a, a = train(syn_config(tmp_path / "accum"))  # 1×8×4, then 1×8×8
    code_b, b = train(
        syn_config(tmp_path / "large", "growth.micro_batch=64", "growth.max_micro_batch=null")
    )  # 1×32×1, 1×64×1
    assert code_a == code_b == EXIT_OK
    splits_a = {(r["micro_batch"], r["accum_steps"]) for r in records(tmp_path / "accum", "step")}
    splits_b = {(r["micro_batch"], r["accum_steps"]) for r in records(tmp_path / "large", "step")}
    assert splits_a == {(8, 4), (8, 8)} and splits_b == {(32, 1), (64, 1)}
    assert a.state.step == b.state.step == 33 + 17
    for name, value in a.model.state_dict().items():
        torch.testing.assert_close(value, b.model.state_dict()[name], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    untrained = make_trainer(syn_config(tmp_path / "untrained")).model.state_dict()
    assert not torch.allclose(a.model.state_dict()["1.weight"], untrained["1.weight"], atol=1e-3)


def test_a_partial_batch_with_empty_micro_batches_is_exact(tmp_path: Path) -> None:
    trainer = make_trainer(syn_config(tmp_path / "run", "optim.momentum=0"))
    reference = copy.deepcopy(trainer.model)
    setting = trainer.policy.setting(0, 0)
    assert (setting.micro_batch, setting.accum_steps) == (8, 4)
    indices = epoch_permutation(N_TRAIN, 0, 0)[:9]  # chunks of 3, 3, 3 and an empty one
    loss = trainer.train_step(indices, setting)

    x, y = trainer.data.train.batch(indices, 0)
    ref_loss = F.cross_entropy(reference(x), y)
    ref_loss.backward()
    ref_loss = ref_loss.detach()
    with torch.no_grad():
        for p in reference.parameters():
            assert p.grad is not None
            p.sub_(setting.lr * p.grad)
    assert loss == pytest.approx(ref_loss.item(), rel=1e-6)
    for (name, got), want in zip(
        trainer.model.named_parameters(), reference.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_lr_and_batch_follow_the_plan_into_the_hybrid(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = syn_config(
        run_dir,
        "schedule.milestones=[1, 2]",
        "growth.max_global_batch=64",
        "run.epochs=3",
        "logging.every_steps=1",
    )
    code, trainer = train(cfg)
    assert code == EXIT_OK
    seen = {(r["epoch"], r["global_batch"], r["lr"]) for r in records(run_dir, "step")}
    # Epoch 2: the batch doubles and the LR stays; epoch 3: capped at 64, the LR halves.
    assert seen == {(1, 32, 0.05), (2, 64, 0.05), (3, 64, 0.025)}
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.025]
    growth = records(run_dir, "event")
    growth = [r for r in growth if r["event"] == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == 33
    assert growth[0]["previous"]["global_batch"] == 32 and growth[0]["global_batch"] == 64
    assert (run_dir / "ckpt-000000033.pt").exists()  # the epoch-end/growth checkpoint


def test_momentum_comes_from_the_plan(tmp_path: Path) -> None:
    cfg = syn_config(
        tmp_path / "run",
        "growth.mode=grow_momentum",
        "growth.momentum=0.98",
        "growth.lr_scale=1",
        "growth.micro_batch=null",
        "growth.max_micro_batch=null",
    )
    trainer = make_trainer(cfg)
    setting = trainer.policy.setting(0, 0)
    trainer.train_step(epoch_permutation(N_TRAIN, 0, 0)[: setting.global_batch], setting)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.98
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(setting.lr)


def test_adam_keeps_its_betas(tmp_path: Path) -> None:
    trainer = make_trainer(syn_config(tmp_path / "run", "optim.name=adam", "optim.momentum=0"))
    setting = trainer.policy.setting(0, 0)
    trainer.train_step(epoch_permutation(N_TRAIN, 0, 0)[:32], setting)
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.999) and "momentum" not in group
    assert group["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_build_optimizer(name: str) -> None:
    momentum = "0.9" if name in ("sgd", "rmsprop") else "0"
    cfg = load_config(None, [f"optim.name={name}", f"optim.momentum={momentum}"])
    opt = build_optimizer(cfg.optim, torch.nn.Linear(2, 2).parameters())
    assert type(opt).__name__.lower() == name
    assert opt.param_groups[0]["lr"] == 0.1


def test_nonfinite_loss_stops_with_65_and_keeps_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "run.epochs=1"))[0] == EXIT_OK
    before = {p.name: p.read_bytes() for p in list_checkpoints(run_dir)}
    assert list(before) == ["ckpt-000000033.pt"]
    cfg = syn_config(run_dir, "run.epochs=2", "run.resume=true", "optim.lr=1e30")
    code, trainer = train(cfg)
    assert code == EXIT_NONFINITE
    assert {p.name: p.read_bytes() for p in list_checkpoints(run_dir)} == before
    assert load_latest(run_dir) is not None
    err = capsys.readouterr().err
    assert "training loss is" in err and "optim.lr" in err and "optim.grad_clip" in err
    assert "ckpt-000000033.pt" in err
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    assert last["event"] == "nonfinite" and last["step"] == trainer.state.step > 33


def test_refuses_to_overwrite_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "run.epochs=1"))[0] == EXIT_OK
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(TrainError, match=r"already holds a run.*--resume.*run\.output_dir"):
        make_trainer(syn_config(run_dir, "run.epochs=1")).train()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_resume_without_a_checkpoint_starts_fresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = syn_config(tmp_path / "run", "run.epochs=1", "run.resume=true", "logging.progress=lines")
    assert train(cfg)[0] == EXIT_OK
    assert "no checkpoint" in capsys.readouterr().out


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    dropout = "model.dropout=0.2"  # reseeded per micro-batch, so a resume repeats the masks
    assert train(syn_config(straight_dir, dropout, "run.epochs=3"))[0] == EXIT_OK
    assert train(syn_config(split_dir, dropout, "run.epochs=1"))[0] == EXIT_OK
    code, resumed = train(syn_config(split_dir, dropout, "run.epochs=3", "run.resume=true"))
    assert code == EXIT_OK and resumed.state.step == 33 + 17 + 17
    want, got = final_model(straight_dir), final_model(split_dir)
    assert all(torch.equal(want[k], got[k]) for k in want)
    summary = json.loads((split_dir / "summary.json").read_text())
    assert summary["total_updates"] == 67 and summary["epochs"] == 3
    events = [r["event"] for r in records(split_dir, "event")]
    assert events.count("resume") == 1


def test_resume_from_a_mid_epoch_checkpoint_before_a_growth(tmp_path: Path) -> None:
    # interval=step: the cut at baseline update 40 is 7 updates (224 samples) into epoch 2,
    # right after the interval checkpoint of update 40; the rest of the epoch is 13 updates of
    # 64. The resume replays the growth from the plan.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = [
        "schedule.interval=step",
        "schedule.milestones=[40]",
        "run.keep_checkpoints=5",
        "run.checkpoint_every_steps=20",
    ]
    assert train(syn_config(straight, *extra))[0] == EXIT_OK
    growth = [r for r in records(straight, "event") if r["event"] == "growth"]
    assert len(growth) == 1 and growth[0]["step"] == 40
    names = [p.name for p in list_checkpoints(straight)]
    assert names == [f"ckpt-{s:09d}.pt" for s in (20, 33, 40, 53)]
    resumed.mkdir()
    (resumed / "ckpt-000000040.pt").write_bytes((straight / "ckpt-000000040.pt").read_bytes())
    state = load_latest(resumed)
    assert state is not None and (state[1]["epoch"], state[1]["position"]) == (1, 224)
    code, trainer = train(syn_config(resumed, *extra, "run.resume=true"))
    assert code == EXIT_OK and trainer.state.step == 53
    assert [r["step"] for r in records(resumed, "event") if r["event"] == "growth"] == [40]
    want, got = final_model(straight), final_model(resumed)
    assert all(torch.equal(want[k], got[k]) for k in want)
    # The epoch's mean train loss spans the resume: it was carried in the checkpoint.
    assert records(resumed, "epoch")[-1]["train_loss"] == pytest.approx(
        records(straight, "epoch")[-1]["train_loss"], rel=1e-12
    )


def test_a_change_of_batch_needs_no_checkpoint(tmp_path: Path) -> None:
    # A growth 7 updates into epoch 2: checkpoints only at the epoch ends (the last is the end).
    run_dir = tmp_path / "run"
    extra = ["schedule.interval=step", "schedule.milestones=[40]", "run.keep_checkpoints=10"]
    assert train(syn_config(run_dir, *extra))[0] == EXIT_OK
    assert [r["step"] for r in records(run_dir, "event") if r["event"] == "growth"] == [40]
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["ckpt-000000033.pt", "ckpt-000000053.pt"]


def test_checkpoints_at_an_interval_of_seconds(tmp_path: Path) -> None:
    # A clock that has always run out: a checkpoint after every update, agreed by the ranks.
    run_dir = tmp_path / "run"
    cfg = syn_config(
        run_dir, "run.epochs=1", "run.keep_checkpoints=50", "run.checkpoint_every_s=1e-9"
    )
    assert train(cfg)[0] == EXIT_OK
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == [f"ckpt-{s:09d}.pt" for s in range(1, 34)]
    newest = load_latest(run_dir)
    assert newest is not None and newest[1]["reason"] == "epoch"  # the same step: one file
    assert torch.load(run_dir / names[0], weights_only=True)["reason"] == "interval"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("run.checkpoint_every_steps=0", r"run.checkpoint_every_steps = 0: must be at least 1"),
        ("run.checkpoint_every_s=0", r"run.checkpoint_every_s = 0.0: must be above 0"),
    ],
)
def test_checkpoint_intervals_are_checked(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        syn_config(tmp_path, override)


def test_metrics_summary_and_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = syn_config(run_dir, "schedule.milestones=[1, 2]", "run.epochs=3")
    code, trainer = train(cfg)
    assert code == EXIT_OK
    plan = make_plan(cfg, N_TRAIN)
    assert (
        trainer.state.step
        == plan.total_updates
        == sum(p.updates for p in plan.phases)
        == 33 + 17 + 9
    )

    steps = records(run_dir, "step")
    assert steps and all(set(r) >= STEP_FIELDS for r in steps)
    assert [r["step"] for r in steps] == list(range(5, trainer.state.step + 1, 5))
    assert all(r["val_loss"] is None and r["train_loss"] > 0 for r in steps)
    epochs = records(run_dir, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["samples_seen"] for r in epochs] == [N_TRAIN, 2 * N_TRAIN, 3 * N_TRAIN]
    assert [r["step"] for r in epochs] == [33, 50, 59]
    assert [r["global_batch"] for r in epochs] == [32, 64, 128]
    assert all(set(r) >= STEP_FIELDS and 0.5 < r["val_acc"] <= 1 for r in epochs)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["total_updates"] == 59 and summary["samples_seen"] == 3 * N_TRAIN
    assert summary["val_acc"] == epochs[-1]["val_acc"]
    assert summary["val_loss"] == epochs[-1]["val_loss"]
    assert summary["baseline_total_updates"] == plan.baseline_total_updates == 3 * 33
    assert summary["worker_seconds"] == pytest.approx(summary["wall_s"])
    assert summary["growth_events"] == 2
    assert load_config(run_dir / "config.yaml") == cfg
    # The typed record writes the keys summary.json always had, plus its version.
    assert set(summary) == SUMMARY_KEYS | {"version"} and summary["version"] == 1
    # CPU seconds inside updates: the phases' sum, above 0 since updates ran, and at most the
    # torch threads' share of the updates' wall time (+ slack for the process's other threads).
    assert summary["train_cpu_s"] == pytest.approx(sum(p["train_cpu_s"] for p in summary["phases"]))
    assert 0 < summary["train_cpu_s"] <= summary["train_s"] * torch.get_num_threads() + 0.5
    assert summary["held"] == {}  # no SLURM job held this run (no slurm_jobs.json)
    assert summary["final_setting"] == {
        "global_batch": 128,
        "workers": 1,
        "micro_batch": 8,
        "accum_steps": 16,
    }
    assert [list(p)[:5] for p in summary["phases"]] == [
        ["index", "global_batch", "workers", "micro_batch", "accum_steps"]
    ] * 3
    assert [p["global_batch"] for p in summary["phases"]] == [32, 64, 128]
    assert Summary.from_dict(summary).to_dict() == summary


def test_plateau_growth_is_decided_at_epoch_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = syn_config(
        run_dir,
        "schedule.type=plateau",
        "schedule.patience=0",
        "schedule.factor=0.5",
        "schedule.threshold_mode=abs",
        "schedule.threshold=100",  # nothing after the first epoch counts as an improvement
        "run.epochs=3",
    )
    assert train(cfg)[0] == EXIT_OK
    assert [r["global_batch"] for r in records(run_dir, "epoch")] == [32, 32, 64]
    growth = [r for r in records(run_dir, "event") if r["event"] == "growth"]
    assert [r["epoch"] for r in growth] == [3]


def test_need_workers_checkpoints_and_exits_75(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = syn_config(
        run_dir, "growth.micro_batch=32", "growth.max_micro_batch=32", "growth.max_workers=2"
    )
    code, _ = train(cfg)
    assert code == EXIT_NEED_WORKERS
    info = json.loads((run_dir / "resize.json").read_text())
    assert info["need_workers"] == 2 and info["have_workers"] == 1
    assert (info["epoch"], info["step"], info["global_batch"]) == (1, 33, 64)
    found = load_latest(run_dir)
    assert found is not None and str(found[0]) == info["checkpoint"]
    # The epoch-end checkpoint at the same step serves: a resume re-derives the 2-worker split.
    assert (found[1]["step"], found[1]["epoch"], found[1]["position"]) == (33, 1, 0)
    # resize.json is rundir's typed record; the need_workers event says what it set, no nulls.
    assert RunDir(run_dir).read_resize() == ResizeRequest.from_dict(info)
    assert (info["version"], info["exit_code"], info["micro_batch"]) == (1, EXIT_NEED_WORKERS, 32)
    event = [r for r in records(run_dir, "event") if r["event"] == "need_workers"][-1]
    assert event["checkpoint"] == info["checkpoint"] and event["exit_code"] == EXIT_NEED_WORKERS
    assert "version" not in event and "elastic" not in event


def test_train_state_reads_and_writes_the_format_1_checkpoint_keys() -> None:
    written = {
        "epoch": 2,
        "position": 96,
        "step": 71,
        "samples_seen": 2162,
        "realisation": {"global_batch": 64, "workers": 2, "micro_batch": 32, "accum_steps": 1},
        "epoch_loss_sum": 12.5,
        "epoch_samples": 96,
        "growth_events": 1,
        "last_val": {"val_loss": 0.25, "val_acc": 0.875},
        "last_train_loss": 0.3,
        "wall_s": 40.0,
        "worker_seconds": 80.0,
        "startup_s": 3,
    }
    state = TrainState()
    state.load_state_dict({**written, "model": {}, "rng": None})  # other components' keys
    assert state.realisation == Split(64, 2, 32, 1)
    assert (state.epoch, state.position, state.step, state.growth_events) == (2, 96, 71, 1)
    assert isinstance(state.startup_s, float) and state.startup_s == 3.0
    assert state.state_dict() == {**written, "startup_s": 3.0}
    # A key an older checkpoint lacks keeps its default.
    state.load_state_dict({"epoch": 1, "position": 0, "step": 9, "samples_seen": 288})
    assert state == TrainState(epoch=1, step=9, samples_seen=288)


def test_regression_reports_no_accuracy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "data.name=synthetic_regression", "optim.lr=0.01"))[0] == 0
    epochs = records(run_dir, "epoch")
    assert all(r["val_acc"] is None for r in epochs)
    assert epochs[-1]["val_loss"] < epochs[0]["val_loss"] < 1.0


def test_micro_batch_seed_depends_on_the_samples_only() -> None:
    assert micro_batch_seed(0, 1, 17) == micro_batch_seed(0, 1, 17)
    seeds = {micro_batch_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def train_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``distgrow train`` on the Fashion-MNIST config, stdout and stderr kept apart."""
    config = str(REPO / "configs" / "fashion_mnist_mlp.yaml")
    argv = distgrow_job_argv(1, [config, *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.integration
def test_cli_missing_data_set_exits_2(tmp_path: Path) -> None:
    proc = train_cli(f"data.root={tmp_path / 'nowhere'}", f"run.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nowhere" in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.integration
def test_cli_config_error_exits_2(tmp_path: Path) -> None:
    proc = train_cli("optim.lr=-1")
    assert proc.returncode == 2 and "optim.lr" in proc.stderr


def test_the_torch_backend_meets_the_protocol() -> None:
    cfg = load_config(None)
    backend = make_backend(cfg, SINGLE)
    assert isinstance(backend, Backend) and backend.world_size == 1 and backend.is_main
    assert backend.device.type in ("cpu", "cuda")
    fp16 = load_config(None, ["backend.precision=fp16", "run.device=cpu"])
    with pytest.raises(BackendError, match="backend.precision"):
        make_backend(fp16, SINGLE)
    nccl = load_config(None, ["backend.dist_backend=nccl", "run.device=cpu"])
    with pytest.raises(BackendError, match="gloo"):
        make_backend(nccl, SINGLE)


def test_a_model_that_does_not_fit_the_data_is_a_train_error(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=r"model.name = 'cnn'.*synthetic_classification"):
        make_trainer(syn_config(tmp_path / "run", "model.name=cnn"))


def test_adam_adjustments_reach_the_optimizer(tmp_path: Path) -> None:
    """growth.beta2_half_life / weight_decay_timescale set β₂ and λ of each update's groups."""
    trainer = make_trainer(syn_config(
        tmp_path / "run", "optim.name=adamw", "optim.momentum=0", "optim.weight_decay=0.01",
        "growth.beta2_half_life=true", "growth.weight_decay_timescale=true",
        "growth.rule=sqrt",  # the square-root forms below (auto is linear for adamw)
    ))  # fmt: skip
    setting = trainer.policy.setting(1, 0)  # after the cut: B = 64 = 2 · B0 (sqrt rule)
    assert setting.global_batch == 64
    trainer.train_step(epoch_permutation(N_TRAIN, 0, 1)[:64], setting)
    group = trainer.optimizer.param_groups[0]
    assert group["betas"] == (0.9, pytest.approx(0.999**2))
    assert group["weight_decay"] == pytest.approx(0.01 * math.sqrt(2))
    assert group["lr"] == pytest.approx(0.05 * math.sqrt(0.5))  # lr0 · √α


# --------------------------------------------------------------------------------------------
# Run directory under hostile conditions: full disks, read-only directories, another run's
# config, a finished run, replayed updates
# --------------------------------------------------------------------------------------------


def fill(disk: Path) -> None:
    """Fill the file system of ``disk`` to the last byte."""
    with (disk / "filler").open("wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


def update_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir, "step")]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    assert train(syn_config(straight, "run.epochs=2", "logging.every_steps=1"))[0] == EXIT_OK
    real_save, saved = trainer_module.save_checkpoint, list[Path]()

    def save_then_fill(directory: Path, state: dict[str, Any], keep: int) -> Path:
        if saved:  # the second checkpoint meets a full disk
            fill(Path(directory).parent)
        saved.append(real_save(directory, state, keep))
        return saved[-1]

    with tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_fill)
        cfg = syn_config(run_dir, "run.epochs=2", "logging.every_steps=1")
        with pytest.raises(RunDirWriteError) as caught:
            make_trainer(cfg).train()
        message = str(caught.value)
        assert "\n" not in message
        assert f"checkpoint {run_dir / 'ckpt-000000050.pt'}" in message
        assert "[Errno 28 ENOSPC] No space left on device" in message
        assert f"free space on the file system of {run_dir}" in message
        assert f"last good checkpoint {run_dir / 'ckpt-000000033.pt'} is untouched" in message
        assert [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")] == []
        assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-000000033.pt"]
        assert load_latest(run_dir) is not None
        # Make room: the resume continues from update 33, and each update is logged once.
        (disk / "filler").unlink()
        monkeypatch.setattr(trainer_module, "save_checkpoint", real_save)
        code, resumed = train(
            syn_config(run_dir, "run.epochs=2", "logging.every_steps=1", "run.resume=true")
        )
        assert code == EXIT_OK and resumed.state.step == 50
        assert update_steps(run_dir) == update_steps(straight) == list(range(1, 51))
        assert [r["epoch"] for r in records(run_dir, "epoch")] == [1, 2]
        resume = [r for r in records(run_dir, "event") if r["event"] == "resume"]
        # Epoch 2's growth event, its 17 step records and its epoch record came after 33.
        assert resume[0]["replaced_records"] == 19
        growth = [r["step"] for r in records(run_dir, "event") if r["event"] == "growth"]
        assert growth == [33]
        want, got = final_model(straight), final_model(run_dir)
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_full_disk_at_a_metrics_record_stops_at_the_next_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = trainer_module.save_checkpoint

    def save_then_fill(directory: Path, state: dict[str, Any], keep: int) -> Path:
        path = real_save(directory, state, keep)
        fill(Path(directory).parent)
        return path

    with tmpfs(tmp_path / "disk", "4m") as disk:
        run_dir = disk / "run"
        monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_fill)
        cfg = syn_config(run_dir, "run.epochs=3", "logging.every_steps=1")
        trainer = make_trainer(cfg)
        with pytest.raises(RunDirWriteError) as caught:
            trainer.train()
        message = str(caught.value)
        assert f"metrics record {run_dir / 'metrics.jsonl'}: [Errno 28 ENOSPC]" in message
        assert f"last good checkpoint {run_dir / 'ckpt-000000033.pt'} is untouched" in message
        assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt-000000033.pt"]
        # The record that did not fit was cut off again: every line is whole.
        text = (run_dir / "metrics.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
        # The record of update k failed; update k + 1's all-reduce asks every rank for a
        # checkpoint, and the checkpoint refuses to go past the lost record.
        last = update_steps(run_dir)[-1]
        assert last > 33 and trainer.state.step == last + 2


def test_a_read_only_output_directory_is_a_write_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro, pytest.raises(RunDirWriteError) as caught:
        make_trainer(syn_config(ro / "run", "run.epochs=1")).train()
    message = str(caught.value)
    assert f"run directory {ro / 'run'}: [Errno 30 EROFS] Read-only file system" in message
    assert f"Fix: make {ro} writable, or set run.output_dir to a writable directory" in message


def test_a_file_in_the_way_of_the_run_directory(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(RunDirWriteError) as caught:
        make_trainer(syn_config(tmp_path / "out" / "run", "run.epochs=1")).train()
    message = str(caught.value)
    assert "[Errno 20 ENOTDIR]" in message or "[Errno 17 EEXIST]" in message
    assert f"move {tmp_path / 'out'} out of the way" in message
    assert (tmp_path / "out").read_text() == "not a directory"


def test_another_runs_config_is_never_overwritten(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "run.epochs=1"))[0] == EXIT_OK
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    other = syn_config(run_dir, "run.epochs=1", "run.resume=true", "model.hidden=[8]", "run.seed=3")
    with pytest.raises(TrainError) as caught:
        make_trainer(other).train()
    message = str(caught.value)
    assert f"{run_dir / 'config.yaml'} is another run's config" in message
    assert "model.hidden: [32] in config.yaml, [8] now" in message
    assert "run.seed: 0 in config.yaml, 3 now" in message
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_a_fresh_run_refuses_a_differing_config_yaml_left_alone(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("run:\n  epochs: 9\n")
    with pytest.raises(TrainError, match=r"run\.epochs: 9 in config.yaml, 1 now"):
        make_trainer(syn_config(run_dir, "run.epochs=1")).train()
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]
    (run_dir / "config.yaml").write_bytes(b"\xff\xfe")
    unreadable = r"not a distgrow config \(it is unreadable \(UnicodeDecodeError"
    with pytest.raises(TrainError, match=unreadable):
        make_trainer(syn_config(run_dir, "run.epochs=1")).train()
    assert (run_dir / "config.yaml").read_bytes() == b"\xff\xfe"


def test_a_resume_may_change_the_schedule_and_says_so(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "run.epochs=1"))[0] == EXIT_OK
    assert train(syn_config(run_dir, "run.epochs=2", "run.resume=true"))[0] == EXIT_OK
    resume = next(r for r in records(run_dir, "event") if r["event"] == "resume")
    assert resume["config_changes"] == ["run.epochs: 1 in config.yaml, 2 now"]
    assert "epochs: 2" in (run_dir / "config.yaml").read_text()


def test_resuming_a_finished_run_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert train(syn_config(run_dir, "run.epochs=1"))[0] == EXIT_OK
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()}
    capsys.readouterr()
    code, trainer = train(syn_config(run_dir, "run.epochs=1", "run.resume=true"))
    assert code == EXIT_OK and trainer.state.step == 0  # nothing loaded, nothing trained
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.iterdir()} == before
    assert "is finished (1 epochs, 33 updates; run.epochs=1): nothing to resume" in (
        capsys.readouterr().out
    )


def test_a_crash_after_a_checkpoint_leaves_each_update_once(tmp_path: Path) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    extra = ("logging.every_steps=1", "run.checkpoint_every_steps=40")
    assert train(syn_config(straight, *extra))[0] == EXIT_OK
    assert train(syn_config(crashed, *extra))[0] == EXIT_OK
    # Rewind the run to its checkpoint at update 40, as a crash at update 50 would leave it
    # (records up to 50 written, the last line cut mid-way, the newest checkpoint at 40).
    for path in list_checkpoints(crashed):
        if path.name != "ckpt-000000040.pt":
            path.unlink()
    (crashed / "summary.json").unlink()
    lines = (crashed / "metrics.jsonl").read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if json.loads(line).get("step") == 50)
    (crashed / "metrics.jsonl").write_text("".join(lines[: end + 1]) + lines[end + 1][:20])
    assert train(syn_config(crashed, *extra, "run.resume=true"))[0] == EXIT_OK
    assert update_steps(crashed) == update_steps(straight) == list(range(1, 51))
    assert [r["epoch"] for r in records(crashed, "epoch")] == [1, 2]
    growth = [r["step"] for r in records(crashed, "event") if r["event"] == "growth"]
    assert growth == [33]
    resume = [r for r in records(crashed, "event") if r["event"] == "resume"]
    assert resume[0]["replaced_records"] == 11  # steps 41-50, and epoch 2's record, cut


@pytest.mark.parametrize(
    ("errno_", "code", "says"),
    [
        (28, 2, r"^distgrow: error: cannot write the file /x/wandb/f: \[Errno 28 ENOSPC\] "),
        (30, 2, r"Read-only file system\. Fix: make /x/wandb writable"),
        (5, 1, r"Traceback .*OSError: \[Errno 5\] Input/output error"),
    ],
)
def test_startup_maps_a_disk_error_anywhere_to_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    errno_: int,
    code: int,
    says: str,
) -> None:
    def fail(self: Trainer) -> int:
        raise OSError(errno_, os.strerror(errno_), "/x/wandb/f")

    monkeypatch.setattr(Trainer, "train", fail)
    with pytest.raises(SystemExit) as stop:
        startup.run(syn_config(tmp_path / "run"))
    assert stop.value.code == code
    # run.flush_denormal (on by default) held inside; the caller's arithmetic is IEEE again.
    assert sys.float_info.min / 2 > 0.0
    err = capsys.readouterr().err
    assert re.search(says, err, re.S), err
    assert code == 1 or err.count("\n") == 1


@pytest.mark.integration
def test_two_ranks_stop_alike_on_a_full_disk(tmp_path: Path) -> None:
    """Rank 0 alone writes; its failed checkpoint stops both ranks with 2, said once."""
    config = tmp_path / "job.yaml"
    with tmpfs(tmp_path / "disk", "48k") as disk:
        config.write_text(
            "data: {name: synthetic_classification, synthetic_samples: 400, "
            "synthetic_features: 8}\nmodel: {name: mlp, hidden: [16]}\n"
            "growth: {base_batch: 32, micro_batch: 16, max_workers: 2, "
            "max_dataset_fraction: null}\nschedule: {type: multistep, milestones: [1]}\n"
            f"run: {{epochs: 40, threads: 1, output_dir: {disk / 'run'}}}\n"
            "logging: {every_steps: 1, progress: 'off', wandb: {mode: disabled}}\n"
        )
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            distgrow_job_argv(2, [str(config)]),
            capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
        )  # fmt: skip
        said = [
            line for line in proc.stderr.splitlines() if line.startswith(("distgrow:", "distgrow["))
        ]
        assert len(said) == 1, proc.stderr
        assert re.match(
            r"distgrow\[rank 0\]: error: cannot write the .*\[Errno 28 ENOSPC\]", said[0]
        )
        # torchrun exits 1 whatever its ranks did; both ranks' own status is 2 (what the
        # launch controller reads as the root cause, and does not retry).
        assert proc.returncode == 1
        assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr
        # No traceback from distgrow (torchrun prints its own ChildFailedError).
        assert "RunDirWriteError" not in proc.stderr and "distgrow/trainer/" not in proc.stderr


def test_replayed_records_of_a_checkpoint_without_metrics_bytes_go_by_step(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "step", "step": s} for s in range(1, 6)] + [
        {"kind": "event", "event": "growth", "step": 3},
        {"kind": "event", "event": "stopped", "step": 4},
        {"kind": "epoch", "step": 5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert drop_replayed_records(path, None, 3) == 3  # steps 4, 5 and the epoch at 5
    assert read_jsonl(path) == lines[:3] + lines[5:7]
    assert drop_replayed_records(path, None, 3) == 0  # nothing left to drop: not rewritten
    # With the size at the checkpoint, what came after it goes, whatever its step says.
    size = path.stat().st_size
    with path.open("a") as f:
        f.write(json.dumps({"kind": "step", "step": 2}) + "\n" + '{"kind": "st')
    assert drop_replayed_records(path, size, 3) == 2
    assert path.stat().st_size == size


def test_reseeding_is_skipped_only_for_models_that_draw_nothing_at_random() -> None:
    from distgrow.models import build_model
    from distgrow.trainer import draws_random

    def mlp(dropout: float) -> nn.Module:
        return build_model("mlp", input_shape=(4,), num_outputs=2, hidden=[8], dropout=dropout)

    assert not draws_random(mlp(0.0))
    assert draws_random(mlp(0.1))

    def wrn(dropout: float) -> nn.Module:
        return build_model(
            "wrn", input_shape=(3, 8, 8), num_outputs=2, depth=10, width=1, dropout=dropout
        )

    assert not draws_random(wrn(0.0))
    assert draws_random(wrn(0.3))
    assert draws_random(nn.Sequential(nn.Linear(4, 4), nn.RReLU()))
    assert draws_random(nn.MultiheadAttention(4, 2, dropout=0.1))
    assert not draws_random(nn.MultiheadAttention(4, 2))
    assert draws_random(nn.LSTM(4, 4, num_layers=2, dropout=0.1))

    class Noisy(nn.Module):  # a user's forward may call torch.rand: counted as random
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    assert draws_random(nn.Sequential(nn.Linear(4, 4), Noisy()))
