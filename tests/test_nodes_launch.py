"""torchrun on several machines without SLURM: the config, the commands, leader and follower.

Fast: no training. The leader publishes launches on a real TCP store and the follower runs
them with ``/bin/echo`` standing in for the interpreter, so each "torchrun" prints its command
line and exits 0. The real thing, across two hosts, is ``test_two_nodes.py``.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port
from test_dockerfile import hadolint

from distgrow.config import ConfigError, load_config
from distgrow.launch import run_controller
from distgrow.launch.builders import LaunchSpec, build_command, build_torchrun
from distgrow.launch.job import Job, prepare
from distgrow.launch.nodes import Leader, channel_port, follow, is_follower

ECHO = "/bin/echo"


def test_node_rank_outside_the_nodes_is_one_clear_line() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["launch.nodes=2", "launch.node_rank=2"])
    assert str(err.value) == (
        "launch.node_rank = 2: must be in [0, launch.nodes=2). Fix: 0 on the machine at "
        "launch.master_addr, 1.. on the others."
    )
    with pytest.raises(ConfigError, match="launch.rdzv"):
        load_config(None, ["launch.rdzv=etcd"])


def test_c10d_with_a_fixed_node_count() -> None:
    spec = LaunchSpec(
        workers=4,
        config="c.yaml",
        python="py",
        nodes=2,
        node_rank=1,
        master_addr="10.0.0.2",
        master_port=29400,
        rdzv_backend="c10d",
        rdzv_id="run-3",
    )
    argv, _ = build_torchrun(spec)
    assert argv[:8] == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.2:29400",
        "--rdzv_id=run-3",
    ]
    assert not any(a.startswith("--node_rank") for a in argv)  # torchrun orders the nodes


def _job(rank: int, port: int, *extra: str) -> Job:
    overrides = [
        "launch.launcher=torchrun",
        "launch.nodes=2",
        f"launch.node_rank={rank}",
        f"launch.master_port={port}",
        "growth.max_workers=4",
        *extra,
    ]
    cfg = load_config(None, overrides)
    lines: list[str] = []
    return prepare("c.yaml", overrides, cfg, {}, lines.append, ECHO, 0)[0]


def test_a_launch_of_fewer_workers_than_nodes_spans_one_node_per_worker(tmp_path: Path) -> None:
    job = _job(0, 29500, f"run.output_dir={tmp_path}")
    assert [job.fixed_nodes(w) for w in (1, 2, 4)] == [1, 2, 2]
    assert job.spec(1, False).nodes == 1
    assert job.spec(4, True).workers_per_node == 2
    assert not is_follower(job)
    follower = _job(1, 29500, f"run.output_dir={tmp_path}")
    assert is_follower(follower)
    assert channel_port(29500) == 29501 and channel_port(65535) == 65534


def test_the_follower_runs_the_launches_that_span_its_node_and_ends_with_node_0s_status(
    tmp_path: Path,
) -> None:
    port = free_port()
    leader_job = _job(0, port, f"run.output_dir={tmp_path}/a")
    follower_job = _job(1, port, f"run.output_dir={tmp_path}/b")
    lines: list[str] = []
    leader = Leader(leader_job, lines.append)
    follower_job.log = lines.append
    result: list[int] = []
    thread = threading.Thread(
        target=lambda: result.append(follow(follower_job, {}, lines.append)), daemon=True
    )
    thread.start()
    leader.launch(1, 1, False, "id-1")
    leader.launch(2, 2, True, "id-2")
    leader.launch(3, 4, True, "id-3")
    leader.end(4, 7)
    thread.join(60)
    assert result == [7]
    assert "launch 1: 1 worker(s) on 1 node(s), not this one" in lines
    commands = [line for line in lines if line.startswith(f"  $ {ECHO} -m torch.distributed.run")]
    assert len(commands) == 2
    assert "--nproc_per_node=1 --nnodes=2 --node_rank=1" in commands[0]
    assert "--nproc_per_node=2 --nnodes=2 --node_rank=1" in commands[1]
    assert all(c.endswith("run.resume=true") for c in commands)
    logs = sorted(p.name for p in (tmp_path / "b" / "launch").iterdir())
    assert logs == ["attempt-02-2w-node1.log", "attempt-03-4w-node1.log"]
    # What /bin/echo printed is the command torchrun would have run: node rank 1 of 2.
    assert "--node_rank=1" in (tmp_path / "b" / "launch" / logs[1]).read_text()


def test_a_follower_dry_run_says_what_it_would_do(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("launch: {launcher: torchrun, nodes: 2, node_rank: 1}\n")
    lines: list[str] = []
    code = run_controller(
        str(config),
        [f"run.output_dir={tmp_path}/run"],
        load_config(config, [f"run.output_dir={tmp_path}/run"]),
        dry_run=True,
        env={},
        log=lines.append,
        python=ECHO,
        gpus_on_node=0,
    )
    assert code == 0
    assert any("node 1 of 2 follows node 0 at 127.0.0.1:29501" in line for line in lines), lines


def test_horovodrun_with_a_hostfile_starts_only_the_workers_asked_for(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nn1 slots=2\n\nn2:2  # the second\n")
    cfg = load_config(
        None,
        [
            "backend.name=horovod",
            "launch.launcher=horovodrun",
            "launch.nodes=2",
            f"launch.hostfile={hosts}",
            "growth.max_workers=4",
            f"run.output_dir={tmp_path}/run",
        ],
    )
    job = prepare("c.yaml", [], cfg, {}, lambda _: None, ECHO, 0)[0]
    # horovodrun 0.28.1 would start every slot of the hostfile: -H names just the ones needed.
    got = []
    for workers in (1, 2, 4):
        argv, _ = launch_of(job, workers)
        got.append(argv[argv.index("-H") + 1])
        assert "--hostfile" not in argv
    assert got == ["n1:1", "n1:2", "n1:2,n2:2"]


def launch_of(job: Job, workers: int) -> tuple[list[str], dict[str, str]]:
    return build_command(job.launcher, job.spec(workers, True))


def test_the_cluster_image_dockerfile_passes_hadolint() -> None:
    dockerfile = REPO_ROOT / "docker" / "slurm" / "Dockerfile"
    proc = subprocess.run([hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
