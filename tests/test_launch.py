"""distgrow.launch: the command builders, the environment, and the controller's decisions.

Unit tests assert on the builders' ``(argv, env)`` and on the controller's choices with a
scripted executor (no process starts). The ``real`` tests at the end run the controller's
subprocess path for real, through torchrun and mpirun, with the stand-in worker of
``launch_fakes`` (exits 75, then 0; crashes; waits for a signal).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    LOCAL_LAUNCHERS,
    REPO_ROOT,
    clear_launcher_env,
    free_port,
    kill_process_tree,
    tmpfs,
    write_config,
)
from launch_fakes import make_fake_distgrow, read_calls

from distgrow.config import Config, ConfigError, load_config
from distgrow.exits import EXIT_NEED_WORKERS, EXIT_NONFINITE, EXIT_USAGE
from distgrow.launch import (
    ELASTIC_LAST_CALL_S,
    AttemptEnd,
    LaunchError,
    LaunchSpec,
    Outcome,
    PlannedExitFilter,
    _prepare,
    build_command,
    build_deepspeed,
    build_horovodrun,
    build_mpirun,
    build_none,
    build_srun,
    build_torchrun,
    decide,
    describe_env_changes,
    detect_launcher,
    main_launch,
    max_workers_from_env,
    redact,
    remote_shell_args,
    rendezvous_from_env,
    run_controller,
    run_subprocess,
    slurm_hostnames,
    torchrun_root_cause,
    torchrun_stop_signal_status,
    with_updates,
    worker_limit,
    write_discovery_script,
)
from distgrow.rundir import RESIZE_FILE, ResizeRequest, RunDir

PY = "/venv/bin/python"
TRAIN = ["-m", "distgrow", "train", "cfg.yaml"]


def spec(**kwargs: Any) -> LaunchSpec:
    base: dict[str, Any] = {"workers": 2, "config": "cfg.yaml", "python": PY}
    return LaunchSpec(**(base | kwargs))


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def test_torchrun_single_node() -> None:
    argv, env = build_torchrun(spec(workers=4, overrides=("optim.lr=0.2",), master_port=29600))
    assert argv == [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        "--nnodes=1",
        "--node_rank=0",
        "--master_addr=127.0.0.1",
        "--master_port=29600",
        "--max_restarts=0",
        *TRAIN,
        "optim.lr=0.2",
    ]
    assert env == {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"}


def test_torchrun_multi_node_static_and_restarts() -> None:
    argv, env = build_torchrun(
        spec(workers=8, nodes=2, node_rank=1, master_addr="node01", max_restarts=2, resume=True)
    )
    assert "--nproc_per_node=4" in argv
    assert argv[argv.index("--nproc_per_node=4") + 1 :] == [
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=node01",
        "--master_port=29500",
        "--max_restarts=2",
        *TRAIN,
        "run.resume=true",
    ]
    # Restarts hang in torch 2.13 when the workers share the agent's store (INFRA.md).
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_torchrun_elastic_uses_c10d_rendezvous_and_node_range() -> None:
    argv, env = build_torchrun(
        spec(workers=4, nodes=2, elastic=True, min_workers=2, max_workers=8, master_addr="n1")
    )
    assert "--nproc_per_node=2" in argv
    assert "--nnodes=1:4" in argv
    assert "--rdzv_backend=c10d" in argv
    assert "--rdzv_endpoint=n1:29500" in argv
    assert not any(a.startswith(("--master_addr", "--node_rank")) for a in argv)
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_torchrun_elastic_rendezvous_id_and_last_call() -> None:
    argv, _ = build_torchrun(
        spec(workers=1, elastic=True, max_workers=4, rdzv_id="distgrow-x-1", rdzv_last_call_s=2)
    )
    assert argv[argv.index("--nproc_per_node=1") + 1 :][:6] == [
        "--nnodes=1:4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=127.0.0.1:29500",
        "--rdzv_id=distgrow-x-1",
        "--rdzv_conf=last_call_timeout=2",
        "--max_restarts=0",
    ]
    # torchrun's own default (30 s) unless asked.
    argv, _ = build_torchrun(spec(workers=2, elastic=True, max_workers=4))
    assert not any(a.startswith("--rdzv_conf") for a in argv)


def test_torchrun_refuses_workers_that_do_not_divide_over_nodes() -> None:
    with pytest.raises(LaunchError, match=r"6 workers cannot be spread evenly over launch.nodes=4"):
        build_torchrun(spec(workers=6, nodes=4))


def test_resume_goes_last_so_it_wins_over_an_earlier_override() -> None:
    argv, _ = build_none(spec(workers=1, overrides=("run.resume=false",), resume=True))
    assert argv == [PY, *TRAIN, "run.resume=false", "run.resume=true"]


def test_none_runs_one_worker_only() -> None:
    assert build_none(spec(workers=1)) == ([PY, *TRAIN], {})
    with pytest.raises(LaunchError, match="single worker, but 2 worker"):
        build_none(spec(workers=2))


def test_deepspeed_local_starts_n_processes_with_num_gpus() -> None:
    argv, env = build_deepspeed(spec(workers=2))
    assert argv == [
        PY,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus=2",  # without it, deepspeed starts one process on CPU (INFRA.md)
        "--master_addr=127.0.0.1",
        "--master_port=29500",
        "--no_local_rank",
        "--module",
        "distgrow",
        "train",
        "cfg.yaml",
    ]
    assert env == {}


def test_deepspeed_multi_node_needs_a_hostfile() -> None:
    argv, _ = build_deepspeed(spec(workers=8, nodes=2, hostfile="/h", master_addr="n1"))
    assert argv[3:8] == ["--hostfile", "/h", "--num_nodes=2", "--num_gpus=4", "--master_addr=n1"]
    with pytest.raises(LaunchError, match="needs a hostfile"):
        build_deepspeed(spec(workers=8, nodes=2))


def test_horovodrun_gloo_on_one_host() -> None:
    argv, env = build_horovodrun(spec(workers=2))
    assert argv == [
        PY,
        "-m",
        "horovod.runner.launch",
        "-np",
        "2",
        "--gloo",
        "-H",
        "localhost:2",
        "--network-interface",
        "lo",
        PY,
        *TRAIN,
    ]
    assert env == {}


def test_horovodrun_mpi_hosts_and_hostfile() -> None:
    argv, _ = build_horovodrun(spec(workers=4, nodes=2, hosts=("a", "b"), horovod_transport="mpi"))
    assert argv[5:8] == ["--mpi", "-H", "a:2,b:2"]
    assert "--network-interface" not in argv  # several hosts: not the loopback
    argv, _ = build_horovodrun(spec(workers=4, nodes=2, hostfile="/hosts"))
    assert argv[6:8] == ["--hostfile", "/hosts"]


def test_horovodrun_elastic() -> None:
    argv, _ = build_horovodrun(
        spec(workers=2, elastic=True, max_workers=4, host_discovery_script="/d.sh")
    )
    i = argv.index("--min-np")
    assert argv[i : i + 6] == ["--min-np", "2", "--max-np", "4", "--host-discovery-script", "/d.sh"]
    assert "-H" not in argv
    # Horovod Elastic hangs silently on one host unless bound to the loopback (INFRA.md).
    assert argv[argv.index("--network-interface") + 1] == "lo"
    with pytest.raises(LaunchError, match="host discovery script"):
        build_horovodrun(spec(elastic=True))


def test_mpirun_as_root_forwards_the_rendezvous() -> None:
    argv, env = build_mpirun(spec(workers=3, run_as_root=True, forward_env=("WANDB_MODE",)))
    assert argv == [
        "mpirun",
        "-np",
        "3",
        "--bind-to",
        "none",
        "--allow-run-as-root",
        "--oversubscribe",
        "-x",
        "MASTER_ADDR",
        "-x",
        "MASTER_PORT",
        "-x",
        "WANDB_MODE",
        PY,
        *TRAIN,
    ]
    assert env == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_mpirun_multi_node() -> None:
    argv, _ = build_mpirun(spec(workers=8, nodes=2, hosts=("n1", "n2", "n3")))
    assert "--allow-run-as-root" not in argv
    assert argv[argv.index("--host") + 1] == "n1:4,n2:4"
    assert argv[argv.index("--map-by") + 1] == "ppr:4:node"
    argv, _ = build_mpirun(spec(workers=8, nodes=2, hostfile="/hf"))
    assert argv[argv.index("--hostfile") + 1] == "/hf" and "--host" not in argv
    with pytest.raises(LaunchError, match="launch.nodes=2 but only 1 host"):
        build_mpirun(spec(workers=8, nodes=2, hosts=("n1",)))


def test_srun_job_step() -> None:
    argv, env = build_srun(spec(workers=4, nodes=2, master_addr="n01", master_port=29517))
    assert argv == [
        "srun",
        "--ntasks=4",
        "--nodes=2",
        "--kill-on-bad-exit=1",
        PY,
        *TRAIN,
    ]
    assert env == {"MASTER_ADDR": "n01", "MASTER_PORT": "29517"}
    argv, _ = build_srun(spec(workers=1, nodes=2, srun_mpi=True))
    assert argv[:5] == ["srun", "--ntasks=1", "--nodes=1", "--kill-on-bad-exit=1", "--mpi=pmix"]


def test_extra_arguments_go_before_the_worker_command() -> None:
    argv, _ = build_srun(spec(extra=("--exclusive",)))
    assert argv[argv.index("--exclusive") + 1] == PY


def test_spec_checks_its_numbers() -> None:
    with pytest.raises(LaunchError, match="at least 1 worker"):
        spec(workers=0)
    with pytest.raises(LaunchError, match="node rank 2 is outside"):
        spec(nodes=2, node_rank=2)
    with pytest.raises(LaunchError, match="elastic range 3:4 must contain the 2 workers"):
        spec(elastic=True, min_workers=3, max_workers=4)
    with pytest.raises(LaunchError, match="'slurm' is not a launcher"):
        build_command("slurm", spec())


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


def test_detect_launcher() -> None:
    assert detect_launcher({"SLURM_JOB_ID": "12", "OMPI_COMM_WORLD_SIZE": "2"}) == "srun"
    assert detect_launcher({"OMPI_MCA_plm": "rsh"}) == "mpirun"
    assert detect_launcher({"HOME": "/root"}) == "torchrun"
    assert detect_launcher({}, backend="horovod") == "horovodrun"


def cfg_of(*overrides: str) -> Config:
    return load_config(None, list(overrides))


@pytest.mark.parametrize(
    ("env", "max_workers", "device", "want"),
    [
        ({}, 8, "auto", 8),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, 8, "auto", 2),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, 8, "auto", 8),  # the config is lower
        (
            {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"},
            16,
            "auto",
            8,
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "a100:2"},
            16,
            "auto",
            6,
        ),
        (
            {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "2"},
            16,
            "cpu",
            16,
        ),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 8, "auto", 3),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 8, "cpu", 8),  # CPU workers ignore GPUs
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, "auto", 8),  # no GPUs: CPU processes
    ],
)
def test_worker_limit_from_env(
    env: dict[str, str], max_workers: int, device: str, want: int
) -> None:
    cfg = cfg_of(f"growth.max_workers={max_workers}", f"run.device={device}")
    assert max_workers_from_env(env, cfg) == want


def test_worker_limit_counts_gpus_times_nodes_and_says_why() -> None:
    cfg = cfg_of("growth.max_workers=64", "launch.nodes=2")
    limit, reason = worker_limit({}, cfg, gpus_on_node=4)
    assert limit == 8
    assert "4 visible GPU(s) (/dev/nvidia*) × launch.nodes=2" in reason
    assert worker_limit({}, cfg, gpus_on_node=0) == (64, "growth.max_workers=64")


def test_an_unset_max_workers_is_the_allocation() -> None:
    cfg = cfg_of("run.device=cpu")
    assert cfg.growth.max_workers is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "6"}
    assert worker_limit(slurm, cfg) == (6, "SLURM_NTASKS=6 (growth.max_workers unset)")
    assert worker_limit({}, cfg) == (1, "growth.max_workers unset and no allocation found")
    gpus = cfg_of("launch.nodes=2")
    assert worker_limit({}, gpus, gpus_on_node=4)[0] == 8


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a,b", ["a", "b"]),
        ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("x[1-2],login", ["x1", "x2", "login"]),
        ("single", ["single"]),
    ],
)
def test_nodelist_parsing(nodelist: str, hosts: list[str]) -> None:
    assert slurm_hostnames(nodelist, use_scontrol=False) == hosts


def test_nodelist_errors_name_the_list() -> None:
    with pytest.raises(LaunchError, match=r"node\[1-"):
        slurm_hostnames("node[1-", use_scontrol=False)


def test_rendezvous_from_slurm() -> None:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
    }
    rdzv = rendezvous_from_env(env, cfg_of(), use_scontrol=False)
    assert (rdzv.master_addr, rdzv.master_port, rdzv.node_rank, rdzv.nodes) == (
        "gpu03",
        29500 + 242,  # launch.master_port + job id mod 1000: jobs sharing a node do not clash
        1,
        2,
    )
    assert rdzv.hosts == ("gpu03", "gpu04")
    outside = rendezvous_from_env({}, cfg_of("launch.master_port=1234", "launch.nodes=3"))
    assert (outside.master_addr, outside.master_port, outside.nodes) == ("127.0.0.1", 1234, 3)


def test_secrets_are_redacted() -> None:
    for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "wandb_api"):
        assert redact(name, "hunter2") == "***"
    assert redact("MASTER_ADDR", "10.0.0.1") == "10.0.0.1"
    lines = describe_env_changes(
        {"WANDB_API_KEY": "new-secret", "MY_TOKEN": "t0k", "MASTER_PORT": "29501", "A": "1"},
        {"WANDB_API_KEY": "old-secret", "MASTER_PORT": "29500", "A": "1"},
    )
    text = "\n".join(lines)
    assert "secret" not in text and "t0k" not in text
    assert lines == [
        "override WANDB_API_KEY: *** -> ***",
        "set MY_TOKEN=***",
        "override MASTER_PORT: 29500 -> 29501",
        "keep A=1 (already set)",
    ]


def test_torchrun_root_cause_is_read_from_its_failure_report() -> None:
    report = """
    Failures:
    [1]:
      exitcode  : 75 (pid: 7940)
    ------------------------------------------------------------
    Root Cause (first observed failure):
    [0]:
      time      : 2026-11-21_16:27:51
      rank      : 0 (local_rank: 0)
      exitcode  : 65 (pid: 7939)
    """
    assert torchrun_root_cause(report) == 65
    assert torchrun_root_cause("Traceback: boom") is None


# --------------------------------------------------------------------------------------------
# The controller's decisions, with a scripted executor
# --------------------------------------------------------------------------------------------


@dataclass
class Ending:
    """How one scripted launch ends."""

    code: int
    need: int | None = None  # rank 0 writes resize.json asking for this many workers
    signal: int | None = None
    log: str = ""


@dataclass
class ScriptedExecutor:
    """Plays the workers: each launch takes the next :class:`Ending` (no process starts)."""

    run_dir: Path
    script: list[Ending]
    calls: list[tuple[list[str], dict[str, str], Path]] = field(default_factory=list)

    def __call__(self, argv: list[str], env: dict[str, str], log_path: Path) -> Outcome:
        self.calls.append((argv, env, log_path))
        ending = self.script.pop(0)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(ending.log)
        if ending.need is not None:
            RunDir(self.run_dir).write_resize(
                ResizeRequest(
                    need_workers=ending.need,
                    have_workers=1,
                    epoch=1,
                    position=0,
                    step=52,
                    samples_seen=1664,
                    global_batch=32,
                    time=time.time(),
                    checkpoint=str(self.run_dir / "ckpt-000000052.pt"),
                    exit_code=75,
                )
            )
        return Outcome(ending.code, ending.signal)

    def workers(self) -> list[int]:
        """The worker count of each launch, read back from torchrun's argv."""
        out = []
        for argv, _, _ in self.calls:
            flag = next(a for a in argv if a.startswith("--nproc_per_node="))
            out.append(int(flag.split("=")[1]))
        return out


# 1 -> 2 -> 4 workers over 3 epochs (checked in test_dry_run_prints_each_span)
GROWING: dict[str, Any] = {
    "run": {"epochs": 3},
    "schedule": {"type": "multistep", "milestones": [1, 2], "gamma": 0.5},
    "growth": {"base_batch": 32, "micro_batch": 32, "max_workers": 4},
    "launch": {"launcher": "torchrun", "max_restarts": 2},
}


@pytest.fixture
def growing(tmp_path: Path) -> tuple[Path, Path]:
    """(config path, run dir) of the 1 -> 2 -> 4 worker config."""
    run_dir = tmp_path / "run"
    tree = {**GROWING, "run": {**GROWING["run"], "output_dir": str(run_dir)}}
    return write_config(tmp_path / "grow.yaml", tree), run_dir


def control(
    config: Path, script: list[Ending], *overrides: str, env: dict[str, str] | None = None
) -> tuple[int, ScriptedExecutor, list[str]]:
    cfg = load_config(config, list(overrides))
    executor = ScriptedExecutor(Path(cfg.run.resolved_output_dir), script)
    lines: list[str] = []
    code = run_controller(
        str(config),
        list(overrides),
        cfg,
        executor=executor,
        env=env or {},
        log=lines.append,
        python=PY,
        gpus_on_node=0,
    )
    return code, executor, lines


def test_grows_wider_on_75_with_the_count_from_resize_json(growing: tuple[Path, Path]) -> None:
    config, run_dir = growing
    code, ex, lines = control(config, [Ending(75, need=2), Ending(75, need=4), Ending(0)])
    assert code == 0
    assert ex.workers() == [1, 2, 4]
    resumes = [argv[-1] == "run.resume=true" for argv, _, _ in ex.calls]
    assert resumes == [False, True, True]
    # Each resize.json is kept with the launch logs, so the next launch starts without one.
    assert not (run_dir / RESIZE_FILE).exists()
    assert (
        json.loads((run_dir / "launch" / "attempt-02.resize.json").read_text())["need_workers"] == 4
    )
    assert any("the plan needs 4 workers from epoch 1" in line for line in lines)


def test_a_launcher_that_exits_1_with_resize_json_still_grows(growing: tuple[Path, Path]) -> None:
    # torchrun and horovodrun exit 1 whatever their workers' status: resize.json is the word.
    config, _ = growing
    code, ex, _ = control(config, [Ending(1, need=2), Ending(0)])
    assert (code, ex.workers()) == (0, [1, 2])


def test_stops_when_the_workers_needed_are_above_the_limit(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    code, ex, lines = control(config, [Ending(75, need=8)])
    assert code == EXIT_NEED_WORKERS
    assert len(ex.calls) == 1
    text = "\n".join(lines)
    assert "the plan needs 8 workers from epoch 1 (step 52), above the limit of 4" in text
    assert "growth.max_workers=4" in text and "sbatch --ntasks=8" in text


def test_restarts_a_crash_up_to_max_restarts_then_reports(growing: tuple[Path, Path]) -> None:
    config, run_dir = growing
    code, ex, lines = control(config, [Ending(75, need=2), Ending(139), Ending(3), Ending(3)])
    assert code == 3
    assert ex.workers() == [1, 2, 2, 2]  # restarts keep the width
    assert all(argv[-1] == "run.resume=true" for argv, _, _ in ex.calls[1:])
    text = "\n".join(lines)
    assert "crashed (exit 3) and launch.max_restarts=2 restart(s) are used up" in text
    for n, (workers, status) in enumerate([(1, 75), (2, 139), (2, 3), (2, 3)], start=1):
        log = run_dir / "launch" / f"attempt-{n:02d}-{workers}w.log"
        assert f"attempt {n}: {workers} worker(s), exit {status}" in text
        assert str(log) in text and log.exists()


def test_a_crash_then_success_finishes(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    code, ex, lines = control(config, [Ending(1), Ending(0)])
    assert (code, ex.workers()) == (0, [1, 1])
    assert "restart 1 of 2" in "\n".join(lines)


@pytest.mark.parametrize("status", [EXIT_USAGE, EXIT_NONFINITE])
def test_usage_errors_and_nonfinite_losses_stop_at_once(
    growing: tuple[Path, Path], status: int
) -> None:
    config, _ = growing
    code, ex, lines = control(config, [Ending(status)])
    assert code == status
    assert len(ex.calls) == 1
    assert "a retry would fail the same way" in "\n".join(lines)


def test_torchrun_status_1_with_a_nonfinite_root_cause_stops_at_once(
    growing: tuple[Path, Path],
) -> None:
    config, _ = growing
    report = "Root Cause (first observed failure):\n[0]:\n  exitcode  : 65 (pid: 1)\n"
    code, ex, _ = control(config, [Ending(1, log=report)])
    assert (code, len(ex.calls)) == (EXIT_NONFINITE, 1)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)]
)
def test_a_signal_stops_without_relaunching(
    growing: tuple[Path, Path], signum: int, status: int
) -> None:
    config, _ = growing
    code, ex, lines = control(config, [Ending(75, need=2, signal=signum)])
    assert (code, len(ex.calls)) == (status, 1)
    assert f"stopped by {signal.Signals(signum).name}" in "\n".join(lines)


def test_a_stale_resize_json_is_set_aside_before_the_first_launch(
    growing: tuple[Path, Path],
) -> None:
    config, run_dir = growing
    run_dir.mkdir()
    (run_dir / RESIZE_FILE).write_text('{"need_workers": 4}')
    code, ex, lines = control(config, [Ending(0)])
    assert (code, ex.workers()) == (0, [1])
    assert any("moved an old resize.json" in line for line in lines)


def test_slurm_allocation_limits_and_replans(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    env = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "c[1-2]"}
    code, ex, lines = control(
        config, [Ending(75, need=2), Ending(0)], "launch.launcher=auto", env=env
    )
    assert code == 0
    first, second = ex.calls[0][0], ex.calls[1][0]
    assert first[:4] == ["srun", "--ntasks=1", "--nodes=1", "--kill-on-bad-exit=1"]
    assert second[1] == "--ntasks=2"
    # The allocation has 2 tasks, so the workers plan within 2 (the batch grows by accumulation).
    assert "growth.max_workers=2" in first
    assert ex.calls[0][1] == {"MASTER_ADDR": "c1", "MASTER_PORT": str(29500 + 77)}
    assert any("growth.max_workers 4 -> 2: SLURM_NTASKS=2" in line for line in lines)


def test_dry_run_prints_each_span_and_launches_nothing(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    cfg = load_config(config, ["launch.launcher=mpirun"])
    lines: list[str] = []

    def no_launch(argv: list[str], env: dict[str, str], log: Path) -> Outcome:
        raise AssertionError("a dry run launched something")

    env = {"MASTER_PORT": "1"}
    code = run_controller(
        str(config),
        ["launch.launcher=mpirun"],
        cfg,
        dry_run=True,
        executor=no_launch,
        env=env,
        log=lines.append,
        python=PY,
        gpus_on_node=0,
    )
    assert code == 0
    heads = [line for line in lines if line.startswith("launch ")]
    assert heads == [
        "launch 1: 1 worker(s), epochs 0-1",
        "launch 2: 2 worker(s), epochs 1-2",
        "launch 3: 4 worker(s), epochs 2-3",
    ]
    commands = [line for line in lines if line.startswith("  $ mpirun -np ")]
    assert [c.split()[3] for c in commands] == ["1", "2", "4"]
    assert commands[0].endswith(f"{config} launch.launcher=mpirun")
    assert all(c.endswith("run.resume=true") for c in commands[1:])
    assert "  env: override MASTER_PORT: 1 -> 29500" in lines


def test_main_launch_dry_run_prints_to_stdout(
    growing: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = growing
    assert main_launch(str(config), ["run.device=cpu"], dry_run=True) == 0  # GPUs: no limit
    out = capsys.readouterr().out
    # One node: torchrun's workers are forked by distgrow's launcher (launch.preload).
    assert out.count("-m distgrow.launch.spawn --nproc_per_node=") == 3
    assert "-m torch.distributed.run" not in out
    assert "dry run: launcher torchrun, worker limit 4" in out
    assert main_launch(str(config), ["run.device=cpu", "launch.preload=false"], True) == 0
    out = capsys.readouterr().out
    assert out.count("-m torch.distributed.run --nproc_per_node=") == 3
    assert "distgrow.launch.spawn" not in out


def test_main_launch_reports_config_and_launch_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main_launch(str(tmp_path / "missing.yaml"), [], dry_run=True) == EXIT_USAGE
    assert "config error" in capsys.readouterr().err
    config = write_config(tmp_path / "c.yaml", {"growth": {"max_workers": 2}})
    code = main_launch(str(config), ["launch.launcher=none", "backend.name=horovod"], True)
    assert code == 0  # none: one worker, and horovod needs no launcher for one process
    code = main_launch(str(config), ["launch.launcher=torchrun", "backend.name=horovod"], True)
    assert code == EXIT_USAGE
    assert "Fix: set launch.launcher=horovodrun" in capsys.readouterr().err


def test_main_launch_on_a_read_only_run_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "c.yaml", {"growth": {"max_workers": 2}})
    with tmpfs(tmp_path / "ro", "64k", "ro") as ro:
        code = main_launch(str(config), [f"run.output_dir={ro}/run", "launch.launcher=none"], False)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == err.splitlines()[-1], err
    assert errors[0].startswith("distgrow launch: error: cannot write the launch log")
    assert "[Errno 30 EROFS]" in errors[0] and f"{ro}/run" in errors[0] and "Fix: make" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# The real subprocess path: real launchers, a stand-in worker
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean launcher environment whose ``python -m distgrow`` is the stand-in worker."""
    clear_launcher_env(monkeypatch)
    fake = make_fake_distgrow(tmp_path / "fake")
    # `python -m` puts the working directory first on sys.path: away from the real package.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), str(REPO_ROOT)]))
    return tmp_path


def real_config(tmp_path: Path, launcher: str, **launch: Any) -> tuple[Path, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    tree = {
        "run": {"output_dir": str(run_dir), "device": "cpu"},  # GPUs would cap the workers
        "growth": {"max_workers": 2},
        "launch": {"launcher": launcher, "master_port": free_port(), **launch},
    }
    return write_config(tmp_path / f"{launcher}.yaml", tree), run_dir


@pytest.mark.parametrize("launcher", LOCAL_LAUNCHERS)
@pytest.mark.integration
def test_real_launch_exits_75_then_relaunches_wider(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch, launcher: str
) -> None:
    config, run_dir = real_config(fake_env, launcher)
    monkeypatch.setenv("FAKE_WORKER", "grow:2")
    lines: list[str] = []
    started = time.monotonic()
    code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)
    assert time.monotonic() - started < 60
    calls = read_calls(run_dir)
    seen = sorted((c["world"], c["rank"], c["resume"], c["launcher"]) for c in calls)
    launcher_vars = "torchrun" if launcher == "torchrun" else "mpirun"
    assert seen == [
        (1, 0, False, launcher_vars),
        (2, 0, True, launcher_vars),
        (2, 1, True, launcher_vars),
    ]
    logs = sorted(p.name for p in (run_dir / "launch").glob("*.log"))
    assert logs == ["attempt-01-1w.log", "attempt-02-2w.log"]
    asked = ResizeRequest.from_dict(
        json.loads((run_dir / "launch" / "attempt-01.resize.json").read_text())
    )
    assert (asked.need_workers, asked.have_workers, asked.epoch, asked.step, asked.checkpoint) == (
        2,
        1,
        1,
        10,
        str(run_dir / "ckpt-000000010.pt"),
    )


@pytest.mark.integration
def test_real_torchrun_nonfinite_stops_at_once_and_crash_is_retried(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, run_dir = real_config(fake_env, "torchrun", max_restarts=3)
    monkeypatch.setenv("FAKE_WORKER", "exit:65")
    lines: list[str] = []
    assert run_controller(str(config), [], load_config(config), log=lines.append) == 65
    assert len(read_calls(run_dir)) == 1  # torchrun exited 1; its report said 65: no retry

    config, run_dir = real_config(fake_env / "crash", "torchrun", max_restarts=3)
    monkeypatch.setenv("FAKE_WORKER", "crash:2")
    assert run_controller(str(config), [], load_config(config), log=lines.append) == 0
    assert [c["resume"] for c in read_calls(run_dir)] == [False, True, True]


@pytest.mark.integration
def test_real_torchrun_on_a_port_in_use_names_launch_master_port(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # torchrun's own store finds the port taken (launch.preload would leave it to rank 0).
        config, run_dir = real_config(
            fake_env, "torchrun", master_port=port, max_restarts=3, preload=False
        )
        monkeypatch.setenv("FAKE_WORKER", "exit:0")
        lines: list[str] = []
        code = run_controller(str(config), [], load_config(config), log=lines.append)
    text = "\n".join(lines)
    assert code == EXIT_USAGE, text
    assert f"the rendezvous port {port} is already in use" in text
    assert f"set launch.master_port to a free port (e.g. launch.master_port={port + 1}" in text
    assert "crashed" not in text  # not retried as a crash: no worker ever started
    assert read_calls(run_dir) == []


@pytest.mark.parametrize(
    ("launcher", "signum", "status"),
    [("none", signal.SIGTERM, 143), ("torchrun", signal.SIGUSR1, 138)],
)
@pytest.mark.integration
def test_real_signal_is_forwarded_and_nothing_relaunches(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch, launcher: str, signum: int, status: int
) -> None:
    config, run_dir = real_config(fake_env, launcher)
    monkeypatch.setenv("FAKE_WORKER", "sleep")
    # The controller runs as its own process (`python -m distgrow launch`), as a user runs it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "distgrow", "launch", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "started-0").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.1)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_process_tree(proc.pid)
    assert proc.returncode == status, out
    name = signal.Signals(signum).name
    assert (run_dir / "signal-0").read_text() == name, out
    assert f"stopped by {name}" in out
    assert len(read_calls(run_dir)) == 1


# --------------------------------------------------------------------------------------------
# Stops by signal: not crashes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "name"), [(143, "SIGTERM"), (138, "SIGUSR1"), (130, "SIGINT")])
def test_workers_stopped_by_a_signal_are_not_restarted(
    growing: tuple[Path, Path], status: int, name: str
) -> None:
    # E.g. SLURM signalled the workers directly: they checkpointed and exited 128 + N.
    config, _ = growing
    code, ex, lines = control(config, [Ending(75, need=2), Ending(status)])
    assert (code, ex.workers()) == (status, [1, 2])
    text = "\n".join(lines)
    assert f"the workers were stopped by {name} (exit {status}), not a crash" in text
    assert "restart 1 of" not in text


def test_torchrun_root_cause_minus_15_is_a_stop_and_a_kill_9_is_a_crash(
    growing: tuple[Path, Path],
) -> None:
    config, _ = growing
    killed_by_term = "Root Cause (first observed failure):\n[0]:\n  exitcode  : -15 (pid: 1)\n"
    code, ex, _ = control(config, [Ending(1, log=killed_by_term)])
    assert (code, len(ex.calls)) == (143, 1)
    killed_by_kill = killed_by_term.replace("-15", "-9")
    code, ex, lines = control(config, [Ending(1, log=killed_by_kill), Ending(0)])
    assert (code, len(ex.calls)) == (0, 2)
    assert "crashed (exit -9); restart 1 of 2" in "\n".join(lines)


def test_torchrun_stopped_by_a_signal_itself_reports_it() -> None:
    log = (
        "Traceback (most recent call last):\n  ...\n"
        "torch.distributed.elastic.multiprocessing.api.SignalException: Process 4613 got "
        "signal: 10\n"
    )
    assert torchrun_stop_signal_status(log) == 138
    assert torchrun_stop_signal_status(log.replace("signal: 10", "signal: 1")) is None  # HUP
    assert torchrun_stop_signal_status("Traceback: boom") is None


def test_torchrun_exit_1_after_a_signal_exception_is_a_stop(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    log = "SignalException: Process 7 got signal: 15\n"
    code, ex, _ = control(config, [Ending(1, log=log)])
    assert (code, len(ex.calls)) == (143, 1)


def test_a_run_that_finished_as_a_signal_came_is_done(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    code, ex, lines = control(config, [Ending(75, need=2), Ending(0, signal=signal.SIGTERM)])
    assert (code, ex.workers()) == (0, [1, 2])
    assert "done: 2 launch(es)" in "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Elastic: torchrun agents on one machine
# --------------------------------------------------------------------------------------------


def _dry(config: Path, *overrides: str, env: dict[str, str] | None = None) -> list[str]:
    lines: list[str] = []
    code = run_controller(
        str(config),
        list(overrides),
        load_config(config, list(overrides)),
        dry_run=True,
        env=env or {},
        log=lines.append,
        python=PY,
        gpus_on_node=0,
    )
    assert code == 0
    return lines


def test_elastic_dry_run_prints_the_agent_command(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    lines = _dry(config, "launch.elastic=true")
    text = "\n".join(lines)
    assert "elastic: one torchrun agent (1 worker) per worker, 1 -> 2 -> 4 agent(s)" in text
    command = next(line for line in lines if line.startswith("  $ "))
    argv = command[4:].split()
    assert "--nproc_per_node=1" in argv and "--nnodes=1:4" in argv
    assert f"--rdzv_conf=last_call_timeout={ELASTIC_LAST_CALL_S}" in argv
    # One restart per possible growth (an agent may see its peers' stop as a failure), on top
    # of launch.max_restarts=2.
    assert "--max_restarts=5" in argv
    assert argv[-1] == "run.resume=true"  # every (re)started worker resumes
    # Each agent's worker sees itself alone: the cores are shared out by the controller.
    cores = len(os.sched_getaffinity(0))
    assert f"run.threads={max(1, cores // 4)}" in argv
    assert "env: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text


def test_elastic_refuses_several_nodes_and_other_launchers_relaunch(
    growing: tuple[Path, Path],
) -> None:
    config, _ = growing
    with pytest.raises(LaunchError, match="spans 2 nodes"):
        _dry(config, "launch.elastic=true", "launch.nodes=2")
    lines = _dry(config, "launch.elastic=true", "launch.launcher=mpirun")
    assert any("mpirun cannot add workers to a running job" in line for line in lines)
    assert [line for line in lines if line.startswith("launch ")][-1].startswith("launch 3")


def test_elastic_gives_each_agent_its_own_gpu(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    overrides = ["launch.elastic=true", "run.device=cuda", "run.threads=2"]
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    ctx, _ = _prepare(str(config), overrides, load_config(config, overrides), env, print, PY, None)
    assert ctx.limit == 2  # two visible GPUs
    assert [ctx.agent_env(k) for k in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "5"},
        {"CUDA_VISIBLE_DEVICES": "3"},
    ]
    cuda = overrides[:2]
    ctx, _ = _prepare(str(config), cuda, load_config(config, cuda), {}, print, PY, 2)
    assert ctx.gpu_ids == ("0", "1")  # from /dev/nvidia*


def test_elastic_never_resumes_a_finished_run_by_surprise(growing: tuple[Path, Path]) -> None:
    config, run_dir = growing
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    cfg = load_config(config, ["launch.elastic=true"])
    with pytest.raises(LaunchError, match="already holds a run.*elastic workers always resume"):
        run_controller(str(config), ["launch.elastic=true"], cfg, env={}, log=print, gpus_on_node=0)


def test_a_resumed_run_starts_as_wide_as_it_last_trained(growing: tuple[Path, Path]) -> None:
    # A run stopped (SIGUSR1, requeued) in its 4-worker phase: the requeued job starts 4
    # workers at once instead of 1 that would exit 75 straight away.
    config, run_dir = growing
    run_dir.mkdir()
    records = [
        {"kind": "epoch", "epoch": 2, "workers": 2},
        {"kind": "step", "epoch": 3, "workers": 4},
        {"kind": "event", "event": "stopped", "workers": 4, "signal": "SIGUSR1"},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"ki')
    code, ex, lines = control(config, [Ending(0)], "run.resume=true")
    assert (code, ex.workers()) == (0, [4])
    assert "resuming a run that last trained on 4 worker(s): starting with 4" in "\n".join(lines)
    # Not when the run is fresh, nor beyond the limit.
    code, ex, _ = control(config, [Ending(75, need=2), Ending(0)])
    assert ex.workers() == [1, 2]
    code, ex, _ = control(config, [Ending(0)], "run.resume=true", "growth.max_workers=2")
    assert ex.workers() == [2]


@dataclass
class StoppingExecutor(ScriptedExecutor):
    """Like :class:`ScriptedExecutor`, and rank 0 records a clean stop by SIGTERM."""

    stop_at: int = 1  # which launch records it

    def __call__(self, argv: list[str], env: dict[str, str], log_path: Path) -> Outcome:
        outcome = super().__call__(argv, env, log_path)
        if len(self.calls) == self.stop_at:
            record = {"kind": "event", "event": "stopped", "exit_code": 143, "time": time.time()}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return outcome


def test_mpirun_exit_1_after_a_recorded_clean_stop_is_not_a_crash(
    growing: tuple[Path, Path],
) -> None:
    # mpirun exits 1 when its ranks stopped on a forwarded SIGTERM (measured, Open MPI 4.1).
    config, run_dir = growing
    run_dir.mkdir()
    old = {"kind": "event", "event": "stopped", "exit_code": 138, "time": time.time() - 3600}
    (run_dir / "metrics.jsonl").write_text(json.dumps(old) + "\n")
    for stop_at, expected in ((1, 143), (99, 1)):  # this launch's stop / only an old one
        executor = StoppingExecutor(run_dir, [Ending(1), Ending(1)], stop_at=stop_at)
        lines: list[str] = []
        code = run_controller(
            str(config),
            ["launch.launcher=mpirun", "launch.max_restarts=1"],
            load_config(config, ["launch.launcher=mpirun", "launch.max_restarts=1"]),
            executor=executor,
            env={},
            log=lines.append,
            python=PY,
            gpus_on_node=0,
        )
        assert code == expected, "\n".join(lines)
        assert len(executor.calls) == (1 if expected == 143 else 2)


# --------------------------------------------------------------------------------------------
# The decision after a launch: a table
# --------------------------------------------------------------------------------------------


def ask(need: int) -> ResizeRequest:
    """A resize request for ``need`` workers, as rank 0 writes it with exit 75."""
    return ResizeRequest(
        need_workers=need,
        have_workers=1,
        epoch=2,
        position=0,
        step=52,
        samples_seen=1664,
        global_batch=64,
        time=0.0,
        checkpoint="/run/ckpt-000000052.pt",
        exit_code=75,
    )


TERM, USR1 = int(signal.SIGTERM), int(signal.SIGUSR1)

# (how the launch ended, (action, status, workers, restart))
DECISIONS: list[tuple[dict[str, Any], tuple[str, int, int, bool]]] = [
    ({"code": 0}, ("done", 0, 0, False)),
    ({"code": 0, "signal": TERM}, ("done", 0, 0, False)),  # finished as the signal came
    ({"code": 1, "signal": TERM}, ("stop", 143, 0, False)),  # forwarded by the controller
    ({"code": 138}, ("stop", 138, 0, False)),  # the workers checkpointed on SLURM's USR1
    ({"code": -TERM}, ("stop", 143, 0, False)),  # killed by SIGTERM before checkpointing
    ({"code": 1, "recorded_stop": USR1}, ("stop", 138, 0, False)),  # mpirun's 1 after a stop
    ({"code": 75, "resize": ask(2)}, ("relaunch", 0, 2, False)),
    ({"code": 1, "resize": ask(4)}, ("relaunch", 0, 4, False)),  # torchrun's 1 hides the 75
    ({"code": 75}, ("stop", 1, 0, False)),  # no readable resize.json
    ({"code": 75, "resize": ask(8)}, ("stop", 75, 0, False)),  # above the limit of 4
    ({"code": 75, "resize": ask(2), "workers": 2}, ("stop", 1, 0, False)),  # nothing to change
    ({"code": 65, "resize": ask(2)}, ("stop", 65, 0, False)),  # a non-finite loss wins
    ({"code": 2}, ("stop", 2, 0, False)),
    ({"code": 1, "port_in_use": 29500}, ("stop", 2, 0, False)),  # not a crash to retry
    ({"code": 3, "workers": 2}, ("relaunch", 0, 2, True)),  # a crash: restart as wide
    ({"code": 3, "restarts": 1}, ("relaunch", 0, 1, True)),
    ({"code": 3, "restarts": 2}, ("stop", 3, 0, False)),  # launch.max_restarts=2 used up
    ({"code": -9, "restarts": 2}, ("stop", 1, 0, False)),  # SIGKILL is a crash, not a stop
]


@pytest.mark.parametrize(("ended", "expected"), DECISIONS)
def test_decide(ended: dict[str, Any], expected: tuple[str, int, int, bool]) -> None:
    end = AttemptEnd(**({"number": 1, "workers": 1} | ended))
    decision = decide(end, limit=4, limit_reason="growth.max_workers=4", max_restarts=2)
    assert (decision.action, decision.status, decision.workers, decision.restart) == expected
    assert decision.message
    # A stop the user must act on lists the attempts and says how to fix it.
    reported = decision.action == "stop" and decision.status not in (143, 138)
    assert bool(decision.fix) == reported


def test_decide_says_why_it_grows_or_stops() -> None:
    grow = decide(AttemptEnd(1, 1, 75, resize=ask(2)), 4, "SLURM_NTASKS=4", 0)
    assert grow.message == (
        "the plan needs 2 workers from epoch 2: relaunching wider from /run/ckpt-000000052.pt"
    )
    above = decide(AttemptEnd(1, 1, 75, resize=ask(8)), 4, "SLURM_NTASKS=4", 0)
    assert "needs 8 workers from epoch 2 (step 52), above the limit of 4 (SLURM_NTASKS=4)" in (
        above.message
    )
    assert "sbatch --ntasks=8" in above.fix


# --------------------------------------------------------------------------------------------
# No remote shell runs a config value (DeepSpeed's pdsh runner on several nodes)
# --------------------------------------------------------------------------------------------

HOSTILE = [
    "logging.wandb.project=$(touch pwned) x",
    "data.root=/d;touch pwned",
    "data.root=/d`touch pwned`",
    "run.name=a  b   c",
    "data.root=/data/[ab]*",
    'run.name="quoted" \\back \\\\two `tick` $HOME ${HOME}',
    "run.name=it's",
    "run.name=tab\there",
    "run.name=new\nline",
    "run.name=",
    "run.name=!x && exit 3 | >out <in",
]


def _pdsh_user_args(args: list[str]) -> list[str]:
    """What DeepSpeed's PDSHRunner.parse_user_args does to the user arguments (0.x): wrap an
    argument holding a space in double quotes, escaping only ``"``."""
    return ['"{}"'.format(a.replace('"', '\\"')) if " " in a else a for a in args]


def _remote_shell_parse(line: str, cwd: Path) -> list[str]:
    """The argv a POSIX shell on the remote node makes of ``line``."""
    out = subprocess.run(
        ["sh", "-c", "printf '%s\\0' " + line], cwd=cwd, capture_output=True, check=True
    ).stdout.decode()
    return out.split("\0")[:-1]


def _deepspeed_user_args(argv: list[str]) -> list[str]:
    """The worker arguments after ``--module distgrow`` in a deepspeed argv."""
    return argv[argv.index("--module") + 2 :]


@pytest.mark.parametrize("value", HOSTILE)
def test_deepspeed_multi_node_quotes_every_worker_argument(value: str, tmp_path: Path) -> None:
    config = "/my configs/c [1].yaml"
    argv, _ = build_deepspeed(
        spec(workers=4, nodes=2, hostfile="/h", config=config, overrides=(value,), resume=True)
    )
    line = " ".join(_pdsh_user_args(_deepspeed_user_args(argv)))
    assert _remote_shell_parse(line, tmp_path) == ["train", config, value, "run.resume=true"]
    assert not (tmp_path / "pwned").exists()
    # One node starts no shell: the arguments stay as they are.
    local, _ = build_deepspeed(spec(workers=2, config=config, overrides=(value,)))
    assert _deepspeed_user_args(local) == ["train", config, value]


def test_remote_shell_args_survive_deepspeeds_own_pdsh_runner(tmp_path: Path) -> None:
    runner = pytest.importorskip("deepspeed.launcher.multinode_runner")
    argv, _ = build_deepspeed(spec(workers=4, nodes=2, hostfile="/h", overrides=tuple(HOSTILE)))
    holder = SimpleNamespace(args=SimpleNamespace(user_args=_deepspeed_user_args(argv)))
    processed = runner.PDSHRunner.parse_user_args(holder)
    line = " ".join(processed)
    assert _remote_shell_parse(line, tmp_path) == ["train", "cfg.yaml", *HOSTILE]
    assert not (tmp_path / "pwned").exists()


def test_remote_shell_args_quote_what_a_shell_would_expand() -> None:
    assert remote_shell_args(["a", "data.root=/d;id", "x=$(id) y"]) == [
        "a",
        "'data.root=/d;id'",
        "x=\\$(id) y",
    ]


# --------------------------------------------------------------------------------------------
# Horovod Elastic's host discovery
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_horovod_discovery_script_follows_elastic_requests_and_never_shrinks(
    tmp_path: Path,
) -> None:
    run = RunDir(tmp_path / "run")
    script = run.launch_dir / "discover_hosts"
    write_discovery_script(
        script, spec(workers=2, nodes=2, hosts=("n1", "n2", "n3"), elastic=True, max_workers=6)
    )
    text = script.read_text()
    assert text.startswith(f"#!{PY}\n") and "sed" not in text and "grep" not in text
    script.write_text(text.replace(PY, sys.executable, 1))  # PY is a made-up path

    def offered() -> list[str]:
        return subprocess.run(
            [str(script)], capture_output=True, text=True, check=True
        ).stdout.split()

    assert offered() == ["n1:2"]
    run.write_resize(replace(ask(5), elastic=True))
    assert offered() == ["n1:3", "n2:2"]  # ceil(6 / 2) slots a host, hosts in order
    run.write_resize(replace(ask(9), elastic=True))
    assert offered() == ["n1:3", "n2:2"]  # above the elastic maximum: not offered
    run.write_resize(replace(ask(3), elastic=True))
    assert offered() == ["n1:3", "n2:2"]  # never shrinks
    run.clear_resize()
    assert offered() == ["n1:3", "n2:2"]  # a resumed run removed resize.json
    run.write_resize(ask(6))  # exit 75's request is the controller's, not Horovod's
    assert offered() == ["n1:3", "n2:2"]


# --------------------------------------------------------------------------------------------
# The config, changed as a typed object; the one process runner
# --------------------------------------------------------------------------------------------


def test_with_updates_changes_one_field_and_validates(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", GROWING))
    changed = with_updates(cfg, "growth", max_workers=2)
    assert changed.growth.max_workers == 2 and cfg.growth.max_workers == 4
    assert changed.growth.base_batch == cfg.growth.base_batch and changed.run == cfg.run
    with pytest.raises(ConfigError, match="growth.max_workers"):
        with_updates(cfg, "growth", max_workers=0)


def test_prepare_hands_the_workers_the_changes_it_made(growing: tuple[Path, Path]) -> None:
    config, _ = growing
    env = {"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}
    given = ["optim.lr=0.2"]
    job, plan = _prepare(str(config), given, load_config(config, given), env, print, PY, 0)
    assert job.overrides == ("optim.lr=0.2", "growth.max_workers=2")
    assert job.cfg.growth.max_workers == 2
    assert load_config(config, list(job.overrides)) == job.cfg  # the workers' config is the job's
    assert max(p.workers for p in plan.phases) == 2


@pytest.mark.integration
def test_run_subprocess_tees_lines_to_echo_and_the_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "child.log"
    lines: list[str] = []
    code = "import sys; print('one'); print('two', file=sys.stderr); sys.stdout.write('three')"
    outcome = run_subprocess(
        [sys.executable, "-c", code + "; sys.exit(7)"], {}, log, echo=lines.append
    )
    assert outcome == Outcome(7, None)
    assert sorted(lines) == ["one", "three", "two"]
    assert sorted(log.read_text().split()) == ["one", "three", "two"]
    killed = run_subprocess([sys.executable, "-c", "import os; os.kill(os.getpid(), 15)"], {}, log)
    assert killed.returncode == 143  # as a shell reports a process killed by SIGTERM


def test_a_corrupt_checkpoint_gets_the_checkpoint_message_not_the_nonfinite_one(
    growing: tuple[Path, Path],
) -> None:
    config, run_dir = growing
    said = (
        f"checkpoint {run_dir}/ckpt-000000052.pt cannot be read (UnpicklingError: invalid load "
        "key). It was left untouched. Fix: move it out of the run directory to resume from the "
        "previous checkpoint, or set run.output_dir to a new directory to start over."
    )
    # What torchrun leaves in the log: the worker's error, then its own report (status 1).
    log = (
        f"distgrow: error: {said}\nRoot Cause (first observed failure):\n  exitcode  : 2 (pid: 1)\n"
    )
    code, ex, lines = control(config, [Ending(1, log=log)])
    text = "\n".join(lines)
    assert (code, len(ex.calls)) == (EXIT_USAGE, 1)
    assert f"checkpoint problem; a retry would fail the same way): {said}" in text
    assert "non-finite" not in text and "optim.lr" not in text
    code, _, lines = control(config, [Ending(65)])
    assert "(a non-finite loss)" in "\n".join(lines) and "lower optim.lr" in "\n".join(lines)


# --------------------------------------------------------------------------------------------
# A planned growth (exit 75) under torchrun shows no failure report in the terminal
# --------------------------------------------------------------------------------------------

TORCHRUN_REPORT = """\
E1129 00:51:35.105000 21785 torch/distributed/elastic/multiprocessing/api.py:1002] failed \
(exitcode: {code}) local_rank: 0 (pid: 22015) of binary: /venv/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in x
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
distgrow FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : {code} (pid: 22015) 
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""  # noqa: W291 - torchrun's own trailing spaces

WORKER_CRASH = """\
Traceback (most recent call last):
  File "train.py", line 3, in <module>
    1 / 0
ZeroDivisionError: division by zero
"""


def _through_filter(text: str, size: int) -> str:
    shown = PlannedExitFilter()
    out = [shown.feed(text[i : i + size]) for i in range(0, len(text), size)]
    return "".join(out) + shown.close()


@pytest.mark.parametrize("size", [1, 7, 100000])
def test_the_terminal_hides_torchruns_report_of_a_planned_exit_only(size: int) -> None:
    before = "distgrow: epoch 2: the plan needs 2 workers\n"
    planned = _through_filter(before + TORCHRUN_REPORT.format(code=75) + "after\n", size)
    assert planned == (
        before + "torchrun: the workers exited 75 to grow the job (torchrun's failure report "
        "is in the log)\nafter\n"
    )
    crash = before + WORKER_CRASH + TORCHRUN_REPORT.format(code=1)
    assert _through_filter(crash, size) == crash  # a real failure shows whole
    bar = "\r\x1b[Kepoch 1 [===   ]\r\x1b[Kepoch 1 [====  ]\n"
    assert _through_filter(bar, size) == bar


def test_a_progress_line_shows_before_its_newline() -> None:
    shown = PlannedExitFilter()
    assert shown.feed("\r\x1b[Kepoch 1 [==") == "\r\x1b[Kepoch 1 [=="
    assert shown.feed("Trac") == "Trac"  # the rest of a line already shown, not a traceback
    assert shown.feed("\nTrac") == "\n"  # a line that may start a traceback waits
    assert shown.feed("ing on\n") == "Tracing on\n"


@pytest.mark.integration
def test_real_torchrun_growth_prints_no_failure_report(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    config, run_dir = real_config(fake_env, "torchrun", preload=False)  # torchrun's report
    monkeypatch.setenv("FAKE_WORKER", "grow:2")
    lines: list[str] = []
    assert run_controller(str(config), [], load_config(config), log=lines.append) == 0
    out = capfd.readouterr().out
    assert "the workers exited 75 to grow the job" in out
    assert "ChildFailedError" not in out and "FAILED" not in out and "exitcode: 75" not in out
    log = (run_dir / "launch" / "attempt-01-1w.log").read_text()
    assert "ChildFailedError" in log and "exitcode  : 75" in log  # the log keeps it all


@pytest.mark.integration
def test_preloaded_growth_prints_nothing_about_the_planned_exit(
    fake_env: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    config, run_dir = real_config(fake_env, "torchrun")  # launch.preload: the default
    monkeypatch.setenv("FAKE_WORKER", "grow:2")
    lines: list[str] = []
    assert run_controller(str(config), [], load_config(config), log=lines.append) == 0
    shown = "".join(capfd.readouterr())
    assert "exited 75" not in shown and "exitcode" not in shown and "Traceback" not in shown
    assert any("-m distgrow.launch.spawn --nproc_per_node=2" in line for line in lines)
    assert (run_dir / "launch" / "attempt-01-1w.log").read_text() == ""  # a clean exit
