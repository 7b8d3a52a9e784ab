"""The job: what every launch of one run shares, and the :class:`LaunchSpec` of each launch.

:func:`prepare` loads nothing: it takes the config the command line gave (loaded once), picks
the launcher, the worker limit and the rendezvous, and changes the config as a typed object
where the job needs it (fewer workers than ``growth.max_workers``, threads shared by elastic
workers). Each change also reaches the workers, as a ``section.field=value`` override built
from the same values.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distgrow.config import Config, config_from_dict
from distgrow.config.grammar import is_host
from distgrow.launch.builders import LauncherName, LaunchError, LaunchSpec
from distgrow.launch.environment import (
    Rendezvous,
    detect_launcher,
    rendezvous_from_env,
    visible_gpu_ids,
    worker_limit,
)
from distgrow.planner import Plan, make_plan
from distgrow.rundir import RunDir
from distgrow.runtime import cpu_cores

ELASTIC_LAST_CALL_S = 1
"""Elastic: once one agent has joined a rendezvous round, how long it waits for more (s).

Every growth pays it once (torchrun's default, 30 s, would dominate). Agents started together
that join further apart make one round more: a restart more, the same result (measured: 2 s
cost 1 s more per growth than 1 s, docs/launch.md)."""


def with_updates(cfg: Config, section: str, **fields: Any) -> Config:
    """``cfg`` with ``fields`` of ``section`` changed, validated as a loaded config is.

    Rebuilt from the plain tree, so it works whatever the config classes are made of.

    Raises:
        ConfigError: a changed value that does not validate.
    """
    data = cfg.to_dict()
    data[section] = {**data[section], **fields}
    return config_from_dict(data, source="the launch controller's changes")


def as_overrides(section: str, **fields: Any) -> list[str]:
    """``section.field=value`` overrides that set ``fields`` (values as JSON, which is YAML)."""
    return [f"{section}.{name}={json.dumps(value)}" for name, value in fields.items()]


@dataclass
class Job:
    """What every launch of one run shares."""

    cfg: Config
    config_path: str
    overrides: tuple[str, ...]
    launcher: LauncherName
    limit: int
    limit_reason: str
    rendezvous: Rendezvous
    run: RunDir
    python: str
    log: Callable[[str], None]
    gpu_ids: tuple[str, ...] = ()
    """Elastic: the GPUs to hand out, one per torchrun agent (empty on the CPU)."""
    listed_gpus: tuple[str, ...] = ()
    """The GPUs ``CUDA_VISIBLE_DEVICES`` lists (empty: unset, or training on the CPU); the
    deepspeed launcher starts its workers on them."""

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def elastic_agents(self) -> bool:
        """True when the controller grows the job by adding torchrun agents (one worker each)."""
        return self.cfg.launch.elastic and self.launcher == "torchrun"

    def rdzv_id(self, number: int) -> str:
        """A rendezvous id of its own for each elastic launch (a restart starts a fresh one)."""
        name = re.sub(r"[^A-Za-z0-9_-]", "-", self.cfg.run.name)[:40]
        return f"distgrow-{name}-{os.getpid()}-{number}"

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

    @property
    def node_leader(self) -> bool:
        """True when this controller leads controllers on other machines (torchrun, several
        nodes, one ``distgrow launch`` per node; :mod:`distgrow.launch.nodes`)."""
        return self.multi_node_torchrun and self.rendezvous.node_rank == 0

    @property
    def multi_node_torchrun(self) -> bool:
        """torchrun over several nodes with a fixed node count per launch."""
        return self.launcher == "torchrun" and self.rendezvous.nodes > 1 and not self.elastic_agents

    def fixed_nodes(self, workers: int) -> int:
        """The nodes a torchrun or deepspeed launch of ``workers`` spans (both start the same
        number on every node): all of them, or one per worker while there are fewer workers
        than nodes (the others sit that launch out)."""
        return min(self.rendezvous.nodes, workers)

    def spec(self, workers: int, resume: bool, rdzv_id: str = "distgrow") -> LaunchSpec:
        """The launch of ``workers`` workers (resuming from the newest checkpoint or not).

        ``rdzv_id``: torchrun's c10d rendezvous id, the same on every node of one launch.
        """
        launch, rdzv = self.cfg.launch, self.rendezvous
        nodes = rdzv.nodes if self.launcher != "none" else 1
        if self.launcher in ("torchrun", "deepspeed"):
            nodes = self.fixed_nodes(workers)
        if self.launcher in ("srun", "mpirun", "horovodrun") and nodes > 1:
            # These place any number of workers: use as few nodes as hold them.
            per_node = max(1, math.ceil(self.limit / nodes))
            nodes = min(nodes, math.ceil(workers / per_node))
        hostfile, hosts = launch.hostfile, rdzv.hosts
        if hostfile and self.launcher in ("deepspeed", "horovodrun", "mpirun"):
            hostfile_hosts(hostfile)  # each a host name: launchers hand them to ssh (and sh)
        if self.launcher == "horovodrun" and hostfile and not launch.elastic:
            # horovodrun 0.28.1 (static) starts a process on every slot of a hostfile, whatever
            # -np says (measured: -np 1 started 4): name the hosts with -H instead, so that only
            # the workers asked for start, on the fewest hosts.
            hosts, hostfile = hostfile_hosts(hostfile), None
        discovery = None
        if launch.elastic and self.launcher == "horovodrun":
            discovery = str(self.run.discovery_script)
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
            hosts=hosts,
            hostfile=hostfile,
            elastic=launch.elastic and self.launcher in ("torchrun", "horovodrun"),
            min_workers=1 if launch.elastic else None,
            max_workers=max(self.limit, workers) if launch.elastic else None,
            host_discovery_script=discovery,
            srun_mpi=self.launcher == "srun" and self.cfg.backend.name == "horovod",
            run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
            preload=launch.preload and self.launcher == "torchrun" and nodes == 1,
            rdzv_id=rdzv_id,
            rdzv_backend=launch.rdzv,
            gpu_ids=self.listed_gpus if self.launcher == "deepspeed" else (),
        )


def hostfile_hosts(path: str) -> tuple[str, ...]:
    """The host names of a hostfile (``host slots=N``, ``host:N`` or ``host`` lines; ``#``
    starts a comment), in order.

    Raises:
        LaunchError: the file cannot be read, names no host, or names one that is not a host
            name or an IP address (launchers hand each to ssh, some through a shell).
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise LaunchError(
            f"launch.hostfile = {path!r}: cannot be read ({err.strerror}). Fix: give a file "
            "with one 'host slots=N' line per node."
        ) from None
    hosts = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words:
            host, colon, slots = words[0].partition(":")
            if not is_host(host) or (colon and not (slots.isascii() and slots.isdigit())):
                raise LaunchError(
                    f"launch.hostfile = {path!r}: {words[0]!r} is not a host name or an IP "
                    "address. Fix: one 'host slots=N' line per node, e.g. 'node001 slots=4'."
                )
            hosts.append(host)
    if not hosts:
        raise LaunchError(
            f"launch.hostfile = {path!r} names no host. Fix: one 'host slots=N' line per node."
        )
    return tuple(hosts)


def prepare(
    cfg_path: str,
    overrides: list[str],
    cfg: Config,
    env: Mapping[str, str],
    log: Callable[[str], None],
    python: str,
    gpus_on_node: int | None,
) -> tuple[Job, Plan]:
    """Pick the launcher, the worker limit and the rendezvous; plan within the limit.

    Args:
        cfg_path: The config file every worker loads.
        overrides: The command line's overrides (every worker gets them, then the job's own).
        cfg: The config they give (loaded once, by the caller).
        env: The environment to read.
        log: Receives a line for each change made to the config.
        python: The workers' interpreter.
        gpus_on_node: GPUs found on this machine when the environment lists none.

    Raises:
        LaunchError: a launcher that cannot run this backend or job.
    """
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
    # A chain plans the whole run: the next, wider span is another job, not accumulation.
    whole_run = cfg.launch.slurm == "chain" and cfg.growth.max_workers is not None
    if not whole_run and (cfg.growth.max_workers is None or limit < cfg.growth.max_workers):
        # Plan within what the job has: the batch still grows (through accumulation), and the
        # workers plan the same way, so none asks for workers that cannot come.
        log(f"growth.max_workers {cfg.growth.max_workers or 'unset'} -> {limit}: {reason}")
        cfg = with_updates(cfg, "growth", max_workers=limit)
        overrides += as_overrides("growth", max_workers=limit)
    rdzv = rendezvous_from_env(env, cfg)
    gpu_ids: tuple[str, ...] = ()
    if cfg.launch.elastic and launcher not in ("torchrun", "horovodrun"):
        log(
            f"launch.elastic=true: {launcher} cannot add workers to a running job; the "
            "controller grows it by relaunching"
        )
    if cfg.launch.elastic and launcher == "torchrun":
        cfg, gpu_ids = _elastic_torchrun(cfg, overrides, rdzv, limit, env, gpus_on_node, log)
    listed_gpus: tuple[str, ...] = ()
    if cfg.run.device != "cpu" and "CUDA_VISIBLE_DEVICES" in env:
        listed_gpus = visible_gpu_ids(env, gpus_on_node)
    plan = make_plan(cfg, cfg.expected_train_size())
    job = Job(
        cfg=cfg,
        config_path=os.path.abspath(cfg_path),  # remote nodes start in other directories
        overrides=tuple(overrides),
        launcher=launcher,
        limit=limit,
        limit_reason=reason,
        rendezvous=rdzv,
        run=RunDir(Path(cfg.run.resolved_output_dir).resolve()),
        python=python,
        log=log,
        gpu_ids=gpu_ids,
        listed_gpus=listed_gpus,
    )
    return job, plan


def _elastic_torchrun(
    cfg: Config,
    overrides: list[str],
    rdzv: Rendezvous,
    limit: int,
    env: Mapping[str, str],
    gpus_on_node: int | None,
    log: Callable[[str], None],
) -> tuple[Config, tuple[str, ...]]:
    """What elastic torchrun agents need: one node, a thread count for each worker (appended
    to ``overrides`` too) and the GPUs they share out.

    Returns:
        The config with ``run.threads`` set, and the visible GPU ids (() on CPU).

    Raises:
        LaunchError: the job spans several nodes.
    """
    if rdzv.nodes > 1:
        raise LaunchError(
            f"launch.elastic=true grows a torchrun job by starting agents on this machine, "
            f"but the job spans {rdzv.nodes} nodes. Fix: set launch.elastic=false (the "
            "controller relaunches wider, on every node), or launch on one node."
        )
    if cfg.run.threads is None:
        # Each agent runs one worker that believes it is alone on the machine.
        cores = cpu_cores()
        threads = max(1, cores // limit)
        log(f"run.threads -> {threads}: {cores} core(s) shared by up to {limit} elastic worker(s)")
        cfg = with_updates(cfg, "run", threads=threads)
        overrides += as_overrides("run", threads=threads)
    gpu_ids = visible_gpu_ids(env, gpus_on_node) if cfg.run.device != "cpu" else ()
    return cfg, gpu_ids
