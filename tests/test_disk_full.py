"""A full or read-only disk at any moment (issue #22, item 2): one line with the errno, the
path and the fix, exit 2, no retry, the last good checkpoint intact and no partial output.

The disks are real tmpfs mounts (:func:`conftest.tmpfs`; ``chmod`` does not stop root): full
before the command starts, filling while a checkpoint is written (sized so that the first
checkpoint fits and the second does not), and read-only; for ``train``, ``launch``,
``compare``, ``report`` and ``sweep``.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO_ROOT, communicate_or_fail, distgrow_job_env, tmpfs
from test_hostile_inputs import SYNTHETIC
from test_launch import TORCHRUN_REPORT
from test_report import fake_run

from distgrow import cli
from distgrow.checkpoint import load_checkpoint, save_checkpoint
from distgrow.config import load_config
from distgrow.launch.controller import AttemptEnd, decide, run_controller
from distgrow.launch.executor import (
    Outcome,
    PlannedExitFilter,
    run_subprocess,
    torchrun_status,
)
from distgrow.rundir import RunDir, atomic_write_bytes

# A model whose checkpoint (weights and momentum) is 2.2 MB: on a 3 MiB disk the checkpoint
# after epoch 1 fits, the one after epoch 2 runs out of room part-way through.
BIG = {
    **SYNTHETIC,
    "model": {"name": "mlp", "hidden": [512, 512]},
    "schedule": {"type": "constant"},  # no growth: every epoch is 10 updates of 32
    "run": {"epochs": 3},
}
FIRST, SECOND = "ckpt-000000010.pt", "ckpt-000000020.pt"
ROOM_FOR_ONE = "3m"


def big_config(tmp: Path, **run: Any) -> Path:
    tree = {k: dict(v) for k, v in BIG.items()}
    tree["run"].update(run)
    path = tmp / "big.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def fill(disk: Path) -> None:
    """Fill the file system of ``disk`` to the last byte."""
    with (disk / "filler").open("wb", buffering=0) as f:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


def cli_run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``distgrow ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # `train` ends its process through the backend
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def launch(config: Path, *overrides: str, timeout: float = 120) -> tuple[int, str]:
    """``distgrow launch CONFIG OVERRIDES`` as a process: (exit status, stdout + stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgrow", "launch", str(config), *overrides],
        cwd=REPO_ROOT,
        env=distgrow_job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = communicate_or_fail(proc, timeout, f"launch {config}")
    return proc.returncode, out


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1, f"not one line: {err!r}"
    return err.strip()


def temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*.tmp"))


def checkpoint_mid_write_fails(run_dir: Path, said: str) -> None:
    """The second checkpoint met the full disk; the first is whole and loads."""
    assert re.search(
        rf"cannot write the checkpoint {re.escape(str(run_dir / SECOND))}: \[Errno 28 ENOSPC\] "
        rf"No space left on device\. Fix: free space on the file system of "
        + re.escape(str(run_dir)),
        said,
    ), said
    assert f"last good checkpoint {run_dir / FIRST} is untouched" in said
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == [FIRST]
    assert load_checkpoint(run_dir / FIRST)["step"] == 10
    assert temporaries(run_dir) == []


# -- atomic writes --------------------------------------------------------------------------


def test_a_checkpoint_cut_by_a_full_disk_is_an_oserror_naming_it(tmp_path: Path) -> None:
    """torch.save meets the disk filling part-way with OSError 28, then raises RuntimeError
    ('unexpected pos') on its way out: the write still ends as the OSError, for the file."""
    state = {
        "format_version": 1,
        "fingerprint": {},
        "model": {"w": torch.zeros(400_000)},  # 1.6 MB
        "optimizer": {},
        "plan_state": {},
        "epoch": 0,
        "position": 0,
        "step": 1,
        "samples_seen": 0,
        "rng": torch.get_rng_state(),
    }
    with tmpfs(tmp_path / "disk", ROOM_FOR_ONE) as disk:
        first = save_checkpoint(disk, state, keep=2)
        free = shutil.disk_usage(disk).free
        assert 500_000 < free < first.stat().st_size  # room for a part of the next one
        with pytest.raises(OSError) as caught:
            save_checkpoint(disk, {**state, "step": 2}, keep=2)
        assert type(caught.value) is OSError
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(RunDir(disk).checkpoint(2))
        assert sorted(p.name for p in disk.iterdir()) == [first.name]  # no temporary file
        assert load_checkpoint(first)["step"] == 1
        assert shutil.disk_usage(disk).free == free


def test_an_atomic_write_on_a_read_only_disk_names_the_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro, pytest.raises(OSError) as caught:
        atomic_write_bytes(ro / "summary.json", b"{}")
    assert caught.value.errno == errno.EROFS
    assert caught.value.filename == str(ro / "summary.json")  # not the temporary file


def test_temporaries_a_killed_trainer_left_are_recognised(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    mine = [".ckpt-000000020.pt.k2j4_x.tmp", ".config.yaml.a1b2c3.tmp", ".summary.json.zz.tmp"]
    kept = [FIRST, "metrics.jsonl", ".slurm_jobs.json.q9.tmp", "notes.tmp", ".ckpt-1.pt.x.tmp"]
    for name in mine + kept:
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in run.remove_temporaries()) == sorted(mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert run.checkpoints() == [tmp_path / FIRST]


# -- train -----------------------------------------------------------------------------------


def test_train_on_a_disk_that_fills_during_a_checkpoint_then_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    config = big_config(tmp_path)
    with tmpfs(tmp_path / "disk", ROOM_FOR_ONE) as disk:
        run_dir = disk / "run"
        code, _, err = cli_run(["train", str(config), f"run.output_dir={run_dir}"], capsys)
        assert code == 2
        checkpoint_mid_write_fails(run_dir, one_line(err))
        assert "then rerun with --resume" in err
        # A kill mid-write leaves a temporary checkpoint: the next start removes it.
        stale = run_dir / f".{SECOND}.w7k1q.tmp"
        stale.write_bytes(b"\0" * 100_000)
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        code, _, err = cli_run(
            ["train", str(config), f"run.output_dir={run_dir}", "--resume"], capsys
        )
        assert code == 0, err
        assert not stale.exists() and temporaries(run_dir) == []
        assert load_checkpoint(RunDir(run_dir).checkpoints()[-1])["step"] == 30


def test_train_on_a_full_disk_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    config = big_config(tmp_path)
    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        run_dir = disk / "run"
        code, _, err = cli_run(["train", str(config), f"run.output_dir={run_dir}"], capsys)
        assert code == 2
        line = one_line(err)
        assert f"{run_dir / 'config.yaml'}: [Errno 28 ENOSPC]" in line
        assert f"Fix: free space on the file system of {run_dir}" in line
        assert [p.name for p in run_dir.rglob("*") if p.is_file()] == []


@pytest.mark.integration
def test_a_kill_mid_checkpoint_leaves_a_temporary_the_next_start_removes(tmp_path: Path) -> None:
    """SIGKILL while the second checkpoint is half written (torch.save writes 1 MB, then the
    process kills itself): the temporary file stays behind until the run resumes."""
    config = big_config(tmp_path)
    run_dir = tmp_path / "run"
    killed_mid_write = f"""
import os, sys, torch
from distgrow import cli
real, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"\\0" * 1_000_000); f.flush(); os.kill(os.getpid(), 9)
    return real(obj, f, *args, **kwargs)
torch.save = save
cli.main(["train", {str(config)!r}, "run.output_dir={run_dir}"])
"""
    proc = subprocess.run(
        [sys.executable, "-c", killed_mid_write], cwd=REPO_ROOT, env=distgrow_job_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    [left] = temporaries(run_dir)
    assert left.startswith(f".{SECOND}.") and (run_dir / left).stat().st_size == 1_000_000
    assert sorted(p.name for p in run_dir.glob("ckpt-*")) == [FIRST]
    proc = subprocess.run(
        [sys.executable, "-m", "distgrow", "train", str(config), f"run.output_dir={run_dir}",
         "--resume"], cwd=REPO_ROOT, env=distgrow_job_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    resumed = [r for r in RunDir(run_dir).records() if r.get("event") == "resume"]
    assert [(r["step"], r["checkpoint"]) for r in resumed] == [(10, str(run_dir / FIRST))]
    assert temporaries(run_dir) == []
    assert load_checkpoint(RunDir(run_dir).checkpoints()[-1])["step"] == 30


# -- launch ----------------------------------------------------------------------------------


def test_decide_never_retries_a_disk_that_cannot_be_written() -> None:
    line = (
        "cannot write the checkpoint /r/ckpt-000000020.pt: [Errno 28 ENOSPC] No space left on "
        "device. Fix: free space on the file system of /r"
    )
    worker = decide(AttemptEnd(1, 1, 2, error=line), 4, "limit", max_restarts=3)
    assert (worker.action, worker.status, worker.fix) == ("stop", 2, "")
    assert worker.message.endswith(line) and "not relaunching" in worker.message
    # A crash (exit 1) is retried, unless the launch's own log could not be written.
    assert decide(AttemptEnd(1, 1, 1), 4, "limit", max_restarts=3).action == "relaunch"
    log = "cannot write the launch log /r/launch/attempt-01-1w.log: [Errno 30 EROFS] ..."
    lost = decide(AttemptEnd(1, 1, 1, log_error=log), 4, "limit", max_restarts=3)
    assert (lost.action, lost.status) == ("stop", 2) and lost.message.endswith(log)
    # Another exit-2 problem keeps its report of every attempt.
    usage = decide(AttemptEnd(1, 1, 2, error="optim.lr = nan"), 4, "limit", max_restarts=3)
    assert usage.status == 2 and usage.fix


@pytest.mark.integration
def test_the_tee_survives_a_log_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashed: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    root_cause = "Root Cause (first observed failure):\\n  exitcode  : 2"
    child = f"print('x' * 70000); print('{root_cause}'); raise SystemExit(1)"
    lines: list[str] = []
    with tmpfs(tmp_path / "disk", "64k") as disk:
        log = disk / "launch" / "attempt-01-1w.log"
        outcome = run_subprocess([sys.executable, "-c", child], {}, log, echo=lines.append)
        assert crashed == []
        assert outcome.returncode == 1
        assert outcome.log_error is not None and outcome.log_error.errno == errno.ENOSPC
        assert lines[-1] == "  exitcode  : 2"  # the terminal got it all
        assert len(lines[0]) == 70000
        # torchrun's root cause is read from the output kept in memory, not the cut log.
        assert log.stat().st_size < 70000
        assert torchrun_status(outcome.returncode, log) == (1, None)
        assert torchrun_status(outcome.returncode, log, outcome.tail) == (2, 2)


def test_the_terminal_shows_one_line_for_torchruns_report_of_an_exit_2() -> None:
    said = "distgrow: error: cannot write the checkpoint /r/ckpt-000000020.pt: [Errno 28 ...\n"
    shown = PlannedExitFilter()
    out = shown.feed(said + TORCHRUN_REPORT.format(code=2) + "after\n") + shown.close()
    assert out == (
        f"{said}torchrun: the workers exited 2 (their error is above) (torchrun's failure "
        "report is in the log)\nafter\n"
    )


@pytest.mark.integration
@pytest.mark.parametrize("preload", [True, False], ids=["forked", "torchrun"])
def test_launch_stops_once_when_a_checkpoint_meets_a_full_disk(
    preload: bool, tmp_path: Path
) -> None:
    """torchrun exits 1 whatever its worker did: the controller reads the worker's 2 in
    torchrun's report (kept in memory, the log may have lost it) and does not retry."""
    config = big_config(tmp_path)
    with tmpfs(tmp_path / "disk", ROOM_FOR_ONE) as disk:
        run_dir = disk / "run"
        code, out = launch(
            config,
            f"run.output_dir={run_dir}",
            "launch.max_restarts=3",
            f"launch.preload={str(preload).lower()}",
        )
        assert code == 2, out
        assert "Traceback" not in out and "launch 2" not in out
        stop = [line for line in out.splitlines() if "not relaunching" in line]
        assert len(stop) == 1 and stop[0].startswith("distgrow launch: not relaunching (exit 2")
        checkpoint_mid_write_fails(run_dir, stop[0])
        assert stop[0].endswith("is untouched); then launch again with run.resume=true.")
        attempts = {p.name.split("-")[1] for p in (run_dir / "launch").glob("attempt-*")}
        assert attempts == {"01"}  # one launch, no retry
        if not preload:  # torchrun's failure report goes to the log, not the terminal
            assert "ChildFailedError" not in out
            assert "torchrun: the workers exited 2 (their error is above) (torchrun" in out


@pytest.mark.integration
def test_launch_on_a_full_disk_names_its_log(tmp_path: Path) -> None:
    config = big_config(tmp_path)
    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        run_dir = disk / "run"
        code, out = launch(config, f"run.output_dir={run_dir}")
        assert code == 2, out
        assert "Traceback" not in out and "launch 2" not in out
        log = run_dir / "launch" / "attempt-01-1w.log"
        stop = [line for line in out.splitlines() if line.startswith("distgrow launch: not")]
        assert len(stop) == 1, out
        assert f"cannot write the launch log {log}: [Errno 28 ENOSPC]" in stop[0]
        assert str(config) not in stop[0]
        # The worker said why it stopped too (its line reached the terminal, not the log).
        assert f"distgrow: error: cannot write the run directory {run_dir}" in out


@pytest.mark.integration
@pytest.mark.parametrize("room", ["none", "some"])
def test_workers_that_finish_despite_a_cut_log_are_done_with_one_warning(
    room: str, tmp_path: Path
) -> None:
    """The workers end with 0, but their launch log met a full disk: the controller's "done"
    says in the same line that the log is incomplete and where; an empty log is removed."""
    config = big_config(tmp_path)
    child = "print('x' * 400_000); print('trained')"
    shown: list[str] = []

    def executor(argv: list[str], additions: dict[str, str], log_path: Path) -> Outcome:
        if room == "none":
            fill(disk)  # after the controller's own files: only the log meets the full disk
        return run_subprocess([sys.executable, "-c", child], {}, log_path, echo=shown.append)

    with tmpfs(tmp_path / "disk", "256k") as disk:
        run_dir = disk / "run"
        cfg = load_config(config, [f"run.output_dir={run_dir}"])
        said: list[str] = []
        code = run_controller(
            str(config), [], cfg, executor=executor, env={}, log=said.append, gpus_on_node=0
        )
        assert code == 0 and shown[-1] == "trained", said
        log = run_dir / "launch" / "attempt-01-1w.log"
        done = [line for line in said if line.startswith("done:")]
        assert len(done) == 1 and "\n" not in done[0], said
        assert done[0].startswith(
            "done: 1 launch(es), 0 restart(s) after crashes; but its log is incomplete: cannot "
            f"write the launch log {log}: [Errno 28 ENOSPC] No space left on device. Fix: free "
            f"space on the file system of {log.parent}"
        ), done[0]
        if room == "none":
            assert not log.exists()
            assert done[0].endswith(
                "Nothing of its output could be written (the empty log was removed)."
            )
        else:
            size = log.stat().st_size
            assert 0 < size < 400_000
            assert done[0].endswith(
                f"The log stops at {size:,} bytes; the rest of its output reached only the "
                "terminal."
            )


@pytest.mark.integration
def test_launch_on_a_read_only_disk_starts_nothing(tmp_path: Path) -> None:
    config = big_config(tmp_path)
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro:
        code, out = launch(config, f"run.output_dir={ro / 'run'}")
    assert code == 2, out
    assert "Traceback" not in out and "distgrow: error" not in out  # no worker started
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"distgrow launch: error: cannot write the launch log {ro / 'run'}")
    assert "[Errno 30 EROFS] Read-only file system. Fix: make" in last


# -- report ----------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path: Path) -> list[str]:
    root = tmp_path / "runs"
    return [
        str(fake_run(root, "decay_lr", ["growth.mode=decay_lr"], wall_s=60.0, final_acc=0.90)),
        str(fake_run(root, "grow_batch", [], wall_s=30.0, final_acc=0.905)),
    ]


def test_report_on_a_read_only_disk(
    two_runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro:
        code, _, err = cli_run(["report", *two_runs, "--out", str(ro / "report")], capsys)
    assert code == 2
    line = one_line(err)
    assert f"cannot write the output {ro / 'report'}: [Errno 30 EROFS]" in line
    assert f"Fix: make {ro} writable, or set --out to a writable directory" in line


def test_report_on_a_disk_that_fills_leaves_no_partial_output(
    two_runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The report is 6 files, 150 KB: the first two plots fit, the third does not.
    with tmpfs(tmp_path / "disk", "96k") as disk:
        out = disk / "new" / "report"
        code, _, err = cli_run(["report", *two_runs, "--out", str(out)], capsys)
        assert code == 2
        line = one_line(err)
        assert re.search(
            rf"cannot write the output {re.escape(str(out))}/\S+\.png: \[Errno 28 ENOSPC\]", line
        )
        assert "set --out to a file system with room" in line
        assert "val_vs_epochs.png" not in line  # the first plot was written, then removed
        assert list(disk.iterdir()) == []  # no PNG cut short, no empty directories
        assert shutil.disk_usage(disk).used == 0


def test_report_keeps_a_file_in_the_way(
    two_runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("mine")
    code, _, err = cli_run(["report", *two_runs, "--out", str(tmp_path / "taken")], capsys)
    assert code == 2
    line = one_line(err)
    assert "[Errno 17 EEXIST]" in line or "[Errno 20 ENOTDIR]" in line
    assert f"Fix: move {tmp_path / 'taken'} out of the way" in line
    assert (tmp_path / "taken").read_text() == "mine"


def test_report_with_a_baseline_not_among_the_runs_writes_nothing(
    two_runs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "report"
    argv = ["report", *two_runs, "--baseline", str(tmp_path / "elsewhere"), "--out", str(out)]
    code, _, err = cli_run(argv, capsys)
    assert code == 2
    assert "is none of the runs given" in one_line(err)
    assert not (tmp_path / "out").exists()


# -- compare and sweep ------------------------------------------------------------------------


def compare_argv(config: Path, out: Path) -> list[str]:
    return ["compare", str(config), "--variants", "decay_lr,grow_batch", "--out", str(out)]


def sweep_argv(config: Path, out: Path) -> list[str]:
    return ["sweep", str(config), "--batch-sizes", "32,64", "--lrs", "0.05", "--out", str(out)]


VERBS = {"compare": (compare_argv, "the decay_lr run"), "sweep": (sweep_argv, "the sweep run")}


@pytest.mark.parametrize("verb", list(VERBS))
def test_compare_and_sweep_on_a_read_only_disk_start_nothing(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = VERBS[verb][0]
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro:
        code, out, err = cli_run(argv(big_config(tmp_path), ro / "out"), capsys)
    assert code == 2
    line = one_line(err)
    assert f"cannot write the output {ro / 'out'}: [Errno 30 EROFS]" in line
    assert "set --out to a writable directory" in line
    assert "$ distgrow train" not in out


@pytest.mark.parametrize("verb", list(VERBS))
def test_compare_and_sweep_keep_a_file_in_the_way(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").write_text("mine")
    code, out, err = cli_run(VERBS[verb][0](big_config(tmp_path), tmp_path / "taken"), capsys)
    assert code == 2
    line = one_line(err)
    assert "[Errno 17 EEXIST]" in line or "[Errno 20 ENOTDIR]" in line
    assert f"Fix: move {tmp_path / 'taken'} out of the way, or set --out to another" in line
    assert (tmp_path / "taken").read_text() == "mine" and "$ distgrow train" not in out


@pytest.mark.integration
@pytest.mark.parametrize("verb", list(VERBS))
def test_compare_and_sweep_stop_at_the_first_checkpoint_that_meets_a_full_disk(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, first_run = VERBS[verb]
    with tmpfs(tmp_path / "disk", ROOM_FOR_ONE) as disk:
        code, out, err = cli_run(argv(big_config(tmp_path), disk / "out"), capsys)
        assert code == 2
        line = one_line(err)
        assert line.startswith(f"distgrow: error: {first_run}")
        assert "stopped (exit 2): cannot write the checkpoint" in line
        assert line.endswith(
            f"is untouched). Then rerun the same command with --out {disk / 'out'}: finished "
            "runs are reused, this one resumes from its last checkpoint."
        )
        assert "set --out to a file system with room" in line and "--resume" not in line
        run_dir = next((disk / "out" / "runs").iterdir())
        checkpoint_mid_write_fails(run_dir, line)
        assert len(list((disk / "out" / "runs").iterdir())) == 1  # no second run started
        assert out.count("$ distgrow train") == 1


@pytest.mark.integration
@pytest.mark.parametrize("verb", list(VERBS))
def test_compare_and_sweep_on_a_full_disk(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, first_run = VERBS[verb]
    with tmpfs(tmp_path / "disk", "256k") as disk:
        fill(disk)
        code, out, err = cli_run(argv(big_config(tmp_path), disk / "out"), capsys)
        assert code == 2
        line = one_line(err)
        assert line.startswith(f"distgrow: error: {first_run}")
        assert "[Errno 28 ENOSPC] No space left on device" in line
        assert "Traceback" not in out and out.count("$ distgrow train") == 1
        # Nothing but the filler: no temporary file, no empty log or run directory.
        assert [p.name for p in disk.rglob("*")] == ["filler"]
