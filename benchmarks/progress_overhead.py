"""What ``Progress.update`` costs the training loop, in microseconds per update.

The trainer calls it after every update on rank 0, so its cost is paid once per step. Each
source tree given (default: this checkout) is measured in a fresh interpreter with that tree's
``distgrow`` first on the path, for each mode: ``bar`` (to a fake terminal that discards what it
is sent), ``lines`` and ``off``, with the real clock and the default redraw interval, and
``bar/draw``: the bar redrawn at every update (``refresh_s=0``), the cost of one redraw. Reported:
the median over ``--repeats`` runs of ``--updates`` calls, wall and CPU (process_time) time.

Compare two versions by unpacking the older one elsewhere and passing both trees::

    mkdir /tmp/old && git archive <commit> distgrow | tar -x -C /tmp/old
    python benchmarks/progress_overhead.py /tmp/old .
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_MEASURE = """
import io, json, statistics, sys, time
from distgrow.progress import Progress, ProgressState

class Sink(io.TextIOBase):
    # A terminal that keeps nothing: the cost measured is building and sending the line.
    encoding = "utf-8"
    def isatty(self): return True
    def write(self, s): return len(s)
    def flush(self): pass

updates, repeats = int(sys.argv[1]), int(sys.argv[2])
out = {}
for mode, refresh_s in (("bar", 0.25), ("lines", 0.25), ("off", 0.25), ("bar/draw", 0.0)):
    wall, cpu = [], []
    for _ in range(repeats):
        p = Progress(mode.split("/")[0], total_samples=updates * 128, total_epochs=10,
                     stream=Sink(), refresh_s=refresh_s)
        states = [
            ProgressState(epoch=1 + i * 10 // updates, samples_seen=(i + 1) * 128, step=i + 1,
                          phase=1, phases=3, global_batch=128, lr=0.1)
            for i in range(updates)
        ]
        w0, c0 = time.perf_counter(), time.process_time()
        for s in states:
            p.update(s)
        wall.append((time.perf_counter() - w0) / updates * 1e6)
        cpu.append((time.process_time() - c0) / updates * 1e6)
        p.close()
    out[mode] = {"wall_us": statistics.median(wall), "cpu_us": statistics.median(cpu)}
print(json.dumps(out))
"""


def measure(tree: Path, updates: int, repeats: int) -> dict[str, dict[str, float]]:
    """Per-update cost of each mode with ``tree``'s distgrow, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(updates), str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
    )
    data: dict[str, dict[str, float]] = json.loads(result.stdout)
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT])
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'tree':40s} {'mode':8s} {'wall µs/update':>15s} {'CPU µs/update':>14s}")
    for tree in args.trees:
        for mode, cost in measure(tree.resolve(), args.updates, args.repeats).items():
            print(f"{tree!s:40s} {mode:8s} {cost['wall_us']:15.2f} {cost['cpu_us']:14.2f}")


if __name__ == "__main__":
    main()
