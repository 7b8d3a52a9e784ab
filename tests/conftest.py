"""Shared test helpers.

Training jobs (``distgrow_job_*``): start ``distgrow train`` as a real process, one rank or
several through torchrun (``python -m torch.distributed.run``) on gloo over the loopback
interface, with a free port, a timeout, and the output shown when something fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_tree(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"job timed out after {timeout} s: {' '.join(args)}\n{out}")
    if expect is not None and proc.returncode != expect:
        pytest.fail(f"job exited {proc.returncode}, expected {expect}: {' '.join(args)}\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


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
