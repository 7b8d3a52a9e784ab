"""The run's one clock (distgrow.trainer.telemetry.Clock): every time a run records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trainer import SINGLE, syn_config

from distgrow import wandb_logger
from distgrow.backends.torch_ddp import TorchBackend
from distgrow.exits import EXIT_OK
from distgrow.startup import load_data
from distgrow.trainer import Trainer
from distgrow.trainer.telemetry import Clock, Reading

pytestmark = pytest.mark.usefixtures("one_thread")

UNIX_AT_START = 1_800_000_000.0


class Ticks:
    """A source that moves ``step`` seconds at each reading (exact in binary: 0.25)."""

    def __init__(self, start: float = 100.0, step: float = 0.25) -> None:
        self.t, self.step = start, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def test_the_clock_counts_laps_start_up_and_unix_time_from_one_source() -> None:
    read, cpu = Ticks(), Ticks(start=0.0, step=0.5)
    clock = Clock(started_at=90.0, read=read, cpu=cpu, unix=lambda: UNIX_AT_START)
    # Created at reading 100.25: Unix time is that reading plus a fixed offset.
    assert clock.unix(100.25) == UNIX_AT_START
    assert clock.unix(110.25) == UNIX_AT_START + 10
    assert clock.start_training() == 100.5 - 90.0  # this process's start-up
    assert clock.lap("epoch") == 0.25  # laps count from training's start
    assert clock.peek("epoch") == 0.25  # peek does not restart the lap
    assert clock.lap("epoch") == 0.5
    assert clock.training_s() == 101.5 - 100.5
    start = clock.reading()
    assert clock.since(start) == Reading(0.25, 0.5)
    clock.start_training()  # a resume in the same process: the laps restart too
    assert clock.peek("epoch") == 0.25


def run_on_ticks(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, str]:
    """A 2-epoch run whose only source of time is a :class:`Ticks` clock: (metrics, summary,
    console), with the run directory's name taken out."""
    cfg = syn_config(run_dir, "logging.progress=lines")
    clock = Clock(read=Ticks(step=2.0), cpu=Ticks(0.0, 0.125), unix=lambda: UNIX_AT_START)
    backend = TorchBackend(cfg.backend, SINGLE, device="cpu")
    trainer = Trainer(cfg, backend, load_data(cfg), clock=clock)
    capsys.readouterr()
    assert trainer.train() == EXIT_OK
    console = capsys.readouterr().out.replace(str(run_dir), "RUN")
    metrics = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").replace(str(run_dir), "RUN")
    summary = (run_dir / "summary.json").read_text(encoding="utf-8")
    return metrics, summary, console


def test_every_record_progress_line_and_summary_read_the_one_clock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # W&B's notices come once per process: the first run would print (and time) one line more.
    monkeypatch.setattr(wandb_logger, "notice_once", lambda *args: None)
    first = run_on_ticks(tmp_path / "a", capsys)
    # Two runs on the same ticking clock record the same times, to the last bit: a time read
    # anywhere else (time.time, perf_counter, monotonic, process_time) would differ.
    assert run_on_ticks(tmp_path / "b", capsys) == first
    metrics, summary_text, console = first
    records = [json.loads(line) for line in metrics.splitlines()]
    timed = [r for r in records if "wall_s" in r and "time" in r]
    assert {r["kind"] for r in timed} >= {"step", "epoch", "event"}
    # Unix time and wall-clock are one reading: they differ by one constant in every record.
    assert len({r["time"] - r["wall_s"] for r in timed}) == 1
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch_wall_s"] > 0 for r in epochs] == [True, True]
    summary = json.loads(summary_text)
    assert summary["startup_s"] > 0
    assert 0 < summary["train_s"] < summary["wall_s"]
    # CPU time ticks 0.125 per reading, two readings per update: 0.125 per update.
    assert summary["train_cpu_s"] == 0.125 * summary["total_updates"]
    assert sum(p["updates"] for p in summary["phases"]) == summary["total_updates"]
    # The progress lines' rate and ETA come from the clock too (a line after 30 clock seconds
    # without one): equal in both runs, above.
    assert "distgrow: progress: epoch" in console
