"""torchelastic's error files: how a torchrun launch ended, as torchrun itself records it.

torchrun sets ``TORCHELASTIC_ERROR_FILE`` for each worker it starts; when a worker fails it
picks the first failure (the smallest timestamp in the workers' files) and, because its own
``main`` is decorated with ``@record``, copies that worker's file into its own
``TORCHELASTIC_ERROR_FILE`` with the worker's exit status as ``errorCode``. When torchrun
fails itself (a stop signal, a rendezvous that cannot start) ``@record`` writes its own
exception there instead. The controller gives each torchrun launch a file of its own
(:meth:`distgrow.rundir.RunDir.error_file`) and reads the outcome from it.

torch's ``@record`` writes nothing for a worker that ends through ``sys.exit`` (a status, no
exception), which is how every planned exit of ``distgrow train`` ends (75, 2, 65): so the
worker records its own status with :func:`recorded` (``python -m distgrow`` runs under it).

The format (torch's ``ErrorHandler``)::

    {"message": {"message": "...", "extraInfo": {"py_callstack": "...", "timestamp": "..."},
                 "errorCode": 75}}

This module imports neither torch nor anything of distgrow's but :mod:`distgrow.signals`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distgrow.signals import exit_status, signal_from_status

ERROR_FILE_VAR = "TORCHELASTIC_ERROR_FILE"
"""The variable torchrun (and its agent, for each worker) reads the error file's path from."""

# torch formats the signal as a number (Python 3.11+) or as ``Signals.SIGTERM`` (before).
_SIGNALLED = re.compile(r"^SignalException: Process \d+ got signal: (?:Signals\.)?(\w+)")


def write_exit(path: str | Path, code: int, message: str, callstack: str = "") -> None:
    """Record that this process exits ``code`` in torchelastic's format (what torchrun's agent
    reads); a file that cannot be written is skipped (the log still says what happened)."""
    data = {
        "message": {
            "message": message,
            "extraInfo": {"py_callstack": callstack, "timestamp": str(int(time.time()))},
            "errorCode": code,
        }
    }
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps(data), encoding="utf-8")


def recorded(main: Callable[[], int | None]) -> Callable[[], int]:
    """``main`` that, under torchrun (``TORCHELASTIC_ERROR_FILE`` set), records a non-zero exit.

    A returned status, a ``SystemExit`` (the backend's shutdown) and an uncaught exception
    (with its traceback, status 1) are recorded; the status is returned or the exception
    raised on as before.
    """

    def run() -> int:
        path = os.environ.get(ERROR_FILE_VAR)
        try:
            code = main()
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if path and status:
                write_exit(path, status, f"distgrow exited {status}")
            raise
        except BaseException as err:
            if path and not isinstance(err, KeyboardInterrupt):
                text = f"{type(err).__name__}: {err}"
                write_exit(path, 1, text, traceback.format_exc())
            raise
        status = int(code or 0)
        if path and status:
            write_exit(path, status, f"distgrow exited {status}")
        return status

    return run


def read_error_file(path: str | Path) -> dict[str, Any] | None:
    """The ``message`` object of an error file; None when there is none or it is unreadable
    (torch's newer plain-string ``message`` is returned as ``{"message": TEXT}``)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, str):
        return {"message": message}
    return message if isinstance(message, dict) else None


def torchrun_error_status(path: str | Path) -> tuple[int, int | None] | None:
    """(The workers' status, the root cause) from torchrun's error file; None without one.

    * ``errorCode`` N: a worker failed first with status N (its root cause, also when a signal
      killed it: ``-N``).
    * torchrun's own ``SignalException`` with a stop signal N: ``(128 + N, None)``, a stop.
    * anything else torchrun raised itself: ``(1, None)``, its own failure.
    """
    message = read_error_file(path)
    if message is None:
        return None
    code = message.get("errorCode")
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        return code, code
    match = _SIGNALLED.match(str(message.get("message", "")))
    if match is not None:
        name = match.group(1)
        signum = int(name) if name.isdigit() else getattr(signal.Signals, name, 0)
        status = exit_status(int(signum))
        if signum and signal_from_status(status):
            return status, None
    return 1, None


__all__ = [
    "ERROR_FILE_VAR",
    "read_error_file",
    "recorded",
    "torchrun_error_status",
    "write_exit",
]
