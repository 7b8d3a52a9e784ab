"""What distgrow hands to W&B, checked through a fake ``wandb`` module (no network, no files
of wandb's); and one run of the real wandb in offline mode."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from distgrow import wandb_logger
from distgrow.config import Config, load_config
from distgrow.metrics import NullLogger
from distgrow.planner import make_plan
from distgrow.wandb_logger import (
    RUN_ID_FILE,
    WandbLogger,
    open_wandb_logger,
    wandb_metrics,
    wandb_summary,
)

SECRET = "s3cr3t-api-key-0123456789"


class FakeSummary(dict[str, Any]):
    pass


class FakeRun:
    def __init__(self, resumed: bool = False, step: int = 0) -> None:
        self.resumed = resumed
        self.step = step
        self.logged: list[tuple[dict[str, Any], int | None]] = []
        self.summary = FakeSummary()
        self.finished = 0

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        self.logged.append((dict(data), step))

    def finish(self) -> None:
        self.finished += 1

    def steps(self) -> list[int]:
        """The step of every point logged; each must have one (W&B's own counter is not used)."""
        steps = [step for _, step in self.logged]
        assert None not in steps, steps
        return [step for step in steps if step is not None]


class FakeWandb(types.ModuleType):
    """Records every ``init``; the run it returns records ``log``, ``summary`` and ``finish``."""

    def __init__(self, *, fail: Exception | None = None, resumed_step: int | None = None) -> None:
        super().__init__("wandb")
        self.inits: list[dict[str, Any]] = []
        self.runs: list[FakeRun] = []
        self.fail = fail
        self.resumed_step = resumed_step

    def init(self, **kwargs: Any) -> FakeRun:
        self.inits.append(kwargs)
        if self.fail is not None:
            raise self.fail
        run = FakeRun(self.resumed_step is not None, self.resumed_step or 0)
        self.runs.append(run)
        return run


@pytest.fixture(autouse=True)
def fresh_notices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wandb_logger, "_shown_notices", set())
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test suite may switch W&B off


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> FakeWandb:
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def config(*overrides: str) -> Config:
    return load_config(
        None,
        [
            "run.name=fmnist",
            "run.epochs=3",
            "data.size=6000",
            "growth.max_dataset_fraction=null",
            "optim.momentum=0.9",
            "schedule.type=multistep",
            "schedule.milestones=[1, 2]",
            "schedule.gamma=0.2",
            "logging.wandb.tags=[paper, cpu]",
            *overrides,
        ],
    )


def plan_json(cfg: Config) -> dict[str, Any]:
    return make_plan(cfg, 6000).to_json()


def step_record(step: int, **extra: Any) -> dict[str, Any]:
    record = {
        "kind": "step",
        "epoch": 1,
        "step": step,
        "samples_seen": step * 128,
        "global_batch": 128,
        "workers": 2,
        "micro_batch": 64,
        "accum_steps": 1,
        "lr": 0.1,
        "momentum": 0.9,
        "train_loss": 1.0 / step,
        "val_loss": None,
        "val_acc": None,
        "wall_s": step * 0.01,
        "samples_per_s": 1000.0,
    }
    record.update(extra)
    return record


END: dict[str, Any] = {
    "kind": "event",
    "event": "end",
    "status": "completed",
    "step": 60,
    "total_updates": 60,
    "samples_seen": 18000,
    "val_acc": 0.81,
    "val_loss": 0.55,
    "train_loss": 0.5,
    "wall_s": 12.5,
    "startup_s": 2.0,
    "worker_seconds": 25.0,
    "worker_hours": 25.0 / 3600,
    "gpu_hours": None,
    "baseline_total_updates": 141,
    "growth_mode": "grow_batch",
    "phases": [
        {
            "index": 0,
            "global_batch": 128,
            "workers": 2,
            "samples_per_s": 900.0,
            "samples_per_s_per_worker": 450.0,
            "updates": 47,
            "train_s": 6.0,
        },
        {
            "index": 1,
            "global_batch": 640,
            "workers": 2,
            "samples_per_s": 2000.0,
            "samples_per_s_per_worker": 1000.0,
            "updates": 13,
            "train_s": 4.0,
        },
    ],
    "savings": {
        "estimated": {
            "kind": "estimated",
            "wall_ratio": 1.4,
            "updates_ratio": 2.35,
            "method": "estimated: baseline training time = ...",
            "details": {"x": 1},
        },
    },
}


def test_only_rank_0_opens_one_run_with_the_config_plan_and_a_persisted_id(
    fake_wandb: FakeWandb, tmp_path: Path
) -> None:
    cfg = config()
    plan = plan_json(cfg)
    others = [open_wandb_logger(cfg, tmp_path, rank=r, plan=plan) for r in (1, 2, 3)]
    assert all(isinstance(lg, NullLogger) for lg in others)
    assert fake_wandb.inits == []
    lines: list[str] = []
    logger = open_wandb_logger(cfg, tmp_path, rank=0, plan=plan, echo=lines.append)
    assert isinstance(logger, WandbLogger)
    (init,) = fake_wandb.inits
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert init["id"] == run_id == logger.run_id and init["resume"] == "allow"
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path)
    assert (init["project"], init["entity"], init["name"]) == ("distgrow", None, "fmnist")
    assert init["tags"] == ["paper", "cpu"]
    expected_config = cfg.to_dict()
    expected_config["plan"] = plan
    assert init["config"] == expected_config
    assert [p["global_batch"] for p in init["config"]["plan"]["phases"]] == [128, 640, 3200]
    assert SECRET not in repr(init)
    assert any("offline" in line and "wandb sync" in line for line in lines)


def test_logs_curves_at_the_global_step_and_the_summary_at_the_end(
    fake_wandb: FakeWandb, tmp_path: Path
) -> None:
    cfg = config()
    logger = open_wandb_logger(cfg, tmp_path, rank=0, plan=plan_json(cfg), echo=lambda _: None)
    logger.log(
        {
            "kind": "event",
            "event": "start",
            "epoch": 1,
            "step": 0,
            "samples_seen": 0,
            "world_size": 2,
        }
    )
    logger.log(step_record(20))
    logger.log(step_record(40))
    logger.log(
        {
            **step_record(47),
            "kind": "epoch",
            "train_loss": 0.7,
            "val_loss": 0.6,
            "val_acc": 0.78,
            "epoch_wall_s": 5.0,
        }
    )
    logger.log(
        {
            **step_record(47, global_batch=640, micro_batch=320, samples_seen=6000),
            "kind": "event",
            "event": "growth",
            "train_loss": None,
            "finished_phase": END["phases"][0],
        }
    )
    logger.log(step_record(30))  # below a step already logged: not sent
    logger.log(END)
    logger.close()
    logger.close()  # twice is harmless
    (run,) = fake_wandb.runs
    steps = run.steps()
    assert steps == [20, 40, 47, 47, 60]
    assert steps == sorted(steps)
    first = run.logged[0][0]
    assert first == {
        "train/loss": pytest.approx(1 / 20),
        "schedule/global_batch": 128,
        "schedule/lr": 0.1,
        "schedule/momentum": 0.9,
        "schedule/workers": 2,
        "schedule/micro_batch": 64,
        "schedule/accum_steps": 1,
        "throughput/samples_per_s": 1000.0,
        "throughput/samples_per_s_per_worker": 500.0,
        "progress/samples_seen": 2560,
        "progress/epoch": pytest.approx(2560 / 6000),
        "progress/wall_s": pytest.approx(0.2),
    }
    epoch = run.logged[2][0]
    assert (epoch["val/loss"], epoch["val/acc"], epoch["train/epoch_loss"]) == (0.6, 0.78, 0.7)
    growth = run.logged[3][0]
    assert growth["schedule/global_batch"] == 640 and growth["phase/samples_per_s"] == 900.0
    assert "train/loss" not in growth
    assert run.logged[4][0] == {
        "phase/samples_per_s": 2000.0,
        "phase/samples_per_s_per_worker": 1000.0,
        "phase/global_batch": 640,
    }
    s = run.summary
    assert s["world_size"] == 2
    assert (s["total_updates"], s["wall_s"], s["startup_s"], s["worker_seconds"]) == (
        60,
        12.5,
        2.0,
        25.0,
    )
    assert s["worker_hours"] == pytest.approx(25 / 3600) and "gpu_hours" not in s
    assert (s["final/val_acc"], s["baseline_total_updates"]) == (0.81, 141)
    assert s["phases/1/samples_per_s"] == 2000.0 and s["phases/0/updates"] == 47
    assert s["savings/estimated/wall_ratio"] == 1.4
    assert s["savings/estimated/method"].startswith("estimated:")
    assert s["savings/estimated/details/x"] == 1
    assert run.finished == 1
    assert logger.skipped == 1  # type: ignore[attr-defined]


def test_a_relaunch_continues_the_same_run_and_skips_steps_it_already_has(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cfg = config()
    first = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", first)
    open_wandb_logger(cfg, tmp_path, rank=0, echo=lambda _: None).close()
    again = FakeWandb(resumed_step=50)
    monkeypatch.setitem(sys.modules, "wandb", again)
    logger = open_wandb_logger(cfg, tmp_path, rank=0, echo=lambda _: None)
    assert again.inits[0]["id"] == first.inits[0]["id"]
    for step in (40, 50, 60):
        logger.log(step_record(step))
    assert [s for _, s in again.runs[0].logged] == [50, 60]


def test_disabled_says_so_once_and_never_imports_wandb(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise
    lines: list[str] = []
    for _ in range(3):
        logger = open_wandb_logger(
            config("logging.wandb.mode=disabled"), tmp_path, rank=0, echo=lines.append
        )
        assert isinstance(logger, NullLogger)
    assert len(lines) == 1 and "logging.wandb.mode=disabled" in lines[0]
    assert not (tmp_path / RUN_ID_FILE).exists()


def test_wandb_mode_disabled_in_the_environment_switches_it_off(
    fake_wandb: FakeWandb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    lines: list[str] = []
    assert isinstance(open_wandb_logger(config(), tmp_path, rank=0, echo=lines.append), NullLogger)
    assert fake_wandb.inits == [] and "WANDB_MODE=disabled" in lines[0]


def test_missing_wandb_says_how_to_install_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    lines: list[str] = []
    for _ in range(2):
        assert isinstance(
            open_wandb_logger(config(), tmp_path, rank=0, echo=lines.append), NullLogger
        )
    assert len(lines) == 1
    assert "wandb is not installed" in lines[0] and "pip install" in lines[0]
    assert "logging.wandb.mode=disabled" in lines[0]


def test_a_failing_init_does_not_stop_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(
        sys.modules, "wandb", FakeWandb(fail=RuntimeError("api_key not configured"))
    )
    lines: list[str] = []
    logger = open_wandb_logger(
        config("logging.wandb.mode=online"), tmp_path, rank=0, echo=lines.append
    )
    assert isinstance(logger, NullLogger)
    assert "api_key not configured" in lines[0] and "wandb login" in lines[0]


def test_a_damaged_run_id_file_is_named(fake_wandb: FakeWandb, tmp_path: Path) -> None:
    (tmp_path / RUN_ID_FILE).write_text("not an id!\n")
    lines: list[str] = []
    assert isinstance(open_wandb_logger(config(), tmp_path, rank=0, echo=lines.append), NullLogger)
    assert RUN_ID_FILE in lines[0] and "delete" in lines[0]


def test_pure_mappings_ignore_what_is_not_a_curve() -> None:
    assert wandb_metrics({"kind": "event", "event": "resume", "step": 3}) == {}
    assert wandb_metrics({"kind": "event", "event": "nonfinite", "step": 3, "lr": 0.1}) == {}
    nan_loss = wandb_metrics(step_record(5, train_loss=None, samples_per_s=None))
    assert "train/loss" not in nan_loss and "throughput/samples_per_s" not in nan_loss
    assert wandb_summary({"status": "completed", "val_acc": None, "phases": None}) == {
        "status": "completed"
    }


@pytest.mark.integration
def test_real_wandb_offline_runs_without_network_and_keeps_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY")
    cfg = config()
    run_dir = tmp_path / "run"
    lines: list[str] = []
    logger = open_wandb_logger(cfg, run_dir, rank=0, plan=plan_json(cfg), echo=lines.append)
    assert isinstance(logger, WandbLogger), lines
    try:
        for step in (10, 20, 30):
            logger.log(step_record(step))
        logger.log(END)
    finally:
        logger.close()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert logger.run_id == run_id
    assert getattr(logger.run, "id", run_id) == run_id
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}")), "no offline run directory"


def test_the_trainer_hands_wandb_one_run_through_the_seam(
    fake_wandb: FakeWandb, tmp_path: Path
) -> None:
    import json

    from distgrow.backends.torch_ddp import TorchBackend
    from distgrow.exits import EXIT_OK
    from distgrow.runtime import Runtime
    from distgrow.startup import load_data
    from distgrow.trainer import Trainer

    single = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
    run_dir = tmp_path / "run"

    def train(*overrides: str) -> Trainer:
        cfg = load_config(
            None,
            [
                "run.name=syn",
                "data.name=synthetic_classification",
                "data.synthetic_samples=1000",
                "data.synthetic_features=8",
                "model.hidden=[16]",
                "optim.momentum=0.9",
                "schedule.type=multistep",
                "schedule.milestones=[1]",
                "schedule.gamma=0.5",
                "growth.base_batch=40",
                "growth.max_dataset_fraction=null",
                "logging.every_steps=5",
                "logging.progress='off'",
                f"run.output_dir={run_dir}",
                *overrides,
            ],
        )
        trainer = Trainer(cfg, TorchBackend(cfg.backend, single, device="cpu"), load_data(cfg))
        assert trainer.train() == EXIT_OK
        return trainer

    trainer = train("run.epochs=2")
    (init,) = fake_wandb.inits
    (run,) = fake_wandb.runs
    assert init["config"]["plan"]["total_updates"] == trainer.plan.total_updates == 20 + 10
    assert init["config"]["growth"]["base_batch"] == 40 and init["name"] == "syn"
    steps = run.steps()
    assert steps == sorted(steps) and steps[-1] == trainer.state.step == 30
    keys = set().union(*(data for data, _ in run.logged))
    assert {
        "train/loss",
        "val/loss",
        "val/acc",
        "schedule/global_batch",
        "schedule/lr",
        "throughput/samples_per_s",
        "phase/samples_per_s",
        "progress/epoch",
    } <= keys
    batches = [d["schedule/global_batch"] for d, _ in run.logged if "schedule/global_batch" in d]
    assert batches[0] == 40 and batches[-1] == 80 and batches == sorted(batches)
    summary = json.loads((run_dir / "summary.json").read_text())
    s = run.summary
    assert (s["total_updates"], s["wall_s"], s["startup_s"]) == (
        summary["total_updates"],
        summary["wall_s"],
        summary["startup_s"],
    )
    assert 0 < summary["startup_s"] < 120 and summary["train_s"] <= summary["wall_s"]
    assert [p["global_batch"] for p in summary["phases"]] == [40, 80]
    assert [p["updates"] for p in summary["phases"]] == [20, 10]
    assert s["phases/1/samples_per_s"] == summary["phases"][1]["samples_per_s"] > 0
    assert s["savings/estimated/method"] == summary["savings"]["estimated"]["method"]
    assert s["savings/estimated/baseline_updates"] == 40
    assert run.finished == 1

    # A relaunch (resume) continues the same W&B run and keeps counting steps upwards.
    fake_wandb.resumed_step = 30
    resumed = train("run.epochs=3", "run.resume=true")
    assert [i["id"] for i in fake_wandb.inits] == [init["id"]] * 2
    steps = fake_wandb.runs[1].steps()
    assert steps == sorted(steps) and steps[0] >= 30 and steps[-1] == resumed.state.step == 40
    phases = json.loads((run_dir / "summary.json").read_text())["phases"]
    assert [p["updates"] for p in phases] == [20, 20]  # the second phase went on after resuming
