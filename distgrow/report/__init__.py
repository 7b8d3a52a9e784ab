"""``distgrow compare``, ``distgrow report`` and ``distgrow sweep``: runs side by side.

* :func:`compare` trains the ``decay_lr`` baseline, ``grow_batch`` and the ``hybrid`` (a batch
  cap that forces the fall-back to LR decay), optionally ``grow_batch_lr`` and
  ``grow_momentum``, each as a real ``distgrow train`` process on the same config, data and
  seed, then calls :func:`build_report`. With several seeds (``--seeds``/``--repeats``) each
  variant is trained on every seed and :mod:`~distgrow.report.seeds` adds the mean, spread,
  the paired 95% interval against the baseline and a verdict.
* :func:`build_report` turns finished run directories into a report directory: ``report.md``
  (final quality, updates, wall-clock, start-up, worker-seconds, ratios against the baseline,
  savings labelled *measured* or *estimated* with their method, per-phase throughput), PNG
  plots, and ``summary.json`` with the same numbers.
* :func:`sweep` trains a grid of batch sizes × learning rates at a fixed batch (``decay_lr``)
  and writes the final losses as ``sweep.png``, ``sweep.md`` and ``sweep.json``.

The layers, each importing only the one above it:

* :mod:`~distgrow.report.runs`: finished run directories, read through
  :mod:`distgrow.rundir` (the typed :class:`~distgrow.rundir.Summary`), their curves, and
  how two configs differ.
* :mod:`~distgrow.report.render`: ``report.md``, ``summary.json`` and the plots;
  :mod:`~distgrow.report.markdown` the report's text; :mod:`~distgrow.report.sweep` the sweep files.
* :mod:`~distgrow.report.verbs`: the verbs, which run the trainings as child processes
  (:func:`distgrow.launch.run_subprocess`) and reuse a run only if its config is the same
  (:mod:`~distgrow.report.training`: one run, its reuse check and its errors).

Nothing here imports torch or matplotlib at import time; runs are separate processes.
"""

from distgrow.report.render import (
    PLOT_FILES,
    REPORT_FILE,
    build_report,
    render_markdown,
    run_curve,
    throughput_drift,
)
from distgrow.report.runs import (
    ReportError,
    RunData,
    config_differences,
    load_run,
    schedule_path,
    validation_points,
)
from distgrow.report.sweep import write_sweep
from distgrow.report.training import check_reuse, config_mismatch, discard, train_process
from distgrow.report.verbs import (
    DEFAULT_VARIANTS,
    VARIANTS,
    compare,
    default_report_dir,
    hybrid_cap,
    parse_list,
    report,
    seed_list,
    sweep,
    variant_overrides,
)

__all__ = [
    "DEFAULT_VARIANTS",
    "PLOT_FILES",
    "REPORT_FILE",
    "VARIANTS",
    "ReportError",
    "RunData",
    "build_report",
    "check_reuse",
    "compare",
    "config_differences",
    "config_mismatch",
    "default_report_dir",
    "discard",
    "hybrid_cap",
    "load_run",
    "parse_list",
    "render_markdown",
    "report",
    "run_curve",
    "schedule_path",
    "seed_list",
    "sweep",
    "throughput_drift",
    "train_process",
    "validation_points",
    "variant_overrides",
    "write_sweep",
]
