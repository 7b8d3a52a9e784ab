"""Stop requests by signal (``distgrow.signals``): exit statuses, real signals to this process."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from distgrow.signals import (
    STOP_SIGNALS,
    StopSignals,
    exit_status,
    signal_from_status,
    signal_name,
)


def test_exit_statuses_are_the_shells_128_plus_n() -> None:
    assert [exit_status(s) for s in STOP_SIGNALS] == [143, 130, 138]
    assert signal_from_status(143) == signal.SIGTERM
    assert signal_from_status(138) == signal.SIGUSR1
    assert signal_from_status(130) == signal.SIGINT
    # Killed before it could stop cleanly: Python's and torchrun's spelling.
    assert signal_from_status(-15) == signal.SIGTERM
    for status in (0, 1, 2, 65, 75, 137, -9, 139):
        assert signal_from_status(status) is None, status
    assert signal_name(15) == "SIGTERM"
    assert signal_name(999) == "signal 999"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_real_signal_is_noted_not_acted_on(signum: int) -> None:
    before = signal.getsignal(signum)
    with StopSignals() as stop:
        assert stop.received is None
        os.kill(os.getpid(), signum)  # handlers run before the next bytecode: no sleep needed
        assert stop.received == signum
    assert signal.getsignal(signum) is before


def test_repeats_keep_the_first_signal() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM may signal the step and each process
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == signal.SIGUSR1


@pytest.mark.integration
def test_a_second_ctrl_c_ends_the_process_at_once() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the first SIGINT is noted, the second one kills it
        os.close(read)
        with StopSignals():
            os.kill(os.getpid(), signal.SIGINT)
            os.write(write, b"noted\n")
            os.kill(os.getpid(), signal.SIGINT)
            os.write(write, b"survived\n")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    assert said == "noted\n"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT


def test_outside_the_main_thread_nothing_is_installed() -> None:
    results: list[bool] = []
    stop = StopSignals()
    thread = threading.Thread(target=lambda: results.append(stop.install()))
    thread.start()
    thread.join()
    assert results == [False]
    assert signal.getsignal(signal.SIGTERM) != stop._handle
