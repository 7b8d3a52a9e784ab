"""Elastic launches: torchrun agents that grow a job in place, and Horovod Elastic's discovery.

torchrun cannot change a running agent's ``--nproc_per_node``, but agents that join the same
c10d rendezvous (``--nnodes=1:LIMIT``) make a *membership change*: torchrun stops all workers
(SIGTERM: they checkpoint after the current update, see ``distgrow.signals``) and restarts them
at the new world size, resuming from that checkpoint. :func:`run_elastic_group` starts one
agent per worker and adds agents when rank 0 asks for more workers in an elastic
``resize.json``.

Horovod Elastic asks a host discovery script which hosts and slots exist;
:func:`write_discovery_script` writes one that offers what the workers asked for
(:mod:`distgrow.launch.discover`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import distgrow
from distgrow.exits import EXIT_OK
from distgrow.launch.builders import LaunchSpec, build_command
from distgrow.launch.environment import describe_env_changes, log_command
from distgrow.launch.error_file import ERROR_FILE_VAR
from distgrow.launch.executor import Outcome, Process, forwarding_signals, torchrun_status
from distgrow.launch.job import Job
from distgrow.rundir import RunDir
from distgrow.signals import exit_status

ELASTIC_GRACE_S = 30.0
"""Elastic: how long agents may outlive the first agent that ended, before they are stopped."""


def run_elastic_group(
    job: Job, workers: int, number: int, env: Mapping[str, str]
) -> tuple[Outcome, int, Path]:
    """One elastic launch: torchrun agents on this machine that grow the job in place.

    The controller starts ``workers`` agents of one worker each, and when rank 0 asks for more
    in an elastic ``resize.json`` (it goes on training the same global batch on the workers it
    has until they come, after ``launch.elastic_wait_s``), it starts the missing agents.
    Nothing is relaunched: the running agents, their rendezvous and their workers' training go
    on until the new agents have joined.

    Signals (SIGTERM, SIGINT, SIGUSR1) are forwarded to every agent, as
    :func:`~distgrow.launch.executor.run_subprocess` does for one launcher. Once an agent ends
    with 0 the run is complete; agents still waiting to join are stopped after
    :data:`ELASTIC_GRACE_S`. After a failure the other agents' workers lose their peers and end
    too (or are stopped after the same grace).

    Args:
        job: The job (``job.elastic_agents`` is true).
        workers: Agents (= workers) to start with.
        number: The launch's number, for its logs (``attempt-NN-agent-K.log``).
        env: The environment the env additions are described against.

    Returns:
        ``(outcome, agents started, log of the agent whose status is reported)``; the outcome's
        return code is already the workers' status (torchrun's root cause behind its 1).
    """
    rdzv_id = job.rdzv_id(number)
    argv, additions = build_command("torchrun", job.agent_spec(rdzv_id))
    job.run.launch_dir.mkdir(parents=True, exist_ok=True)
    job.log(
        f"launch {number}: elastic, {workers} torchrun agent(s) of 1 worker, rendezvous "
        f"{rdzv_id}; logs {job.run.agent_logs(number)}"
    )
    log_command(job.log, argv, additions, env)
    agents: list[Process] = []

    def start(count: int) -> None:
        for _ in range(count):
            index = len(agents)
            extra = job.agent_env(index)
            if extra:
                job.log(f"  agent {index}: " + ", ".join(describe_env_changes(extra, env)))
            path = job.run.agent_log(number, index)
            error_file = RunDir.error_file(path)  # torchrun's @record writes the root cause
            error_file.unlink(missing_ok=True)
            extra = {**extra, ERROR_FILE_VAR: str(error_file)}
            agents.append(Process(argv, {**os.environ, **additions, **extra}, path))

    def signal_all(signum: int) -> None:
        for agent in agents:
            agent.send(signum)

    ended_at: float | None = None
    stopping = 0  # 0: not yet; 1: SIGTERM sent to the agents left; 2: SIGKILL sent
    try:
        with forwarding_signals(signal_all) as received:
            start(workers)
            while True:
                codes = [agent.poll() for agent in agents]
                if all(code is not None for code in codes):
                    break
                if ended_at is None and any(code is not None for code in codes):
                    ended_at = time.monotonic()
                if ended_at is not None and time.monotonic() - ended_at > ELASTIC_GRACE_S * (
                    stopping + 1
                ):
                    stopping += 1
                    job.log(
                        f"an agent ended {ELASTIC_GRACE_S * stopping:.0f} s ago; stopping the "
                        f"{sum(code is None for code in codes)} still running"
                    )
                    signal_all(signal.SIGTERM if stopping == 1 else signal.SIGKILL)
                if not received and ended_at is None:
                    _grow(job, agents, number, start)
                time.sleep(0.1)
    finally:
        for agent in agents:
            agent.close()
    return _agents_outcome(agents, received[0] if received else None)


def _agents_outcome(agents: list[Process], forwarded: int | None) -> tuple[Outcome, int, Path]:
    """How an elastic launch ended, from its agents (all ended): done when one ended with 0;
    else the first agent whose workers failed on their own account (an agent we stopped
    reports only the signal): torchrun's root cause, else the agent's status."""
    if any(agent.proc.returncode == 0 for agent in agents):
        return Outcome(EXIT_OK, forwarded), len(agents), agents[0].log_path
    reports = []
    for agent in agents:
        raw = agent.proc.wait()  # ended: its status at once
        status, cause = torchrun_status(
            exit_status(-raw) if raw < 0 else raw,
            agent.log_path,
            agent.tail(),
            RunDir.error_file(agent.log_path),
        )
        reports.append((status, cause, agent))
    chosen = next((r for r in reports if r[1] is not None), reports[0])
    agent = chosen[2]
    outcome = Outcome(chosen[0], forwarded, agent.tail(), agent.log_error)
    return outcome, len(agents), agent.log_path


def _grow(job: Job, agents: list[Process], number: int, start: Callable[[int], None]) -> None:
    """Start the agents an elastic ``resize.json`` asks for (within the limit)."""
    request = job.run.read_resize()
    if request is None or not request.elastic:
        return
    need = request.need_workers
    job.run.set_aside_resize(RunDir.resize_set_aside(number, need=need))
    if need > job.limit:
        job.log(
            f"the workers ask for {need} workers, above the limit of {job.limit} "
            f"({job.limit_reason}): they go on with accumulation"
        )
    elif need > len(agents):
        job.log(
            f"the workers ask for {need} workers (epoch {request.epoch}, step {request.step}): "
            f"starting {need - len(agents)} more torchrun agent(s)"
        )
        start(need - len(agents))


def write_discovery_script(path: Path, spec: LaunchSpec) -> None:
    """Horovod Elastic's host discovery: the slots the growth plan needs now.

    The script starts with the launch's ``spec.workers`` slots and follows the workers: when
    rank 0 asks for more in an elastic ``resize.json`` (see ``Trainer.elastic_interim``), it
    offers that many (at most the elastic maximum), so the driver starts the new workers and
    the running ones re-form the job with them (see ``distgrow.backends.horovod_backend``).
    The count never shrinks (:mod:`distgrow.launch.discover` keeps it next to the script).
    Slots fill the hosts in order, ``ceil(max / nodes)`` per host.

    The script is Python run by the workers' interpreter, reading ``resize.json`` through
    :class:`~distgrow.rundir.RunDir`: no shell parses the request.
    """
    hosts = list(spec.hosts) or ["localhost"]
    most = spec.elastic_range[1]
    run_dir = path.parent.parent  # the script lives in <run dir>/launch/
    args = [
        str(run_dir),
        str(spec.workers),
        str(most),
        str(math.ceil(most / max(1, spec.nodes))),
        *hosts[: spec.nodes],
    ]
    root = str(Path(distgrow.__file__).resolve().parent.parent)
    script = (
        f"#!{spec.python or sys.executable}\n"
        "# Written by distgrow launch: Horovod Elastic host discovery (host:slots lines).\n"
        "import sys\n\n"
        f"sys.path.insert(0, {root!r})\n"
        "from distgrow.launch.discover import main\n\n"
        f"sys.exit(main({args!r}))\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).horovod_slots.unlink(missing_ok=True)  # a new launch starts from its count
    path.write_text(script)
    path.chmod(0o755)
