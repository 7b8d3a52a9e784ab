"""A stand-in ``distgrow`` package for testing the launch controller with real processes.

:func:`make_fake_distgrow` writes a package directory whose ``__main__`` plays a worker (it
exits 75 after writing ``resize.json``, crashes, sleeps until signalled, ...), while every
other module (``distgrow.launch``, ``distgrow.config``, ``distgrow.runtime``) is the real one:
the fake's ``__path__`` continues into the real package. Put the returned directory first on
``PYTHONPATH`` and ``python -m distgrow train ...`` (also under torchrun, mpirun and srun) runs
the fake worker, and ``python -m distgrow launch ...`` runs the real controller.

What each worker saw goes to ``<run dir>/calls.jsonl``: one line per rank and launch, with its
rank, world size, the launcher whose variables it read, and its arguments.

Behaviour, from ``FAKE_WORKER`` in the environment:

* ``grow:N`` — with fewer than N workers, rank 0 writes ``resize.json`` asking for N and every
  rank exits 75; with N or more, exit 0.
* ``exit:CODE`` — every rank exits CODE.
* ``crash:K`` — the first K launches exit 3 (a crash); later ones exit 0.
* ``sleep`` — write ``started-<rank>`` and sleep; on SIGTERM/SIGINT/SIGUSR1 write
  ``signal-<rank>`` (the signal's name) and exit 128 + its number. ``sleep:fresh`` sleeps only
  in a fresh run; resumed (``run.resume=true``), it exits 0 at once. ``sleep:grow:N`` sleeps in
  a fresh run; resumed, it behaves as ``grow:N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import distgrow

REAL_PACKAGE = Path(distgrow.__file__).resolve().parent

_INIT = '''"""Test stand-in: __main__ is a fake worker; every other module is the real distgrow."""
__path__.append({real!r})
__version__ = "0.0.0-fake"
'''

_MAIN = r"""
import json
import os
import signal
import sys
import time
from pathlib import Path

from distgrow.config import load_config
from distgrow.rundir import ResizeRequest, RunDir
from distgrow.runtime import detect_runtime

verb, args = sys.argv[1], sys.argv[2:]
if verb == "launch":  # the real controller
    from distgrow.launch import main_launch

    dry = "--dry-run" in args
    rest = [a for a in args if a != "--dry-run"]
    sys.exit(main_launch(rest[0], rest[1:], dry))

assert verb == "train", sys.argv
rt = detect_runtime(os.environ)
cfg = load_config(args[0], args[1:])
run = Path(cfg.run.resolved_output_dir)
run.mkdir(parents=True, exist_ok=True)
line = {
    "rank": rt.rank,
    "world": rt.world_size,
    "launcher": rt.launcher,
    "resume": cfg.run.resume,
    "max_workers": cfg.growth.max_workers,
    "args": args,
}
with open(run / "calls.jsonl", "a") as f:
    f.write(json.dumps(line) + "\n")
mode, _, value = os.environ["FAKE_WORKER"].partition(":")
if mode == "sleep" and value.startswith("grow:") and cfg.run.resume:
    mode, value = "grow", value.split(":", 1)[1]
if mode == "grow":
    need = int(value)
    if rt.world_size < need:
        if rt.rank == 0:
            RunDir(run).write_resize(ResizeRequest(
                need_workers=need, have_workers=rt.world_size, epoch=1, position=320, step=10,
                samples_seen=320, global_batch=32, time=time.time(),
                checkpoint=str(run / "ckpt-000000010.pt"), exit_code=75,
            ))
        sys.exit(75)
    sys.exit(0)
if mode == "exit":
    sys.exit(int(value))
if mode == "crash":
    calls = [json.loads(x) for x in (run / "calls.jsonl").read_text().splitlines()]
    launches = sum(1 for c in calls if c["rank"] == 0)  # this one included
    sys.exit(3 if launches <= int(value) else 0)
if mode == "sleep" and value == "fresh" and cfg.run.resume:
    sys.exit(0)
if mode == "sleep":
    def stop(signum, _frame):
        (run / f"signal-{rt.rank}").write_text(signal.Signals(signum).name)
        sys.exit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, stop)
    (run / f"started-{rt.rank}").write_text("")
    time.sleep(90)
    sys.exit(0)
raise SystemExit(f"unknown FAKE_WORKER {mode!r}")
"""


def make_fake_distgrow(root: Path) -> Path:
    """Write the stand-in package under ``root``; returns the directory for ``PYTHONPATH``."""
    package = root / "distgrow"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_INIT.format(real=str(REAL_PACKAGE)))
    (package / "__main__.py").write_text(_MAIN)
    return root


def read_calls(run_dir: Path) -> list[dict[str, Any]]:
    """What the fake workers recorded, in order."""
    import json

    path = run_dir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
