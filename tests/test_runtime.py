"""distgrow.runtime: the launchers' environments, node lists, and what gets exported."""

from __future__ import annotations

import pytest

from distgrow.runtime import (
    Runtime,
    RuntimeEnvError,
    detect_runtime,
    expand_nodelist,
    export_environment,
    redact,
    runtime_variables,
)


def test_no_launcher_is_a_single_process() -> None:
    rt = detect_runtime({"PATH": "/usr/bin"}, default_port=29555)
    assert rt == Runtime(0, 1, 0, 1, "127.0.0.1", 29555, "none")
    assert not rt.is_distributed


def test_torchrun_variables() -> None:
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "1234",
    }
    assert detect_runtime(env) == Runtime(3, 8, 1, 2, "node7", 1234, "torchrun")


def test_torchrun_wins_over_mpi_variables() -> None:
    # deepspeed --launcher openmpi exports both; RANK/WORLD_SIZE are the ones it means.
    env = {"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4"}
    rt = detect_runtime(env)
    assert (rt.rank, rt.world_size, rt.launcher) == (1, 2, "torchrun")


def test_open_mpi_variables() -> None:
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "6",
        "OMPI_COMM_WORLD_LOCAL_RANK": "2",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
    }
    rt = detect_runtime(env, default_addr="10.0.0.1", default_port=29600)
    assert rt == Runtime(5, 6, 2, 3, "10.0.0.1", 29600, "mpirun")


def test_slurm_variables_and_master_from_the_node_list() -> None:
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_JOB_NODELIST": "gpu[07-09,12]",
    }
    rt = detect_runtime(env)
    # The step's task count, not the allocation's; the first node of the list hosts rank 0.
    assert rt == Runtime(3, 4, 1, 2, "gpu07", 29500, "srun")


def test_slurm_keeps_an_explicit_master_addr() -> None:
    env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "a,b",
        "MASTER_ADDR": "x",
    }
    assert detect_runtime(env).master_addr == "x"
    # ... and then the node list is not needed: one distgrow cannot parse is no obstacle, as
    # the error for it says (Fix: set MASTER_ADDR).
    bad = {**env, "SLURM_JOB_NODELIST": "node[1-"}
    assert detect_runtime(bad).master_addr == "x"
    with pytest.raises(RuntimeEnvError, match="MASTER_ADDR"):
        detect_runtime({k: v for k, v in bad.items() if k != "MASTER_ADDR"})


def test_pmi_variables() -> None:
    env = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"}
    assert detect_runtime(env) == Runtime(2, 4, 0, 1, "127.0.0.1", 29500, "pmi")


def test_unknown_local_size_assumes_everyone_is_local() -> None:
    rt = detect_runtime({"RANK": "0", "WORLD_SIZE": "4"})
    assert rt.local_world_size == 4


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("host", ["host"]),
        ("host[1-3,5]", ["host1", "host2", "host3", "host5"]),
        ("a,b", ["a", "b"]),
        ("n[08-10]", ["n08", "n09", "n10"]),
        ("n[1-2]-ib,login", ["n1-ib", "n2-ib", "login"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("x[3],y[1,4]", ["x3", "y1", "y4"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["host[1-3", "host[a-b]", "host[5-2]"])
def test_malformed_nodelist_is_an_error(bad: str) -> None:
    with pytest.raises(RuntimeEnvError, match="MASTER_ADDR"):
        expand_nodelist(bad)


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"OMPI_COMM_WORLD_RANK": "-1", "OMPI_COMM_WORLD_SIZE": "2"},
    ],
)
def test_inconsistent_variables_are_errors(env: dict[str, str]) -> None:
    with pytest.raises(RuntimeEnvError):
        detect_runtime(env)


def test_export_sets_and_logs_every_changed_variable() -> None:
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "MASTER_PORT": "1"}
    rt = detect_runtime(env, default_port=29500)
    assert rt.master_port == 1  # an explicit port is kept...
    env["MASTER_PORT"] = "777"  # ...and overwritten by export if it changed since
    lines: list[str] = []
    changed = export_environment(rt, env, log=lines.append)
    assert changed == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1",
    }
    assert all(env[k] == v for k, v in changed.items())
    assert len(lines) == 6
    assert any("set RANK=1" in line for line in lines)
    assert any("overwrote MASTER_PORT: 777 -> 1" in line for line in lines)


def test_export_logs_nothing_when_nothing_changes() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    lines: list[str] = []
    assert export_environment(detect_runtime(env), env, log=lines.append) == {}
    assert lines == []


def test_a_single_process_exports_nothing() -> None:
    env: dict[str, str] = {}
    lines: list[str] = []
    assert export_environment(detect_runtime(env), env, log=lines.append) == {}
    assert env == {} and lines == []


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "HF_TOKEN", "MY_SECRET", "DB_PASSWORD"])
def test_secrets_are_redacted(name: str) -> None:
    assert redact(name, "hunter2") == "<redacted>"


def test_ordinary_values_are_not_redacted() -> None:
    assert redact("MASTER_ADDR", "node1") == "node1"


def test_runtime_variables_are_strings_for_env() -> None:
    rt = Runtime(1, 2, 1, 2, "h", 5, "torchrun")
    assert runtime_variables(rt) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "5",
    }


@pytest.mark.parametrize("flush", [True, False])
@pytest.mark.integration
def test_flush_denormal_reaches_torchs_cpu_threads(flush: bool) -> None:
    """``run.flush_denormal`` (set at start-up) holds in every intra-op thread torch starts
    after it: a denormal input reads as 0 in a parallel elementwise product, or keeps its value."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "torch.set_num_threads(2)\n"
        "from distgrow.startup import configure_denormals\n"
        f"on = configure_denormals({flush})\n"
        "x = torch.full((1 << 20,), 1e-39)\n"  # a denormal float32, 1M times: several threads
        "y = x * 3.0\n"
        "print(on, int((y == 0).sum()), int((y == x * 3.0).sum()), y.numel())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    if flush and out[0] != "True":
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    on, zeros, numel = out[0] == "True", int(out[1]), int(out[3])
    assert on is flush
    assert zeros == (numel if flush else 0)  # all flushed, or none
