"""Stop requests by signal: SIGTERM, SIGINT and SIGUSR1 end training at an update boundary.

A scheduler asks a job to stop with a signal: SIGTERM (``scancel``, a time limit, torchrun
forwarding its own), SIGUSR1 (SLURM's warning before a time limit or pre-emption,
``--signal=USR1@N``), SIGINT (Ctrl-C). Killing the worker there and then would lose every
update since the last checkpoint. Instead :class:`StopSignals` only notes the signal; the
trainer asks :class:`~distgrow.agreement.Agreement` once per update, which agrees on it with
the other ranks (each update's loss agreement also counts the ranks holding a signal), so that
every rank stops after the *same* update even when the signal reached only some of them. It
checkpoints at that exact point and exits with ``128 + signal number`` (143, 138, 130), the
status a shell gives a process killed by that signal.

Repeats: a scheduler may send SIGTERM or SIGUSR1 more than once (to the job step and to each
process); repeats are ignored while the stop is pending. A second SIGINT is a user pressing
Ctrl-C again: it ends the process at once, as the default action would.

This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals that ask for a clean stop (checkpoint, then exit ``128 + signum``)."""


def exit_status(signum: int) -> int:
    """The exit status of a stop by ``signum``: ``128 + signum`` (143 TERM, 138 USR1, 130 INT)."""
    return 128 + signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, or ``signal 99`` for a number this platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def signal_from_status(status: int) -> int | None:
    """The stop signal behind an exit status, or None for any other status.

    Both spellings count: ``128 + N`` (a shell's, and what the trainer exits with after a
    clean stop) and ``-N`` (Python's ``returncode`` and torchrun's report for a process that
    the signal killed before it could stop cleanly).
    """
    return next((int(s) for s in STOP_SIGNALS if status in (exit_status(s), -int(s))), None)


class StopSignals:
    """Notes the first stop signal; the trainer polls :attr:`received` between updates.

    Use as a context manager (or :meth:`install` / :meth:`restore`) around training. Handlers
    can only be installed from the main thread; elsewhere (a notebook's worker thread, a test
    runner's thread) installing does nothing and :attr:`received` stays None.

    Args:
        signals: The signals to catch (default :data:`STOP_SIGNALS`).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Catch the signals from now on; True when the handlers are in place."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            self._previous.setdefault(int(sig), signal.signal(sig, self._handle))
        return True

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def request(self, signum: int) -> None:
        """Record a stop request as if ``signum`` had arrived (tests, and the handler)."""
        if self.received is None:
            self.received = signum

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # No printing here: a handler that writes to a stream the main code is writing to can
        # raise "reentrant call". The trainer says what happened when it stops.
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: out now
            return
        self.request(signum)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.restore()
