"""How long loading a config takes: the import of ``distgrow.config`` and one ``load_config``.

Each source tree given (default: this checkout) is measured in fresh interpreters, so that
imports are not cached between them:

* import: ``import distgrow.config`` in a new process, then its first ``load_config`` (median
  of ``--imports`` processes);
* load: ``load_config`` of every file in ``configs/`` with two overrides, repeated
  ``--loads`` times in one process after a warm-up load (median per load).

Compare two versions by unpacking the older one elsewhere and passing both trees::

    mkdir /tmp/old && git archive <commit> distgrow | tar -x -C /tmp/old
    python benchmarks/config_load.py /tmp/old .
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# CPU seconds (process_time) as well as wall seconds: on a shared machine the wall clock
# measures the neighbours as much as the code.
_IMPORT = """
import sys, time
w, c = time.perf_counter(), time.process_time()
import distgrow.config
w1, c1 = time.perf_counter(), time.process_time()
distgrow.config.load_config(sys.argv[1])
print(w1 - w, c1 - c, time.perf_counter() - w1, time.process_time() - c1)
"""

_LOADS = """
import json, statistics, sys, time
from pathlib import Path
from distgrow.config import load_config
files = sorted(Path(sys.argv[1]).glob("*.yaml"))
overrides = ["optim.lr=0.05", "growth.max_workers=4"]
for f in files:
    load_config(f, overrides)  # warm-up: lazy builders, file cache
wall, cpu = [], []
for _ in range(int(sys.argv[2])):
    for f in files:
        w, c = time.perf_counter(), time.process_time()
        load_config(f, overrides)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
print(json.dumps([wall, cpu]))
"""


def measure(tree: Path, imports: int, loads: int) -> list[float]:
    """Medians for the distgrow in ``tree`` (s): import and first load, then later loads.

    Wall and CPU seconds each: import, the first load in a fresh process (what `distgrow plan`
    pays), a load after that.
    """
    # cwd=tree as well: `python -c` puts the working directory first on sys.path.
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}
    first = ROOT / "configs" / "cifar10_wrn16_4.yaml"
    runs = [
        subprocess.run([sys.executable, "-c", _IMPORT, str(first)], env=env, cwd=tree,
                       capture_output=True, text=True, check=True).stdout.split()
        for _ in range(imports)
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _LOADS, str(ROOT / "configs"), str(loads)],
        env=env, cwd=tree, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    load_wall, load_cpu = json.loads(out)
    return [
        *(statistics.median(float(run[i]) for run in runs) for i in range(4)),
        statistics.median(load_wall),
        statistics.median(load_cpu),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT], help="source trees")
    parser.add_argument("--imports", type=int, default=15, help="processes for the import time")
    parser.add_argument("--loads", type=int, default=200, help="loads of each config")
    args = parser.parse_args()
    heads = ("import wall", "import CPU", "1st wall", "1st CPU", "load wall", "load CPU")
    print(f"{'tree (medians, ms)':30}" + "".join(f"{h:>13}" for h in heads))
    for tree in args.trees:
        row = measure(tree.resolve(), args.imports, args.loads)
        print(f"{tree!s:30}" + "".join(f"{x * 1e3:13.2f}" for x in row))


if __name__ == "__main__":
    main()
