"""A one-machine launcher that forks its workers from a process that has imported torch.

``python -m distgrow.launch.spawn --nproc_per_node=N --master_addr=A --master_port=P -- -m
distgrow train CONFIG ...`` does on one machine what static torchrun does, without paying
torch's import in every process: it imports torch, ``torch._dynamo`` (the first optimizer
imports it otherwise, about as long as torch itself) and distgrow's training modules once,
then forks the N workers, each in its own session with the environment torchrun would give it
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...). Like torchrun it forwards
SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to every worker, and when one worker fails it
stops the others (SIGTERM, then SIGKILL after 30 s). Unlike torchrun it exits with the
workers' own status: the first non-zero one, else 0 (a worker killed by signal N counts as
128 + N).

With ``--serve FD [WORKER COMMAND]`` it is the server that :mod:`distgrow.launch.executor`
keeps for a controller: it imports everything once, then forks one such launcher per launch
request on the socket ``FD`` (the same code, already imported), so a relaunch of the wider job
starts its workers at once instead of paying torch's import again (see docs/launch.md). The
forked processes keep the server's command line (the worker command is there for ``ps``);
each worker names itself ``distgrow rank N`` (``ps -o comm``, ``pgrep``).

Forking is safe here because nothing has run in the server (one thread, no torch op):
importing torch starts no thread of its own (numpy's OpenBLAS pool, the one thread there is,
re-forms itself after a fork) and initialises no CUDA; the workers set their threads and
devices after the fork, as they do under torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import runpy
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from types import FrameType

from distgrow.exits import EXIT_NEED_WORKERS
from distgrow.launch.builders import SPAWN_MODULE as MODULE
from distgrow.launch.executor import recv_message, send_message

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1)
"""What torchrun forwards to its workers (with ``PET_SIGNALS_TO_HANDLE`` as the builder sets
it), and so does this launcher."""

PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # prctl(2)

STOP_GRACE_S = 30.0
"""After one worker failed, how long the others may take to stop (torchrun's default)."""

PLANNED_EXIT_GRACE_S = 10.0
"""After one worker exited 75 (the plan needs more workers), how long the others may take to
exit by themselves (they exit 75 after the same update) before they are sent SIGTERM."""


def preload() -> None:
    """Import what every worker needs before its first update, once, before the fork."""
    import torch
    import torch._dynamo  # noqa: F401  # torch.optim imports it at the first optimizer

    import distgrow.backends.torch_ddp  # the backend torchrun's workers use
    import distgrow.cli
    import distgrow.startup  # noqa: F401
    from distgrow.config import config_from_dict

    # The config models build their validators at the first use (pydantic's defer_build):
    # build them here, not in every worker.
    config_from_dict({})


def worker_env(
    base: Mapping[str, str], *, local_rank: int, nproc: int, master_addr: str, master_port: int
) -> dict[str, str]:
    """The environment of local rank ``local_rank``: ``base`` and what static torchrun sets.

    One machine, so the global rank is the local rank and the world is ``nproc``.
    """
    env = dict(base)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = "1"  # as torchrun does: the workers set their threads anyway
    env.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        GROUP_RANK="0",
        ROLE_RANK=str(local_rank),
        ROLE_NAME="default",
        LOCAL_WORLD_SIZE=str(nproc),
        WORLD_SIZE=str(nproc),
        GROUP_WORLD_SIZE="1",
        ROLE_WORLD_SIZE=str(nproc),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        TORCHELASTIC_RESTART_COUNT="0",
        TORCHELASTIC_MAX_RESTARTS="0",
        TORCHELASTIC_RUN_ID="none",
        TORCHELASTIC_USE_AGENT_STORE="False",
        TORCH_NCCL_ASYNC_ERROR_HANDLING=env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    )
    return env


def status_of(wait_status: int) -> int:
    """A ``waitpid`` status as a shell reports it (signal N: 128 + N)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def name_process(name: str) -> None:
    """Set this process's name as ``ps -o comm``, ``top`` and ``pgrep`` show it (Linux; at
    most 15 bytes): a forked worker's command line is its launcher's, so the name says which
    rank it is."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _run_worker(command: Sequence[str], env: Mapping[str, str]) -> int:
    """In the forked child: become ``python COMMAND`` (``-m MODULE args`` or ``SCRIPT args``)."""
    os.setsid()  # its own session, as torchrun's workers: a signal to the launcher's group
    for signum in FORWARDED:  # is the launcher's to forward, once
        signal.signal(
            signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler
        )
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.clear()
    os.environ.update(env)
    name_process(f"distgrow rank {env['RANK']}")
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(command)
            runpy.run_path(command[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    return code


def _fork_workers(
    command: Sequence[str],
    children: dict[int, int],
    *,
    nproc: int,
    master_addr: str,
    master_port: int,
) -> None:
    """Fork the ``nproc`` workers of ``command``, each entered in ``children`` (pid -> local
    rank) as it starts, so that a signal forwarded meanwhile reaches those already running."""
    sys.stdout.flush()
    sys.stderr.flush()
    for local_rank in range(nproc):
        env = worker_env(
            os.environ,
            local_rank=local_rank,
            nproc=nproc,
            master_addr=master_addr,
            master_port=master_port,
        )
        # Blocked across the fork: a signal now must not reach the child's copy of `forward`.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_worker(command, env)
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        children[pid] = local_rank
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def launch(command: Sequence[str], *, nproc: int, master_addr: str, master_port: int) -> int:
    """Fork ``nproc`` workers running ``command``, forward stop signals, wait for them all.

    Returns:
        The first non-zero worker status (128 + N for a worker killed by signal N), else 0.
    """
    received: list[int] = []
    children: dict[int, int] = {}  # pid -> local rank

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        _signal_all(children, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    _fork_workers(command, children, nproc=nproc, master_addr=master_addr, master_port=master_port)
    first_failure: int | None = None
    # After a failure: when the others get SIGTERM, then SIGKILL (None: not yet, or done).
    term_at: float | None = None
    kill_at: float | None = None
    while children:
        if term_at is None and kill_at is None:
            pid, wait_status = os.waitpid(-1, 0)
        else:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                now = time.monotonic()
                if term_at is not None and now >= term_at:
                    _signal_all(children, signal.SIGTERM)
                    term_at, kill_at = None, now + STOP_GRACE_S
                elif kill_at is not None and now >= kill_at:
                    _signal_all(children, signal.SIGKILL)
                    kill_at = None
                time.sleep(0.05)
                continue
        rank = children.pop(pid)
        code = status_of(wait_status)
        if code == 0 or first_failure is not None:
            continue
        first_failure = code
        if not children or received:
            continue  # a forwarded signal is stopping them all already
        if code == EXIT_NEED_WORKERS:
            # A planned growth: every rank exits 75 after the same update; give the others
            # time to finish their own exit before stopping them.
            term_at = time.monotonic() + PLANNED_EXIT_GRACE_S
            continue
        # torchrun's rule: one failed worker ends the group (the others would wait in a
        # collective for it forever).
        print(
            f"distgrow spawn: rank {rank} exited {code}; stopping the other "
            f"{len(children)} worker(s)",
            file=sys.stderr,
            flush=True,
        )
        _signal_all(children, signal.SIGTERM)
        kill_at = time.monotonic() + STOP_GRACE_S
    return first_failure or 0


def _signal_all(children: Mapping[int, int], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The launcher's flags, then ``--`` and the worker command."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--nproc_per_node", type=int, required=True)
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command or args.nproc_per_node < 1:
        parser.error("give --nproc_per_node >= 1 and, after --, the worker command")
    return args


# --------------------------------------------------------------------------------------------
# The server: one process per controller that imports once and forks every launch
# --------------------------------------------------------------------------------------------


def serve(sock: socket.socket) -> int:
    """Import once, then fork a launcher for each request until the socket closes.

    A request is ``{"args": [...], "env": {...}}`` with one descriptor attached: where the
    launcher's output goes. The answer is ``{"pid": N}``; when that launcher ends,
    ``{"pid": N, "status": S}`` follows (``S``: the ``waitpid`` status).
    """
    preload()
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([sock], [], [], 0.05)
        while running:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            send_message(sock, {"pid": pid, "status": wait_status})
        if not readable:
            continue
        message = recv_message(sock)
        if message is None:
            return 0  # the controller is done (or gone); running launchers are on their own
        request, fds = message
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # If the server dies, its launchers are stopped as by the controller (their
                # workers checkpoint and exit): nobody would report their status any more.
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
                if os.getppid() != server:
                    os._exit(128 + signal.SIGTERM)  # it died before that was set
                sock.close()
                os.dup2(fds[0], 1)
                os.dup2(fds[0], 2)
                os.close(fds[0])
                os.setsid()  # its own session, as a launcher started by Popen
                os.environ.clear()
                os.environ.update(request["env"])
                args = parse_args(request["args"])
                code = launch(
                    args.command,
                    nproc=args.nproc_per_node,
                    master_addr=args.master_addr,
                    master_port=args.master_port,
                )
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 2
            except BaseException:
                traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        running.add(pid)
        send_message(sock, {"pid": pid})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher; ``--serve FD``: the server of :func:`serve` on socket ``FD``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve"]:
        # What follows the descriptor is the worker command, for `ps` only: every process the
        # server forks (launchers, workers) shows the server's command line.
        return serve(socket.socket(fileno=int(argv[1])))
    args = parse_args(argv)
    preload()
    return launch(
        args.command,
        nproc=args.nproc_per_node,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


if __name__ == "__main__":
    sys.exit(main())
