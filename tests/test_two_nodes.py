"""One job across two hosts: two containers on a Docker bridge network, each its own address.

The hosts run the ``distgrow:test`` image (``docker_fixtures.py``) on a user-defined bridge
network; only the addresses Docker gives them are used (no loopback). Each host mounts a folder
of its own at /out (the DDP runs: only node 0's ends up holding the run) and one folder both
mount at /shared (the FSDP runs, whose every rank writes its shards into the run directory, as
on a cluster's shared file system).

* **torchrun, static and c10d rendezvous.** Each host runs ``distgrow launch`` with its own
  ``launch.node_rank``; node 0's controller leads, node 1's follows (``distgrow.launch.nodes``).
  The plan of ``test_launch_integration.py`` grows 1 -> 2 -> 4 workers: the first launch runs on
  node 0 alone, the second puts one worker on each host, the third two on each. The finished
  run must equal the same config run on one host (4 workers on node 0 alone, same image) bit
  for bit: on CPU gloo's all-reduce of the same tensors over the same ranks adds them in the
  same order whichever host each rank is on, so nothing may differ at all.
* **FSDP2 (``backend.name: fsdp``), torchrun static.** The same 1 -> 2 -> 4 plan with its run
  directory in /shared: each relaunch wider resumes from the sharded checkpoint
  (``torch.distributed.checkpoint``) the narrower launch wrote, node 1's ranks reading and
  writing their shards there. It must equal the DDP run on one host within the tolerance of
  docs/backends.md (rtol 1e-5, atol 1e-6: reduce-scatter sums in another order than DDP's
  all-reduce, a few ulp per update). With the run directory on each host's own disk instead,
  the relaunch onto node 1 stops with the one line that says the directory must be shared.
* **SLURM.** One controller and two compute nodes in containers (``docker/slurm``: slurm-wlm
  and munge on top of the image) run ``slurm/distgrow.sbatch`` with ``--nodes=2``: the 4-worker
  job step spans both hosts, and the result equals the single-host run too.
* **SLURM chain mode** (``launch.slurm: chain``), submitted from the controller (the login
  node): one job per span, each of its span's size (two tasks per node), the last on both
  nodes; the result equals the single-host run again.

Horovod and DeepSpeed across the two hosts: see docs/launch.md ("Several machines"), which says
what is tested and what is not.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, assert_same_model, write_config
from test_launch_integration import GROWING, PLANNED_WORKERS

from distgrow.backends.sharded_state import id_keyed, is_sharded, read_full
from distgrow.checkpoint import load_latest
from distgrow.metrics import read_jsonl
from distgrow.rundir import RunDir, SlurmJobs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

RUN_TIMEOUT_S = 900  # one growing run across the hosts (2 cores for everything)
SLURM_IMAGE = "distgrow-slurm:test"
SLURM_CONTEXT = REPO_ROOT / "docker" / "slurm"
PORT = 29500  # each host has its own network namespace: no other job shares it
SHARED = "/shared"  # where both hosts of ``two_hosts`` mount one folder (the FSDP runs)


def _sh(
    cmd: list[str], env: dict[str, str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)}")
    return proc


@dataclass(frozen=True)
class Host:
    """A container on the bridge network: its name, its address, and its own folder (/out)."""

    name: str
    ip: str
    out: Path


class Cluster:
    """Containers on one user-defined bridge network; removed at the end."""

    def __init__(self, env: dict[str, str], root: Path) -> None:
        self.env = env
        self.root = root
        self.tag = uuid.uuid4().hex[:8]
        self.network = f"distgrow-nodes-{self.tag}"
        self.hosts: list[Host] = []
        _sh(["docker", "network", "create", self.network], env)

    def start(self, name: str, image: str, *options: str) -> Host:
        """A container named (and with the host name) ``name``, doing nothing until exec'd."""
        out = self.root / name
        out.mkdir()
        out.chmod(0o777)
        container = f"{name}-{self.tag}"
        _sh(
            [
                "docker",
                "run",
                "-d",
                "--rm",
                "--name",
                container,
                "--hostname",
                name,
                "--network",
                self.network,
                "--network-alias",
                name,
                "--shm-size=512m",
                "-e",
                "WANDB_MODE=disabled",
                "-v",
                f"{out}:/out",
                *options,
                "--entrypoint",
                "sleep",
                image,
                "infinity",
            ],
            self.env,
        )
        ip = _sh(
            [
                "docker",
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ],
            self.env,
        ).stdout.strip()
        assert ip and not ip.startswith("127."), ip
        host = Host(container, ip, out)
        self.hosts.append(host)
        return host

    def exec(
        self, host: Host, *argv: str, env: dict[str, str] | None = None, workdir: str = ""
    ) -> list[str]:
        """``docker exec`` argv for ``host`` (with extra environment variables, in ``workdir``)."""
        extra = [f"--env={k}={v}" for k, v in (env or {}).items()]
        if workdir:
            extra.append(f"--workdir={workdir}")
        return ["docker", "exec", *extra, host.name, *argv]

    def close(self) -> None:
        for host in self.hosts:
            _sh(["docker", "rm", "-f", host.name], self.env, check=False)
        _sh(["docker", "network", "rm", self.network], self.env, check=False)


@pytest.fixture(scope="module")
def two_hosts(
    docker_env: dict[str, str], image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, Host, Host]]:
    """Two containers of the image on a bridge network: node 0 and node 1."""
    root = tmp_path_factory.mktemp("two-hosts")
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cluster = Cluster(docker_env, root)
    try:
        mount = ["-v", f"{shared}:{SHARED}"]
        a, b = cluster.start("node0", image, *mount), cluster.start("node1", image, *mount)
        assert a.ip != b.ip
        yield cluster, a, b
    finally:
        cluster.close()


def shared_folder(host: Host) -> Path:
    """The folder both hosts of ``two_hosts`` mount at /shared, as seen from here."""
    return host.out.parent / "shared"


def growing_config(
    host: Host, name: str, backend: str = "torch", folder: str = "/out", **launch: Any
) -> str:
    """The 1 -> 2 -> 4 plan, its run (and the config) in the host's ``folder`` (/out: its own;
    /shared: both hosts'); the config's path inside the container."""
    tree = {
        **GROWING,
        "run": {**GROWING["run"], "name": name, "output_dir": f"{folder}/{name}"},
        "backend": {"name": backend},
        "launch": {"launcher": "torchrun", "max_restarts": 0, "master_port": PORT, **launch},
    }
    here = host.out if folder == "/out" else shared_folder(host)
    write_config(here / f"{name}.yaml", tree)
    return f"{folder}/{name}.yaml"


def finish(
    procs: list[subprocess.Popen[str]], timeout: float = RUN_TIMEOUT_S, ok: bool = True
) -> list[str]:
    """Wait for every process; fail with all their output if one hangs, or (``ok``) fails."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        rest = [proc.communicate()[0] for proc in procs]
        pytest.fail("the run hung:\n" + "\n-----\n".join(o[-6000:] for o in outputs + rest))
    codes = [proc.returncode for proc in procs]
    if ok:
        assert codes == [0] * len(procs), "\n-----\n".join(o[-8000:] for o in outputs)
    return outputs


def popen(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def epoch_ends(run_dir: Path) -> list[tuple[int, int, int]]:
    """(epoch, samples_seen, workers) of each epoch record."""
    return [
        (r["epoch"], r["samples_seen"], r["workers"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r["kind"] == "epoch"
    ]


def final_state(run_dir: Path) -> dict[str, Any]:
    found = load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]


@pytest.fixture(scope="module")
def one_host_run(two_hosts: tuple[Cluster, Host, Host]) -> Path:
    """The same config on node 0 alone (torchrun, 1 -> 2 -> 4 workers on one host)."""
    cluster, a, _ = two_hosts
    config = growing_config(a, "one-host")
    finish([popen(cluster.exec(a, "distgrow", "launch", config), cluster.env)])
    run_dir = a.out / "one-host"
    train = json.loads((run_dir / "summary.json").read_text())["samples_seen"] // 3
    assert epoch_ends(run_dir) == [
        (epoch, epoch * train, workers) for epoch, workers in enumerate(PLANNED_WORKERS, 1)
    ]
    return run_dir


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_grows_1_2_4_across_two_hosts_to_the_one_host_result(
    two_hosts: tuple[Cluster, Host, Host], one_host_run: Path, rdzv: str
) -> None:
    cluster, a, b = two_hosts
    name = f"two-hosts-{rdzv}"
    launch: dict[str, Any] = {"nodes": 2, "master_addr": a.ip, "rdzv": rdzv}
    config = growing_config(a, name, **launch)
    assert growing_config(b, name, **launch) == config  # the same file on both hosts
    leader = popen(cluster.exec(a, "distgrow", "launch", config, "launch.node_rank=0"), cluster.env)
    follower = popen(
        cluster.exec(b, "distgrow", "launch", config, "launch.node_rank=1"), cluster.env
    )
    out_a, out_b = finish([leader, follower])

    # Node 1 sat out the 1-worker launch and ran torchrun as node 1 of 2 for the others,
    # meeting node 0 at its address.
    assert "launch 1: 1 worker(s) on 1 node(s), not this one" in out_b, out_b
    meet = f"--master_addr={a.ip}" if rdzv == "static" else f"--rdzv_endpoint={a.ip}:{PORT}"
    for workers in (2, 4):
        line = next(x for x in out_b.splitlines() if f"--nproc_per_node={workers // 2}" in x)
        assert "--nnodes=2" in line and meet in line, line
        if rdzv == "static":
            assert "--node_rank=1" in line, line
        log = b.out / name / "launch" / f"attempt-0{2 if workers == 2 else 3}-{workers}w-node1.log"
        assert log.is_file(), sorted(p.name for p in (b.out / name / "launch").iterdir())
    assert "node 0 ended the run with exit 0" in out_b, out_b
    assert "done: 3 launch(es)" in out_a, out_a
    # Nothing is shared: the run (metrics, checkpoints) is node 0's alone.
    assert not (b.out / name / "metrics.jsonl").exists()
    assert not list((b.out / name).glob("ckpt-*"))

    run_dir = a.out / name
    assert epoch_ends(run_dir) == epoch_ends(one_host_run)
    assert [p.name for p in sorted((run_dir / "launch").glob("attempt-*.log"))] == [
        "attempt-01-1w.log",
        "attempt-02-2w.log",
        "attempt-03-4w.log",
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    got, want = final_state(run_dir), final_state(one_host_run)
    assert got["step"] == want["step"] == summary["total_updates"]
    assert_same_model(got["model"], want["model"], exact=True)
    for key, state in want["optimizer"]["state"].items():
        assert_same_model(
            {"m": got["optimizer"]["state"][key]["momentum_buffer"]},
            {"m": state["momentum_buffer"]},
            exact=True,
        )


# --------------------------------------------------------------------------------------------
# FSDP2 across the two hosts: a run directory both hosts share
# --------------------------------------------------------------------------------------------


def test_fsdp_grows_1_2_4_across_two_hosts_on_a_shared_run_directory(
    two_hosts: tuple[Cluster, Host, Host], one_host_run: Path
) -> None:
    """backend.name=fsdp, torchrun --nnodes=2 (static): each relaunch wider reshards."""
    cluster, a, b = two_hosts
    name = "two-hosts-fsdp"
    launch: dict[str, Any] = {"nodes": 2, "master_addr": a.ip, "rdzv": "static"}
    config = growing_config(a, name, backend="fsdp", folder=SHARED, **launch)
    leader = popen(cluster.exec(a, "distgrow", "launch", config, "launch.node_rank=0"), cluster.env)
    follower = popen(
        cluster.exec(b, "distgrow", "launch", config, "launch.node_rank=1"), cluster.env
    )
    out_a, out_b = finish([leader, follower])
    assert "done: 3 launch(es)" in out_a, out_a
    assert "node 0 ended the run with exit 0" in out_b, out_b
    for workers in (2, 4):
        line = next(x for x in out_b.splitlines() if f"--nproc_per_node={workers // 2}" in x)
        assert "--nnodes=2" in line and "--node_rank=1" in line, line

    run_dir = shared_folder(a) / name
    # Both controllers' logs in the one run directory; node 1's for the launches it ran.
    assert sorted(p.name for p in (run_dir / "launch").glob("attempt-*.log")) == [
        "attempt-01-1w.log",
        "attempt-02-2w-node1.log",
        "attempt-02-2w.log",
        "attempt-03-4w-node1.log",
        "attempt-03-4w.log",
    ]
    starts = [
        (r["event"], r["world_size"])
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r.get("event") in ("start", "resume")
    ]
    assert starts == [("start", 1), ("resume", 2), ("resume", 4)]  # each from the shards
    assert epoch_ends(run_dir) == epoch_ends(one_host_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4

    got, want = final_state(run_dir), final_state(one_host_run)
    assert got["step"] == want["step"] == summary["total_updates"]
    assert is_sharded(got["model"]), got["model"]
    shards = run_dir / got["model"]["sharded_dcp"]
    # Every rank wrote its own shards there: ranks 2 and 3 ran on node 1.
    ranks = {
        int(m[1]) for p in shards.iterdir() if (m := re.match(r"__(\d+)_\d+\.distcp$", p.name))
    }
    assert ranks == {0, 1, 2, 3}, sorted(p.name for p in shards.iterdir())
    full = read_full(shards)
    # Within docs/backends.md's FSDP tolerance of DDP (rtol 1e-5, atol 1e-6), momentum too.
    assert_same_model(full["model"], want["model"])
    names = [full["optim"]["param_groups"][0]["params"]]
    momentum = id_keyed(full["optim"], names)["state"]
    for key, state in want["optimizer"]["state"].items():
        assert_same_model({"m": momentum[key]["momentum_buffer"]}, {"m": state["momentum_buffer"]})
    # The figures docs/backends.md quotes (pytest -s): the largest difference of any tensor,
    # as a share of that tensor's largest value.
    params = max(_share(full["model"][k], v) for k, v in want["model"].items())
    moms = max(
        _share(momentum[k]["momentum_buffer"], s["momentum_buffer"])
        for k, s in want["optimizer"]["state"].items()
    )
    print(f"fsdp on two hosts against DDP on one: parameters {params:.1e}, momentum {moms:.1e}")


def _share(got: Any, want: Any) -> float:
    """``max |got - want|`` as a share of ``max |want|``."""
    return float((got - want).abs().max() / want.abs().max())


def test_fsdp_on_each_hosts_own_disk_stops_at_the_relaunch_with_the_fix(
    two_hosts: tuple[Cluster, Host, Host],
) -> None:
    """The run directory in each host's own /out: the first launch (node 0 alone) saves its
    shards there; the relaunch onto both hosts stops every rank with one line (node 1's rank
    sees no shards), exit 2, and nothing is retried."""
    cluster, a, b = two_hosts
    name = "unshared-fsdp"
    launch: dict[str, Any] = {"nodes": 2, "master_addr": a.ip, "rdzv": "static"}
    config = growing_config(a, name, backend="fsdp", **launch)
    assert growing_config(b, name, backend="fsdp", **launch) == config
    wait = {"DISTGROW_SHARDS_SEEN_WITHIN_S": "2"}  # not NFS's 60 s: nothing will appear
    argv = ["distgrow", "launch", config]
    leader = popen(cluster.exec(a, *argv, "launch.node_rank=0", env=wait), cluster.env)
    follower = popen(cluster.exec(b, *argv, "launch.node_rank=1", env=wait), cluster.env)
    out_a, out_b = finish([leader, follower], ok=False)
    assert leader.returncode == 2, out_a[-6000:]
    line = re.compile(
        r"a rank does not see /out/unshared-fsdp/ckpt-\d+\.dcp/\.metadata, of the checkpoint "
        r"this run resumes from: under backend\.name=fsdp every rank writes and reads its "
        r"shards in the run directory, so it must be one shared file system on every node\. "
        r"Fix: set run\.output_dir to a shared path"
    )
    log = (a.out / name / "launch" / "attempt-02-2w.log").read_text()
    assert line.search(log), log[-6000:]
    assert "FileNotFoundError" not in log and "CheckpointException" not in log, log[-6000:]
    assert "distgrow launch: done:" not in out_a, out_a[-6000:]
    assert not list((a.out / name / "launch").glob("attempt-03*"))  # a usage error: no retry
    assert "node 0 ended the run with exit 2" in out_b, out_b[-6000:]
    assert list((a.out / name).glob("ckpt-*.dcp")) and not list((b.out / name).glob("ckpt-*"))


# --------------------------------------------------------------------------------------------
# SLURM: one controller and two compute nodes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_image(docker_env: dict[str, str], image: str) -> str:
    """``distgrow-slurm:test``: slurm-wlm and munge on top of the image (docker/slurm)."""
    started = time.monotonic()
    proc = _sh(
        ["docker", "build", "-t", SLURM_IMAGE, "--build-arg", f"IMAGE={image}", str(SLURM_CONTEXT)],
        docker_env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"docker build docker/slurm failed:\n{proc.stdout[-4000:]}"
    print(f"{SLURM_IMAGE} built in {time.monotonic() - started:.0f} s")
    return SLURM_IMAGE


@dataclass
class SlurmCluster:
    """A running cluster: ``controller`` (slurmctld), compute ``nodes`` (slurmd), and the
    folder every container mounts at /shared (``shared`` here)."""

    cluster: Cluster
    controller: Host
    nodes: list[Host]
    shared: Path

    def sbatch(self, job: str, *args: str, timeout: float = RUN_TIMEOUT_S) -> str:
        """``sbatch --wait ARGS`` on the controller, from /shared/JOB; fails on a non-zero exit.

        Returns:
            The job's output file (``distgrow-<name>-<id>.out``), whole.
        """
        (self.shared / job).mkdir(exist_ok=True)
        cmd = self.cluster.exec(
            self.controller, "sbatch", "--wait", f"--chdir=/shared/{job}", *args
        )
        proc = _sh(cmd, self.cluster.env, timeout=timeout, check=False)
        outputs = "\n".join(p.read_text() for p in sorted((self.shared / job).glob("*.out")))
        assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stderr}\n{outputs}"
        return outputs


@pytest.fixture(scope="module")
def slurm_cluster(
    docker_env: dict[str, str], slurm_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmCluster]:
    """One controller and two compute nodes, each a container with its own address.

    For the chain mode's test too (``launch.slurm: chain``): submit with
    ``slurm_cluster.sbatch(job, ...)``; ``slurm_cluster.shared / job`` is where the job's run
    and output files land.
    """
    root = tmp_path_factory.mktemp("slurm-cluster")
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cluster = Cluster(docker_env, root)
    try:
        mount = ["-v", f"{shared}:/shared"]
        ctl = cluster.start("slurmctl", slurm_image, *mount)
        nodes = [cluster.start(f"n{i}", slurm_image, *mount) for i in (1, 2)]
        setup = ["distgrow-slurm", "conf", "slurmctl", ctl.ip]
        setup += [f"n{i}:{host.ip}" for i, host in enumerate(nodes, 1)]
        _sh(cluster.exec(ctl, *setup), docker_env)
        _sh(cluster.exec(ctl, "distgrow-slurm", "controller"), docker_env)
        for i, host in enumerate(nodes, 1):
            _sh(cluster.exec(host, "distgrow-slurm", "node", f"n{i}"), docker_env)
        _sh(cluster.exec(ctl, "distgrow-slurm", "wait", "2"), docker_env)
        yield SlurmCluster(cluster, ctl, nodes, shared)
    finally:
        cluster.close()


def test_sbatch_runs_one_job_across_two_slurm_nodes_to_the_one_host_result(
    slurm_cluster: SlurmCluster, one_host_run: Path
) -> None:
    shared = slurm_cluster.shared
    job = "grow"
    (shared / job).mkdir()
    tree = {
        **GROWING,
        "run": {**GROWING["run"], "name": job, "output_dir": f"/shared/{job}/run"},
        "launch": {"max_restarts": 0, "master_port": PORT},  # auto: srun in the allocation
    }
    write_config(shared / job / "grow.yaml", tree)
    output = slurm_cluster.sbatch(
        job,
        "--nodes=2",
        "--ntasks-per-node=2",
        "--export=ALL,WANDB_MODE=disabled",
        "/opt/distgrow/slurm/distgrow.sbatch",
        f"/shared/{job}/grow.yaml",
    )
    # The controller ran on n1 and placed each span as a job step: the 4-worker one on both.
    assert "on n[1-2] (4 tasks)" in output, output
    assert "srun --ntasks=1 --nodes=1" in output, output
    assert "srun --ntasks=4 --nodes=2" in output, output
    n2 = (shared / "slurm" / "log" / "slurmd-n2.log").read_text()
    assert "launch task StepId=" in n2, n2[-3000:]

    run_dir = shared / job / "run"
    assert epoch_ends(run_dir) == epoch_ends(one_host_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    got, want = final_state(run_dir), final_state(one_host_run)
    assert got["step"] == want["step"]
    assert_same_model(got["model"], want["model"], exact=True)


@pytest.mark.parametrize("backend", ["torch", "fsdp"])
def test_chain_mode_runs_each_span_as_its_own_job_the_last_on_both_nodes(
    slurm_cluster: SlurmCluster, one_host_run: Path, backend: str
) -> None:
    """``launch.slurm=chain`` from the login node: 1 -> 2 -> 4 workers, two tasks per node.

    Three jobs, each the size of its span: 1 task on one node, 2 on one node, 4 on n1 and n2
    (the third span's job is submitted by the second from inside SLURM, and runs one job step
    across both nodes). Each span resumes from the checkpoint the one before wrote, as each
    launch of the one-host run does: the result equals it bit for bit (torch); under fsdp each
    span reshards the one before's shards in /shared and ends within docs/backends.md's
    tolerance of it (rtol 1e-5, atol 1e-6).
    """
    shared, cluster, ctl = slurm_cluster.shared, slurm_cluster.cluster, slurm_cluster.controller
    job = "chain" if backend == "torch" else f"chain-{backend}"
    (shared / job).mkdir()
    tree = {
        **GROWING,
        "run": {**GROWING["run"], "name": job, "output_dir": f"/shared/{job}/run"},
        "backend": {"name": backend},
        "launch": {"max_restarts": 0, "master_port": PORT, "chain": {"tasks_per_node": 2}},
    }
    write_config(shared / job / "grow.yaml", tree)
    submit = cluster.exec(
        ctl, "distgrow", "launch", tree_path(job), "launch.slurm=chain", workdir=f"/shared/{job}"
    )
    proc = _sh(submit, cluster.env, timeout=120)
    assert "submitted span 1: job" in proc.stdout + proc.stderr, proc.stdout + proc.stderr

    run_dir = shared / job / "run"

    def jobs() -> SlurmJobs:
        found = RunDir(run_dir).read_slurm_jobs()
        return found if found is not None else SlurmJobs("?", "?")

    def logs() -> str:
        outs = sorted((run_dir / "launch").glob("span-*.out"))
        return json.dumps(jobs().to_dict()) + "".join(
            f"\n== {p.name}\n{p.read_text()}" for p in outs
        )

    def ended() -> bool:
        known = jobs().jobs
        if len(known) < 3 or known[-1].state in ("submitted", "running"):
            return False
        queue = _sh(cluster.exec(ctl, "squeue", "-h", "-n", jobs().name, "-o", "%i"), cluster.env)
        return not queue.stdout.strip()

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ended():
        if time.monotonic() > deadline:
            pytest.fail(f"the chain did not end in {RUN_TIMEOUT_S} s: {logs()[-8000:]}")
        time.sleep(2)

    chain = jobs()
    assert chain.mode == "chain" and not chain.cancel_requested
    assert [(j.index, j.workers, j.nodes, j.tasks, j.cpus, j.state) for j in chain.jobs] == [
        (1, 1, 1, 1, 1, "grown"),
        (2, 2, 1, 2, 2, "grown"),
        (3, 4, 2, 4, 4, "completed"),
    ], logs()
    assert [j.next_job_id for j in chain.jobs] == [chain.jobs[1].job_id, chain.jobs[2].job_id, None]
    span3 = (run_dir / "launch" / "span-03.sbatch").read_text()
    assert "#SBATCH --nodes=2\n" in span3 and "#SBATCH --ntasks=4\n" in span3, span3
    # SLURM's own records (jobcomp/filetxt): each job's size, and the last one on both nodes.
    records: dict[str | None, dict[str, str]] = {}
    for line in (shared / "slurm" / "log" / "jobcomp.txt").read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        records[fields.get("JobId")] = fields
    assert [
        (records[j.job_id]["JobState"], records[j.job_id]["NodeCnt"], records[j.job_id]["ProcCnt"])
        for j in chain.jobs
    ] == [("COMPLETED", "1", "1"), ("COMPLETED", "1", "2"), ("COMPLETED", "2", "4")], records
    assert records[chain.jobs[2].job_id]["NodeList"] == "n[1-2]", records

    assert epoch_ends(run_dir) == epoch_ends(one_host_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    got, want = final_state(run_dir), final_state(one_host_run)
    assert got["step"] == want["step"] == summary["total_updates"]
    if backend == "torch":
        assert_same_model(got["model"], want["model"], exact=True)
        return
    assert is_sharded(got["model"]), got["model"]
    assert_same_model(read_full(run_dir / got["model"]["sharded_dcp"])["model"], want["model"])


# --------------------------------------------------------------------------------------------
# Hostfile launchers over ssh: horovodrun and deepspeed (pdsh)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssh_nodes(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The compute nodes with sshd and root's key: the remote shell the launchers use."""
    for host in slurm_cluster.nodes:
        _sh(slurm_cluster.cluster.exec(host, "distgrow-slurm", "ssh"), slurm_cluster.cluster.env)
    return slurm_cluster


@pytest.mark.parametrize(
    ("launcher", "backend"),
    [("horovodrun", {"name": "horovod"}), ("deepspeed", {"name": "deepspeed", "zero_stage": 0})],
)
def test_a_hostfile_launcher_grows_1_2_4_across_two_hosts_over_ssh(
    ssh_nodes: SlurmCluster, one_host_run: Path, launcher: str, backend: dict[str, Any]
) -> None:
    shared, cluster = ssh_nodes.shared, ssh_nodes.cluster
    job = f"hostfile-{launcher}"
    (shared / job).mkdir()
    (shared / job / "hosts").write_text("n1 slots=2\nn2 slots=2\n")
    tree = {
        **GROWING,
        "run": {**GROWING["run"], "name": job, "output_dir": f"/shared/{job}/run"},
        "backend": backend,
        "launch": {
            "launcher": launcher,
            "nodes": 2,
            "hostfile": f"/shared/{job}/hosts",
            "master_addr": "n1",
            "master_port": PORT,
            "max_restarts": 0,
        },
    }
    write_config(shared / job / "grow.yaml", tree)
    n1 = ssh_nodes.nodes[0]
    (output,) = finish([popen(cluster.exec(n1, "distgrow", "launch", tree_path(job)), cluster.env)])
    assert "done: 3 launch(es)" in output, output[-6000:]
    run_dir = shared / job / "run"
    assert epoch_ends(run_dir) == epoch_ends(one_host_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 4
    got, want = final_state(run_dir), final_state(one_host_run)
    assert got["step"] == want["step"]
    # Another all-reduce than torch's gloo DDP (Horovod's, DeepSpeed's): equal to float rounding.
    assert_same_model(got["model"], want["model"])


def tree_path(job: str) -> str:
    return f"/shared/{job}/grow.yaml"
