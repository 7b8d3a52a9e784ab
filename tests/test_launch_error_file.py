"""torchrun's outcome from torchelastic's error files (``TORCHELASTIC_ERROR_FILE``), the log
only where there is none; and the launch folder's names, spelled once in :mod:`distgrow.rundir`.

The unit tests write the files with torch's own ``ErrorHandler`` (what torchrun's ``@record``
uses); the integration test runs a real torchrun whose worker exits 65 through
:func:`~distgrow.launch.error_file.recorded`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clear_launcher_env, free_port, write_config
from test_launch import GROWING
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

from distgrow.config import load_config
from distgrow.exits import EXIT_NONFINITE
from distgrow.launch import run_controller
from distgrow.launch.error_file import (
    ERROR_FILE_VAR,
    read_error_file,
    recorded,
    torchrun_error_status,
    write_exit,
)
from distgrow.launch.executor import Outcome, torchrun_status
from distgrow.rundir import RunDir

# What torchrun's log says when a worker exited 65 (the fallback reads it).
REPORT_65 = "Root Cause (first observed failure):\n[0]:\n  exitcode  : 65 (pid: 1)\n"


def _torchrun_copies(worker_file: Path, torchrun_file: Path, exitcode: int) -> None:
    """What torchrun's ``@record`` does with the first failed worker's file."""
    os.environ[ERROR_FILE_VAR] = str(torchrun_file)
    try:
        ErrorHandler().dump_error_file(str(worker_file), exitcode)
    finally:
        del os.environ[ERROR_FILE_VAR]


def test_the_workers_status_comes_from_torchruns_copy_of_their_file(tmp_path: Path) -> None:
    worker, copy = tmp_path / "worker.json", tmp_path / "torchrun.json"
    write_exit(worker, 75, "distgrow exited 75")
    _torchrun_copies(worker, copy, 75)
    assert torchrun_error_status(copy) == (75, 75)
    # The file wins over the log: a log that says 65 (or nothing) does not change it.
    log = tmp_path / "attempt.log"
    assert torchrun_status(1, log, REPORT_65, copy) == (75, 75)
    assert torchrun_status(1, log, "", copy) == (75, 75)
    # Only torchrun's 1 hides a status; the file is not read otherwise.
    assert torchrun_status(143, log, "", copy) == (143, None)


def test_without_an_error_file_the_log_is_read(tmp_path: Path) -> None:
    log = tmp_path / "attempt.log"
    assert torchrun_status(1, log, REPORT_65, tmp_path / "missing.json") == (65, 65)
    assert torchrun_status(1, log, REPORT_65, None) == (65, 65)
    assert torchrun_status(1, log, "Traceback: boom", tmp_path / "missing.json") == (1, None)


@pytest.mark.parametrize(
    ("signum", "expected"),
    [(signal.SIGTERM, (143, None)), (signal.SIGUSR1, (138, None)), (signal.SIGHUP, (1, None))],
)
def test_torchruns_own_signal_exception_is_a_stop(
    tmp_path: Path, signum: int, expected: tuple[int, None]
) -> None:
    """torchrun stopped by a stop signal records its ``SignalException``: 128 + N, no cause."""
    path = tmp_path / "torchrun.json"
    os.environ[ERROR_FILE_VAR] = str(path)
    try:
        try:
            sigval = signal.Signals(signum)  # as torch's handler raises it
            raise SignalException(f"Process 123 got signal: {sigval}", sigval=sigval)
        except SignalException as err:
            ErrorHandler().record_exception(err)
    finally:
        del os.environ[ERROR_FILE_VAR]
    assert torchrun_error_status(path) == expected
    assert torchrun_status(1, tmp_path / "x.log", REPORT_65, path) == expected


def test_an_unreadable_or_foreign_file_is_no_answer(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text("{not json")
    assert torchrun_error_status(path) is None
    path.write_text('{"message": "RendezvousTimeoutError: no peers"}')  # a plain message
    assert read_error_file(path) == {"message": "RendezvousTimeoutError: no peers"}
    assert torchrun_error_status(path) == (1, None)  # torchrun's own failure


def test_recorded_writes_a_nonzero_exit_and_nothing_for_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.json"
    monkeypatch.setenv(ERROR_FILE_VAR, str(path))
    assert recorded(lambda: 0)() == 0
    assert not path.exists()
    assert recorded(lambda: 2)() == 2
    assert json.loads(path.read_text())["message"]["errorCode"] == 2

    def shut_down() -> int:
        raise SystemExit(75)  # the backend's shutdown ends a worker this way

    with pytest.raises(SystemExit):
        recorded(shut_down)()
    assert read_error_file(path)["errorCode"] == 75  # type: ignore[index]

    def crash() -> int:
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        recorded(crash)()
    message = read_error_file(path)
    assert message is not None and message["errorCode"] == 1
    assert message["message"] == "ZeroDivisionError: boom"
    assert "crash" in message["extraInfo"]["py_callstack"]  # the traceback


def test_the_launch_folders_names(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    launch = tmp_path / "launch"
    assert run.attempt_log(3, 4) == launch / "attempt-03-4w.log"
    assert run.attempt_log(3, 4, node=1) == launch / "attempt-03-4w-node1.log"
    assert RunDir.error_file(run.attempt_log(3, 4)) == launch / "attempt-03-4w.error.json"
    assert run.agent_log(2, 5) == launch / "attempt-02-agent-5.log"
    assert RunDir.error_file(run.agent_log(2, 5)) == launch / "attempt-02-agent-5.error.json"
    assert run.agent_logs(2) == str(launch / "attempt-02-agent-*.log")
    assert RunDir.resize_set_aside(7) == "attempt-07.resize.json"
    assert RunDir.resize_set_aside(7, need=8) == "attempt-07-ask-8.resize.json"
    assert RunDir.resize_set_aside(now=1700000000.9) == "stale-1700000000.resize.json"
    assert run.span_script(2) == launch / "span-02.sbatch"
    assert run.span_output(2) == launch / "span-02-%j.out"
    assert (run.discovery_script, run.horovod_slots) == (
        launch / "discover_hosts",
        launch / "horovod_slots",
    )


_WORKER = """
import os, sys, time
from distgrow.launch.error_file import recorded

def main():
    if os.environ["RANK"] == "1":
        return 65
    time.sleep(60)  # stopped by torchrun once rank 1 failed
    return 0

sys.exit(recorded(main)())
"""


@pytest.mark.integration
def test_real_torchrun_passes_a_workers_status_through_its_error_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_launcher_env(monkeypatch)
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    error_file = tmp_path / "launch" / "attempt-01-2w.error.json"
    error_file.parent.mkdir()
    env = {**os.environ, ERROR_FILE_VAR: str(error_file), "GLOO_SOCKET_IFNAME": "lo"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    argv += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr[-2000:]
    message = read_error_file(error_file)
    assert message is not None and message["errorCode"] == 65, done.stderr[-2000:]
    # Read from the file alone: the log passed is empty.
    assert torchrun_status(1, tmp_path / "none.log", "", error_file) == (65, 65)


def test_the_controller_gives_torchrun_an_error_file_and_reads_the_status_there(
    tmp_path: Path,
) -> None:
    """The log says nothing; torchrun's error file says 65: the run stops at once with 65.
    A file left by an earlier run (75, which would relaunch) is removed before the launch."""
    run_dir = tmp_path / "run"
    tree = {**GROWING, "run": {**GROWING["run"], "output_dir": str(run_dir)}}
    tree["launch"] = {**tree.get("launch", {}), "preload": False}  # torchrun itself, not spawn
    config = write_config(tmp_path / "grow.yaml", tree)
    error_file = run_dir / "launch" / "attempt-01-1w.error.json"
    error_file.parent.mkdir(parents=True)
    write_exit(error_file, 75, "an earlier run's")
    seen: list[str | None] = []

    def torchrun(argv: list[str], env: dict[str, str], log_path: Path) -> Outcome:
        seen.append(env.get(ERROR_FILE_VAR))
        assert not error_file.exists()  # the stale one is gone
        log_path.write_text("")
        write_exit(env[ERROR_FILE_VAR], 65, "distgrow exited 65")
        return Outcome(1)

    cfg = load_config(config, [])
    lines: list[str] = []
    code = run_controller(
        str(config), [], cfg, executor=torchrun, env={}, log=lines.append, gpus_on_node=0
    )
    assert (code, seen) == (EXIT_NONFINITE, [str(error_file)])
    assert any("non-finite loss" in line for line in lines)
