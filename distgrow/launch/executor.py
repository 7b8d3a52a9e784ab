"""Running a launch: the one place that starts a process, tees its output and forwards signals.

:func:`run_subprocess` runs one launcher (the controller's relaunches, ``compare``'s training
runs); the elastic agents start several :class:`Process` es under one :func:`forwarding_signals`.
Also here: reading what a launcher's exit status hides (torchrun exits 1 whatever its workers
did; its log keeps the root cause).
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import io
import json
import os
import re
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
from typing import Any, Literal

from distgrow.exits import EXIT_FAILURE, EXIT_NEED_WORKERS, EXIT_USAGE
from distgrow.launch.builders import SPAWN_MODULE
from distgrow.launch.error_file import torchrun_error_status
from distgrow.signals import exit_status, signal_from_status

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


_TRACEBACK = "Traceback (most recent call last):"
_CHILD_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
_AGENT_FAILED_QUIET = re.compile(
    rf"\] failed \(exitcode: (?:{EXIT_NEED_WORKERS}|{EXIT_USAGE})\) local_rank"
)
_QUIET_CAUSES = {
    EXIT_NEED_WORKERS: f"the workers exited {EXIT_NEED_WORKERS} to grow the job",
    # The worker printed its one line (a config, data or disk problem) just above.
    EXIT_USAGE: f"the workers exited {EXIT_USAGE} (their error is above)",
}
_REPORT_MAX_LINES = 500  # more than any report torchrun writes: past it, show what was held


def _may_be_hidden(start: str) -> bool:
    """True when a line that starts with ``start`` may be one the filter hides: a traceback's
    first line, or an error line of torchrun's agent (``E1129 00:51:35 ...``)."""
    return _TRACEBACK.startswith(start) or re.match(r"E\d*(?: |$)", start) is not None


class PlannedExitFilter:
    """What the terminal shows of a launcher's output: all of it, except torchrun's failure
    report when the workers exited 75 on purpose (the plan needs more of them), or 2 after
    printing their own one-line error (a config, data or disk problem).

    torchrun treats any non-zero worker status as a failure: its agent logs "failed (exitcode:
    75)" and it ends with a ``ChildFailedError`` traceback and a "FAILED" table. For a planned
    growth that is noise in the terminal; the log file keeps it (the controller reads the root
    cause there). A traceback is held until its exception line: any other one is shown as it
    was (a worker's crash stays visible), torchrun's report until its closing rule, then
    replaced by one line when its root cause is 75 and shown whole otherwise; the agent's
    "failed (exitcode: 75)" line is dropped. Partial lines (a progress bar redrawn with
    ``\\r``) pass at once, unless they may start a line that is hidden.
    """

    def __init__(self) -> None:
        self._held: list[str] = []
        self._state: Literal["pass", "traceback", "report"] = "pass"
        self._rules = 0
        self._partial = ""  # the start of a line that may become a traceback's first
        self._mid_line = False  # the start of the current line was already shown

    def feed(self, text: str) -> str:
        """The part of ``text`` (the child's next output) to show now."""
        *lines, last = (self._partial + text).split("\n")
        self._partial = ""
        out = []
        for line in lines:
            if self._mid_line:  # the rest of a line already shown in part
                self._mid_line = False
                out.append(line + "\n")
            else:
                out.append(self._line(line))
        if last:
            if self._state == "pass" and (self._mid_line or not _may_be_hidden(last)):
                out.append(last)
                self._mid_line = True
            else:
                self._partial = last
        return "".join(out)

    def close(self) -> str:
        """What is still held, at the end of the output."""
        held, self._partial = self._release() + self._partial, ""
        return held

    def _line(self, line: str) -> str:
        if self._state == "pass":
            if line == _TRACEBACK:
                self._state, self._held = "traceback", [line]
                return ""
            return "" if _AGENT_FAILED_QUIET.search(line) else line + "\n"
        self._held.append(line)
        if self._state == "traceback":
            if line[:1] in (" ", "\t"):  # a frame of the traceback
                return ""
            if line.startswith(_CHILD_FAILED):
                self._state, self._rules = "report", 0
                return ""
            return self._release()
        if line and set(line.strip()) == {"="}:
            self._rules += 1
        if self._rules >= 2:  # the report's closing rule
            cause = torchrun_root_cause("\n".join(self._held))
            if cause in _QUIET_CAUSES:
                self._held, self._state = [], "pass"
                return (
                    f"torchrun: {_QUIET_CAUSES[cause]} (torchrun's failure report is in the log)\n"
                )
            return self._release()
        return self._release() if len(self._held) > _REPORT_MAX_LINES else ""

    def _release(self) -> str:
        held = "".join(line + "\n" for line in self._held)
        self._held, self._state = [], "pass"
        return held


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


# --------------------------------------------------------------------------------------------
# What a launcher's status hides
# --------------------------------------------------------------------------------------------

_TORCHRUN_FAILURE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_TORCHRUN_SIGNALLED = re.compile(r"SignalException: Process \d+ got signal: (\d+)")


def log_tail(path: Path, size: int = 65536) -> str:
    """The last ``size`` bytes of a launch log ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


_WORKER_ERROR = re.compile(r"^distgrow(?:\[rank \d+\])?: error: (.+)$", re.MULTILINE)


def worker_error(log_text: str) -> str | None:
    """The last error a worker reported (``distgrow: error: ...``, the line that names the
    value or file and the fix), without its prefix; None when there is none."""
    found = _WORKER_ERROR.findall(log_text)
    return found[-1].strip() if found else None


def address_in_use(log_text: str) -> bool:
    """True when the launch failed to listen on its rendezvous port (``EADDRINUSE``): torchrun's
    store, or ``torch.distributed``'s in a worker, found the port taken."""
    return "EADDRINUSE" in log_text or "ddress already in use" in log_text


def torchrun_root_cause(log_text: str) -> int | None:
    """The worker exit status in torchrun's failure report ("Root Cause ... exitcode : N").

    torchrun exits 1 whatever its workers' statuses were; its report is the only place the
    worker's own status (65, 2, a crash) survives.
    """
    _, found, after = log_text.rpartition("Root Cause")
    if not found:
        return None
    match = _TORCHRUN_FAILURE.search(after)
    return int(match.group(1)) if match else None


def torchrun_stop_signal_status(log_text: str) -> int | None:
    """``128 + N`` when torchrun itself ended on stop signal N ("SignalException ... got signal").

    torchrun forwards the signal to its workers (which checkpoint and exit) and then exits 1
    with that exception: the run was stopped, it did not crash.
    """
    found = _TORCHRUN_SIGNALLED.findall(log_text)
    if not found:
        return None
    signum = int(found[-1])
    return exit_status(signum) if signal_from_status(exit_status(signum)) else None


def torchrun_status(
    raw: int, log_path: Path, tail: str | None = None, error_file: Path | None = None
) -> tuple[int, int | None]:
    """(The workers' status, torchrun's root cause) behind torchrun's exit status ``raw``.

    torchrun exits 1 whatever its workers did. Its error file (``error_file``, the
    ``TORCHELASTIC_ERROR_FILE`` the controller gave it) holds the first failed worker's status,
    or torchrun's own exception (a stop signal: ``128 + signal``); see
    :mod:`distgrow.launch.error_file`. Only where there is no such file (a worker killed
    before it could write one, an older launch, ``error_file`` None) is the log read: its
    failure report's root cause, or torchrun's ``SignalException`` line. ``tail``: the end of
    its output as kept in memory (:attr:`Outcome.tail`), read instead of the log.
    """
    if raw != EXIT_FAILURE:
        return raw, None
    recorded = torchrun_error_status(error_file) if error_file is not None else None
    if recorded is not None:
        return recorded
    tail = log_tail(log_path) if tail is None else tail
    cause = torchrun_root_cause(tail)
    if cause is not None:
        return cause, cause
    return torchrun_stop_signal_status(tail) or raw, None
