"""`distgrow launch`: start the workers a growth plan needs, and start them again, wider.

A growth plan adds workers as the batch grows. No launcher can add ranks to a running
``torch.distributed`` job, so distgrow grows by relaunching: the workers train until the plan
needs more of them than the job has, checkpoint, and exit with status 75 after rank 0 wrote
``resize.json``; the controller here then launches that many workers with ``run.resume=true``.
The sample order does not depend on the world size, so the resumed run neither repeats nor
skips a sample.

The module has three layers, each testable alone:

* **builders** — :func:`build_torchrun`, :func:`build_deepspeed`, :func:`build_horovodrun`,
  :func:`build_mpirun`, :func:`build_srun` (and :func:`build_none`): pure functions from a
  :class:`LaunchSpec` to ``(argv, env additions)``. Never a shell string.
* **the environment** — :func:`detect_launcher`, :func:`max_workers_from_env` and
  :func:`rendezvous_from_env` read SLURM, Open MPI and CUDA variables (a plain mapping, so they
  are pure too).
* **the controller** — :func:`run_controller` decides what to launch next from the exit status
  and ``resize.json``; an :data:`Executor` (by default :func:`run_subprocess`) runs one launch.

Exit statuses the controller reads (the trainer's, see ``distgrow.trainer``): 0 done; 75 relaunch
wider; 2 (usage/config) and 65 (non-finite loss) stop at once; 130/138/143 (the workers stopped
on SIGINT/SIGUSR1/SIGTERM, after checkpointing) stop without a relaunch, and are not crashes;
anything else is a crash, retried from the newest checkpoint up to ``launch.max_restarts`` times.
torchrun and horovodrun report a worker's failure as their own status 1; the controller still
tells a resize (``resize.json`` was written) and, for torchrun, reads the root-cause exit status
from torchrun's failure report (or the signal that stopped torchrun itself).

Elastic (``launch.elastic=true`` with torchrun, one machine): see :func:`run_elastic_group`.

This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from distgrow.config import Config, ConfigError, load_config
from distgrow.exits import (
    EXIT_FAILURE,
    EXIT_NEED_WORKERS,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_USAGE,
)
from distgrow.planner import Plan, make_plan
from distgrow.rundir import RESIZE_FILE
from distgrow.runtime import RuntimeEnvError, cpu_cores, expand_nodelist
from distgrow.runtime import redact as runtime_redact
from distgrow.signals import exit_status, signal_from_status, signal_name

# What the controller exits with when a signal stopped the run: the shell's 128 + signal number,
# so `sbatch`, CI and shells read it as "stopped by SIGTERM/SIGINT". SIGUSR1 is SLURM's
# pre-emption warning (`--signal=B:USR1@120`): 138 tells the batch script to requeue the job.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

LauncherName = Literal["none", "torchrun", "deepspeed", "horovodrun", "mpirun", "srun"]

REDACTED = "***"  # what the controller shows for a credential's value


class LaunchError(ValueError):
    """A launch that cannot work as configured; the message names the value and the fix."""


# --------------------------------------------------------------------------------------------
# What to launch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a launcher command depends on; the builders turn it into ``(argv, env)``.

    Attributes:
        workers: Data-parallel workers (processes) in the whole job.
        config: The YAML config every worker loads.
        overrides: Dotted ``key=value`` overrides passed to every worker, in order.
        resume: Append ``run.resume=true``: continue from the newest checkpoint.
        python: The interpreter that runs the workers (and the Python launchers, so the
            launcher and the workers come from the same environment).
        nodes: Machines the workers are spread over.
        node_rank: This machine's index (torchrun without elastic rendezvous: one command per
            node).
        master_addr: Rendezvous host (rank 0's machine).
        master_port: Rendezvous port.
        hosts: Host names of the nodes (e.g. from ``SLURM_JOB_NODELIST``); used by horovodrun
            and mpirun when no hostfile is given.
        hostfile: A hostfile for deepspeed, horovodrun and mpirun (multi-node).
        elastic: torchrun's c10d rendezvous with ``--nnodes=MIN:MAX``; Horovod Elastic.
        min_workers: Elastic: fewest workers the job may shrink to (default ``workers``).
        max_workers: Elastic: most workers the job may grow to (default ``workers``).
        max_restarts: Restarts the launcher itself does (torchrun); the controller keeps its own
            count and sets 0 here, so a worker that asks for more workers is not restarted as it
            was.
        host_discovery_script: Horovod Elastic: an executable printing ``host:slots`` lines.
        horovod_transport: horovodrun's controller: ``gloo`` or ``mpi``.
        srun_mpi: Add ``--mpi=pmix`` to srun (Horovod over MPI needs PMIx; Debian's Open MPI has
            no PMI-2).
        run_as_root: Add Open MPI's ``--allow-run-as-root`` (it refuses root otherwise).
        forward_env: Variable names mpirun must forward to remote ranks (``-x NAME``).
        extra: Further launcher arguments, placed just before the worker command.
        rdzv_id: Elastic torchrun: the rendezvous id every agent of one job shares.
        rdzv_last_call_s: Elastic torchrun: once the fewest agents have joined, how long the
            rendezvous waits for more (torchrun's default, 30 s, when None).
    """

    workers: int
    config: str
    overrides: tuple[str, ...] = ()
    resume: bool = False
    python: str = sys.executable
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    hosts: tuple[str, ...] = ()
    hostfile: str | None = None
    elastic: bool = False
    min_workers: int | None = None
    max_workers: int | None = None
    max_restarts: int = 0
    host_discovery_script: str | None = None
    horovod_transport: Literal["gloo", "mpi"] = "gloo"
    srun_mpi: bool = False
    run_as_root: bool = False
    forward_env: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    rdzv_id: str = "distgrow"
    rdzv_last_call_s: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise LaunchError(f"workers = {self.workers}: a launch needs at least 1 worker.")
        if self.nodes < 1:
            raise LaunchError(f"launch.nodes = {self.nodes}: must be at least 1. Fix: e.g. 1.")
        if not 0 <= self.node_rank < self.nodes:
            raise LaunchError(
                f"node rank {self.node_rank} is outside [0, {self.nodes}) for {self.nodes} "
                "node(s). Fix: check SLURM_NODEID or launch.nodes."
            )
        lo, hi = self.elastic_range
        if not 1 <= lo <= self.workers <= hi:
            raise LaunchError(
                f"elastic range {lo}:{hi} must contain the {self.workers} workers launched, with "
                f"1 <= min. Fix: use min_workers <= {self.workers} <= max_workers."
            )

    @property
    def elastic_range(self) -> tuple[int, int]:
        """(fewest, most) workers an elastic job may have."""
        return (self.min_workers or self.workers, self.max_workers or self.workers)

    @property
    def workers_per_node(self) -> int:
        """Workers on each node; the node-level launchers need the same number on every node.

        Raises:
            LaunchError: ``workers`` is not a multiple of ``nodes``.
        """
        if self.workers % self.nodes:
            below = self.workers // self.nodes * self.nodes
            raise LaunchError(
                f"{self.workers} workers cannot be spread evenly over launch.nodes="
                f"{self.nodes} (torchrun and deepspeed start the same number on every node). "
                f"Fix: set growth.max_workers to a multiple of {self.nodes} (e.g. "
                f"{max(below, self.nodes)}), or launch with srun or mpirun, which place any "
                "number of workers."
            )
        return self.workers // self.nodes


def worker_command(spec: LaunchSpec) -> list[str]:
    """``[-m, distgrow, train, CONFIG, *overrides]``: what each worker runs after the interpreter.

    ``run.resume=true`` goes last so that it wins over an earlier ``run.resume`` override.
    """
    command = ["-m", "distgrow", "train", spec.config, *spec.overrides]
    if spec.resume:
        command.append("run.resume=true")
    return command


def build_none(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """One worker, started directly: ``python -m distgrow train ...``.

    Raises:
        LaunchError: more than one worker (no launcher, no ranks).
    """
    if spec.workers != 1 or spec.nodes != 1:
        raise LaunchError(
            f"launch.launcher=none runs a single worker, but {spec.workers} worker(s) on "
            f"{spec.nodes} node(s) were asked for. Fix: set launch.launcher=torchrun (or auto), "
            "or growth.max_workers=1."
        )
    return [spec.python, *worker_command(spec)], {}


def build_torchrun(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """torchrun (as ``python -m torch.distributed.run``, the same interpreter as the workers).

    Static: ``--nnodes=N --node_rank=R --master_addr --master_port``, one command per node.
    Elastic: ``--nnodes=MIN:MAX --rdzv_backend=c10d --rdzv_endpoint=ADDR:PORT``; nodes may
    join and leave, and every membership change restarts all workers.
    """
    per_node = spec.workers_per_node
    argv = [spec.python, "-m", "torch.distributed.run", f"--nproc_per_node={per_node}"]
    env = {
        # torchrun forwards only TERM/INT/HUP/QUIT by default: a SLURM pre-emption warning
        # (USR1) would kill torchrun and never reach the workers. This is --signals_to_handle,
        # set through its PET_ variable: older torch versions lack the flag and ignore it.
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    }
    if spec.elastic:
        lo, hi = spec.elastic_range
        min_nodes, max_nodes = max(1, lo // per_node), max(1, math.ceil(hi / per_node))
        argv += [
            f"--nnodes={min_nodes}:{max_nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={spec.master_addr}:{spec.master_port}",
            f"--rdzv_id={spec.rdzv_id}",
        ]
        if spec.rdzv_last_call_s is not None:
            argv.append(f"--rdzv_conf=last_call_timeout={spec.rdzv_last_call_s}")
    else:
        argv += [
            f"--nnodes={spec.nodes}",
            f"--node_rank={spec.node_rank}",
            f"--master_addr={spec.master_addr}",
            f"--master_port={spec.master_port}",
        ]
    if spec.elastic or spec.max_restarts:
        # Measured with torch 2.13: restarts and membership changes hang, or fail with "Gloo
        # connectFullMesh failed", when the workers share the agent's TCP store.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    argv += [f"--max_restarts={spec.max_restarts}", *spec.extra, *worker_command(spec)]
    return argv, env


def build_deepspeed(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """The deepspeed launcher (``python -m deepspeed.launcher.runner``).

    One node: ``--num_gpus N`` starts N processes (on CPU too; without it deepspeed starts
    one). Several nodes: ``--hostfile`` (pdsh over ssh) with ``--num_nodes`` and
    ``--master_addr``. ``--no_local_rank`` because the workers read ``LOCAL_RANK`` from the
    environment and ``distgrow train`` takes no ``--local_rank`` flag.

    Raises:
        LaunchError: several nodes without a hostfile.
    """
    per_node = spec.workers_per_node
    argv = [spec.python, "-m", "deepspeed.launcher.runner"]
    if spec.nodes > 1:
        if not spec.hostfile:
            raise LaunchError(
                f"deepspeed on launch.nodes={spec.nodes} needs a hostfile ('host slots=N' "
                "lines). Fix: set launch.hostfile=PATH, or use launch.launcher=srun in SLURM."
            )
        argv += ["--hostfile", spec.hostfile, f"--num_nodes={spec.nodes}"]
    argv += [
        f"--num_gpus={per_node}",
        f"--master_addr={spec.master_addr}",
        f"--master_port={spec.master_port}",
        "--no_local_rank",
        *spec.extra,
        "--module",
        *worker_command(spec)[1:],  # --module takes the module name without the "-m"
    ]
    return argv, {}


def build_horovodrun(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """horovodrun (``python -m horovod.runner.launch``), over Gloo or MPI.

    Hosts come from the hostfile, else ``-H host:slots,...`` (``localhost:N`` on one node).
    Elastic: ``--min-np/--max-np --host-discovery-script``. On one host the job binds to the
    loopback interface: Horovod Elastic hangs silently otherwise (measured).

    Raises:
        LaunchError: elastic without a host discovery script.
    """
    argv = [spec.python, "-m", "horovod.runner.launch", "-np", str(spec.workers)]
    argv.append("--gloo" if spec.horovod_transport == "gloo" else "--mpi")
    if spec.elastic:
        if not spec.host_discovery_script:
            raise LaunchError(
                "Horovod Elastic needs a host discovery script (prints 'host:slots' lines). "
                "Fix: give host_discovery_script, or set launch.elastic=false."
            )
        lo, hi = spec.elastic_range
        argv += [
            "--min-np",
            str(lo),
            "--max-np",
            str(hi),
            "--host-discovery-script",
            spec.host_discovery_script,
        ]
    elif spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    else:
        argv += ["-H", _host_slots(spec)]
    if spec.nodes == 1:
        argv += ["--network-interface", "lo"]
    return [*argv, *spec.extra, spec.python, *worker_command(spec)], {}


def build_mpirun(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """Open MPI's mpirun; each rank reads ``OMPI_COMM_WORLD_*`` and the forwarded rendezvous.

    ``--bind-to none``: Open MPI pins each rank to one core by default (for up to 2 ranks),
    which would squeeze torch's intra-op threads onto that core. ``MASTER_ADDR`` and
    ``MASTER_PORT`` are set for ``torch.distributed`` and forwarded with ``-x`` (Open MPI passes
    no variables to remote nodes unless told to).
    """
    argv = ["mpirun", "-np", str(spec.workers), "--bind-to", "none"]
    if spec.run_as_root:
        # Open MPI refuses to start as root without this; --oversubscribe lets more ranks than
        # detected cores start (a CPU test box, or ranks that mostly wait on a GPU).
        argv += ["--allow-run-as-root", "--oversubscribe"]
    if spec.hostfile:
        argv += ["--hostfile", spec.hostfile]
    elif spec.nodes > 1 or spec.hosts:
        argv += ["--host", _host_slots(spec)]
    if spec.nodes > 1:
        argv += ["--map-by", f"ppr:{math.ceil(spec.workers / spec.nodes)}:node"]
    env = {"MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)}
    for name in dict.fromkeys([*env, *spec.forward_env]):
        argv += ["-x", name]
    return [*argv, *spec.extra, spec.python, *worker_command(spec)], env


def build_srun(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """A job step inside a SLURM allocation; each rank reads ``SLURM_PROCID`` and friends.

    ``--kill-on-bad-exit=1`` ends the step when one rank fails instead of leaving the others
    waiting in a collective. ``--nodes`` uses no more nodes than there are workers.
    """
    argv = [
        "srun",
        f"--ntasks={spec.workers}",
        f"--nodes={min(spec.nodes, spec.workers)}",
        "--kill-on-bad-exit=1",
    ]
    if spec.srun_mpi:
        argv.append("--mpi=pmix")
    env = {"MASTER_ADDR": spec.master_addr, "MASTER_PORT": str(spec.master_port)}
    return [*argv, *spec.extra, spec.python, *worker_command(spec)], env


def _host_slots(spec: LaunchSpec) -> str:
    """``host:slots,...`` for horovodrun ``-H`` and mpirun ``--host``."""
    hosts = list(spec.hosts) or ["localhost"]
    if len(hosts) < spec.nodes:
        raise LaunchError(
            f"launch.nodes={spec.nodes} but only {len(hosts)} host name(s) are known "
            f"({', '.join(hosts)}). Fix: set launch.hostfile, or run inside a SLURM allocation."
        )
    per_node = math.ceil(spec.workers / spec.nodes)
    return ",".join(f"{host}:{per_node}" for host in hosts[: spec.nodes])


BUILDERS: dict[str, Callable[[LaunchSpec], tuple[list[str], dict[str, str]]]] = {
    "none": build_none,
    "torchrun": build_torchrun,
    "deepspeed": build_deepspeed,
    "horovodrun": build_horovodrun,
    "mpirun": build_mpirun,
    "srun": build_srun,
}


def build_command(launcher: str, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """The ``(argv, env additions)`` of ``launcher`` for ``spec``.

    Raises:
        LaunchError: an unknown launcher, or a spec that launcher cannot run.
    """
    try:
        builder = BUILDERS[launcher]
    except KeyError:
        raise LaunchError(
            f"launch.launcher = {launcher!r} is not a launcher. Fix: use one of "
            f"{', '.join(BUILDERS)} or auto."
        ) from None
    return builder(spec)


# --------------------------------------------------------------------------------------------
# What the environment allows
# --------------------------------------------------------------------------------------------


def in_slurm_allocation(env: Mapping[str, str]) -> bool:
    """True inside ``sbatch``/``salloc`` (a job id is set)."""
    return bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"))


def detect_launcher(env: Mapping[str, str], backend: str = "torch") -> LauncherName:
    """The launcher for ``launch.launcher=auto``.

    Inside a SLURM allocation, ``srun`` (job steps use the allocation's nodes and tasks); under
    Open MPI (``OMPI_*`` variables), ``mpirun``; otherwise ``torchrun``, or ``horovodrun`` for
    the Horovod backend, which cannot start from torchrun's variables.
    """
    if in_slurm_allocation(env):
        return "srun"
    if any(name.startswith("OMPI_") for name in env):
        return "mpirun"
    return "horovodrun" if backend == "horovod" else "torchrun"


def _leading_int(text: str | None) -> int | None:
    """``4`` from ``"4"``, ``"4(x2)"`` or ``"gpu:4"``/``"a100:4"`` (GPU counts come in all
    of these forms); None when there is no number."""
    if not text:
        return None
    match = re.search(r"(\d+)(?:\(x\d+\))?\s*$", text.split(",")[0])
    return int(match.group(1)) if match else None


def count_cuda_visible_devices(env: Mapping[str, str]) -> int | None:
    """Devices listed in ``CUDA_VISIBLE_DEVICES``: None when unset, 0 when empty or ``-1``."""
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    items = [item.strip() for item in raw.split(",") if item.strip()]
    if not items or items[0] in ("-1", "NoDevFiles"):
        return 0
    return len(items)


def local_gpu_count(dev: Path = Path("/dev")) -> int:
    """NVIDIA GPUs on this machine, from ``/dev/nvidiaN`` (no CUDA or torch import needed)."""
    return sum(1 for p in dev.glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name))


def worker_limit(
    env: Mapping[str, str], cfg: Config, gpus_on_node: int | None = None
) -> tuple[int, str]:
    """The most workers this job may start, and where that number comes from.

    In order: SLURM's ``SLURM_NTASKS``; else its nodes × GPUs per node
    (``SLURM_GPUS_ON_NODE``/``SLURM_GPUS_PER_NODE``); else, training on GPUs, the visible
    GPUs (``CUDA_VISIBLE_DEVICES`` or ``gpus_on_node``) × ``launch.nodes``. The result is the
    smaller of that and ``growth.max_workers``; with nothing in the environment, the config's.
    ``run.device=cpu`` ignores GPUs (CPU workers are processes, limited by the config only).

    Args:
        env: The environment (``os.environ`` or a dict in tests).
        cfg: The run's config.
        gpus_on_node: GPUs found on this machine when the environment lists none
            (:func:`local_gpu_count`).

    Returns:
        ``(workers, reason)``, e.g. ``(4, "SLURM_NTASKS=4")``.
    """
    config_limit = cfg.growth.max_workers
    env_limit: int | None = None
    reason = ""
    use_gpus = cfg.run.device != "cpu"
    if in_slurm_allocation(env):
        ntasks = _leading_int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"))
        nodes = _leading_int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or 1
        gpus = _leading_int(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE"))
        if ntasks:
            env_limit, reason = ntasks, f"SLURM_NTASKS={ntasks}"
        elif gpus and use_gpus:
            env_limit = nodes * gpus
            reason = f"SLURM_JOB_NUM_NODES={nodes} × {gpus} GPU(s) per node"
    if env_limit is None and use_gpus:
        visible = count_cuda_visible_devices(env)
        if visible is None:
            visible = gpus_on_node
        if visible:
            env_limit = visible * cfg.launch.nodes
            source = "CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in env else "/dev/nvidia*"
            reason = f"{visible} visible GPU(s) ({source}) × launch.nodes={cfg.launch.nodes}"
    if env_limit is None:
        return config_limit, f"growth.max_workers={config_limit}"
    if env_limit >= config_limit:
        return config_limit, f"growth.max_workers={config_limit} ({reason} allows {env_limit})"
    return env_limit, f"{reason} (growth.max_workers={config_limit})"


def max_workers_from_env(
    env: Mapping[str, str], cfg: Config, gpus_on_node: int | None = None
) -> int:
    """The most workers this job may start: see :func:`worker_limit`."""
    return worker_limit(env, cfg, gpus_on_node)[0]


def slurm_hostnames(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """Expand a SLURM node list (``node[01-04,07]``, ``a,b``) into host names.

    ``scontrol show hostnames`` is SLURM's own answer and is used when it is installed; the
    parser in ``distgrow.runtime`` covers machines without it (and gives the same names).

    Raises:
        LaunchError: a node list neither can read.
    """
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass  # no controller reachable, or an old scontrol: the parser below knows the format
    try:
        return expand_nodelist(nodelist)
    except RuntimeEnvError as err:
        raise LaunchError(str(err)) from None


@dataclass(frozen=True)
class Rendezvous:
    """Where the job meets: rank 0's host and port, this node's rank, the job's hosts."""

    master_addr: str
    master_port: int
    node_rank: int
    nodes: int
    hosts: tuple[str, ...]


def rendezvous_from_env(
    env: Mapping[str, str], cfg: Config, use_scontrol: bool = True
) -> Rendezvous:
    """The rendezvous: from SLURM inside an allocation, else from ``launch.*``.

    Inside SLURM the master is the first host of ``SLURM_JOB_NODELIST``, the node rank is
    ``SLURM_NODEID``, the nodes are ``SLURM_JOB_NUM_NODES``, and the port is
    ``launch.master_port + SLURM_JOB_ID mod 1000``, so that jobs sharing a node do not clash.
    """
    launch = cfg.launch
    if not in_slurm_allocation(env):
        return Rendezvous(launch.master_addr, launch.master_port, 0, launch.nodes, ())
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    hosts = tuple(slurm_hostnames(nodelist, use_scontrol)) if nodelist else ()
    job_id = _leading_int(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")) or 0
    port = launch.master_port + job_id % 1000
    if port > 65535:
        port = launch.master_port - job_id % 1000
    nodes = _leading_int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"))
    return Rendezvous(
        master_addr=hosts[0] if hosts else launch.master_addr,
        master_port=port,
        node_rank=_leading_int(env.get("SLURM_NODEID")) or 0,
        nodes=nodes or len(hosts) or launch.nodes,
        hosts=hosts,
    )


# --------------------------------------------------------------------------------------------
# Logging the environment
# --------------------------------------------------------------------------------------------


def redact(name: str, value: str) -> str:
    """``value``, or ``***`` when ``name`` looks like a credential (:func:`runtime.is_secret`)."""
    return runtime_redact(name, value, REDACTED)


def describe_env_changes(additions: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """One line per variable that ``additions`` sets or overrides in ``current``; redacted."""
    lines = []
    for name, value in additions.items():
        old = current.get(name)
        if old is None:
            lines.append(f"set {name}={redact(name, value)}")
        elif old != value:
            lines.append(f"override {name}: {redact(name, old)} -> {redact(name, value)}")
        else:
            lines.append(f"keep {name}={redact(name, value)} (already set)")
    return lines


def _log_command(
    log: Callable[[str], None],
    argv: Sequence[str],
    additions: Mapping[str, str],
    env: Mapping[str, str],
) -> None:
    """Log the environment a launch changes (redacted) and its command line."""
    for line in describe_env_changes(additions, env):
        log(f"  env: {line}")
    log(f"  $ {format_command(argv)}")


def format_command(argv: Iterable[str]) -> str:
    """A copy-pasteable command line for logs (never executed through a shell)."""
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------
# Running one launch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How one launch ended.

    Attributes:
        returncode: The launcher's exit status (128 + N when signal N killed it).
        signal: A signal the controller received and forwarded while it ran, if any.
    """

    returncode: int
    signal: int | None = None


Executor = Callable[[list[str], dict[str, str], Path], Outcome]
"""Runs ``argv`` with ``os.environ`` plus the env additions, writing its output to the log
path; returns the :class:`Outcome`. Tests pass a fake one to check the controller's decisions."""


def run_subprocess(argv: list[str], env_additions: dict[str, str], log_path: Path) -> Outcome:
    """The real executor: run the launcher, tee its output to the terminal and ``log_path``.

    The launcher runs in its own session (process group), so a Ctrl-C in the terminal reaches
    only the controller, which forwards it once to the whole group: the workers then checkpoint
    and exit. SIGINT is forwarded as SIGTERM, which every launcher relays to its workers (srun
    answers a lone SIGINT with a status report). SIGTERM and SIGUSR1 (SLURM's time-limit and
    pre-emption warnings) are forwarded as they are; a second Ctrl-C kills the group.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **env_additions}
    received: list[int] = []
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def forward(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            to_send: int = signal.SIGTERM if signum == signal.SIGINT else signum
            if received.count(signal.SIGINT) > 1:
                to_send = int(signal.SIGKILL)  # Ctrl-C twice: the user wants out now
            with contextlib.suppress(ProcessLookupError):  # already gone: nothing to stop
                os.killpg(proc.pid, to_send)

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED_SIGNALS:
                previous[sig] = signal.signal(sig, forward)
        reader = threading.Thread(target=_tee, args=(proc, log), daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        # A worker that outlives its launcher keeps the pipe open: do not wait on it forever.
        reader.join(timeout=10)
    if code < 0:
        code = exit_status(-code)  # as a shell reports a process killed by a signal
    return Outcome(code, received[0] if received else None)


def _tee(proc: subprocess.Popen[bytes], log: Any) -> None:
    stream = typing.cast(io.BufferedReader, proc.stdout)
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    # read1 returns what is there now, so progress lines show up as they are printed.
    while chunk := stream.read1(65536):
        log.write(chunk)
        log.flush()
        if out is not None:
            out.write(chunk)
            out.flush()
        else:  # a replaced sys.stdout (pytest's capture, a notebook) takes text
            sys.stdout.write(chunk.decode(errors="replace"))


_TORCHRUN_FAILURE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_TORCHRUN_SIGNALLED = re.compile(r"SignalException: Process \d+ got signal: (\d+)")


def torchrun_root_cause(log_text: str) -> int | None:
    """The worker exit status in torchrun's failure report ("Root Cause ... exitcode : N").

    torchrun exits 1 whatever its workers' statuses were; its report is the only place the
    worker's own status (65, 2, a crash) survives.
    """
    _, found, after = log_text.rpartition("Root Cause")
    if not found:
        return None
    match = _TORCHRUN_FAILURE.search(after)
    return int(match.group(1)) if match else None


def torchrun_stop_signal_status(log_text: str) -> int | None:
    """``128 + N`` when torchrun itself ended on stop signal N ("SignalException ... got signal").

    torchrun forwards the signal to its workers (which checkpoint and exit) and then exits 1
    with that exception: the run was stopped, it did not crash.
    """
    found = _TORCHRUN_SIGNALLED.findall(log_text)
    if not found:
        return None
    signum = int(found[-1])
    return exit_status(signum) if signal_from_status(exit_status(signum)) else None


# --------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """A stretch of the plan with one worker count: one launch."""

    workers: int
    start_epoch: float
    end_epoch: float
    first_phase: int


def plan_spans(plan: Plan) -> list[Span]:
    """Consecutive phases with the same worker count, merged; each span is one launch."""
    spans: list[Span] = []
    for index, phase in enumerate(plan.phases):
        if spans and spans[-1].workers == phase.workers:
            spans[-1] = replace(spans[-1], end_epoch=phase.end_epoch)
        else:
            spans.append(Span(phase.workers, phase.start_epoch, phase.end_epoch, index))
    return spans


@dataclass
class Attempt:
    """One launch and how it ended (the controller's history, for its report)."""

    number: int
    workers: int
    returncode: int
    worker_code: int
    log: Path
    seconds: float


@dataclass
class _Context:
    """What every launch of one run shares."""

    cfg: Config
    config_path: str
    overrides: tuple[str, ...]
    launcher: LauncherName
    limit: int
    limit_reason: str
    rendezvous: Rendezvous
    run_dir: Path
    python: str
    log: Callable[[str], None]
    history: list[Attempt] = field(default_factory=list)
    gpu_ids: tuple[str, ...] = ()
    """Elastic: the GPUs to hand out, one per torchrun agent (empty on the CPU)."""

    @property
    def elastic_agents(self) -> bool:
        """True when the controller grows the job by adding torchrun agents (one worker each)."""
        return self.cfg.launch.elastic and self.launcher == "torchrun"

    def agent_spec(self, rdzv_id: str) -> LaunchSpec:
        """One elastic torchrun agent on this machine: 1 worker, ``--nnodes=1:limit``.

        Its worker always resumes (``run.resume=true``): torchrun restarts it at every
        membership change, and a restarted worker must continue from the checkpoint.
        """
        return LaunchSpec(
            workers=1,
            config=self.config_path,
            overrides=self.overrides,
            resume=True,
            python=self.python,
            master_addr=self.rendezvous.master_addr,
            master_port=self.rendezvous.master_port,
            elastic=True,
            min_workers=1,
            max_workers=self.limit,
            rdzv_id=rdzv_id,
            rdzv_last_call_s=ELASTIC_LAST_CALL_S,
            # An agent that notices a membership change after its peers sees its worker stop
            # (the ranks agree on stopping) as a failure: allow one restart per possible
            # growth on top of the crash restarts.
            max_restarts=self.cfg.launch.max_restarts + self.limit - 1,
        )

    def agent_env(self, index: int) -> dict[str, str]:
        """Agent ``index``'s own GPU: each agent's single worker has local rank 0."""
        if not self.gpu_ids:
            return {}
        return {"CUDA_VISIBLE_DEVICES": self.gpu_ids[index % len(self.gpu_ids)]}

    def spec(self, workers: int, resume: bool) -> LaunchSpec:
        launch, rdzv = self.cfg.launch, self.rendezvous
        nodes = rdzv.nodes if self.launcher != "none" else 1
        if self.launcher in ("srun", "mpirun", "horovodrun") and nodes > 1:
            # These place any number of workers: use as few nodes as hold them.
            per_node = max(1, math.ceil(self.limit / nodes))
            nodes = min(nodes, math.ceil(workers / per_node))
        discovery = None
        if launch.elastic and self.launcher == "horovodrun":
            discovery = str(self.run_dir / "launch" / "discover_hosts.sh")
        return LaunchSpec(
            workers=workers,
            config=self.config_path,
            overrides=self.overrides,
            resume=resume,
            python=self.python,
            nodes=nodes,
            node_rank=rdzv.node_rank if self.launcher == "torchrun" else 0,
            master_addr=rdzv.master_addr,
            master_port=rdzv.master_port,
            hosts=rdzv.hosts,
            hostfile=launch.hostfile,
            elastic=launch.elastic and self.launcher in ("torchrun", "horovodrun"),
            min_workers=1 if launch.elastic else None,
            max_workers=max(self.limit, workers) if launch.elastic else None,
            host_discovery_script=discovery,
            srun_mpi=self.launcher == "srun" and self.cfg.backend.name == "horovod",
            run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
        )


def _read_resize(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RESIZE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _set_aside(run_dir: Path, name: str) -> Path | None:
    """Move ``resize.json`` into ``launch/`` so that the next launch starts without it."""
    path = run_dir / RESIZE_FILE
    if not path.exists():
        return None
    target = run_dir / "launch" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, target)
    return target


def _last_record(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The newest record of ``metrics.jsonl`` that has ``key`` (read from the file's end)."""
    for line in reversed(_log_tail(run_dir / "metrics.jsonl").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a cut first line, or one being written
            continue
        if isinstance(record, dict) and key in record:
            return record
    return None


def recorded_stop_signal(run_dir: Path, since: float) -> int | None:
    """The signal of a clean stop that rank 0 recorded (``stopped`` event) after ``since``.

    The newest record of the run must be that event, written at or after ``since`` (a Unix
    time: the launch's start), so an older stop is never taken for this launch's.
    """
    record = _last_record(run_dir, "kind")
    if record is None or record.get("event") != "stopped":
        return None
    if float(record.get("time", 0.0)) < since:
        return None
    return signal_from_status(int(record.get("exit_code", 0)))


def last_width(run_dir: Path) -> int | None:
    """The worker count of the run's newest metrics record (``workers``), if any.

    Read from the end of ``metrics.jsonl`` (its last 64 KiB), so a long run costs nothing.
    """
    record = _last_record(run_dir, "workers")
    return int(record["workers"]) if record and isinstance(record["workers"], int) else None


def _log_tail(path: Path, size: int = 65536) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _worker_code(ctx: _Context, outcome: Outcome, log_path: Path) -> int:
    """The workers' own exit status: the launcher's, or torchrun's root cause behind its 1.

    When torchrun itself was stopped by a signal (it forwards it to the workers, which
    checkpoint, then it exits 1 with a ``SignalException``), the status is ``128 + signal``.
    """
    if ctx.launcher == "torchrun":
        return _torchrun_status(outcome.returncode, log_path)[0]
    return outcome.returncode


def _torchrun_status(raw: int, log_path: Path) -> tuple[int, int | None]:
    """(The workers' status, torchrun's root cause) behind torchrun's exit status ``raw``.

    torchrun exits 1 whatever its workers did; its log names the failed worker's status (the
    root cause), or says torchrun was stopped by a signal (``128 + signal``).
    """
    if raw != EXIT_FAILURE:
        return raw, None
    tail = _log_tail(log_path)
    cause = torchrun_root_cause(tail)
    if cause is not None:
        return cause, cause
    return torchrun_stop_signal_status(tail) or raw, None


def _report(ctx: _Context, headline: str, fix: str) -> None:
    ctx.log(headline)
    for a in ctx.history:
        ctx.log(
            f"  attempt {a.number}: {a.workers} worker(s), exit {a.returncode}"
            + (f" (worker exit {a.worker_code})" if a.worker_code != a.returncode else "")
            + f", {a.seconds:.1f} s, log {a.log}"
        )
    ctx.log(f"  fix: {fix}")


def _prepare(
    cfg_path: str,
    overrides: list[str],
    cfg: Config,
    env: Mapping[str, str],
    log: Callable[[str], None],
    python: str,
    gpus_on_node: int | None,
) -> tuple[_Context, Plan]:
    """Pick the launcher, the worker limit and the rendezvous; plan within the limit."""
    launch = cfg.launch
    launcher: LauncherName = (
        detect_launcher(env, cfg.backend.name) if launch.launcher == "auto" else launch.launcher
    )
    if cfg.backend.name == "horovod" and launcher in ("torchrun", "deepspeed"):
        raise LaunchError(
            f"backend.name=horovod cannot start under launch.launcher={launcher}: Horovod needs "
            "horovodrun's Gloo rendezvous or MPI. Fix: set launch.launcher=horovodrun (or "
            "mpirun, or srun in SLURM)."
        )
    if launcher == "none":
        limit, reason = 1, "launch.launcher=none (one process)"
    else:
        limit, reason = worker_limit(env, cfg, gpus_on_node)
    overrides = list(overrides)
    if limit < cfg.growth.max_workers:
        # Plan within what the job has: the batch still grows (through accumulation), and the
        # workers plan the same way, so none asks for workers that cannot come.
        overrides.append(f"growth.max_workers={limit}")
        log(f"growth.max_workers {cfg.growth.max_workers} -> {limit}: {reason}")
        cfg = load_config(cfg_path, overrides)
    rdzv = rendezvous_from_env(env, cfg)
    gpu_ids: tuple[str, ...] = ()
    if cfg.launch.elastic and launcher not in ("torchrun", "horovodrun"):
        log(
            f"launch.elastic=true: {launcher} cannot add workers to a running job; the "
            "controller grows it by relaunching"
        )
    if cfg.launch.elastic and launcher == "torchrun":
        if rdzv.nodes > 1:
            raise LaunchError(
                f"launch.elastic=true grows a torchrun job by starting agents on this machine, "
                f"but the job spans {rdzv.nodes} nodes. Fix: set launch.elastic=false (the "
                "controller relaunches wider, on every node), or launch on one node."
            )
        if cfg.run.threads is None:
            # Each agent runs one worker that believes it is alone on the machine.
            cores = cpu_cores()
            overrides.append(f"run.threads={max(1, cores // limit)}")
            log(
                f"run.threads -> {max(1, cores // limit)}: {cores} core(s) shared by up to "
                f"{limit} elastic worker(s)"
            )
            cfg = load_config(cfg_path, overrides)
        if cfg.run.device != "cpu":
            gpu_ids = _visible_gpu_ids(env, gpus_on_node)
    plan = make_plan(cfg, cfg.data.expected_train_size())
    ctx = _Context(
        cfg=cfg,
        config_path=os.path.abspath(cfg_path),  # remote nodes start in other directories
        overrides=tuple(overrides),
        launcher=launcher,
        limit=limit,
        limit_reason=reason,
        rendezvous=rdzv,
        run_dir=Path(cfg.run.resolved_output_dir).resolve(),
        python=python,
        log=log,
        gpu_ids=gpu_ids,
    )
    return ctx, plan


def _visible_gpu_ids(env: Mapping[str, str], gpus_on_node: int | None) -> tuple[str, ...]:
    """The GPU ids to hand out: ``CUDA_VISIBLE_DEVICES``'s, else ``0..gpus_on_node-1``."""
    visible = count_cuda_visible_devices(env)
    if visible is not None:
        raw = env.get("CUDA_VISIBLE_DEVICES", "")
        return tuple(i.strip() for i in raw.split(",") if i.strip())[:visible]
    return tuple(str(i) for i in range(gpus_on_node or 0))


def _holds_a_run(run_dir: Path) -> bool:
    """True when ``run_dir`` already has a checkpoint, metrics or a summary."""
    return any(run_dir.glob("ckpt-*.pt")) or any(
        (run_dir / name).exists() for name in ("metrics.jsonl", "summary.json")
    )


def _dry_run(ctx: _Context, plan: Plan, env: Mapping[str, str]) -> int:
    spans = plan_spans(plan)
    ctx.log(
        f"dry run: launcher {ctx.launcher}, worker limit {ctx.limit} ({ctx.limit_reason}), "
        f"{1 if ctx.elastic_agents else len(spans)} launch(es); run dir {ctx.run_dir}"
    )
    if ctx.elastic_agents:
        argv, additions = build_command("torchrun", ctx.agent_spec(_rdzv_id(ctx, 1)))
        counts = " -> ".join(str(span.workers) for span in spans)
        ctx.log(
            f"elastic: one torchrun agent (1 worker) per worker, {counts} agent(s); an agent is "
            "added when the workers ask for more (resize.json), and torchrun restarts all workers "
            "at the new size. Each agent runs:"
        )
        _log_command(ctx.log, argv, additions, env)
        return EXIT_OK
    for number, span in enumerate(spans, start=1):
        where = (
            f"rung {plan.phases[span.first_phase].rung}+ (when the plateaus come)"
            if plan.ladder
            else f"epochs {span.start_epoch:g}-{span.end_epoch:g}"
        )
        resume = number > 1 or ctx.cfg.run.resume
        argv, additions = build_command(ctx.launcher, ctx.spec(span.workers, resume))
        ctx.log(f"launch {number}: {span.workers} worker(s), {where}")
        _log_command(ctx.log, argv, additions, env)
    return EXIT_OK


ELASTIC_LAST_CALL_S = 1
"""Elastic: once one agent has joined a rendezvous round, how long it waits for more (s).

Every growth pays it once (torchrun's default, 30 s, would dominate). Agents started together
that join further apart make one round more: a restart more, the same result (measured: 2 s
cost 1 s more per growth than 1 s, docs/launch.md)."""

ELASTIC_GRACE_S = 30.0
"""Elastic: how long agents may outlive the first agent that ended, before they are stopped."""


def _rdzv_id(ctx: _Context, number: int) -> str:
    """A rendezvous id of its own for each elastic launch (a restart starts a fresh one)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", ctx.cfg.run.name)[:40]
    return f"distgrow-{name}-{os.getpid()}-{number}"


@dataclass
class _Agent:
    """One elastic torchrun agent and where its output goes."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    log: Any
    reader: threading.Thread


def run_elastic_group(
    ctx: _Context, workers: int, number: int, env: Mapping[str, str]
) -> tuple[Outcome, int, Path]:
    """One elastic launch: torchrun agents on this machine that grow the job in place.

    torchrun cannot change a running agent's ``--nproc_per_node``, but agents that join the
    same c10d rendezvous (``--nnodes=1:LIMIT``) make a *membership change*: torchrun stops all
    workers (SIGTERM: they checkpoint after the current update, see ``distgrow.signals``) and
    restarts them at the new world size, resuming from that checkpoint. So the controller
    starts ``workers`` agents of one worker each, and when rank 0 asks for more in an elastic
    ``resize.json`` (it goes on training the same global batch on the workers it has until they
    come, after ``launch.elastic_wait_s``), it starts the missing agents. Nothing is relaunched:
    the running agents, their rendezvous and their workers' training go on until the new
    agents have joined.

    Signals (SIGTERM, SIGINT, SIGUSR1) are forwarded to every agent, as :func:`run_subprocess`
    does for one launcher. Once an agent ends with 0 the run is complete; agents still waiting
    to join are stopped after :data:`ELASTIC_GRACE_S`. After a failure the other agents' workers
    lose their peers and end too (or are stopped after the same grace).

    Args:
        ctx: The controller's context (``ctx.elastic_agents`` is true).
        workers: Agents (= workers) to start with.
        number: The launch's number, for its logs (``attempt-NN-agent-K.log``).
        env: The environment the env additions are described against.

    Returns:
        ``(outcome, agents started, log of the agent whose status is reported)``; the outcome's
        return code is already the workers' status (torchrun's root cause behind its 1).
    """
    rdzv_id = _rdzv_id(ctx, number)
    argv, additions = build_command("torchrun", ctx.agent_spec(rdzv_id))
    log_dir = ctx.run_dir / "launch"
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx.log(
        f"launch {number}: elastic, {workers} torchrun agent(s) of 1 worker, rendezvous "
        f"{rdzv_id}; logs {log_dir}/attempt-{number:02d}-agent-*.log"
    )
    _log_command(ctx.log, argv, additions, env)
    agents: list[_Agent] = []
    received: list[int] = []

    def start(count: int) -> None:
        for _ in range(count):
            index = len(agents)
            path = log_dir / f"attempt-{number:02d}-agent-{index}.log"
            extra = ctx.agent_env(index)
            if extra:
                ctx.log(f"  agent {index}: " + ", ".join(describe_env_changes(extra, env)))
            log = open(path, "ab")  # noqa: SIM115 - closed below, after its reader
            proc = subprocess.Popen(
                argv,
                env={**os.environ, **additions, **extra},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            reader = threading.Thread(target=_tee, args=(proc, log), daemon=True)
            reader.start()
            agents.append(_Agent(proc, path, log, reader))

    def signal_all(signum: int) -> None:
        for agent in agents:
            if agent.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(agent.proc.pid, signum)

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        to_send: int = signal.SIGTERM if signum == signal.SIGINT else signum
        if received.count(signal.SIGINT) > 1:
            to_send = int(signal.SIGKILL)  # Ctrl-C twice: the user wants out now
        signal_all(to_send)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    ended_at: float | None = None
    stopping = 0  # 0: not yet; 1: SIGTERM sent to the agents left; 2: SIGKILL sent
    try:
        start(workers)
        while True:
            codes = [agent.proc.poll() for agent in agents]
            if all(code is not None for code in codes):
                break
            if ended_at is None and any(code is not None for code in codes):
                ended_at = time.monotonic()
            if ended_at is not None and time.monotonic() - ended_at > ELASTIC_GRACE_S * (
                stopping + 1
            ):
                stopping += 1
                ctx.log(
                    f"an agent ended {ELASTIC_GRACE_S * stopping:.0f} s ago; stopping the "
                    f"{sum(code is None for code in codes)} still running"
                )
                signal_all(signal.SIGTERM if stopping == 1 else signal.SIGKILL)
            resize = None if received or ended_at is not None else _read_resize(ctx.run_dir)
            if resize is not None and resize.get("elastic"):
                need = int(resize.get("need_workers", 0))
                _set_aside(ctx.run_dir, f"attempt-{number:02d}-ask-{need}.resize.json")
                if need > ctx.limit:
                    ctx.log(
                        f"the workers ask for {need} workers, above the limit of {ctx.limit} "
                        f"({ctx.limit_reason}): they go on with accumulation"
                    )
                elif need > len(agents):
                    ctx.log(
                        f"the workers ask for {need} workers (epoch {resize.get('epoch')}, "
                        f"step {resize.get('step')}): starting {need - len(agents)} more "
                        "torchrun agent(s)"
                    )
                    start(need - len(agents))
            time.sleep(0.1)
    finally:
        for number_, handler in previous.items():
            signal.signal(number_, handler)
        for agent in agents:
            agent.reader.join(timeout=10)
            agent.log.close()
    forwarded = received[0] if received else None
    if any(agent.proc.returncode == 0 for agent in agents):
        return Outcome(EXIT_OK, forwarded), len(agents), agents[0].log_path
    # The first agent whose workers failed on their own account (an agent we stopped reports
    # only the signal): torchrun's root cause, else the agent's status.
    reports = []
    for agent in agents:
        raw = agent.proc.returncode
        status, cause = _torchrun_status(exit_status(-raw) if raw < 0 else raw, agent.log_path)
        reports.append((status, cause, agent))
    chosen = next((r for r in reports if r[1] is not None), reports[0])
    return Outcome(chosen[0], forwarded), len(agents), chosen[2].log_path


def run_controller(
    cfg_path: str,
    overrides: list[str],
    cfg: Config,
    *,
    dry_run: bool = False,
    executor: Executor = run_subprocess,
    env: Mapping[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    python: str = sys.executable,
    gpus_on_node: int | None = None,
) -> int:
    """Run a config's growth plan to the end, relaunching wider whenever the workers ask.

    Decisions after each launch, by the workers' exit status:

    * 0: done.
    * 75 (or any failure after rank 0 wrote ``resize.json``): relaunch with ``need_workers``
      from ``resize.json`` and ``run.resume=true``; stop if that is above the worker limit.
    * 2 or 65: stop at once (a config problem or a non-finite loss; a retry cannot help).
    * anything else: a crash; relaunch from the newest checkpoint, at most
      ``launch.max_restarts`` times in the whole run, then stop with a report.
    * a SIGTERM/SIGINT/SIGUSR1 during a launch is forwarded to the workers (they checkpoint and
      exit); no relaunch, and the controller exits 128 + the signal's number.

    Args:
        cfg_path: The config file (passed on to every worker).
        overrides: The command line's overrides (passed on to every worker).
        cfg: The loaded config (``load_config(cfg_path, overrides)``).
        dry_run: Print each span's command and environment instead of launching.
        executor: Runs one launch (:func:`run_subprocess`; tests pass a fake).
        env: The environment to read (``os.environ`` by default).
        log: Receives the controller's lines (default: stderr, prefixed ``distgrow launch:``;
            a dry run prints to stdout).
        python: The workers' interpreter.
        gpus_on_node: GPUs on this machine (default: counted from ``/dev/nvidia*``).

    Returns:
        The exit status for the ``distgrow launch`` command.

    Raises:
        LaunchError: a launcher that cannot run this job (the message says how to fix it).
        ConfigError: an override the controller added does not validate (a bug if it happens).
    """
    env = os.environ if env is None else env
    # A dry run's commands are its output (stdout); a real run's lines are diagnostics (stderr).
    log = log or (print if dry_run else _log_stderr)
    if gpus_on_node is None:
        gpus_on_node = local_gpu_count()
    ctx, plan = _prepare(cfg_path, overrides, cfg, env, log, python, gpus_on_node)
    if dry_run:
        return _dry_run(ctx, plan, env)

    first = plan.phases[0].workers if plan.phases else 1
    workers, resume, restarts = min(first, ctx.limit), ctx.cfg.run.resume, 0
    last = last_width(ctx.run_dir) if resume else None
    if last is not None and min(last, ctx.limit) > workers:
        # A stopped (or requeued) run continues as wide as it was, not from the plan's start
        # (which would only exit 75 at once and cost a launch).
        workers = min(last, ctx.limit)
        log(f"resuming a run that last trained on {last} worker(s): starting with {workers}")
    if ctx.elastic_agents and not resume and _holds_a_run(ctx.run_dir):
        raise LaunchError(
            f"run directory {ctx.run_dir} already holds a run, and elastic workers always resume "
            "(torchrun restarts them at each membership change). Fix: pass run.resume=true to "
            "continue it, or choose another run.output_dir (or run.name)."
        )
    stale = _set_aside(ctx.run_dir, f"stale-{int(time.time())}.resize.json")
    if stale:
        log(f"moved an old {RESIZE_FILE} (from an earlier launch) to {stale}")
    log(
        f"launcher {ctx.launcher}, worker limit {ctx.limit} ({ctx.limit_reason}), "
        f"{1 if ctx.elastic_agents else len(plan_spans(plan))} planned launch(es)"
        f"{' (elastic)' if ctx.elastic_agents else ''}, run dir {ctx.run_dir}"
    )
    while True:
        number = len(ctx.history) + 1
        started, started_wall = time.monotonic(), time.time()
        if ctx.elastic_agents:
            outcome, workers, log_path = run_elastic_group(ctx, workers, number, env)
            code = outcome.returncode
        else:
            spec = ctx.spec(workers, resume)
            argv, additions = build_command(ctx.launcher, spec)
            if spec.host_discovery_script:
                _write_discovery_script(Path(spec.host_discovery_script), spec)
            log_path = ctx.run_dir / "launch" / f"attempt-{number:02d}-{workers}w.log"
            log(
                f"launch {number}: {workers} worker(s){' (resume)' if resume else ''}; "
                f"log {log_path}"
            )
            _log_command(log, argv, additions, env)
            outcome = executor(argv, additions, log_path)
            code = _worker_code(ctx, outcome, log_path)
        ctx.history.append(
            Attempt(number, workers, outcome.returncode, code, log_path, time.monotonic() - started)
        )
        resize = _read_resize(ctx.run_dir)
        if resize is not None:
            _set_aside(ctx.run_dir, f"attempt-{number:02d}.resize.json")

        if code == EXIT_OK:
            # Also after a signal: the workers had finished the run when it came.
            log(f"done: {number} launch(es), {restarts} restart(s) after crashes")
            return EXIT_OK
        if outcome.signal is not None:
            log(
                f"stopped by {signal_name(outcome.signal)}: forwarded to the workers, which "
                f"checkpoint and exit; not relaunching. Resume with run.resume=true. "
                f"Logs: {log_path}"
            )
            return exit_status(outcome.signal)
        stopped_by = signal_from_status(code)
        if stopped_by is None and not ctx.elastic_agents:
            # mpirun, srun and others exit 1 (or their own status) after their workers stopped
            # cleanly on a signal; rank 0's last record says so.
            stopped_by = recorded_stop_signal(ctx.run_dir, since=started_wall)
        if stopped_by is not None:
            # A signal that reached the workers (or their launcher) without passing through
            # this controller, e.g. SLURM signalling every process of the job: a request to
            # stop, not a crash. The workers checkpointed (exit 128 + N) unless it killed them
            # first (-N); either way the newest checkpoint is where a resume continues.
            log(
                f"the workers were stopped by {signal_name(stopped_by)} (exit {code}), not a "
                f"crash: not relaunching. Resume with run.resume=true. Logs: {log_path}"
            )
            return exit_status(stopped_by)
        if code == EXIT_NEED_WORKERS or (
            resize is not None and code not in (EXIT_USAGE, EXIT_NONFINITE)
        ):
            resize = resize or {}
            need = int(resize["need_workers"]) if "need_workers" in resize else None
            if need is None:
                _report(
                    ctx,
                    f"the workers exited {EXIT_NEED_WORKERS} (need more workers) but wrote no "
                    f"readable {ctx.run_dir / RESIZE_FILE}",
                    "check the workers' log above; resume with run.resume=true",
                )
                return EXIT_FAILURE
            if need > ctx.limit:
                _report(
                    ctx,
                    f"the plan needs {need} workers from epoch {resize.get('epoch')} (step "
                    f"{resize.get('step')}), above the limit of {ctx.limit} ({ctx.limit_reason})",
                    f"give the job {need} workers (e.g. sbatch --ntasks={need}, or "
                    f"growth.max_workers={need}), or set growth.max_workers={ctx.limit} so the "
                    "batch grows by accumulation instead; then resume with run.resume=true",
                )
                return EXIT_NEED_WORKERS
            if need <= workers:
                _report(
                    ctx,
                    f"resize.json asks for {need} workers while {workers} ran: a relaunch "
                    "would not change anything",
                    "check the workers' log; this is a bug if the config did not change",
                )
                return EXIT_FAILURE
            log(
                f"the plan needs {need} workers from epoch {resize.get('epoch')}: relaunching "
                f"wider from {resize.get('checkpoint')}"
            )
            workers, resume = need, True
            continue
        if code in (EXIT_USAGE, EXIT_NONFINITE):
            what = "a config or usage error" if code == EXIT_USAGE else "a non-finite loss"
            _report(
                ctx,
                f"the workers stopped with exit {code} ({what}); a retry would fail the same way",
                "read the error in the log; for a non-finite loss, lower optim.lr or set "
                "optim.grad_clip, then resume with run.resume=true",
            )
            return code
        restarts += 1
        if restarts > ctx.cfg.launch.max_restarts:
            _report(
                ctx,
                f"the workers crashed (exit {code}) and launch.max_restarts="
                f"{ctx.cfg.launch.max_restarts} restart(s) are used up",
                "read the logs listed; resume with run.resume=true, or raise launch.max_restarts",
            )
            return code if 0 < code < 256 else EXIT_FAILURE
        log(
            f"the workers crashed (exit {code}); restart {restarts} of "
            f"{ctx.cfg.launch.max_restarts} from the newest checkpoint"
        )
        resume = True


def _write_discovery_script(path: Path, spec: LaunchSpec) -> None:
    """Horovod Elastic's host discovery: the slots the growth plan needs now.

    The script starts with the launch's ``spec.workers`` slots and follows the workers: when
    rank 0 asks for more in an elastic ``resize.json`` (``"elastic": true``, ``need_workers``;
    see ``Trainer.elastic_interim``), it offers that many (at most the elastic maximum), so the
    driver starts the new workers and the running ones re-form the job with them (see
    ``distgrow.backends.horovod_backend``). The count never shrinks: it is kept in
    ``horovod_slots`` next to the script, since a resumed run removes ``resize.json``. Slots
    fill the hosts in order, ``ceil(max / nodes)`` per host.
    """
    hosts = list(spec.hosts) or ["localhost"]
    most = spec.elastic_range[1]
    per_node = math.ceil(most / max(1, spec.nodes))
    state = path.parent / "horovod_slots"
    resize = path.parent.parent / RESIZE_FILE
    q = shlex.quote
    script = f"""#!/bin/sh
# Written by distgrow launch: Horovod Elastic host discovery (host:slots lines).
slots={spec.workers}
[ -s {q(str(state))} ] && slots=$(cat {q(str(state))})
if [ -f {q(str(resize))} ] && grep -q '"elastic": *true' {q(str(resize))}; then
  need=$(sed -nE 's/.*"need_workers": *([0-9]+).*/\\1/p' {q(str(resize))} | head -n 1)
  if [ -n "$need" ] && [ "$need" -gt "$slots" ] && [ "$need" -le {most} ]; then slots=$need; fi
fi
echo "$slots" > {q(str(state))}
left=$slots
for host in {" ".join(q(h) for h in hosts[: spec.nodes])}; do
  [ "$left" -le 0 ] && break
  n=$left; [ "$n" -gt {per_node} ] && n={per_node}
  echo "$host:$n"
  left=$((left - n))
done
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    state.unlink(missing_ok=True)  # a new launch starts from its own worker count
    path.write_text(script)
    path.chmod(0o755)


def _log_stderr(message: str) -> None:
    print(f"distgrow launch: {message}", file=sys.stderr, flush=True)


def main_launch(config: str, overrides: list[str], dry_run: bool) -> int:
    """``distgrow launch CONFIG [key=value ...] [--dry-run]``.

    Returns:
        0 when the plan ran to the end; 2 for a config or launch problem (before anything
        runs); otherwise the status :func:`run_controller` explains on stderr.
    """
    try:
        cfg = load_config(config, overrides)
        return run_controller(config, overrides, cfg, dry_run=dry_run)
    except (ConfigError, LaunchError) as err:
        kind = "config" if isinstance(err, ConfigError) else "launch"
        print(f"distgrow launch: {kind} error: {err}", file=sys.stderr)
        return EXIT_USAGE
