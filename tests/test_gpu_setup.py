"""A GPU node on the first try, checked on a CPU machine: no silent CPU training, one rank ->
GPU rule for every launcher and backend, every backend on CUDA, the setup scripts.

No GPU here: ``torch.cuda`` is monkeypatched (what a CUDA build on an N-GPU node answers), the
launchers' environments are written out as each launcher sets them, and DeepSpeed and Horovod
are the real, installed objects.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, distgrow_job_env

from distgrow.backends.base import BackendError
from distgrow.backends.deepspeed_backend import build_ds_config, point_local_rank_at
from distgrow.backends.torch_ddp import join_process_group
from distgrow.config import load_config
from distgrow.devices import DeviceError, cuda_index, gpus_present, select_device
from distgrow.exits import EXIT_USAGE
from distgrow.launch.builders import LaunchError, LaunchSpec, build_deepspeed
from distgrow.runtime import Runtime, detect_runtime

SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None


@pytest.fixture
def cuda_build(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make torch a CUDA build that sees ``n`` devices (0: CUDA cannot initialise)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


@pytest.fixture
def dev_with_gpus(tmp_path: Path) -> Callable[[int], Path]:
    """A /dev stand-in holding ``nvidia0..nvidiaN-1`` (and the control files a real one has)."""

    def make(n: int) -> Path:
        dev = tmp_path / f"dev{n}"
        dev.mkdir(exist_ok=True)
        for name in [f"nvidia{i}" for i in range(n)] + ["nvidiactl", "nvidia-uvm"]:
            (dev / name).touch()
        return dev

    return make


# --------------------------------------------------------------------------------------------
# Rank -> GPU: one rule for torchrun, deepspeed, mpirun, srun (with and without binding)
# --------------------------------------------------------------------------------------------


def _ids(n: int) -> str:
    return ",".join(str(i) for i in range(n))


def launcher_env(launcher: str, node: int, local: int, per_node: int, gpus: int) -> dict[str, str]:
    """What ``launcher`` sets for local rank ``local`` on node ``node`` (2 nodes, ``gpus`` each).

    torchrun and mpirun leave ``CUDA_VISIBLE_DEVICES`` alone; the deepspeed launcher lists the
    node's GPUs; srun without binding lists the step's GPUs for every task; srun
    ``--gpus-per-task=1`` and ``--gpu-bind=single:1`` give each task its own (by SLURM's ids).
    """
    rank, world = node * per_node + local, 2 * per_node
    if launcher == "torchrun":
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(local),
            "LOCAL_WORLD_SIZE": str(per_node),
        }
    if launcher == "deepspeed":
        return {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(local),
            "LOCAL_SIZE": str(per_node),
            "CUDA_VISIBLE_DEVICES": _ids(gpus),
        }
    if launcher == "mpirun":
        return {
            "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_SIZE": str(world),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(per_node),
        }
    slurm = {
        "SLURM_JOB_ID": "42",
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": str(world),
        "SLURM_LOCALID": str(local),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x2)",
        "SLURM_STEP_NODELIST": "gpu[01-02]",
        "SLURM_STEP_GPUS": _ids(gpus),
    }
    if launcher == "srun":
        return {**slurm, "CUDA_VISIBLE_DEVICES": _ids(gpus)}
    if launcher == "srun --gpus-per-task=1":
        return {**slurm, "SLURM_GPUS_PER_TASK": "1", "CUDA_VISIBLE_DEVICES": str(local)}
    if launcher == "srun --gpu-bind=single:1":
        return {**slurm, "CUDA_VISIBLE_DEVICES": str(local)}
    raise AssertionError(launcher)


UNBOUND = ["torchrun", "deepspeed", "mpirun", "srun"]
BOUND = ["srun --gpus-per-task=1", "srun --gpu-bind=single:1"]


def physical_gpus(launcher: str, per_node: int, gpus: int) -> list[tuple[int, int, int]]:
    """``(node, local rank, physical GPU)`` of every rank of a 2-node job, by the rule."""
    placed = []
    for node in range(2):
        for local in range(per_node):
            env = launcher_env(launcher, node, local, per_node, gpus)
            rt = detect_runtime(env)
            listed = env.get("CUDA_VISIBLE_DEVICES")
            seen = [int(i) for i in listed.split(",")] if listed else list(range(gpus))
            index = cuda_index(rt.local_rank, rt.local_world_size, len(seen), env)
            assert 0 <= index < len(seen)  # a valid ordinal ("invalid device ordinal" otherwise)
            placed.append((node, local, seen[index]))
    return placed


@pytest.mark.parametrize("gpus", range(1, 9))
@pytest.mark.parametrize("launcher", UNBOUND + BOUND)
def test_every_rank_gets_its_own_gpu(launcher: str, gpus: int) -> None:
    """One rank per GPU (and fewer): distinct GPUs on each node, local rank r on GPU r."""
    for per_node in sorted({gpus, max(1, gpus // 2)}):
        placed = physical_gpus(launcher, per_node, gpus)
        for node in range(2):
            on_node = [gpu for n, _, gpu in placed if n == node]
            assert on_node == list(range(per_node)), (launcher, gpus, per_node, placed)


@pytest.mark.parametrize("gpus", range(1, 9))
@pytest.mark.parametrize("launcher", UNBOUND)
def test_more_ranks_than_visible_gpus_is_an_error_on_every_rank(launcher: str, gpus: int) -> None:
    per_node = gpus + 1
    for local in range(per_node):
        env = launcher_env(launcher, 1, local, per_node, gpus)
        rt = detect_runtime(env)
        with pytest.raises(DeviceError) as err:
            cuda_index(rt.local_rank, rt.local_world_size, gpus, env)
        message = str(err.value)
        assert f"{per_node} ranks on this node but {gpus} visible GPU(s)" in message
        assert "Duplicate GPU" in message and f"at most {gpus} worker(s) per node" in message
        assert "\n" not in message


def test_cuda_visible_devices_picks_the_gpus_and_local_ranks_index_them() -> None:
    # torch numbers what CUDA_VISIBLE_DEVICES lists: local rank 1 of 2 on "6,7" is device 1.
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env["CUDA_VISIBLE_DEVICES"] = "6,7"
    assert cuda_index(1, 2, 2, env) == 1
    with pytest.raises(DeviceError, match=r"CUDA_VISIBLE_DEVICES=6,7\)"):
        cuda_index(2, 3, 2, {**env, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "3"})


def test_srun_without_slurms_gpu_variables_trusts_one_gpu_per_task() -> None:
    """Each task shown only its own GPU (a cgroup: CUDA_VISIBLE_DEVICES=0 everywhere) and no
    SLURM_STEP_GPUS: device 0 for each; ranks that truly share one stop at the UUID check."""
    for local in range(8):
        env = {"SLURM_PROCID": str(local), "SLURM_LOCALID": str(local)}
        assert cuda_index(local, 8, 1, {**env, "CUDA_VISIBLE_DEVICES": "0"}) == 0
    # With the step's GPUs known, one GPU for two tasks is the oversubscription it is.
    shared = {"SLURM_PROCID": "1", "SLURM_STEP_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(DeviceError, match="2 ranks on this node but 1 visible"):
        cuda_index(1, 2, 1, shared)


def test_slurm_binding_with_two_gpus_per_task_keeps_ranks_apart() -> None:
    # --gpus-per-task=2: task k sees GPUs 2k, 2k+1 as devices 0, 1; local rank mod 2 picks one.
    for local, want in [(0, 0), (1, 3), (2, 4), (3, 7)]:
        seen = [2 * local, 2 * local + 1]
        env = {
            "SLURM_PROCID": str(local),
            "SLURM_LOCALID": str(local),
            "SLURM_GPUS_PER_TASK": "2",
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, seen)),
        }
        assert seen[cuda_index(local, 4, 2, env)] == want


def test_ranks_that_hold_one_gpu_are_refused_after_they_join(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the rule cannot see (a wrapper's own CUDA_VISIBLE_DEVICES): the ranks compare the
    GPUs they hold, by host and UUID, and every rank stops with the same line."""
    import torch.distributed as dist

    from distgrow.backends import torch_ddp
    from distgrow.devices import check_distinct_gpus

    check_distinct_gpus(["gpu01/GPU-a", "gpu01/GPU-b", "gpu02/GPU-a", "gpu02/GPU-b"])
    held = ["gpu01/GPU-a", "gpu01/GPU-b", "gpu02/GPU-c", "gpu01/GPU-b"]

    def gather(out: list[object], mine: object) -> None:
        out[:] = held

    monkeypatch.setattr(dist, "all_gather_object", gather)
    monkeypatch.setattr(torch_ddp, "gpu_identity", lambda device: held[3])
    member = torch_ddp.ProcessGroupMember(
        Runtime(3, 4, 1, 2, "gpu01", 29500, "mpirun"), torch.device("cuda", 0), "nccl"
    )
    with pytest.raises(DeviceError) as err:
        member.check_distinct_gpus()
    assert str(err.value).startswith("ranks 1 and 3 both train on GPU gpu01/GPU-b: ")
    held[3] = "gpu01/GPU-d"
    member.check_distinct_gpus()
    cpu = torch_ddp.ProcessGroupMember(
        Runtime(3, 4, 1, 2, "gpu01", 29500, "mpirun"), torch.device("cpu"), "gloo"
    )
    monkeypatch.setattr(dist, "all_gather_object", None)  # the CPU asks nothing
    cpu.check_distinct_gpus()


# --------------------------------------------------------------------------------------------
# run.device: GPUs present but unusable stop the run; the CPU only when asked for
# --------------------------------------------------------------------------------------------


def test_auto_on_a_gpu_machine_with_a_cpu_torch_refuses_in_one_line(
    monkeypatch: pytest.MonkeyPatch, dev_with_gpus: Callable[[int], Path]
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as err:
        select_device("auto", env={}, dev=dev_with_gpus(8))
    message = str(err.value)
    assert message.startswith("run.device = 'auto' found 8 GPU(s) on this machine, but torch ")
    assert "is a CPU build" in message and "run.device=cpu" in message and "\n" not in message


def test_auto_with_an_old_driver_says_what_torch_said(
    monkeypatch: pytest.MonkeyPatch, dev_with_gpus: Callable[[int], Path]
) -> None:
    def old_driver() -> bool:
        warnings.warn(
            "CUDA initialization: The NVIDIA driver on your system is too old (found version "
            "12020). Please update your GPU driver.",
            UserWarning,
            stacklevel=1,
        )
        return False

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    with pytest.raises(DeviceError) as err:
        select_device("auto", env={}, dev=dev_with_gpus(2))
    message = str(err.value)
    assert "(CUDA 13.0) cannot use CUDA: CUDA initialization: The NVIDIA driver" in message
    assert "found version 12020" in message and "\n" not in message
    # SLURM's GPUs count as present too (a job step whose /dev is hidden by cgroups).
    with pytest.raises(DeviceError, match="found 2 GPU"):
        select_device("auto", env={"SLURM_JOB_GPUS": "0,1"}, dev=dev_with_gpus(0))


def test_the_cpu_when_asked_for_or_when_there_is_no_gpu(
    monkeypatch: pytest.MonkeyPatch, dev_with_gpus: Callable[[int], Path]
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    assert select_device("cpu", env={}, dev=dev_with_gpus(8)) == torch.device("cpu")
    assert select_device("auto", env={}, dev=dev_with_gpus(0)) == torch.device("cpu")
    hidden = {"CUDA_VISIBLE_DEVICES": ""}
    assert select_device("auto", env=hidden, dev=dev_with_gpus(8)) == torch.device("cpu")
    assert gpus_present({}, dev_with_gpus(3)) == 3  # nvidiactl, nvidia-uvm are not GPUs
    with pytest.raises(DeviceError, match=r"run.device = 'cuda' \(0 GPU\(s\).*CPU build"):
        select_device("cuda", env={}, dev=dev_with_gpus(0))


def test_auto_on_a_working_gpu_node_picks_the_local_ranks_gpu(
    cuda_build: Callable[[int], None], dev_with_gpus: Callable[[int], Path]
) -> None:
    cuda_build(8)
    assert select_device("auto", 5, 8, env={}, dev=dev_with_gpus(8)) == torch.device("cuda", 5)
    with pytest.raises(DeviceError, match="9 ranks on this node but 8 visible"):
        select_device("auto", 0, 9, env={}, dev=dev_with_gpus(8))


def test_distgrow_train_stops_with_exit_2_on_unusable_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole start-up: the worker says why in one line and exits 2 (the launch controller
    does not retry that), instead of training on the CPU."""
    from distgrow import startup

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0-7")  # GPUs present, whatever this machine has
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    cfg = load_config(
        None,
        [
            "data.name=synthetic_classification",
            "data.synthetic_samples=256",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    threads = torch.get_num_threads()
    try:
        assert startup.run(cfg) == EXIT_USAGE
    finally:
        torch.set_num_threads(threads)
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "found 8 GPU(s)" in err[0] and "CPU build" in err[0], err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*.pt"))


@pytest.mark.integration
def test_launch_on_gpus_torch_cannot_use_stops_once_with_the_workers_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``distgrow launch`` counted 2 GPUs and started a worker; it says why and exits 2 (no
    retry, no CPU training)."""
    from conftest import clear_launcher_env, free_port, write_config

    from distgrow.launch import run_controller

    clear_launcher_env(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1")  # the workers find GPUs present
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    config = write_config(
        tmp_path / "c.yaml",
        {
            "data": {"name": "synthetic_classification", "synthetic_samples": 512},
            "run": {"output_dir": str(tmp_path / "run"), "epochs": 1},
            "growth": {"base_batch": 32},
            "launch": {"launcher": "torchrun", "master_port": free_port(), "max_restarts": 2},
        },
    )
    lines: list[str] = []
    code = run_controller(str(config), [], load_config(config), log=lines.append, gpus_on_node=2)
    assert code == EXIT_USAGE, "\n".join(lines)
    said = [line for line in lines if "found 2 GPU(s)" in line]
    assert len(said) == 1 and "CPU build" in said[0] and "run.device=cpu" in said[0], lines
    assert sum("attempt " in line for line in lines) == 1, lines  # not retried


# --------------------------------------------------------------------------------------------
# DeepSpeed on CUDA: NCCL even for one worker, cuda:LOCAL_RANK is distgrow's device,
# precision as the torch backend's
# --------------------------------------------------------------------------------------------


def test_a_single_worker_group_uses_the_runs_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed needs a group even for one worker; on CUDA it must be NCCL (a gloo group
    cannot reduce CUDA tensors)."""
    import torch.distributed as dist

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **_: calls.append(backend))
    assert join_process_group(SINGLE, "nccl", single=True)
    assert join_process_group(SINGLE, "gloo", single=True)
    assert calls == ["nccl", "gloo"]


def test_deepspeed_local_rank_names_the_chosen_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    # srun --gpus-per-task=1: local rank 3 sees one GPU, cuda:0; DeepSpeed would pick cuda:3.
    rt = Runtime(11, 16, 3, 8, "gpu01", 29500, "srun")
    environ = {"LOCAL_RANK": "3"}
    point_local_rank_at(torch.device("cuda", 0), rt, environ)
    assert environ["LOCAL_RANK"] == "0"
    assert "overwrote LOCAL_RANK: 3 -> 0" in capsys.readouterr().err
    unbound = {"LOCAL_RANK": "3"}
    point_local_rank_at(torch.device("cuda", 3), rt, unbound)
    assert unbound == {"LOCAL_RANK": "3"} and capsys.readouterr().err == ""
    plain: dict[str, str] = {}
    point_local_rank_at(torch.device("cpu"), SINGLE, plain)
    assert plain == {"LOCAL_RANK": "0"}


def test_deepspeed_reduces_float32_gradients_like_ddp() -> None:
    cfg = load_config(None, ["backend.name=deepspeed", "backend.precision=bf16"])
    ds = build_ds_config(cfg, world_size=8, micro_batch=4, accum_steps=1)
    assert ds["torch_autocast"]["lower_precision_safe_modules"] == []


PRECISION_PROBE = """
import sys, torch, deepspeed
from distgrow.backends import make_backend
from distgrow.config import load_config
from distgrow.runtime import Runtime
stage = sys.argv[1]
cfg = load_config(None, ["backend.name=deepspeed", f"backend.zero_stage={stage}",
                         "run.device=cpu", "backend.precision=bf16"])
backend = make_backend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))

def probe(config):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if config is None:
        engine = backend.setup(model, opt)
    else:
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                          dist_init_required=False)
    logits = engine(torch.randn(5, 3)).dtype
    comm = {engine.optimizer.get_param_comm_dtype(p) for p in model.parameters()}
    return logits, sorted(str(d) for d in comm)

print("distgrow", *probe(None))
plain = dict(backend.ds_config, torch_autocast={"enabled": True, "dtype": "bfloat16"})
print("deepspeed", *probe(plain))
backend.shutdown(0)
"""


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.integration
def test_deepspeed_bf16_returns_float32_logits_and_reduces_float32_gradients() -> None:
    """A real engine (ZeRO-2, CPU, bf16 autocast): what DeepSpeed 0.19.8 does by itself (bf16
    logits, bf16 gradient reduction for Linear weights) and what distgrow's backend does (the
    torch backend's float32 for both)."""
    proc = subprocess.run(
        [sys.executable, "-c", PRECISION_PROBE, "2"],
        env=distgrow_job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines["distgrow"] == ["torch.float32", "['torch.float32']"]
    assert lines["deepspeed"] == ["torch.bfloat16", "['torch.bfloat16']"]


DS_BF16_RUN = """
import sys
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
from pathlib import Path
from test_trainer import SINGLE, syn_config
from distgrow.backends import make_backend
from distgrow.startup import load_data
from distgrow.trainer import Trainer
cfg = syn_config(Path(sys.argv[1]), "backend.precision=bf16", "run.device=cpu",
                 "backend.name=deepspeed", "backend.zero_stage=2")
backend = make_backend(cfg, SINGLE)
backend.shutdown(Trainer(cfg, backend, load_data(cfg)).train())
"""


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.integration
@pytest.mark.usefixtures("one_thread")
def test_deepspeed_bf16_trains_to_the_torch_backends_bf16_parameters(tmp_path: Path) -> None:
    """One process, bf16, growth 32 -> 64: ZeRO-2 ends bit-identical to the torch backend
    (measured before this change, with DeepSpeed's 16-bit logits: max |Δparameter| 3.7e-3)."""
    from test_trainer import final_model, syn_config, train

    proc = subprocess.run(
        [sys.executable, "-c", DS_BF16_RUN, str(tmp_path / "ds"), str(REPO_ROOT / "tests")],
        env=distgrow_job_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert train(syn_config(tmp_path / "torch", "backend.precision=bf16"))[0] == 0
    ds, ref = final_model(tmp_path / "ds"), final_model(tmp_path / "torch")
    assert all(torch.equal(ds[k], ref[k]) for k in ref), {
        k: (ds[k] - ref[k]).abs().max().item() for k in ref
    }


# --------------------------------------------------------------------------------------------
# Horovod on CUDA: a CPU-only build is refused at start-up, in one line
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_HOROVOD, reason="horovod is not installed")
def test_a_cpu_only_horovod_refuses_cuda_at_start_up(cuda_build: Callable[[int], None]) -> None:
    import horovod.torch as hvd

    from distgrow.backends.horovod_backend import HorovodBackend, check_cuda_build

    assert not hvd.cuda_built()  # this machine's build (bootstrap: no CUDA here)
    check_cuda_build(hvd, torch.device("cpu"))  # the CPU needs neither
    cuda_build(1)
    cfg = load_config(None, ["backend.name=horovod", "run.device=cuda"])
    # Horovod stays initialised: a shutdown here would leave this process unable to init again,
    # and the in-process Horovod tests after this one (test_precision.py) would crash pytest.
    with pytest.raises(BackendError) as err:
        HorovodBackend(cfg, SINGLE)
    message = str(err.value)
    assert "this run trains on cuda:0, but Horovod was built without CUDA/NCCL" in message
    assert "hvd.cuda_built(), hvd.nccl_built() is false" in message
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in message and "\n" not in message


def test_a_cuda_and_nccl_horovod_build_passes() -> None:
    class Built:
        def cuda_built(self) -> bool:
            return True

        def nccl_built(self) -> int:
            return 22703  # horovod returns NCCL's version

    from distgrow.backends.horovod_backend import check_cuda_build

    check_cuda_build(Built(), torch.device("cuda", 0))


# --------------------------------------------------------------------------------------------
# The deepspeed launcher keeps CUDA_VISIBLE_DEVICES
# --------------------------------------------------------------------------------------------


def test_deepspeed_starts_on_the_listed_gpus_not_gpus_0_to_n() -> None:
    spec = LaunchSpec(workers=2, config="c.yaml", gpu_ids=("4", "5", "6", "7"))
    argv, _ = build_deepspeed(spec)
    assert "--include=localhost:4,5" in argv and not any(a.startswith("--num_gpus") for a in argv)
    assert "--num_gpus=2" in build_deepspeed(LaunchSpec(workers=2, config="c.yaml"))[0]
    with pytest.raises(LaunchError, match="5 workers on this node but CUDA_VISIBLE_DEVICES=4,5"):
        build_deepspeed(LaunchSpec(workers=5, config="c.yaml", gpu_ids=("4", "5")))
    with pytest.raises(LaunchError, match="GPU numbers"):
        build_deepspeed(LaunchSpec(workers=1, config="c.yaml", gpu_ids=("GPU-8a1b",)))


def test_launch_hands_cuda_visible_devices_to_deepspeed(tmp_path: Path) -> None:
    from distgrow.launch import _prepare

    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {name: synthetic_classification, synthetic_samples: 512}\n"
        f"run: {{output_dir: {tmp_path / 'run'}}}\n"
        "backend: {name: deepspeed}\nlaunch: {launcher: deepspeed}\n"
    )
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    job, _ = _prepare(str(config), [], load_config(config), env, print, sys.executable, 8)
    argv, _ = build_deepspeed(job.spec(2, resume=False))
    assert "--include=localhost:2,3" in argv
    cpu = ["run.device=cpu"]
    job, _ = _prepare(str(config), cpu, load_config(config, cpu), env, print, sys.executable, 8)
    assert any(a.startswith("--num_gpus=") for a in build_deepspeed(job.spec(2, resume=False))[0])


# --------------------------------------------------------------------------------------------
# Setup: bootstrap.sh with a CUDA torch, the DeepSpeed op step on a CUDA accelerator, sbatch
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.integration
def test_the_deepspeed_op_step_passes_on_a_cuda_accelerator() -> None:
    """DS_ACCELERATOR=cuda: what DeepSpeed picks on a GPU node (no CPU op to build there)."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "deepspeed_ops.py")],
        env={**os.environ, "DS_ACCELERATOR": "cuda"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "none cuda", (
        proc.stdout + proc.stderr
    )


FAKE_PYTHON = """#!/bin/sh
# stands in for a CUDA venv's python: what bootstrap.sh asks of it
echo "python $*" >> "$(dirname "$0")/../calls"
case "$*" in
  *deepspeed_ops.py*) echo "none cuda" ;;
  *"torch.version.cuda"*) echo "2.13.0+cu130 13.0" ;;
esac
exit 0
"""
FAKE_PIP = """#!/bin/sh
echo "pip $*" >> "$(dirname "$0")/../calls"
"""


def _bootstrap(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "bootstrap.sh")],
        env={
            **os.environ,
            "DISTGROW_VENV": str(venv),
            "DISTGROW_SKIP_APT": "1",
            "DISTGROW_SKIP_HOROVOD": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bootstrap_with_a_cuda_torch_keeps_the_other_pins_and_the_cuda_build(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("pip", FAKE_PIP)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    first = _bootstrap(venv, DISTGROW_TORCH_SPEC="torch==2.13.0")
    assert first.returncode == 0, first.stdout + first.stderr
    calls = (venv / "calls").read_text().splitlines()
    own = venv / "constraints-own-torch.txt"
    assert f"pip install -q -c {own} torch==2.13.0" in calls
    pins = own.read_text()
    assert not [line for line in pins.splitlines() if line.startswith("torch")]
    assert "\ndeepspeed==0.19.8\n" in pins and "\nnumpy==" in pins
    assert "torch 2.13.0+cu130 (CUDA: 13.0)" in first.stdout
    assert "DeepSpeed's accelerator is cuda: its collectives are NCCL's" in first.stdout
    # A later run without the variable keeps the CUDA build (it used to reinstall +cpu).
    (venv / ".distgrow-installed").write_text("stale\n")
    (venv / "calls").write_text("")
    second = _bootstrap(venv)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "keeping this venv's torch: DISTGROW_TORCH_SPEC=torch==2.13.0" in second.stdout
    installs = [c for c in (venv / "calls").read_text().splitlines() if c.startswith("pip")]
    assert installs[0] == f"pip install -q -c {own} torch==2.13.0", installs
    third = _bootstrap(venv)
    assert "is up to date" in third.stdout and "JIT op" not in third.stdout


def test_sbatch_passes_cpus_per_task_to_the_steps_and_warns_on_one_cpu_per_gpu(
    tmp_path: Path,
) -> None:
    sbatch = REPO_ROOT / "slurm" / "distgrow.sbatch"
    assert "--cpus-per-task=1" not in sbatch.read_text()
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset} $*"\n')
    python.chmod(0o755)
    base = {"PATH": os.environ["PATH"], "DISTGROW_PYTHON": str(python), "SLURM_JOB_ID": "7"}

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(sbatch), "c.yaml"],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    gpu = run(SLURM_CPUS_PER_TASK="8", SLURM_GPUS_ON_NODE="8")
    assert "SRUN_CPUS_PER_TASK=8 -m distgrow launch c.yaml" in gpu.stdout, gpu.stdout
    assert "warning" not in gpu.stderr
    starved = run(SLURM_GPUS_ON_NODE="8")
    assert "8 GPU(s) per node but 1 CPU per task" in starved.stderr
    assert "--cpus-per-task=8" in starved.stderr
    cpu = run(SLURM_CPUS_PER_TASK="1")
    assert cpu.stderr == "" and "SRUN_CPUS_PER_TASK=1" in cpu.stdout


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU build of torch")
def test_install_horovod_wants_a_cuda_torch_for_a_gpu_build() -> None:
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "launchers" / "install_horovod.sh"), "--verify"],
        env={**os.environ, "DISTGROW_VENV": sys.prefix, "DISTGROW_HOROVOD_GPU": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert f"DISTGROW_HOROVOD_GPU=1 but torch {torch.__version__} is not a CUDA build" in (
        proc.stderr
    )


# --------------------------------------------------------------------------------------------
# On a real GPU (skipped here: no GPU has been lent to this project)
# --------------------------------------------------------------------------------------------


def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch sees none")


@pytest.mark.gpu
def test_on_cuda_auto_picks_the_gpu_and_knows_its_uuid() -> None:
    _needs_cuda()
    from distgrow.devices import gpu_identity

    device = select_device("auto", 0, 1, env=os.environ)
    assert device == torch.device("cuda", 0)
    identity = gpu_identity(device)
    assert "/" in identity and identity.split("/", 1)[1] != str(device), identity


GPU_DEEPSPEED_PROBE = """
import torch, torch.distributed as dist
from distgrow.backends import make_backend
from distgrow.config import load_config
from distgrow.runtime import Runtime
cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=2", "run.device=cuda",
                         "backend.precision=bf16"])
backend = make_backend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).cuda()
engine = backend.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
out = engine(torch.randn(5, 3, device="cuda"))
comm = {str(engine.optimizer.get_param_comm_dtype(p)) for p in model.parameters()}
print("result", dist.get_backend(), out.dtype, out.device, sorted(comm))
backend.shutdown(0)
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DEEPSPEED, reason="deepspeed is not installed")
def test_on_cuda_deepspeed_runs_on_nccl_with_float32_logits_and_reduction() -> None:
    _needs_cuda()
    proc = subprocess.run(
        [sys.executable, "-c", GPU_DEEPSPEED_PROBE],
        env=distgrow_job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = [line for line in proc.stdout.splitlines() if line.startswith("result ")]
    assert result == ["result nccl torch.float32 cuda:0 ['torch.float32']"], proc.stdout


FAKE_HVD_PYTHON = """#!/bin/sh
# a venv's python with a CUDA torch and an installed horovod, as install_horovod.sh asks it
case "$*" in
  -) cat >/dev/null; echo "2.13.0+cu130 0.28.1 cp311 x86_64 1 /usr" ;;
  *hvd.size*) echo "size 1" ;;
  *cuda_built*) echo "gpu ${FAKE_HVD_GPU:-0}" ;;
esac
"""
FAKE_HOROVODRUN = """#!/bin/sh
printf '[X] PyTorch\\n[X] Gloo\\n'
[ "${FAKE_HVD_GPU:-0}" = 1 ] && printf '[X] NCCL\\n'
exit 0
"""


@pytest.mark.parametrize(
    ("nvcc", "built_with_nccl", "code", "said"),
    [
        (True, True, 0, "--check-build lists PyTorch Gloo NCCL"),
        (True, False, 1, "this horovod was built without CUDA/NCCL"),
        (False, False, 0, "is a CUDA build but no CUDA toolkit (nvcc) is here: this Horovod"),
    ],
)
def test_install_horovod_checks_nccl_where_torch_is_a_cuda_build(
    tmp_path: Path, nvcc: bool, built_with_nccl: bool, code: int, said: str
) -> None:
    """A CUDA torch with the CUDA toolkit: the build is NCCL's and verified as such; without
    the toolkit the script says that Horovod is CPU-only."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fakes = {"python": FAKE_HVD_PYTHON, "horovodrun": FAKE_HOROVODRUN}
    if nvcc:
        fakes["nvcc"] = "#!/bin/sh\n"
    for name, text in fakes.items():
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "launchers" / "install_horovod.sh"), "--verify"],
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "DISTGROW_VENV": str(venv),
            "DISTGROW_HOROVOD_MPI": "0",
            "FAKE_HVD_GPU": "1" if built_with_nccl else "0",
            "CUDA_HOME": str(tmp_path / "no-cuda"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert said in proc.stdout + proc.stderr
