"""Where this process sits in a job: rank, world size and rendezvous, read from the launcher.

Every launcher announces a worker's place in its own variables:

==============  ===========================  ====================  ===========================
launcher        rank                         world size            local rank
==============  ===========================  ====================  ===========================
torchrun,       ``RANK``                     ``WORLD_SIZE``        ``LOCAL_RANK``
deepspeed
mpirun (Open    ``OMPI_COMM_WORLD_RANK``     ``OMPI_COMM_WORLD_    ``OMPI_COMM_WORLD_LOCAL_
MPI)                                         SIZE``                RANK``
horovodrun      ``HOROVOD_RANK``             ``HOROVOD_SIZE``      ``HOROVOD_LOCAL_RANK``
(Gloo)
srun (SLURM)    ``SLURM_PROCID``             ``SLURM_NTASKS``      ``SLURM_LOCALID``
MPICH, Intel    ``PMI_RANK``                 ``PMI_SIZE``          ``MPI_LOCALRANKID``
MPI (PMI)
other MPI       ``MPI.COMM_WORLD`` (mpi4py), when only ``PMIX_RANK`` says an MPI started us
==============  ===========================  ====================  ===========================

:func:`detect_runtime` reads them (pure: it takes the environment as a mapping) into a
:class:`Runtime`, and :func:`export_environment` writes the normalised ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` that
``torch.distributed``'s ``env://`` rendezvous reads, logging every variable it sets or
overwrites. Under SLURM the rendezvous host is the first node of the job's node list.

The last row is the one place where distgrow asks MPI itself (mpi4py, imported only then): a
process started by a PMIx-based MPI launcher whose variables distgrow does not know (MVAPICH,
``prterun``, a wrapper that strips ``OMPI_*``) learns its rank, size, node-local rank (a
shared-memory split of ``COMM_WORLD``) and rank 0's host from MPI. :func:`finalize_mpi` then
ends MPI cleanly at exit (Open MPI's ``mpirun`` fails a job whose ranks called ``MPI_Init`` but
not ``MPI_Finalize``).

This module imports neither torch nor anything distributed.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

# Variable names that may hold credentials: their values never reach a log or the terminal.
_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "WANDB_API")


class RuntimeEnvError(ValueError):
    """The launcher's variables are inconsistent or malformed; the message names them."""


@dataclass(frozen=True)
class Runtime:
    """This worker's place in the job.

    Attributes:
        rank: Global rank, ``0 <= rank < world_size``.
        world_size: Number of workers in the job.
        local_rank: Rank among the workers on this node (picks the GPU).
        local_world_size: Workers on this node (shares the CPU cores between them).
        master_addr: Rendezvous host of rank 0.
        master_port: Rendezvous port.
        launcher: Which variables were read: ``torchrun`` (also deepspeed's launcher),
            ``mpirun``, ``horovodrun`` (its Gloo mode; its MPI mode is ``mpirun``), ``srun``,
            ``pmi``, or ``none`` for a plain single process.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_distributed(self) -> bool:
        """True when more than one worker takes part."""
        return self.world_size > 1


@dataclass(frozen=True)
class MpiWorld:
    """What MPI itself says about this process (:func:`probe_mpi`)."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    root_host: str


def probe_mpi() -> MpiWorld:
    """Ask MPI (mpi4py's ``COMM_WORLD``) for this process's place in the job.

    Initialises MPI (a collective: every rank of the job must call it).

    Raises:
        RuntimeEnvError: mpi4py is not installed.
    """
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise RuntimeEnvError(
            f"PMIX_RANK says an MPI launcher started this process, but mpi4py cannot be "
            f"imported ({err}) to ask MPI for the ranks. Fix: pip install mpi4py, or launch "
            "with mpirun (Open MPI), srun, torchrun or horovodrun."
        ) from err
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return MpiWorld(
            rank=world.Get_rank(),
            size=world.Get_size(),
            local_rank=node.Get_rank(),
            local_size=node.Get_size(),
            root_host=world.bcast(socket.gethostname(), root=0),
        )
    finally:
        node.Free()


def finalize_mpi() -> None:
    """``MPI_Finalize`` if this process initialised MPI through mpi4py (and nothing ended it)."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()


def _int(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise RuntimeEnvError(
            f"environment variable {name}={raw!r} is not an integer; the launcher sets it to a "
            "number. Fix: unset it, or start the job with its launcher."
        ) from None


def _first_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return _int(env, name)
    return None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list: ``host``, ``host[1-3,5]``, ``a,b``, ``n[01-02]-ib``.

    Zero padding is kept (``n[08-10]`` gives ``n08 n09 n10``) and several bracket groups in one
    name multiply out (``r[1-2]n[1-2]``), as ``scontrol show hostnames`` does.

    Args:
        nodelist: The value of ``SLURM_JOB_NODELIST`` (or ``SLURM_STEP_NODELIST``).

    Returns:
        The host names in order.

    Raises:
        RuntimeEnvError: unbalanced brackets or a malformed range.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item, nodelist))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets (``a[1,2],b`` -> ``a[1,2]``, ``b``)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_one(item: str, whole: str) -> list[str]:
    match = re.match(r"^([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if match is None:
        if "[" in item or "]" in item:
            raise RuntimeEnvError(
                f"SLURM node list {whole!r}: unbalanced brackets in {item!r}. Fix: set "
                "MASTER_ADDR to the first node's host name."
            )
        return [item]
    prefix, ranges, rest = match.groups()
    expanded: list[str] = []
    for part in ranges.split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers = [bounds[0]]
        elif (
            len(bounds) == 2
            and all(b.isdigit() for b in bounds)
            and int(bounds[0]) <= int(bounds[1])
        ):
            width = len(bounds[0])
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise RuntimeEnvError(
                f"SLURM node list {whole!r}: {part!r} is not a number or a range lo-hi. Fix: set "
                "MASTER_ADDR to the first node's host name."
            )
        for number in numbers:
            expanded.extend(_expand_one(prefix + number + rest, whole))
    return expanded


_SLURM_COUNT = re.compile(r"\s*(\d+)(?:\(x(\d+)\))?\s*")


def slurm_counts(text: str) -> list[int] | None:
    """One count per node from SLURM's compressed lists: ``[2, 2, 2, 1]`` from ``2(x3),1``
    (``SLURM_STEP_TASKS_PER_NODE``, ``SLURM_JOB_CPUS_PER_NODE``, ``SLURM_TASKS_PER_NODE``);
    None when an item is not ``N`` or ``N(xM)``. The one parser of that form in distgrow."""
    counts: list[int] = []
    for part in text.split(","):
        match = _SLURM_COUNT.fullmatch(part)
        if match is None:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node ``node_id`` from ``SLURM_STEP_TASKS_PER_NODE``, e.g. ``2(x3),1``."""
    counts = slurm_counts(tasks_per_node) or []
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _from_slurm(env: Mapping[str, str], addr: str) -> tuple[int, int, int, int | None, str]:
    """``(rank, world, local rank, local world or None, rendezvous host)`` of an ``srun`` task;
    the host is SLURM's first node unless ``MASTER_ADDR`` is set (else ``addr``)."""
    rank = _int(env, "SLURM_PROCID")
    # Inside an `srun` step the step's own task count is the world; SLURM_NTASKS is the
    # allocation's, which can be larger.
    world = _first_int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1
    local_rank = _first_int(env, "SLURM_LOCALID") or 0
    local_world = None
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        local_world = _slurm_tasks_on_node(per_node, _first_int(env, "SLURM_NODEID") or 0)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if nodelist and not env.get("MASTER_ADDR"):  # the node list only names the master
        hosts = expand_nodelist(nodelist)
        if hosts:
            addr = hosts[0]
    return rank, world, local_rank, local_world, addr


def _check_ranks(launcher: str, rank: int, local_rank: int, world: int) -> None:
    """Raise :class:`RuntimeEnvError` unless ``0 <= rank, local_rank < world``."""
    if world < 1 or not 0 <= rank < world:
        raise RuntimeEnvError(
            f"the {launcher} variables give rank {rank} in a world of {world}: the rank must be "
            "in [0, world size). Fix: check the launcher's command line."
        )
    if not 0 <= local_rank < world:
        raise RuntimeEnvError(
            f"the {launcher} variables give local rank {local_rank} in a world of {world}. "
            "Fix: check the launcher's command line."
        )


def detect_runtime(
    env: Mapping[str, str],
    *,
    default_addr: str = DEFAULT_MASTER_ADDR,
    default_port: int = DEFAULT_MASTER_PORT,
    mpi: Callable[[], MpiWorld] = probe_mpi,
) -> Runtime:
    """Read this worker's rank, world size and rendezvous from the launcher's variables.

    The first launcher whose variables are present wins, in the order torchrun/deepspeed
    (``RANK`` + ``WORLD_SIZE``), Open MPI, horovodrun's Gloo mode, SLURM, PMI; with none, a
    single process. (horovodrun inside a SLURM allocation sees the allocation's ``SLURM_*`` of
    the batch step, so its own variables come first.) An
    explicitly set ``MASTER_ADDR``/``MASTER_PORT`` is kept; otherwise SLURM's first node or
    ``default_addr``, and ``default_port``.

    Args:
        env: The environment (``os.environ`` or a plain dict in tests).
        default_addr: Rendezvous host when the environment names none.
        default_port: Rendezvous port when the environment names none.
        mpi: Asked only when ``PMIX_RANK`` is the one launcher variable present
            (:func:`probe_mpi`; tests pass a fake). Its ``root_host`` is the rendezvous host
            unless ``MASTER_ADDR`` is set.

    Returns:
        The :class:`Runtime`.

    Raises:
        RuntimeEnvError: a non-integer value, or a rank outside ``[0, world_size)``.
    """
    launcher = "none"
    rank, world, local_rank, local_world = 0, 1, 0, None
    addr = default_addr
    if env.get("RANK") and env.get("WORLD_SIZE"):
        launcher = "torchrun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _first_int(env, "LOCAL_RANK") or 0
        local_world = _first_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    elif env.get("OMPI_COMM_WORLD_RANK") and env.get("OMPI_COMM_WORLD_SIZE"):
        launcher = "mpirun"
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _first_int(env, "OMPI_COMM_WORLD_LOCAL_RANK") or 0
        local_world = _first_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    elif env.get("HOROVOD_RANK") and env.get("HOROVOD_SIZE"):
        launcher = "horovodrun"
        rank, world = _int(env, "HOROVOD_RANK"), _int(env, "HOROVOD_SIZE")
        local_rank = _first_int(env, "HOROVOD_LOCAL_RANK") or 0
        local_world = _first_int(env, "HOROVOD_LOCAL_SIZE")
    elif env.get("SLURM_PROCID") and (env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")):
        launcher = "srun"
        rank, world, local_rank, local_world, addr = _from_slurm(env, addr)
    elif env.get("PMI_RANK") and env.get("PMI_SIZE"):
        launcher = "pmi"
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_rank = _first_int(env, "MPI_LOCALRANKID") or 0
        local_world = _first_int(env, "MPI_LOCALNRANKS")
    elif env.get("PMIX_RANK"):
        launcher = "mpi"
        found = mpi()
        rank, world = found.rank, found.size
        local_rank, local_world = found.local_rank, found.local_size
        addr = found.root_host
    _check_ranks(launcher, rank, local_rank, world)
    # Unknown local size: assume every worker is on this node, the safe side for sharing cores.
    local_world = local_world if local_world and local_world >= 1 else world
    addr = env.get("MASTER_ADDR") or addr
    port = _first_int(env, "MASTER_PORT") or default_port
    return Runtime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=max(1, min(local_world, world)),
        master_addr=addr,
        master_port=port,
        launcher=launcher,
    )


def runtime_variables(rt: Runtime) -> dict[str, str]:
    """The variables ``torch.distributed``'s ``env://`` rendezvous reads, for ``rt``."""
    return {
        "RANK": str(rt.rank),
        "WORLD_SIZE": str(rt.world_size),
        "LOCAL_RANK": str(rt.local_rank),
        "LOCAL_WORLD_SIZE": str(rt.local_world_size),
        "MASTER_ADDR": rt.master_addr,
        "MASTER_PORT": str(rt.master_port),
    }


def is_secret(name: str) -> bool:
    """True when a variable's name suggests a credential (KEY, TOKEN, SECRET, ...)."""
    upper = name.upper()
    return any(marker in upper for marker in _SECRET_MARKERS)


def redact(name: str, value: str, token: str = "<redacted>") -> str:
    """``value``, or ``token`` when ``name`` looks like it holds a credential."""
    return token if is_secret(name) else value


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity; all of them off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def export_environment(
    rt: Runtime,
    environ: MutableMapping[str, str],
    log: Callable[[str], None] = _log_stderr,
) -> dict[str, str]:
    """Write the normalised rendezvous variables for ``rt`` into ``environ``; log each change.

    A plain single process (``launcher == "none"``) gets nothing: it needs no rendezvous, and
    leaving the environment alone keeps child processes from inheriting a fake job.

    Args:
        rt: The detected runtime.
        environ: Usually ``os.environ``.
        log: Receives one line per variable set (``set NAME=value``) or overwritten
            (``overwrote NAME: old -> new``); values of names containing KEY, TOKEN, SECRET or
            PASSWORD are redacted.

    Returns:
        The variables that were set or changed, with their new values.
    """
    if rt.launcher == "none":
        return {}
    changed: dict[str, str] = {}
    for name, value in runtime_variables(rt).items():
        old = environ.get(name)
        if old == value:
            continue
        environ[name] = value
        changed[name] = value
        shown = redact(name, value)
        if old is None:
            log(f"distgrow[rank {rt.rank}]: set {name}={shown} (from {rt.launcher})")
        else:
            log(
                f"distgrow[rank {rt.rank}]: overwrote {name}: {redact(name, old)} -> {shown} "
                f"(from {rt.launcher})"
            )
    return changed
