"""Running a launch: the one place that starts a process, tees its output and forwards signals.

:func:`run_subprocess` runs one launcher (the controller's relaunches, ``compare``'s training
runs); the elastic agents start several :class:`Process` es under one :func:`forwarding_signals`.
Also here: the spawn server of ``launch.preload``. What a launcher's output and exit status
hide (torchrun exits 1 whatever its workers did) is read in :mod:`distgrow.launch.launch_log`.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from distgrow.launch.builders import SPAWN_MODULE

# What a launcher's output and status hide lives in launch_log; the names stay importable here.
from distgrow.launch.launch_log import PlannedExitFilter as PlannedExitFilter
from distgrow.launch.launch_log import address_in_use as address_in_use
from distgrow.launch.launch_log import log_tail as log_tail
from distgrow.launch.launch_log import torchrun_root_cause as torchrun_root_cause
from distgrow.launch.launch_log import torchrun_status as torchrun_status
from distgrow.launch.launch_log import torchrun_stop_signal_status as torchrun_stop_signal_status
from distgrow.launch.launch_log import worker_error as worker_error
from distgrow.signals import exit_status

# What the controller exits with when a signal stopped the run: the shell's 128 + signal number,
# so `sbatch`, CI and shells read it as "stopped by SIGTERM/SIGINT". SIGUSR1 is SLURM's
# pre-emption warning (`--signal=B:USR1@120`): 138 tells the batch script to requeue the job.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

STOP_GRACE_S = 30.0
"""How long a child left running by an error in the parent may take to stop before SIGKILL."""


@dataclass(frozen=True)
class Outcome:
    """How one launch ended.

    Attributes:
        returncode: The launcher's exit status (128 + N when signal N killed it).
        signal: A signal the controller received and forwarded while it ran, if any.
        tail: The last :data:`TAIL_BYTES` of its output, kept in memory (None: read the log),
            so that its exit can be read even where the log could not be written.
        log_error: Why the log could not be written (a full or read-only disk), if it could
            not: the output from then on went only to the terminal.
    """

    returncode: int
    signal: int | None = None
    # What it printed, not how it ended: left out of ==.
    tail: str | None = field(default=None, compare=False)
    log_error: OSError | None = field(default=None, compare=False)


TAIL_BYTES = 65536
"""How much of a launch's output the controller keeps in memory to read its exit from."""

Executor = Callable[[list[str], dict[str, str], Path], Outcome]
"""Runs ``argv`` with ``os.environ`` plus the env additions, writing its output to the log
path; returns the :class:`Outcome`. Tests pass a fake one to check the controller's decisions."""


class Process:
    """A child in its own session (process group) whose output goes to a log and the terminal.

    Args:
        argv: The command.
        env: Its whole environment.
        log_path: Appended with everything the child prints (stdout and stderr). Once a
            write fails (a full disk) the log is closed and :attr:`log_error` says why; the
            output still reaches the terminal and :meth:`tail`.
        echo: Receives each line of output (without its newline) instead of the terminal.

    Raises:
        OSError: the log's directory or the log cannot be created (nothing was started).
    """

    def __init__(
        self,
        argv: list[str],
        env: Mapping[str, str],
        log_path: Path,
        echo: Callable[[str], None] | None = None,
        *,
        adopt: subprocess.Popen[bytes] | ForkedLauncher | None = None,
    ) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.log_error: OSError | None = None
        self._tail = bytearray()
        self._log: typing.BinaryIO | None = open(log_path, "ab")  # noqa: SIM115 - see close()
        try:
            # adopt: a launcher already started (forked by the spawn server).
            self.proc: subprocess.Popen[bytes] | ForkedLauncher = adopt or subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except BaseException:
            self._close_log()
            raise
        self._reader = threading.Thread(target=self._tee, args=(echo,), daemon=True)
        self._reader.start()

    def poll(self) -> int | None:
        """The exit status once the child ended (negative: killed by that signal), else None."""
        return self.proc.poll()

    def send(self, signum: int) -> None:
        """Send ``signum`` to the child's whole process group, if it still runs."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # already gone: nothing to stop
                os.killpg(self.proc.pid, signum)

    def close(self) -> None:
        """Stop a child left running (an error in the parent), then close the log."""
        if self.proc.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.proc.wait()
        # A worker that outlives its launcher keeps the pipe open: do not wait on it forever.
        self._reader.join(timeout=10)
        self._close_log()

    def tail(self) -> str:
        """The last :data:`TAIL_BYTES` of the child's output (also what the log lost)."""
        return bytes(self._tail).decode(errors="replace")

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is None:
            return
        try:
            log.close()  # its last flush can meet the full disk too
        except OSError as err:
            self.log_error = self.log_error or err

    def _write_log(self, chunk: bytes) -> None:
        """Append to the log; on the first failure keep the error and stop writing it."""
        self._tail += chunk
        del self._tail[:-TAIL_BYTES]
        log = self._log
        if log is None:
            return
        try:
            log.write(chunk)
            log.flush()
        except OSError as err:
            self.log_error = err
            self._log = None
            with contextlib.suppress(OSError):
                log.close()

    def _tee(self, echo: Callable[[str], None] | None) -> None:
        stream = typing.cast(io.BufferedReader, self.proc.stdout)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        shown = PlannedExitFilter()
        pending = ""
        # read1 returns what is there now, so progress lines show up as they are printed.
        while chunk := stream.read1(65536):
            self._write_log(chunk)  # the log keeps everything, as the child wrote it
            text = shown.feed(decoder.decode(chunk))
            if echo is None:
                _show(text)
                continue
            *lines, pending = (pending + text).split("\n")
            for line in lines:
                echo(line.rstrip("\r"))
        rest = shown.feed(decoder.decode(b"", final=True)) + shown.close()
        if echo is None:
            _show(rest)
        else:
            for line in (pending + rest).split("\n"):
                if line:
                    echo(line.rstrip("\r"))


def _show(text: str) -> None:
    """Write ``text`` to the terminal now."""
    if not text:
        return
    if hasattr(sys.stdout, "buffer"):
        sys.stdout.buffer.write(text.encode(errors="replace"))
        sys.stdout.buffer.flush()
    else:  # a replaced sys.stdout (pytest's capture, a notebook) takes text
        sys.stdout.write(text)


@contextlib.contextmanager
def forwarding_signals(send: Callable[[int], None]) -> Iterator[list[int]]:
    """Forward SIGTERM, SIGINT and SIGUSR1 through ``send`` while the block runs.

    The children run in their own sessions, so a Ctrl-C in the terminal reaches only this
    process, which forwards it once: the workers then checkpoint and exit. SIGINT is forwarded
    as SIGTERM, which every launcher relays to its workers (srun answers a lone SIGINT with a
    status report). SIGTERM and SIGUSR1 (SLURM's time-limit and pre-emption warnings) are
    forwarded as they are; a second Ctrl-C sends SIGKILL.

    Yields:
        The signals received so far (in order), filled while the block runs. Outside the main
        thread no handler can be installed and the list stays empty.
    """
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        to_send: int = signal.SIGTERM if signum == signal.SIGINT else signum
        if received.count(signal.SIGINT) > 1:
            to_send = int(signal.SIGKILL)  # Ctrl-C twice: the user wants out now
        send(to_send)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_subprocess(
    argv: list[str],
    env_additions: dict[str, str],
    log_path: Path,
    *,
    echo: Callable[[str], None] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> Outcome:
    """The real executor: run ``argv`` to its end, tee its output, forward stop signals.

    Args:
        argv: The command.
        env_additions: Set on top of ``base_env``.
        log_path: Appended with the command's output.
        echo: Receives each output line instead of the terminal (e.g. with a prefix).
        base_env: The environment to start from (``os.environ`` by default).

    Returns:
        The :class:`Outcome`; a child killed by signal N reports ``128 + N``, as a shell does.

    Raises:
        OSError: the log cannot be created (nothing was started).
    """
    env = {**(base_env or os.environ), **env_additions}
    # A log that cannot be created (a read-only run directory) stops the launch before a
    # launcher is forked that nothing would read or stop.
    log_path.parent.mkdir(parents=True, exist_ok=True)
    open(log_path, "ab").close()
    forked = None
    if is_spawn(argv):
        # launch.preload: forked by the server that imported torch once for this controller.
        try:
            forked = spawn_server(argv, env).launch(argv, env)
        except OSError:
            # The server failed to start or died: run the launcher itself (its log says why).
            stop_spawn_server()
    process = Process(argv, env, log_path, echo, adopt=forked)
    try:
        with forwarding_signals(process.send) as received:
            code = process.proc.wait()
    finally:
        process.close()
    if code < 0:
        code = exit_status(-code)
    forwarded = received[0] if received else None
    return Outcome(code, forwarded, process.tail(), process.log_error)


# --------------------------------------------------------------------------------------------
# The spawn server of launch.preload
# --------------------------------------------------------------------------------------------


def send_message(sock: socket.socket, payload: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """One message: its length (4 bytes, with ``fds`` attached), then its JSON."""
    data = json.dumps(payload).encode()
    head = struct.pack("!I", len(data))
    if fds:
        socket.send_fds(sock, [head], list(fds))
    else:
        sock.sendall(head)
    sock.sendall(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None at end of input."""
    head, fds, _flags, _addr = socket.recv_fds(sock, 4, 4)
    if not head:
        return None
    while len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            return None
        head += more
    (size,) = struct.unpack("!I", head)
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            return None
        data += more
    return json.loads(data), fds


class ForkedLauncher:
    """A launcher forked by the spawn server: what :class:`Process` uses of a ``Popen``
    (``pid``, ``stdout``, ``poll``, ``wait``), its status reported by the server."""

    def __init__(self, server: SpawnServer, pid: int, stdout: io.BufferedReader) -> None:
        self._server = server
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self._server.collect(self, block=False)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._server.collect(self, block=True, timeout=timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"launcher {self.pid}", timeout or 0.0)
        return self.returncode


class SpawnServer:
    """``python -m distgrow.launch.spawn --serve FD``: one process per controller that imports
    torch once and forks each ``launch.preload`` launch (see :mod:`distgrow.launch.spawn`).

    Args:
        python: Its interpreter (the workers').
        env: Its environment; a launch with another environment gets a server of its own.
        worker: The worker command (``-m distgrow train ...``), shown in its command line.
    """

    def __init__(self, python: str, env: Mapping[str, str], worker: Sequence[str] = ()) -> None:
        self.python = python
        self.env = dict(env)
        self._sock, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                # The worker command only shows in `ps` (for the server, the launchers and
                # the workers it forks: they keep its command line).
                [python, "-m", SPAWN_MODULE, "--serve", str(theirs.fileno()), *worker],
                env=self.env,
                stdin=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()],
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._statuses: dict[int, int] = {}
        self._closed = False  # the server closed its end (it ended)

    def launch(self, argv: list[str], env: Mapping[str, str]) -> ForkedLauncher:
        """Fork the launcher of ``argv`` (``python -m distgrow.launch.spawn ...``) in ``env``.

        Raises:
            OSError: the server is gone.
        """
        read_end, write_end = os.pipe()
        try:
            send_message(self._sock, {"args": argv[3:], "env": dict(env)}, [write_end])
        finally:
            os.close(write_end)
        stdout = os.fdopen(read_end, "rb")
        while True:  # the answer; statuses of earlier launchers may come first
            message = self._receive(timeout=None)
            if message is None:
                stdout.close()
                raise OSError("the spawn server ended")
            if "status" not in message:
                return ForkedLauncher(self, int(message["pid"]), stdout)

    def collect(self, launcher: ForkedLauncher, block: bool, timeout: float | None = None) -> None:
        """Read the server's reports until ``launcher``'s status is known (or, not blocking,
        until none is waiting; blocking, until ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while launcher.pid not in self._statuses:
            left = 0.0 if not block else None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0 and block:
                return
            message = self._receive(timeout=left)
            if message is None and self._closed:
                # The server died (killed, out of memory): the launcher's status is lost. The
                # launcher got SIGTERM (its parent-death signal) and stops its workers, which
                # checkpoint; wait for that, end what is left, and report a kill.
                _wait_gone(launcher.pid, STOP_GRACE_S + 5)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)
                self._statuses[launcher.pid] = -int(signal.SIGKILL)
                break
            if message is None:
                return
        wait_status = self._statuses.pop(launcher.pid)
        if wait_status < 0:
            launcher.returncode = wait_status
        elif os.WIFSIGNALED(wait_status):
            launcher.returncode = -os.WTERMSIG(wait_status)
        else:
            launcher.returncode = os.WEXITSTATUS(wait_status)

    def _receive(self, timeout: float | None) -> dict[str, Any] | None:
        """The next report (a status is filed away and returned too); None on timeout or EOF."""
        if self._closed:
            return None
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return None
        message = recv_message(self._sock)
        if message is None:
            self._closed = True
            return None
        report, _ = message
        if "status" in report:
            self._statuses[int(report["pid"])] = int(report["status"])
        return report

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def stop(self) -> None:
        """End the server (end of input; SIGTERM if it does not go)."""
        with contextlib.suppress(OSError):
            self._sock.close()
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait()


def _wait_gone(pid: int, timeout: float) -> None:
    """Wait up to ``timeout`` seconds for process ``pid`` (not a child of ours) to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return  # ended; its new parent has not reaped it yet
        except OSError:
            return
        time.sleep(0.05)


_server: SpawnServer | None = None


def is_spawn(argv: list[str]) -> bool:
    """True for a launch by :mod:`distgrow.launch.spawn` (``launch.preload``)."""
    return argv[1:3] == ["-m", SPAWN_MODULE]


def spawn_server(argv: list[str], env: Mapping[str, str]) -> SpawnServer:
    """The spawn server for the launch ``argv`` in ``env``: the running one if it has the same
    interpreter and environment, else a new one (which imports torch before its first launch)."""
    global _server
    python = argv[0]
    if _server is not None and not (
        _server.python == python and _server.env == dict(env) and _server.alive()
    ):
        stop_spawn_server()
    if _server is None:
        worker = argv[argv.index("--") + 1 :] if "--" in argv else []
        _server = SpawnServer(python, env, worker)
    return _server


def stop_spawn_server() -> None:
    """Stop the spawn server, if any (no further launch will come)."""
    global _server
    found, _server = _server, None
    if found is not None:
        found.stop()


atexit.register(stop_spawn_server)
