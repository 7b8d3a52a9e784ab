"""What the environment allows: the launcher, the worker limit, the rendezvous and the GPUs.

Pure functions of a plain mapping (``os.environ``, or a dict in tests) and the config: SLURM,
Open MPI and CUDA variables in, numbers and names out. Also how a launch logs the variables it
sets (credentials redacted).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from distgrow.config import Config
from distgrow.launch.builders import LauncherName, LaunchError, format_command
from distgrow.runtime import RuntimeEnvError, expand_nodelist, slurm_counts
from distgrow.runtime import redact as runtime_redact

REDACTED = "***"  # what the controller shows for a credential's value


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
    of these forms): the first node's count; None when there is no number."""
    if not text:
        return None
    counts = slurm_counts(text.split(",")[0].rsplit(":", 1)[-1])
    return counts[0] if counts else None


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
    Unset ``growth.max_workers`` means the allocation (one worker where none is found).
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
    if config_limit is None:  # unset: the allocation (one worker when none is found)
        if env_limit is None:
            return 1, "growth.max_workers unset and no allocation found"
        return env_limit, f"{reason} (growth.max_workers unset)"
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
    """The rendezvous: from SLURM inside an allocation, else from ``launch.*`` (the node rank
    from ``launch.node_rank``: one ``distgrow launch`` per machine).

    Inside SLURM the master is the first host of ``SLURM_JOB_NODELIST``, the node rank is
    ``SLURM_NODEID``, the nodes are ``SLURM_JOB_NUM_NODES``, and the port is
    ``launch.master_port + SLURM_JOB_ID mod 1000``, so that jobs sharing a node do not clash.
    """
    launch = cfg.launch
    if not in_slurm_allocation(env):
        return Rendezvous(
            launch.master_addr, launch.master_port, launch.node_rank, launch.nodes, ()
        )
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


def visible_gpu_ids(env: Mapping[str, str], gpus_on_node: int | None) -> tuple[str, ...]:
    """The GPU ids to hand out: ``CUDA_VISIBLE_DEVICES``'s, else ``0..gpus_on_node-1``."""
    visible = count_cuda_visible_devices(env)
    if visible is not None:
        raw = env.get("CUDA_VISIBLE_DEVICES", "")
        return tuple(i.strip() for i in raw.split(",") if i.strip())[:visible]
    return tuple(str(i) for i in range(gpus_on_node or 0))


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


def log_command(
    log: Callable[[str], None],
    argv: Sequence[str],
    additions: Mapping[str, str],
    env: Mapping[str, str],
) -> None:
    """Log the environment a launch changes (redacted) and its command line."""
    for line in describe_env_changes(additions, env):
        log(f"  env: {line}")
    log(f"  $ {format_command(argv)}")
