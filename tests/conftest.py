"""Shared test helpers.

Training jobs (``distgrow_job_*``): start ``distgrow train`` as a real process, one rank or
several through torchrun (``python -m torch.distributed.run``) on gloo over the loopback
interface, with a free port, a timeout, and the output shown when something fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest
import torch
import yaml

# The Docker engine and image fixtures (session scope, so test_docker_image.py and
# test_two_nodes.py share one engine and one image build).
from docker_fixtures import docker_env, image  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent

# Trainings in tests log to W&B only where a test asks for it (a fake wandb, or offline in a
# temporary folder): wandb's own switch, honoured by distgrow.wandb_logger and by the jobs the
# tests start, which inherit the environment.
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for in-process training: two threads on two cores that other
    processes also use spin and run several times slower than one, and tiny models gain nothing
    from a second thread anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *options: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (a full disk or a read-only one that stops
    root too; chmod does not). The tests run as root, in CI too; a mount that fails fails."""
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.fail(f"mount -t tmpfs -o {opts} failed ({done.stderr.strip()}): run as root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def exit_spawned_rank() -> NoReturn:
    """End a spawned gloo rank that finished its work: flush, then ``os._exit(0)``.

    About 15% of multi-process gloo runs abort at interpreter exit (SIGABRT, "terminate called
    without an active exception"; shared/INFRA.md), after the work and its results are written.
    Called after ``destroy_process_group()``, and only on success: a failing rank still raises.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# What a launcher leaves in the environment: a test's job must not inherit the rank, world or
# allocation of whatever launched pytest (a SLURM step, mpirun, torchrun, horovodrun).
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "HOROVOD_", "PET_")
RENDEZVOUS_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


# The launchers that start workers on this machine without a scheduler (bootstrap installs
# Open MPI, so CI runs both).
LOCAL_LAUNCHERS = [
    "torchrun",
    pytest.param(
        "mpirun",
        marks=pytest.mark.skipif(
            shutil.which("mpirun") is None, reason="needs mpirun: apt-get install openmpi-bin"
        ),
    ),
]


def is_launcher_variable(name: str) -> bool:
    """True for a variable a launcher sets (see :data:`LAUNCHER_PREFIXES`)."""
    return name.startswith(LAUNCHER_PREFIXES) or name in RENDEZVOUS_VARIABLES


def clear_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Drop every launcher variable for this test; gloo on loopback."""
    for name in list(os.environ):
        if is_launcher_variable(name):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def assert_same_model(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], exact: bool = False
) -> None:
    """Equal state dicts: floats within rtol 1e-5 / atol 1e-6 (or bit for bit), the rest equal."""
    assert got.keys() == want.keys()
    for name in want:
        if exact or not want[name].is_floating_point():
            assert torch.equal(got[name], want[name]), name
        else:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


# A small plan with a growth event, for the multi-rank tests. 1033 training samples (1291 - 258
# held out): epoch 1 at batch 32 is 33 updates whose last holds 9 samples (on 2 ranks × 8 × 2
# micro-steps: 3, 3, 3 and an empty one), then batch 64 (2 × 8 × 4) for epochs 2-3, 17 updates
# each. Dropout makes the per-micro-batch RNG matter; momentum makes the optimizer state matter
# at a resume.
SYN_PLAN: dict[str, Any] = {
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
}
SYN_UPDATES = 33 + 17 + 17


def distgrow_job_env() -> dict[str, str]:
    """The environment of a CPU job on one machine (INFRA.md: loopback gloo, no shared store)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE"))}
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        MASTER_ADDR="127.0.0.1",
        GLOO_SOCKET_IFNAME="lo",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def distgrow_job_argv(nproc: int, args: Sequence[str]) -> list[str]:
    """``distgrow train ARGS`` in one process, or as ``nproc`` torchrun ranks."""
    if nproc == 1:
        return [sys.executable, "-m", "distgrow", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "distgrow",
        "train",
        *args,
    ]


def distgrow_job_start(
    nproc: int, args: Sequence[str], output: IO[str] | None = None
) -> subprocess.Popen[str]:
    """Start a job without waiting (its own session, so that it can be killed as a whole).

    Args:
        nproc: 1 for a plain process, more for torchrun ranks.
        args: ``CONFIG key=value ...`` (and ``--resume``).
        output: A file for stdout and stderr; None pipes them (read with ``communicate``).
    """
    return subprocess.Popen(
        distgrow_job_argv(nproc, args),
        cwd=REPO_ROOT,
        env=distgrow_job_env(),
        stdout=subprocess.PIPE if output is None else output,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def distgrow_job_run(
    nproc: int, args: Sequence[str], *, expect: int | None = 0, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run a job to its end; fail the test (showing the output) on a timeout or wrong status.

    Args:
        nproc: 1 for a plain process, more for torchrun ranks.
        args: ``CONFIG key=value ...`` (and ``--resume``).
        expect: The exit status required (None: any).
        timeout: Seconds before the whole job is killed.
    """
    proc = distgrow_job_start(nproc, args)
    out = communicate_or_fail(proc, timeout, f"job {' '.join(args)}", expect=expect)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def communicate_or_fail(
    proc: subprocess.Popen[str], timeout: float, what: str, *, expect: int | None = None
) -> str:
    """The output of ``proc`` (started with its own session) once it ends.

    On a timeout its whole process tree is killed and the test fails with the output; with
    ``expect`` it also fails, showing the output, when the exit status differs. Whatever the
    outcome, no process of the tree outlives this call.
    """
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout} s:\n{out}")
    finally:
        kill_process_tree(proc.pid)
    if expect is not None and proc.returncode != expect:
        pytest.fail(f"{what} exited {proc.returncode}, expected {expect}:\n{out}")
    return out


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 (after the parenthesised command, which may hold spaces) is the parent pid.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def kill_process_tree(pid: int) -> list[int]:
    """SIGKILL ``pid`` and all its descendants (torchrun puts workers in their own sessions).

    Returns:
        The pids signalled, descendants first.
    """
    tree: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(_children(current))
    victims = list(reversed(tree))  # workers before their launcher
    for victim in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    return victims


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, ...), parents first."""
    found, frontier = [], [pid]
    while frontier:
        children = _children(frontier.pop())
        found.extend(children)
        frontier.extend(children)
    return found


def rank_pids(pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers below ``pid``, from the rank variable their launcher set."""
    ranks = {}
    for child in descendants(pid):
        try:
            raw = Path(f"/proc/{child}/environ").read_bytes()
            command = Path(f"/proc/{child}/cmdline").read_bytes()
            name = Path(f"/proc/{child}/comm").read_bytes()
        except OSError:  # it ended meanwhile
            continue
        env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        rank = env.get(b"RANK") or env.get(b"OMPI_COMM_WORLD_RANK")
        # A worker forked by launch.preload's server keeps the server's environment and
        # command line in /proc; its name says its rank.
        forked = re.fullmatch(rb"distgrow rank (\d+)\n?", name)
        rank = forked.group(1) if forked else rank
        if rank is not None and b"distgrow\0train" in command:
            ranks[int(rank)] = child
    return ranks


def write_config(path: Path, tree: dict[str, Any]) -> Path:
    """Write a config tree as YAML and return its path."""
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def config_writer(tmp_path: Path) -> Callable[[dict[str, Any], str], Path]:
    """``write(tree, name)`` puts a YAML config in the test's temporary directory."""

    def write(tree: dict[str, Any], name: str = "config.yaml") -> Path:
        return write_config(tmp_path / name, tree)

    return write


# --------------------------------------------------------------------------------------------
# A real one-node SLURM cluster (slurm/local_cluster.sh), shared by the tests that need one
# --------------------------------------------------------------------------------------------

SLURM_SCRIPT = REPO_ROOT / "slurm" / "local_cluster.sh"
SLURM_UNAVAILABLE = 3  # local_cluster.sh: SLURM missing and not installable here


def _port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A running cluster for the whole session; yields the environment that reaches it
    (``SLURM_CONF``). Skips, naming the Debian packages, only where SLURM cannot be installed
    (not root, or no apt-get); in CI the script installs it."""
    if shutil.which("bash") is None:
        pytest.skip("needs bash to run slurm/local_cluster.sh")
    directory = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "DISTGROW_SLURM_DIR": str(directory),
        "DISTGROW_SLURM_PORT": str(_port_pair()),
        "DISTGROW_SLURM_CPUS": "4",  # 4 tasks on a 2-core machine (config_overrides)
    }
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SLURM_SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600
    )
    try:
        if proc.returncode == SLURM_UNAVAILABLE:
            pytest.skip(
                "SLURM is not installed and cannot be installed here (needs root and apt-get): "
                f"install the Debian packages slurm-wlm and munge. {proc.stderr.strip()}"
            )
        assert proc.returncode == 0, f"local_cluster.sh start failed:\n{proc.stderr}"
        print(f"local SLURM up in {time.monotonic() - started:.1f} s")  # shown with -s
        yield {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}
    finally:
        subprocess.run(
            ["bash", str(SLURM_SCRIPT), "stop"], env=env, capture_output=True, timeout=120
        )
