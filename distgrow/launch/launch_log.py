"""What a launcher's output and exit status hide: torchrun's failure report and root cause.

:class:`PlannedExitFilter` keeps torchrun's report of a planned exit (75: grow the job; 2: the
workers printed their own error) off the terminal; :func:`torchrun_status` reads the workers'
status behind torchrun's exit 1 from its error file or its log. Pure text work: no process
starts here (:mod:`distgrow.launch.executor` runs them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from distgrow.exits import EXIT_FAILURE, EXIT_NEED_WORKERS, EXIT_USAGE
from distgrow.launch.error_file import torchrun_error_status
from distgrow.signals import exit_status, signal_from_status

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
