"""The process of `distgrow train`: runtime, threads, data, backend, then the trainer.

:func:`run` is what ``distgrow train`` calls in every worker. It reads the launcher's
environment, sets the threads, loads the data and starts the backend (each error there is one
line and :data:`~distgrow.exits.EXIT_USAGE`), then hands over to
:class:`~distgrow.trainer.Trainer` and maps what comes back to the process's exit status (see
:mod:`distgrow.trainer` for the statuses). A full disk, a read-only run directory or a file in
the way is a usage error too (one line with the errno, the path and the fix): the launch
controller does not retry :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace

import torch

from distgrow.backends import Backend, BackendError, make_backend
from distgrow.checkpoint import CheckpointError
from distgrow.config import Config, ConfigError
from distgrow.data import (
    DataBundle,
    DatasetFormatError,
    DatasetNotFoundError,
    load_dataset,
)
from distgrow.data.feed import one_line
from distgrow.exits import EXIT_FAILURE, EXIT_USAGE
from distgrow.gpu import place_data
from distgrow.probe import resolve_auto
from distgrow.runtime import (
    Runtime,
    RuntimeEnvError,
    cpu_cores,
    detect_runtime,
    export_environment,
)
from distgrow.savings import process_age_s
from distgrow.signals import StopSignals
from distgrow.state import TrainError, is_disk_error, write_error
from distgrow.trainer import Trainer


def configure_threads(runtime: Runtime, threads: int | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else this node's cores shared by its workers.

    torchrun would leave every worker with one thread (``OMP_NUM_THREADS=1``) however many
    cores there are; a single process would take them all.

    Returns:
        The thread count set.
    """
    if threads is None:
        threads = max(1, cpu_cores() // runtime.local_world_size)
    torch.set_num_threads(threads)
    return threads


def configure_denormals(flush: bool) -> bool:
    """``run.flush_denormal``: CPU arithmetic treats denormal floats as 0 (or not).

    Call before torch starts its CPU threads (its OpenMP pool starts at the first parallel
    operation): the flag is a per-thread CPU register, which new threads copy from the thread
    that starts them.

    Returns:
        Whether flushing is on (False where the CPU cannot flush, whatever was asked).
    """
    return bool(torch.set_flush_denormal(flush)) and flush


def _say_on(backend: Backend, cfg: Config) -> Callable[[str], None]:
    """Print a start-up line on rank 0 only (as the trainer's, silent with progress off)."""

    def say(line: str) -> None:
        if backend.is_main and cfg.logging.progress != "off":
            print(line if line.startswith("distgrow") else f"distgrow: {line}", flush=True)

    return say


def load_data(cfg: Config) -> DataBundle:
    """The data set of ``cfg.data``, split with ``run.seed``."""
    return load_dataset(cfg.data, seed=cfg.run.seed)


def run(cfg: Config) -> int:
    """Train ``cfg`` as this process's part of the job, then end the process (:func:`_run`).

    ``run.flush_denormal`` holds while it runs; on the way out (a return, or the ``SystemExit``
    of the shutdown) torch's default, IEEE gradual underflow, is back, for a caller that goes
    on in the same process (tests, ``launch.preload``).
    """
    try:
        return _run(cfg)
    finally:
        configure_denormals(False)


def _run(cfg: Config) -> int:
    """Train ``cfg`` as this process's part of the job, then end the process.

    Reads the launcher's environment (torchrun, mpirun, srun, PMI, or none), starts the backend,
    trains, and leaves through ``backend.shutdown`` (which never returns once a job was joined;
    it raises ``SystemExit`` in a single process). Errors before the job is joined are printed
    and returned as :data:`EXIT_USAGE`.
    """
    # Start-up counts from the birth of the process: imports, data, rendezvous, W&B.
    age = process_age_s() or 0.0
    started_at = time.perf_counter() - age
    # From here a SIGTERM/SIGINT/SIGUSR1 stops training after the current update, with a
    # checkpoint (during start-up: before the first update).
    stop_signals = StopSignals()
    stop_signals.install()
    marks = {"process_start": time.time() - age, "main": time.time()}
    prefix = "distgrow: error"
    try:
        runtime = detect_runtime(
            os.environ,
            default_addr=cfg.launch.master_addr,
            default_port=cfg.launch.master_port,
        )
        if runtime.world_size > 1:
            prefix = f"distgrow[rank {runtime.rank}]: error"
        export_environment(runtime, os.environ)
        configure_threads(runtime, cfg.run.threads)
        configure_denormals(cfg.run.flush_denormal)
        data = load_data(cfg)
        marks["data_loaded"] = time.time()
        backend = make_backend(cfg, runtime)
        marks["backend_ready"] = time.time()
        # On CUDA, in-memory data moves to the device once when it fits (distgrow.gpu).
        data = place_data(data, backend.device, cfg.data.device_fraction, _say_on(backend, cfg))
    except (
        RuntimeEnvError,
        DatasetNotFoundError,
        DatasetFormatError,
        BackendError,
        ValueError,
    ) as err:
        print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        stop_signals.restore()
        return EXIT_USAGE
    code = EXIT_FAILURE
    try:
        # growth.max_micro_batch: auto: the probe's answer for this model on this device.
        plan_cfg = resolve_auto(cfg, data, backend, _say_on(backend, cfg))
        trainer = Trainer(
            cfg,
            backend,
            data,
            started_at=started_at,
            stop_signals=stop_signals,
            startup_marks=marks,
            plan_cfg=plan_cfg,
        )
        marks["trainer_ready"] = time.time()  # model, optimizer (torch imports its compiler)
        code = trainer.train()
        while backend.rejoin(code):
            # Horovod Elastic: workers joined; the trainer stopped with a checkpoint, and the
            # job was re-formed in place. Resume from it at the new world size.
            stop_signals.received = None
            resumed = replace(cfg, run=replace(cfg.run, resume=True))
            code = Trainer(
                resumed,
                backend,
                data,
                stop_signals=stop_signals,
                plan_cfg=replace(plan_cfg, run=resumed.run),
            ).train()
    except (TrainError, CheckpointError, ConfigError, BackendError) as err:
        # Decided on rank 0 and broadcast, or the same on every rank: say it once.
        if backend.is_main:
            print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except DatasetFormatError as err:
        # A bad file met in training (read here or by a loader worker): the rank that read it
        # says which, in the one line it says before training.
        print(f"{prefix}: {one_line(err)}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except OSError as err:
        if not is_disk_error(err):
            traceback.print_exc()
            code = EXIT_FAILURE
        else:
            # A write the trainer does not route through its own checks (a W&B file, say): a
            # full disk or a read-only directory is still the user's to fix, not a crash that
            # the launch controller would retry.
            where = err.filename if isinstance(err.filename, str) else cfg.run.resolved_output_dir
            print(f"{prefix}: {write_error(err, 'file', where)}", file=sys.stderr, flush=True)
            code = EXIT_USAGE
    except Exception:
        traceback.print_exc()
        code = EXIT_FAILURE
    stop_signals.restore()
    backend.shutdown(code)
