"""Training one run for a verb (``compare``, ``sweep``): the check that a run directory may be
reused, the ``distgrow train`` process, and the one-line errors of a run that a signal or a full
disk stopped.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from distgrow.config import Config, ConfigError, config_from_dict, dump_config
from distgrow.exits import EXIT_USAGE
from distgrow.launch import Outcome, run_subprocess
from distgrow.launch.launch_log import worker_error
from distgrow.report.render import cannot_write
from distgrow.report.runs import ReportError, differences, read_config
from distgrow.rundir import CONFIG_FILE, WRITE_FAILURE, RunDir, is_disk_error, write_failure
from distgrow.signals import exit_status, signal_name

Echo = Callable[[str], None]

_NOT_THE_CONFIG = ("run.output_dir", "run.resume")
"""Keys a reused run may differ in: the folder is the same one by construction (spelled from
another working directory, perhaps), and a resumed run records ``run.resume=true``."""


def _tree(cfg: Config) -> dict[str, Any]:
    """The config as its ``config.yaml`` holds it (YAML types: lists, not tuples)."""
    loaded = yaml.safe_load(dump_config(cfg))
    return loaded if isinstance(loaded, dict) else {}


def config_mismatch(run_dir: RunDir, expected: Config) -> list[str]:
    """How the config a run directory was trained with differs from ``expected`` ([] when
    they are equal, or when the directory holds no run yet)."""
    if not run_dir.holds_a_run():
        return []
    try:
        stored = read_config(run_dir)
    except ReportError:
        stored = {}  # broken: it cannot be checked (below), and --force may still reuse it
    if not stored:
        return [f"it has no readable {CONFIG_FILE}, so its config cannot be checked"]
    try:
        trained = config_from_dict(stored, source=str(run_dir.config))
    except ConfigError as err:
        return [f"its {CONFIG_FILE} does not load ({err})"]
    return differences(
        _tree(trained), _tree(expected), ignore=_NOT_THE_CONFIG, names=("there", "now")
    )


def check_reuse(
    runs: Sequence[tuple[str, RunDir, Config]], *, force: bool, verb: str
) -> dict[str, list[str]]:
    """Refuse run directories trained with another config, unless ``force``.

    Without this, a finished run would be reused and its numbers labelled with the new
    command. Every directory is checked before anything trains.

    Args:
        runs: (name, run directory, the config this command would train there).
        force: Let them be trained again (:func:`discard` deletes each just before).
        verb: ``compare`` or ``sweep``, for the message.

    Returns:
        The runs trained with another config (only with ``force``): name → differences.

    Raises:
        ReportError: some directory holds a run of another config and ``force`` is false.
    """
    found = {name: (rd, diffs) for name, rd, cfg in runs if (diffs := config_mismatch(rd, cfg))}
    if force or not found:
        return {name: diffs for name, (_, diffs) in found.items()}
    what = " ".join(f"{name} in {rd}: {'; '.join(diffs)}." for name, (rd, diffs) in found.items())
    raise ReportError(
        f"{len(found)} run(s) there were trained with another config, and reusing them would "
        f"label their numbers with this command. {what} Fix: choose another --out, or rerun "
        f"`distgrow {verb}` with --force to delete and retrain them."
    )


def discard(run_dir: RunDir, log: Path, diffs: Sequence[str], prefix: str, echo: Echo) -> None:
    """Delete a run of another config and its log, just before it is trained again (so a
    training that fails first leaves the runs after it as they were)."""
    why = "; ".join(diffs)
    echo(f"{prefix} {run_dir} was trained with another config ({why}): --force, deleting it")
    shutil.rmtree(run_dir.path)
    log.unlink(missing_ok=True)


def _child_env() -> dict[str, str]:
    """What a training process adds to this environment: this distgrow importable first."""
    root = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": root + (os.pathsep + current if current else "")}


def train_process(
    config: str | Path,
    overrides: Sequence[str],
    run_dir: RunDir,
    log_path: Path,
    *,
    prefix: str,
    echo: Echo,
    python: str = sys.executable,
    env: Mapping[str, str] | None = None,
) -> Outcome:
    """Run ``distgrow train CONFIG OVERRIDES run.output_dir=RUN_DIR`` to its end.

    The output goes to ``echo``, each line behind ``prefix``, and to ``log_path``
    (:func:`distgrow.launch.run_subprocess`, which also forwards Ctrl-C, SIGTERM and SIGUSR1 so
    that the training checkpoints). A run
    directory with checkpoints but no summary is resumed; one with a summary is not rerun
    (:func:`check_reuse` has made sure that it was trained with this config).

    Args:
        env: Variables the training gets on top of this environment (``compare`` sets W&B's
            own ``WANDB_RUN_GROUP`` and ``WANDB_JOB_TYPE``).

    Returns:
        How the process ended (status 0 also when the run had already finished).
    """
    if run_dir.summary.is_file():
        echo(f"{prefix} already finished in {run_dir}: reusing it")
        return Outcome(0)
    argv = [python, "-m", "distgrow", "train", str(config), *overrides]
    argv.append(f"run.output_dir={run_dir}")
    if run_dir.checkpoints():
        argv.append("--resume")
        echo(f"{prefix} resuming the unfinished run in {run_dir}")
    echo(f"{prefix} $ distgrow {shlex.join(argv[3:])}")
    child = {**_child_env(), **(env or {})}
    return run_subprocess(argv, child, log_path, echo=lambda line: echo(f"{prefix} {line}"))


def stopped_error(outcome: Outcome, what: str, log: Path, out: Path) -> ReportError:
    """The error of a training that a forwarded signal stopped: rerunning resumes it."""
    assert outcome.signal is not None
    return ReportError(
        f"{what} was stopped by {signal_name(outcome.signal)} (exit status {outcome.returncode}); "
        f"its output is in {log}. Rerun the same command with --out {out}: finished runs are "
        "reused, this one resumes from its last checkpoint.",
        exit_code=exit_status(outcome.signal),
    )


def disk_failure(
    outcome: Outcome, what: str, log: Path, run_dir: RunDir, out: Path, made_out: bool
) -> ReportError | None:
    """The error of a training that stopped on a full or read-only disk: its own line (exit
    2, ``cannot write the ...``), or the line for its log that could not be written. No other
    run is started after it: it would meet the same disk. What it left empty (its log, its
    run directory, ``OUT`` when this command made it) is removed."""
    if outcome.returncode == 0:
        return None
    error = _disk_line(outcome, what, log, out)
    if error is not None:
        empty = [log, run_dir.path, log.parent, run_dir.path.parent, *([out] if made_out else [])]
        for path in empty:
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()  # only when empty
                elif path.stat().st_size == 0:
                    path.unlink()
    return error


def _disk_line(outcome: Outcome, what: str, log: Path, out: Path) -> ReportError | None:
    again = (
        f" Then rerun the same command with --out {out}: finished runs are reused, this one "
        "resumes from its last checkpoint."
    )
    error = worker_error(outcome.tail or "")
    if outcome.returncode == EXIT_USAGE and error and error.startswith(WRITE_FAILURE):
        # The run's output directory is under --out: the fix names the option given here.
        error = error.replace("set run.output_dir to", "set --out to")
        error = error.replace("; then rerun with --resume.", ".")  # `again` says how here
        return ReportError(f"{what} stopped (exit {EXIT_USAGE}): {error}{again}")
    if outcome.log_error is not None and is_disk_error(outcome.log_error):
        line = write_failure(outcome.log_error, "log", log, setting="--out")
        return ReportError(f"{what} stopped (exit {outcome.returncode}): {line}{again}")
    return None


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Turn a failed write under ``out`` (a full or read-only disk, a file in the way) into
    one line: the errno, the path and the fix (exit 2)."""
    try:
        yield
    except OSError as err:
        if not is_disk_error(err):
            raise
        raise cannot_write(err, out) from None
