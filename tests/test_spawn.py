"""distgrow's one-machine launcher (``launch.preload``) and the standby the executor keeps.

The builder tests are pure. The others fork real workers: a small script stands in for
``distgrow train`` and writes what it saw (its environment, its parent) to a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from distgrow.launch import executor
from distgrow.launch.builders import LaunchSpec, build_command
from distgrow.launch.spawn import worker_env

REPO = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, os, sys, time
out = sys.argv[1]
mode = sys.argv[2]
rank = int(os.environ["RANK"])
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK", "OMP_NUM_THREADS"]
seen = {k: os.environ.get(k) for k in keys}
with open(f"/proc/{os.getppid()}/stat") as f:
    grandparent = int(f.read().rsplit(")", 1)[1].split()[1])
seen.update(ppid=os.getppid(), gppid=grandparent, sid=os.getsid(0), pid=os.getpid(),
            argv=sys.argv[1:],
            torch_loaded="torch" in sys.modules and "torch._dynamo" in sys.modules)
with open(f"{out}/rank-{rank}.json", "w") as f:
    json.dump(seen, f)
if mode == "exit":
    sys.exit(int(sys.argv[3]))
if mode == "rank1-fails" and rank == 1:
    while not os.path.exists(f"{out}/started-0"):  # fail once rank 0 handles SIGTERM
        time.sleep(0.05)
    sys.exit(3)
if mode in ("rank1-fails", "sleep"):
    import signal
    def stop(signum, _frame):
        open(f"{out}/signal-{rank}", "a").write(signal.Signals(signum).name + "\n")
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGUSR1, stop)
    open(f"{out}/started-{rank}", "w").close()
    time.sleep(60)
"""


def spec(**fields: object) -> LaunchSpec:
    return LaunchSpec(**{"workers": 2, "config": "c.yaml", **fields})  # type: ignore[arg-type]


def test_preload_on_one_node_builds_the_spawn_launcher_with_the_worker_command() -> None:
    argv, env = build_command("torchrun", spec(preload=True, resume=True, master_port=1234))
    assert argv == [
        sys.executable,
        "-m",
        "distgrow.launch.spawn",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        "--master_port=1234",
        "--",
        "-m",
        "distgrow",
        "train",
        "c.yaml",
        "run.resume=true",
    ]
    assert env == {}


@pytest.mark.parametrize(
    "fields",
    [
        {"nodes": 2, "workers": 4},  # several nodes: torchrun's rendezvous
        {"elastic": True, "min_workers": 1, "max_workers": 4},
        {"max_restarts": 1},  # torchrun restarts in place
        {"preload": False},
    ],
)
def test_torchrun_is_kept_where_the_spawn_launcher_cannot_stand_in(fields: dict) -> None:
    argv, _ = build_command("torchrun", spec(**{"preload": True, **fields}))
    assert argv[1:3] == ["-m", "torch.distributed.run"]


def test_worker_env_is_what_static_torchrun_sets_on_one_node() -> None:
    env = worker_env(
        {"PATH": "/bin"}, local_rank=1, nproc=3, master_addr="10.0.0.1", master_port=4242
    )
    assert env["PATH"] == "/bin"
    assert (env["RANK"], env["LOCAL_RANK"], env["GROUP_RANK"]) == ("1", "1", "0")
    assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["ROLE_WORLD_SIZE"]) == ("3", "3", "3")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "4242")
    assert env["OMP_NUM_THREADS"] == "1"  # torchrun's default for several workers
    assert env["TORCHELASTIC_RESTART_COUNT"] == "0"
    single = worker_env({}, local_rank=0, nproc=1, master_addr="a", master_port=1)
    assert "OMP_NUM_THREADS" not in single
    kept = worker_env(
        {"OMP_NUM_THREADS": "4"}, local_rank=0, nproc=2, master_addr="a", master_port=1
    )
    assert kept["OMP_NUM_THREADS"] == "4"


def _spawn_argv(tmp_path: Path, nproc: int, *worker_args: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return [
        sys.executable,
        "-m",
        "distgrow.launch.spawn",
        f"--nproc_per_node={nproc}",
        "--master_port=4321",
        "--",
        str(script),
        str(tmp_path),
        *worker_args,
    ]


def _seen(tmp_path: Path, rank: int) -> dict:
    return json.loads((tmp_path / f"rank-{rank}.json").read_text())


@pytest.fixture
def repo_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    executor.stop_spawn_server()


@pytest.mark.integration
def test_spawn_forks_preloaded_workers_in_their_own_sessions(
    tmp_path: Path, repo_env: None
) -> None:
    log = tmp_path / "launch.log"
    outcome = executor.run_subprocess(_spawn_argv(tmp_path, 2, "exit", "75"), {}, log)
    assert outcome.returncode == 75  # the workers' own status, not a launcher's 1
    ranks = [_seen(tmp_path, r) for r in (0, 1)]
    assert [(s["RANK"], s["WORLD_SIZE"], s["MASTER_PORT"]) for s in ranks] == [
        ("0", "2", "4321"),
        ("1", "2", "4321"),
    ]
    assert ranks[0]["ppid"] == ranks[1]["ppid"]  # forked by one launcher
    assert all(s["sid"] == s["pid"] for s in ranks)  # each in its own session, as torchrun's
    assert all(s["torch_loaded"] for s in ranks)  # imported before the fork
    server = executor._server
    assert server is not None and server.alive()
    assert ranks[0]["gppid"] == server.proc.pid  # the launcher was forked by the server


@pytest.mark.integration
def test_every_launch_of_a_controller_forks_from_one_server(tmp_path: Path, repo_env: None) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    executor.run_subprocess(_spawn_argv(first, 1, "exit", "75"), {}, first / "log")
    server = executor._server
    assert server is not None
    outcome = executor.run_subprocess(_spawn_argv(second, 2, "exit", "0"), {}, second / "log")
    assert outcome.returncode == 0
    assert executor._server is server and server.alive()
    assert _seen(second, 0)["gppid"] == _seen(second, 1)["gppid"] == server.proc.pid
    assert _seen(first, 0)["ppid"] != _seen(second, 0)["ppid"]  # a launcher per launch
    executor.stop_spawn_server()
    assert executor._server is None and server.proc.poll() == 0


@pytest.mark.integration
def test_a_launch_with_another_environment_gets_a_server_of_its_own(
    tmp_path: Path, repo_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor.run_subprocess(_spawn_argv(tmp_path, 1, "exit", "0"), {}, tmp_path / "l")
    server = executor._server
    assert server is not None
    monkeypatch.setenv("DISTGROW_TEST_CHANGED", "1")
    executor.run_subprocess(_spawn_argv(tmp_path, 1, "exit", "0"), {}, tmp_path / "l2")
    assert _seen(tmp_path, 0)["gppid"] != server.proc.pid
    assert server.proc.poll() is not None  # stopped, not left behind


@pytest.mark.integration
def test_one_failed_worker_stops_the_others_and_its_status_is_the_launchers(
    tmp_path: Path, repo_env: None
) -> None:
    outcome = executor.run_subprocess(_spawn_argv(tmp_path, 2, "rank1-fails"), {}, tmp_path / "log")
    assert outcome.returncode == 3
    assert (tmp_path / "signal-0").read_text() == "SIGTERM\n"
    assert (
        "distgrow spawn: rank 1 exited 3; stopping the other 1 worker(s)"
        in (tmp_path / "log").read_text()
    )


@pytest.mark.integration
def test_a_signal_to_the_launcher_reaches_every_worker_once(tmp_path: Path, repo_env: None) -> None:
    proc = subprocess.Popen(_spawn_argv(tmp_path, 2, "sleep"), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"started-{r}").exists() for r in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGUSR1)  # the launcher's group only: it forwards
        assert proc.wait(timeout=60) == 128 + signal.SIGUSR1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [(tmp_path / f"signal-{r}").read_text() for r in (0, 1)] == ["SIGUSR1\n"] * 2


@pytest.mark.integration
def test_a_dead_server_stops_its_launcher_and_the_workers(tmp_path: Path, repo_env: None) -> None:
    def kill_the_server_once_the_workers_run() -> None:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"started-{r}").exists() for r in (0, 1)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)
        server = executor._server
        assert server is not None
        os.kill(server.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_server_once_the_workers_run, daemon=True)
    killer.start()
    outcome = executor.run_subprocess(_spawn_argv(tmp_path, 2, "sleep"), {}, tmp_path / "log")
    killer.join(timeout=10)
    assert outcome.returncode == 128 + signal.SIGKILL  # the launcher's status is lost
    # The launcher was stopped as the controller stops it: every worker got SIGTERM once.
    assert [(tmp_path / f"signal-{r}").read_text() for r in (0, 1)] == ["SIGTERM\n"] * 2
