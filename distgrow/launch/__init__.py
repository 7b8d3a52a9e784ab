"""`distgrow launch`: start the workers a growth plan needs, and start them again, wider.

A growth plan adds workers as the batch grows. No launcher can add ranks to a running
``torch.distributed`` job, so distgrow grows by relaunching: the workers train until the plan
needs more of them than the job has, checkpoint, and exit with status 75 after rank 0 wrote
``resize.json``; the controller then launches that many workers with ``run.resume=true``.
The sample order does not depend on the world size, so the resumed run neither repeats nor
skips a sample.

The package, layer by layer (each imports only the ones above it):

* :mod:`~distgrow.launch.builders` — pure functions from a :class:`LaunchSpec` to
  ``(argv, env additions)`` for torchrun, deepspeed, horovodrun, mpirun, srun and none.
* :mod:`~distgrow.launch.environment` — the launcher, the worker limit, the rendezvous and the
  GPUs, read from SLURM, Open MPI and CUDA variables (a plain mapping: pure too).
* :mod:`~distgrow.launch.executor` — the one process runner: start, tee the output, forward
  SIGTERM/SIGINT/SIGUSR1 (:func:`run_subprocess`, also used by ``compare``).
* :mod:`~distgrow.launch.job` — what every launch of a run shares; the config, loaded once and
  changed as a typed object.
* :mod:`~distgrow.launch.elastic` — torchrun agents that grow a job in place; Horovod Elastic's
  host discovery (:mod:`~distgrow.launch.discover`).
* :mod:`~distgrow.launch.controller` — :func:`decide` (pure) and :func:`run_controller`.

Exit statuses the controller reads (the trainer's, see ``distgrow.exits``): 0 done; 75 relaunch
wider; 2 (usage/config) and 65 (non-finite loss) stop at once; 130/138/143 (the workers stopped
on SIGINT/SIGUSR1/SIGTERM, after checkpointing) stop without a relaunch, and are not crashes;
anything else is a crash, retried from the newest checkpoint up to ``launch.max_restarts`` times.
torchrun and horovodrun report a worker's failure as their own status 1; the controller still
tells a resize (``resize.json`` was written) and, for torchrun, reads the root-cause exit status
from torchrun's failure report (or the signal that stopped torchrun itself).

Nothing here imports torch or anything distributed.
"""

from __future__ import annotations

from distgrow.launch.builders import (
    BUILDERS,
    LauncherName,
    LaunchError,
    LaunchSpec,
    build_command,
    build_deepspeed,
    build_horovodrun,
    build_mpirun,
    build_none,
    build_srun,
    build_torchrun,
    format_command,
    remote_shell_args,
    worker_command,
)
from distgrow.launch.controller import (
    Attempt,
    AttemptEnd,
    Decision,
    Span,
    decide,
    last_width,
    main_launch,
    plan_spans,
    recorded_stop_signal,
    run_controller,
)
from distgrow.launch.elastic import ELASTIC_GRACE_S, run_elastic_group, write_discovery_script
from distgrow.launch.environment import (
    REDACTED,
    Rendezvous,
    count_cuda_visible_devices,
    describe_env_changes,
    detect_launcher,
    in_slurm_allocation,
    local_gpu_count,
    max_workers_from_env,
    redact,
    rendezvous_from_env,
    slurm_hostnames,
    worker_limit,
)
from distgrow.launch.executor import (
    FORWARDED_SIGNALS,
    Executor,
    Outcome,
    PlannedExitFilter,
    Process,
    forwarding_signals,
    run_subprocess,
    torchrun_root_cause,
    torchrun_status,
    torchrun_stop_signal_status,
)
from distgrow.launch.job import ELASTIC_LAST_CALL_S, Job, prepare, with_updates

_prepare = prepare  # the name tests knew before the package split

__all__ = [
    "BUILDERS",
    "ELASTIC_GRACE_S",
    "ELASTIC_LAST_CALL_S",
    "FORWARDED_SIGNALS",
    "REDACTED",
    "Attempt",
    "AttemptEnd",
    "Decision",
    "Executor",
    "Job",
    "LaunchError",
    "LaunchSpec",
    "LauncherName",
    "Outcome",
    "PlannedExitFilter",
    "Process",
    "Rendezvous",
    "Span",
    "build_command",
    "build_deepspeed",
    "build_horovodrun",
    "build_mpirun",
    "build_none",
    "build_srun",
    "build_torchrun",
    "count_cuda_visible_devices",
    "decide",
    "describe_env_changes",
    "detect_launcher",
    "format_command",
    "forwarding_signals",
    "in_slurm_allocation",
    "last_width",
    "local_gpu_count",
    "main_launch",
    "max_workers_from_env",
    "plan_spans",
    "prepare",
    "recorded_stop_signal",
    "redact",
    "remote_shell_args",
    "rendezvous_from_env",
    "run_controller",
    "run_elastic_group",
    "run_subprocess",
    "slurm_hostnames",
    "torchrun_root_cause",
    "torchrun_status",
    "torchrun_stop_signal_status",
    "with_updates",
    "worker_command",
    "worker_limit",
    "write_discovery_script",
]
