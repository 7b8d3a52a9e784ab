"""Horovod Elastic host discovery: print the ``host:slots`` lines the workers asked for.

Run by the script :func:`distgrow.launch.elastic.write_discovery_script` writes, every time
Horovod's driver polls (so it imports only :mod:`distgrow.rundir`)::

    main([RUN_DIR, START, MOST, PER_HOST, HOST, ...])
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence

from distgrow.rundir import RunDir, atomic_write_bytes


def offered_slots(run: RunDir, start: int, most: int) -> int:
    """The slots to offer: the last offer (else ``start``), raised to an elastic request's
    ``need_workers`` when that is more and at most ``most``; remembered for the next poll."""
    state = run.horovod_slots
    slots = start
    # The first poll of a launch finds no file: it starts from the launch's count.
    with contextlib.suppress(OSError, ValueError):
        slots = int(state.read_text().strip() or start)
    request = run.read_resize()
    if request is not None and request.elastic and slots < request.need_workers <= most:
        slots = request.need_workers
    atomic_write_bytes(state, f"{slots}\n".encode())
    return slots


def host_lines(slots: int, per_host: int, hosts: Sequence[str]) -> list[str]:
    """``host:n`` lines that fill ``hosts`` in order, at most ``per_host`` slots each."""
    lines = []
    left = slots
    for host in hosts:
        if left <= 0:
            break
        n = min(left, per_host)
        lines.append(f"{host}:{n}")
        left -= n
    return lines


def main(argv: Sequence[str]) -> int:
    """Print the host lines for ``[RUN_DIR, START, MOST, PER_HOST, HOST, ...]``."""
    run_dir, start, most, per_host, *hosts = argv
    slots = offered_slots(RunDir(run_dir), int(start), int(most))
    for line in host_lines(slots, int(per_host), hosts):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
