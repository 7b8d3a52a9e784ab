"""The launch builders: pure functions from a :class:`LaunchSpec` to ``(argv, env additions)``.

One builder per launcher (torchrun, deepspeed, horovodrun, mpirun, srun, none). Never a shell
string, except where a launcher hands the worker command to a remote shell (DeepSpeed's pdsh
runner on several nodes): there every worker argument is quoted so that the remote shell parses
it back into the very same argument (:func:`remote_shell_args`). What a launcher pastes into a
shell line unquoted (the master address and port, host names, DeepSpeed's working directory,
interpreter and exported variables) is checked to hold no character a shell reads
(:meth:`LaunchSpec.__post_init__`, :func:`check_deepspeed_remote_line`).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from distgrow.config.grammar import is_host, is_port

SPAWN_MODULE = "distgrow.launch.spawn"
"""The one-machine launcher of ``launch.preload`` (:func:`build_spawn`)."""

LauncherName = Literal["none", "torchrun", "deepspeed", "horovodrun", "mpirun", "srun"]


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
        preload: torchrun on one node, static, without restarts: start the workers with
            :mod:`distgrow.launch.spawn` instead (forked from a process that imported torch
            once; the same environment as torchrun's workers).
        rdzv_backend: torchrun with a fixed node count: ``static`` (``--node_rank``, rank 0 on
            node 0) or ``c10d`` (torchrun's store at the master address orders the nodes).
        gpu_ids: The GPUs ``CUDA_VISIBLE_DEVICES`` lists (empty: unset, or training on the
            CPU). deepspeed on one node starts its workers on them (``--include``): its
            ``--num_gpus`` would discard ``CUDA_VISIBLE_DEVICES`` and use GPUs 0..N-1.
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
    preload: bool = False
    rdzv_backend: Literal["static", "c10d"] = "static"
    gpu_ids: tuple[str, ...] = ()

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
        # Launchers paste these into shell lines (DeepSpeed's pdsh runner: --master_addr;
        # horovodrun: ssh HOST): only a host name or an address, never a word a shell reads.
        if not is_host(self.master_addr):
            raise LaunchError(
                f"master address {self.master_addr!r} is not a host name or an IP address. "
                "Fix: set launch.master_addr to rank 0's machine (e.g. 10.0.0.1 or node001), "
                "or check SLURM_JOB_NODELIST."
            )
        if not is_port(self.master_port):
            raise LaunchError(
                f"master port {self.master_port!r} is not a port (1-65535). Fix: set "
                "launch.master_port, e.g. 29500."
            )
        for host in self.hosts:
            if not is_host(host):
                raise LaunchError(
                    f"host {host!r} (from launch.hostfile or SLURM_JOB_NODELIST) is not a host "
                    "name or an IP address. Fix: list one machine per line, e.g. 'node001 "
                    "slots=4'."
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
    c10d with a fixed node count: ``--nnodes=N --rdzv_backend=c10d --rdzv_endpoint=ADDR:PORT``
    (torchrun hands out the node ranks).
    Elastic: ``--nnodes=MIN:MAX --rdzv_backend=c10d --rdzv_endpoint=ADDR:PORT``; nodes may
    join and leave, and every membership change restarts all workers. With ``spec.preload``
    on one node (static, no restarts): :func:`build_spawn` instead.
    """
    if spec.preload and spec.nodes == 1 and not (spec.elastic or spec.max_restarts or spec.extra):
        return build_spawn(spec)
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
    elif spec.rdzv_backend == "c10d":
        argv += [
            f"--nnodes={spec.nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={spec.master_addr}:{spec.master_port}",
            f"--rdzv_id={spec.rdzv_id}",
        ]
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


def build_spawn(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """distgrow's one-machine launcher (``python -m distgrow.launch.spawn``): what static
    torchrun does on one node, with the workers forked from a process that has imported torch
    (and the compiler the first optimizer imports) once. See :mod:`distgrow.launch.spawn`.
    """
    argv = [
        spec.python,
        "-m",
        SPAWN_MODULE,
        f"--nproc_per_node={spec.workers}",
        f"--master_addr={spec.master_addr}",
        f"--master_port={spec.master_port}",
        "--",
        *worker_command(spec),
    ]
    return argv, {}


def build_deepspeed(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """The deepspeed launcher (``python -m deepspeed.launcher.runner``).

    One node: ``--num_gpus N`` starts N processes (on CPU too; without it deepspeed starts
    one), or ``--include=localhost:IDS`` with the first N of ``spec.gpu_ids`` (the GPUs
    ``CUDA_VISIBLE_DEVICES`` lists, which ``--num_gpus`` would discard). Several nodes:
    ``--hostfile`` (pdsh over ssh) with ``--num_nodes`` and ``--master_addr``.
    ``--no_local_rank`` because the workers read ``LOCAL_RANK`` from the environment and
    ``distgrow train`` takes no ``--local_rank`` flag.

    Raises:
        LaunchError: several nodes without a hostfile; more workers than ``gpu_ids``.
    """
    per_node = spec.workers_per_node
    argv = [spec.python, "-m", "deepspeed.launcher.runner"]
    if spec.nodes > 1:
        check_deepspeed_remote_line(
            spec.python, os.path.abspath("."), os.environ, master_addr=spec.master_addr
        )
        if not spec.hostfile:
            raise LaunchError(
                f"deepspeed on launch.nodes={spec.nodes} needs a hostfile ('host slots=N' "
                "lines). Fix: set launch.hostfile=PATH, or use launch.launcher=srun in SLURM."
            )
        argv += ["--hostfile", spec.hostfile, f"--num_nodes={spec.nodes}"]
    module, *args = worker_command(spec)[1:]  # --module takes the module name without the "-m"
    if spec.nodes > 1:
        # pdsh joins the command into one line for the remote shell of every node.
        args = remote_shell_args(args)
    argv += [
        deepspeed_slots(per_node, spec.gpu_ids if spec.nodes == 1 else ()),
        f"--master_addr={spec.master_addr}",
        f"--master_port={spec.master_port}",
        "--no_local_rank",
        *spec.extra,
        "--module",
        module,
        *args,
    ]
    return argv, {}


def deepspeed_slots(per_node: int, gpu_ids: tuple[str, ...]) -> str:
    """``--num_gpus=N``, or ``--include=localhost:IDS`` on the GPUs ``CUDA_VISIBLE_DEVICES`` lists.

    Raises:
        LaunchError: more workers than listed GPUs, or ids that are not GPU numbers.
    """
    if not gpu_ids:
        return f"--num_gpus={per_node}"
    listed = ",".join(gpu_ids)
    if per_node > len(gpu_ids):
        raise LaunchError(
            f"deepspeed: {per_node} workers on this node but CUDA_VISIBLE_DEVICES={listed} "
            f"lists {len(gpu_ids)} GPU(s): two ranks would share a GPU. Fix: set "
            f"growth.max_workers={len(gpu_ids)}, or list more GPUs."
        )
    if not all(i.isdigit() for i in gpu_ids):
        raise LaunchError(
            f"deepspeed's --include takes GPU numbers, but CUDA_VISIBLE_DEVICES={listed}. "
            "Fix: list the GPUs by number (nvidia-smi -L), or use launch.launcher=torchrun."
        )
    return f"--include=localhost:{','.join(gpu_ids[:per_node])}"


def remote_shell_args(args: Iterable[str]) -> list[str]:
    """``args`` written so that DeepSpeed's pdsh runner hands each to the remote shell intact.

    The pdsh runner joins the worker command with spaces into one line that a shell on every
    node runs, after wrapping each argument that holds a space in double quotes (escaping only
    ``"``). Unquoted, an override such as ``data.root=/d;id`` or ``x=$(touch pwned)`` would run
    on every node, and spaces, ``[`` or ``*`` would mangle values. So an argument without a
    space is single-quoted (:func:`shlex.quote`; the runner leaves it as it is), and one with a
    space has the characters still special inside double quotes (backslash, dollar, backquote)
    escaped, so the runner's double quotes make it whole again. pdsh then rewrites ``%h``,
    ``%u``, ``%n`` and ``%%`` in the line (the node, the user, its rank, a ``%``: pdsh 2.34,
    ``-R ssh`` and ``-R exec`` alike), so every ``%`` is doubled: ``runs/lr%5`` or
    ``run.name=%h`` arrives as it was.
    """
    out = []
    for arg in args:
        arg = arg.replace("%", "%%")
        if " " in arg:
            out.append(arg.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`"))
        else:
            out.append(shlex.quote(arg))
    return out


# DeepSpeed 0.19.8's runner exports every variable whose name starts with one of these (and
# the accelerator's own: NCCL on CUDA) to the remote nodes: ``export NAME=VALUE;``, the value
# wrapped in double quotes when it holds a character outside [\w@%+=:,./-]. Inside double
# quotes a shell still reads $, `, \ and ".
DEEPSPEED_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")
_DOUBLE_QUOTE_SPECIAL = re.compile(r'[$`\\"\n]')
# What pdsh rewrites in the remote command line (pdsh 2.34): the node, the user, its rank, a %.
PDSH_CODES = re.compile(r"%[hun%]")
_SHELL_PLAIN = re.compile(r"[\w@%+=:,./-]+", re.ASCII)


def check_deepspeed_remote_line(
    python: str, cwd: str, env: Mapping[str, str], master_addr: str = ""
) -> None:
    """Refuse what DeepSpeed's pdsh runner would paste unquoted into the remote shell line.

    The runner writes ``export NAME=VALUE; cd CWD; PYTHON -u -m deepspeed.launcher.launch ...``
    for every node's shell: the working directory and the interpreter unquoted, and the
    exported variables (``DEEPSPEED_EXPORT_PREFIXES``, ``PYTHONPATH`` always, which it
    prefixes with ``CWD:``, and the lines of ``.deepspeed_env``) in double quotes. distgrow
    cannot quote them (DeepSpeed writes them), so each must hold nothing a shell would read
    there. pdsh rewrites ``%h``, ``%u``, ``%n`` and ``%%`` in that line, so none of them (nor
    ``master_addr``, an IPv6 scope such as ``%nic0``) may hold one (the worker command's own
    words are escaped: :func:`remote_shell_args`).

    Raises:
        LaunchError: naming the value and what to change.
    """
    _check_pdsh_codes("launch.master_addr", master_addr)
    for what, value in (("working directory", cwd), ("interpreter", python)):
        _check_pdsh_codes(f"the {what}", value)
        if not _SHELL_PLAIN.fullmatch(value):
            raise LaunchError(
                f"deepspeed on several nodes: the {what} {value!r} holds characters a shell "
                "reads, and DeepSpeed's pdsh runner writes it unquoted into every node's remote "
                "command line. Fix: use a path of letters, digits and @%+=:,./-_ only."
            )
    exported = {f"${k}": v for k, v in env.items() if k.startswith(DEEPSPEED_EXPORT_PREFIXES)}
    exported["$PYTHONPATH"] = f"{cwd}:{env['PYTHONPATH']}" if "PYTHONPATH" in env else cwd
    # And every NAME=VALUE line of its .deepspeed_env files (in ~ and the working directory).
    env_file = env.get("DS_ENV_FILE", ".deepspeed_env")
    for folder in (os.path.expanduser("~"), cwd):
        path = os.path.join(folder, env_file)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    name, _, value = line.partition("=")
                    exported[f"{name.strip()} in {path}"] = value
    for name, value in exported.items():
        _check_pdsh_codes(name, value.strip())
        if _DOUBLE_QUOTE_SPECIAL.search(value.strip()):
            raise LaunchError(
                f'deepspeed on several nodes: {name} = {value!r} holds $, `, \\, " or a '
                "newline, which DeepSpeed's pdsh runner exports to every node inside double "
                "quotes, where a shell still reads them. Fix: unset it or remove them."
            )


def _check_pdsh_codes(name: str, value: str) -> None:
    """Refuse a value DeepSpeed writes into pdsh's remote line (distgrow cannot escape it)
    that holds a code pdsh rewrites there (:data:`PDSH_CODES`)."""
    code = PDSH_CODES.search(value)
    if code:
        raise LaunchError(
            f"deepspeed on several nodes: {name} = {value!r} holds {code.group()!r}, which "
            "pdsh rewrites in every node's remote command line (%h the node, %u the user, %n "
            "its rank, %% a %), so it would arrive changed. Fix: rename or unset it, or use "
            "launch.launcher=srun or torchrun."
        )


def build_horovodrun(spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    """horovodrun (``python -m horovod.runner.launch``), over Gloo or MPI.

    Hosts come from the hostfile, else ``-H host:slots,...`` (``localhost:N`` on one node).
    Elastic: ``--min-np/--max-np --host-discovery-script`` (a path horovodrun hands to a shell,
    so it is quoted). On one host the job binds to the
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
            # horovodrun runs it through a shell (shell=True): the path, quoted, is one word.
            shlex.quote(spec.host_discovery_script),
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


def format_command(argv: Iterable[str]) -> str:
    """A copy-pasteable command line for logs (never executed through a shell)."""
    return shlex.join(argv)
