"""torchrun on several machines without SLURM: one ``distgrow launch`` per node, node 0 leads.

Every machine runs the same command with its own node rank::

    distgrow launch CONFIG launch.launcher=torchrun launch.nodes=2 \\
        launch.master_addr=<node 0's address> launch.node_rank=<0 or 1>

Node 0's controller decides everything, exactly as on one machine (it reads ``resize.json``,
relaunches wider or after a crash, stops on a signal), and before each launch it publishes
``(launch number, workers, resume, rendezvous id)`` on a small TCP store it serves at
``launch.master_addr:launch.master_port + 1``; at the end it publishes its exit status. The
other controllers follow: each starts torchrun with its node rank for every launch that spans
its node (a launch of fewer workers than nodes spans one node per worker), and ends with node
0's status. No shared file system is needed: rank 0 alone reads and writes the run directory,
and broadcasts the checkpoint it resumes from (``Trainer.open_run``).

A follower whose torchrun is still running when node 0 has already published the next launch
(node 0's launch failed before the rendezvous completed, so this one waits for peers that
never come) stops it and follows on.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from distgrow.exits import EXIT_FAILURE
from distgrow.launch.builders import LaunchError, build_command
from distgrow.launch.environment import log_command
from distgrow.launch.executor import Process, forwarding_signals
from distgrow.signals import exit_status

if TYPE_CHECKING:
    from torch.distributed import Store

    from distgrow.launch.job import Job

CONNECT_TIMEOUT_S = 600.0
"""How long a follower waits for node 0's store to answer (node 0 may start later)."""

ACK_WAIT_S = 60.0
"""How long node 0 waits, at the end, for the followers to read its exit status."""

STALE_GRACE_S = 15.0
"""How long a follower's torchrun may take to end by itself once node 0 has moved on."""

POLL_S = 0.2

_KEY = "distgrow/launch/{}"
_ACK = "distgrow/ack/{}"


def channel_port(master_port: int) -> int:
    """The port of node 0's store: the one above the rendezvous port (below it at 65535)."""
    return master_port + 1 if master_port < 65535 else master_port - 1


def _store(host: str, port: int, leader: bool, timeout_s: float) -> Store:
    """Node 0's store (served on every interface), or a client of it."""
    from torch.distributed import TCPStore  # torch only on a multi-node controller

    return TCPStore(
        host,
        port,
        is_master=leader,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
    )


class Leader:
    """Node 0's side: publishes each launch and the end; the controller calls it."""

    def __init__(self, job: Job, log: Callable[[str], None]) -> None:
        rdzv = job.rendezvous
        self.port = channel_port(rdzv.master_port)
        self.followers = rdzv.nodes - 1
        self.log = log
        try:
            self.store = _store(rdzv.master_addr, self.port, True, CONNECT_TIMEOUT_S)
        except RuntimeError as err:
            raise LaunchError(
                f"node 0 cannot serve the launch channel on port {self.port} "
                f"(launch.master_port + 1): {err}. Fix: choose a launch.master_port whose next "
                "port is free on every node"
            ) from None
        log(
            f"node 0 of {rdzv.nodes}: leading; the other nodes follow through port {self.port} "
            f"(run `distgrow launch ... launch.node_rank=R launch.master_addr="
            f"{rdzv.master_addr}` on each)"
        )

    def launch(self, number: int, workers: int, resume: bool, rdzv_id: str) -> None:
        """Tell the followers launch ``number`` starts (before node 0's own torchrun)."""
        message = {"workers": workers, "resume": resume, "rdzv_id": rdzv_id}
        self.store.set(_KEY.format(number), json.dumps(message))

    def end(self, number: int, status: int) -> None:
        """Publish the run's exit status as message ``number``; wait for the followers."""
        self.store.set(_KEY.format(number), json.dumps({"end": status}))
        deadline = time.monotonic() + ACK_WAIT_S
        missing = list(range(1, self.followers + 1))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not self.store.check([_ACK.format(r)])]
            if missing:
                time.sleep(POLL_S)
        if missing:
            self.log(
                f"node(s) {', '.join(map(str, missing))} did not read the end within "
                f"{ACK_WAIT_S:.0f} s (gone already, or never started)"
            )


def follow(
    job: Job, env: Mapping[str, str], log: Callable[[str], None], dry_run: bool = False
) -> int:
    """A follower's whole run: the launches node 0 publishes, then node 0's exit status.

    Returns:
        Node 0's exit status, or 128 + N after a signal N stopped this node's workers, or 1
        when node 0 cannot be reached.
    """
    rdzv = job.rendezvous
    port = channel_port(rdzv.master_port)
    if dry_run:
        log(
            f"dry run: node {rdzv.node_rank} of {rdzv.nodes} follows node 0 at "
            f"{rdzv.master_addr}:{port}: it starts torchrun with --node_rank={rdzv.node_rank} "
            "for each launch of at least "
            f"{rdzv.node_rank + 1} worker(s) that node 0 publishes"
        )
        return 0
    log(f"node {rdzv.node_rank} of {rdzv.nodes}: following node 0 at {rdzv.master_addr}:{port}")
    try:
        store = _store(rdzv.master_addr, port, False, CONNECT_TIMEOUT_S)
    except RuntimeError as err:
        log(f"cannot reach node 0's launch channel at {rdzv.master_addr}:{port}: {err}")
        return EXIT_FAILURE
    number = 1
    while True:
        message = _wait(store, number)
        if message is None:
            log(f"node 0's launch channel at {rdzv.master_addr}:{port} closed before the end")
            return EXIT_FAILURE
        if "end" in message:
            status = int(message["end"])
            store.set(_ACK.format(rdzv.node_rank), "1")
            log(f"node 0 ended the run with exit {status}")
            return status
        workers, resume = int(message["workers"]), bool(message["resume"])
        spanned = job.fixed_nodes(workers)
        if rdzv.node_rank >= spanned:
            log(f"launch {number}: {workers} worker(s) on {spanned} node(s), not this one")
        else:
            stopped = _run_one(job, store, number, workers, resume, str(message["rdzv_id"]), env)
            if stopped is not None:
                return exit_status(stopped)
        number += 1


def _wait(store: Store, number: int) -> dict[str, Any] | None:
    """Message ``number`` (polled, so that signals are handled); None when node 0 is gone."""
    key = _KEY.format(number)
    while True:
        try:
            if store.check([key]):
                return dict(json.loads(store.get(key)))
        except RuntimeError:  # the connection to node 0 broke: it has exited
            return None
        time.sleep(POLL_S)


def _run_one(
    job: Job,
    store: Store,
    number: int,
    workers: int,
    resume: bool,
    rdzv_id: str,
    env: Mapping[str, str],
) -> int | None:
    """This node's torchrun for launch ``number``; the signal that stopped it, if any."""
    argv, additions = build_command("torchrun", job.spec(workers, resume, rdzv_id))
    node = job.rendezvous.node_rank
    log_path = job.run.attempt_log(number, workers, node)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job.log(f"launch {number}: {workers} worker(s); log {log_path}")
    log_command(job.log, argv, additions, env)
    process = Process(argv, {**env, **additions}, log_path, None)
    moved_on: float | None = None
    try:
        with forwarding_signals(process.send) as received:
            while process.poll() is None:
                if moved_on is None and store.check([_KEY.format(number + 1)]):
                    moved_on = time.monotonic()
                if moved_on is not None and time.monotonic() - moved_on > STALE_GRACE_S:
                    job.log(f"node 0 moved past launch {number}: stopping this node's torchrun")
                    process.send(signal.SIGTERM)
                    moved_on = float("inf")  # sent once
                time.sleep(POLL_S)
    except RuntimeError:
        pass  # node 0 is gone; the next wait says so
    finally:
        process.close()
    return received[0] if received else None


def leader_for(job: Job, log: Callable[[str], None]) -> Leader | None:
    """A :class:`Leader` when ``job`` spans several nodes under torchrun on node 0, else None."""
    return Leader(job, log) if job.node_leader else None


def is_follower(job: Job) -> bool:
    """True on nodes 1.. of a multi-node torchrun job."""
    return job.multi_node_torchrun and job.rendezvous.node_rank > 0


__all__ = ["Leader", "channel_port", "follow", "is_follower", "leader_for"]
