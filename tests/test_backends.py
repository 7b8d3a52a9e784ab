"""The DeepSpeed and Horovod backends against the torch one, and every launcher × backend pair.

Unit tests (no processes): the DeepSpeed config builder and the merge of a user's JSON, the
precision rules, the runtime's reading of horovodrun's variables, and that every backend class
implements the whole protocol.

Integration tests (real 2-rank jobs on the CPU, each started by the real launcher command that
``distgrow.launch`` builds): the same config and seed, with a growth event after epoch 1 (the batch
grows 32 -> 64 through accumulation 2 -> 4), trained by torch/DDP, DeepSpeed ZeRO 0, 1, 2 and 3
(ZeRO-3 with every parameter partitioned, under torchrun, ``distgrow launch``, the deepspeed
launcher, mpirun and srun), and Horovod, must end with the same parameters (float32, ``rtol=1e-5,
atol=1e-6``) and log the same ``metrics.jsonl`` values for batch, workers, accumulation, learning
rate and updates. DeepSpeed checkpoints resume at another world size (ZeRO 0 and 2, momentum
included) and under another backend. Each supported pair of the table in ``docs/backends.md`` is
one test here: ``test_launcher_backend_pair[<launcher>-<backend>]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    LAUNCHER_PREFIXES,
    REPO_ROOT,
    SYN_PLAN,
    SYN_UPDATES,
    assert_same_model,
    clear_launcher_env,
    communicate_or_fail,
    distgrow_job_env,
    free_port,
    write_config,
)

from distgrow.backends import Backend, BackendError, make_backend
from distgrow.backends.base import check_precision
from distgrow.backends.deepspeed_backend import (
    DeepSpeedBackend,
    DeepSpeedConfigError,
    build_ds_config,
    load_user_ds_config,
    merge_ds_config,
)
from distgrow.backends.horovod_backend import HorovodBackend
from distgrow.backends.torch_ddp import TorchBackend
from distgrow.checkpoint import load_latest
from distgrow.config import load_config
from distgrow.launch import (
    LaunchSpec,
    build_deepspeed,
    build_horovodrun,
    build_mpirun,
    build_none,
    build_srun,
    build_torchrun,
    run_controller,
)
from distgrow.metrics import read_jsonl
from distgrow.runtime import Runtime, detect_runtime

SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
HAVE_HOROVOD = importlib.util.find_spec("horovod") is not None
HAVE_MPIRUN = shutil.which("mpirun") is not None

needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED,
    reason="deepspeed is not installed: DS_BUILD_OPS=0 pip install -c constraints.txt deepspeed "
    "(scripts/bootstrap.sh installs it; CI runs these tests)",
)
needs_horovod = pytest.mark.skipif(
    not HAVE_HOROVOD,
    reason="horovod is not installed: bash launchers/install_horovod.sh (scripts/bootstrap.sh "
    "runs it; CI runs these tests)",
)
needs_mpirun = pytest.mark.skipif(
    not HAVE_MPIRUN, reason="mpirun is not installed: apt-get install openmpi-bin libopenmpi-dev"
)


# --------------------------------------------------------------------------------------------
# Unit: the DeepSpeed config
# --------------------------------------------------------------------------------------------


def test_ds_config_follows_distgrows_settings() -> None:
    cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=2"])
    ds = build_ds_config(cfg, world_size=4, micro_batch=8, accum_steps=3)
    assert ds["train_batch_size"] == 96 == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    # DeepSpeed 0.19.8 would clip at 1.0 by default: "no clipping" must be written out.
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert "torch_autocast" not in ds and "optimizer" not in ds and "scheduler" not in ds
    json.dumps(ds)  # DeepSpeed takes it as JSON


def test_ds_config_clipping_stage_and_precision() -> None:
    cfg = load_config(
        None, ["backend.name=deepspeed", "optim.grad_clip=0.5", "backend.precision=bf16"]
    )
    ds = build_ds_config(cfg, world_size=1, micro_batch=4, accum_steps=1)
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 0} and "zero_allow_untested_optimizer" not in ds
    # lower_precision_safe_modules []: gradients reduced in float32, as DDP does (test_gpu_setup)
    assert ds["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }


def test_merge_keeps_the_users_other_keys_and_accepts_agreeing_ones() -> None:
    cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=2"])
    ours = build_ds_config(cfg, world_size=2, micro_batch=8, accum_steps=2)
    theirs = {
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7},
        "gradient_clipping": 0,  # the same value, as an int
        "train_batch_size": "auto",  # Hugging Face's "the trainer fills it in"
        "communication_data_type": "fp32",
    }
    merged = merge_ds_config(ours, theirs)
    assert merged["zero_optimization"] == {
        "stage": 2,
        "overlap_comm": True,
        "reduce_bucket_size": 5e7,
    }
    assert merged["train_batch_size"] == 32 and merged["gradient_clipping"] == 0.0
    assert merged["communication_data_type"] == "fp32"
    assert ours["zero_optimization"] == {"stage": 2}  # not modified in place


def test_merge_conflicts_name_every_key_both_values_and_the_fix() -> None:
    cfg = load_config(None, ["backend.name=deepspeed", "optim.grad_clip=1.0"])
    ours = build_ds_config(cfg, world_size=2, micro_batch=8, accum_steps=2)
    theirs = {
        "zero_optimization": {"stage": 2},
        "gradient_clipping": 0.25,
        "train_micro_batch_size_per_gpu": 16,
        "bf16": {"enabled": True},
    }
    with pytest.raises(DeepSpeedConfigError) as info:
        merge_ds_config(ours, theirs, "ds.json")
    text = str(info.value)
    assert "'zero_optimization.stage' is 2 in ds.json but 0 from distgrow" in text
    assert "set backend.zero_stage instead" in text
    assert "'gradient_clipping' is 0.25 in ds.json but 1.0" in text and "optim.grad_clip" in text
    assert "'train_micro_batch_size_per_gpu' is 16" in text and "growth.micro_batch" in text
    assert "'bf16.enabled' is True" in text and "backend.precision" in text


def test_merge_refuses_an_optimizer_or_scheduler_section() -> None:
    ours = build_ds_config(load_config(None), world_size=1, micro_batch=8, accum_steps=1)
    theirs = {"optimizer": {"type": "Adam"}, "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(DeepSpeedConfigError, match=r"'optimizer'.*optim\.\*") as info:
        merge_ds_config(ours, theirs)
    assert "'scheduler'" in str(info.value) and "schedule.*" in str(info.value)


def test_user_ds_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DeepSpeedConfigError, match="does not exist"):
        load_user_ds_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_user_ds_config(str(bad))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="not a JSON object"):
        load_user_ds_config(str(listed))


def test_a_conflicting_json_fails_before_anything_starts(tmp_path: Path) -> None:
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 1.0}))
    cfg = load_config(None, ["backend.name=deepspeed", f"backend.deepspeed_config={user}"])
    # Raised while building the config: before DeepSpeed is imported or a group is joined.
    with pytest.raises(BackendError, match="'gradient_clipping' is 1.0"):
        make_backend(cfg, SINGLE)


def test_fp16_is_refused_on_the_cpu() -> None:
    with pytest.raises(BackendError, match="'fp16' needs a CUDA device.*bf16 or fp32"):
        check_precision("fp16", torch.device("cpu"))
    check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    cfg = load_config(None, ["backend.name=deepspeed", "backend.precision=fp16", "run.device=cpu"])
    with pytest.raises(BackendError, match="fp16"):
        make_backend(cfg, SINGLE)


def test_horovod_refuses_fp16_precision_on_the_cpu() -> None:
    cfg = load_config(None, ["backend.name=horovod", "backend.precision=fp16", "run.device=cpu"])
    with pytest.raises(BackendError, match=r"'fp16' needs a CUDA device.*bf16 or fp32"):
        make_backend(cfg, SINGLE)


def test_every_backend_implements_the_whole_protocol() -> None:
    wanted = {
        name
        for name in dir(Backend)
        if not name.startswith("_") and name not in dir(object) and name != "mro"
    }
    assert {"begin_update", "optimizer_state_dict", "load_optimizer_state_dict"} <= wanted
    for cls in (TorchBackend, DeepSpeedBackend, HorovodBackend):
        missing = sorted(name for name in wanted if not hasattr(cls, name))
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_runtime_reads_horovodrun_gloo_variables() -> None:
    env = {
        "HOROVOD_RANK": "1",
        "HOROVOD_SIZE": "2",
        "HOROVOD_LOCAL_RANK": "1",
        "HOROVOD_LOCAL_SIZE": "2",
        # horovodrun inside an allocation: the batch step's SLURM variables must not win.
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "4",
    }
    rt = detect_runtime(env)
    assert (rt.launcher, rt.rank, rt.world_size, rt.local_rank, rt.local_world_size) == (
        "horovodrun",
        1,
        2,
        1,
        2,
    )
    # horovodrun --mpi is Open MPI underneath: its variables are read as mpirun's.
    mpi = detect_runtime({**env, "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert mpi.launcher == "mpirun" and mpi.rank == 0


# --------------------------------------------------------------------------------------------
# Integration: every launcher × backend pair, 2 ranks on the CPU, against torch/DDP
# --------------------------------------------------------------------------------------------

# The shared plan with a growth event (conftest.SYN_PLAN), kept for resumes.
SYN: dict[str, Any] = {
    **SYN_PLAN,
    "run": {**SYN_PLAN["run"], "device": "cpu", "keep_checkpoints": 10},
    "logging": {"every_steps": 5, "progress": "lines"},
}
# What metrics.jsonl must agree on across backends (the batch, workers, accumulation,
# LR and updates; kind/event/epoch place each record).
COMPARED = ("kind", "event", "epoch", "step", "global_batch", "workers", "accum_steps", "lr")

BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("backend.name=torch",),
    "ds-zero0": ("backend.name=deepspeed", "backend.zero_stage=0"),
    "ds-zero1": ("backend.name=deepspeed", "backend.zero_stage=1"),
    "ds-zero2": ("backend.name=deepspeed", "backend.zero_stage=2"),
    # + backend.deepspeed_config: the zero3_json fixture (every parameter partitioned)
    "ds-zero3": ("backend.name=deepspeed", "backend.zero_stage=3"),
    "horovod": ("backend.name=horovod",),
}


def _job_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in distgrow_job_env().items() if not k.startswith(LAUNCHER_PREFIXES)}
    return {**env, **(extra or {})}


_OMPI_RANK_VARIABLES = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
)


def run_launcher(
    launcher: str,
    config: Path,
    run_dir: Path,
    overrides: tuple[str, ...],
    *,
    workers: int = 2,
    resume: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 420,
) -> str:
    """Run ``distgrow train`` with the real command ``distgrow.launch`` builds for ``launcher``.

    ``horovodrun-gloo`` and ``horovodrun-mpi`` are horovodrun with either controller; ``none``
    is one plain process. Fails the test (with the output) on a non-zero exit or a timeout.
    """
    backend_is_horovod = "backend.name=horovod" in overrides
    # mpirun-mpi4py: mpirun, with its OMPI_COMM_WORLD_* variables removed before the worker
    # starts, so that only PMIx's PMIX_RANK is left and distgrow.runtime asks MPI (mpi4py).
    strip = ("env", *(f"-u{name}" for name in _OMPI_RANK_VARIABLES))
    spec = LaunchSpec(
        workers=workers,
        config=str(config),
        overrides=(f"run.output_dir={run_dir}", f"growth.max_workers={workers}", *overrides),
        resume=resume,
        python=sys.executable,
        master_port=free_port(),
        horovod_transport="mpi" if launcher == "horovodrun-mpi" else "gloo",
        srun_mpi=launcher == "srun" and backend_is_horovod,
        run_as_root=os.geteuid() == 0,
        extra=strip if launcher == "mpirun-mpi4py" else (),
    )
    builders = {
        "none": build_none,
        "torchrun": build_torchrun,
        "deepspeed": build_deepspeed,
        "horovodrun-gloo": build_horovodrun,
        "horovodrun-mpi": build_horovodrun,
        "mpirun": build_mpirun,
        "mpirun-mpi4py": build_mpirun,
        "srun": build_srun,
    }
    if launcher == "distgrow-launch":  # the controller: on one node, torchrun's preloaded fork
        port = f"launch.master_port={spec.master_port}"
        argv = [spec.python, "-m", "distgrow", "launch", spec.config, *spec.overrides, port]
        additions: dict[str, str] = {}
    else:
        argv, additions = builders[launcher](spec)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env={**_job_env(env), **additions},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = communicate_or_fail(proc, timeout, f"{launcher} job {shlex.join(argv)}", expect=0)
    print(f"{launcher} {' '.join(overrides)}: {time.monotonic() - started:.1f} s")
    return out


def final_state(run_dir: Path) -> dict[str, Any]:
    found = load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]


def metric_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    rows = []
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record["kind"] in ("step", "epoch") or record.get("event") == "growth":
            rows.append(tuple(record.get(key) for key in COMPARED))
    return rows


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want)


@pytest.fixture(scope="module")
def syn_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("cfg") / "syn.yaml", SYN)


@pytest.fixture(scope="module")
def zero3_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ZeRO-3 partitioning every parameter (DeepSpeed keeps those under 1e5 elements whole)."""
    path = tmp_path_factory.mktemp("ds3") / "ds3.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return path


@pytest.fixture(scope="module")
def torch_reference(syn_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch/DDP on 2 ranks under torchrun: what every other pair must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref") / "torch"
    run_launcher("torchrun", syn_config, run_dir, BACKENDS["torch"])
    state = final_state(run_dir)
    assert state["step"] == SYN_UPDATES
    rows = metric_rows(run_dir)
    growth = [r for r in rows if r[1] == "growth"]
    assert [(r[4], r[5], r[6]) for r in growth] == [(64, 2, 4)]  # 2×8×2 -> 2×8×4, mid-run
    return run_dir


def _skip_unless(launcher: str, backend: str) -> None:
    if backend.startswith("ds-") and not HAVE_DEEPSPEED:
        pytest.skip(
            "deepspeed is not installed: DS_BUILD_OPS=0 pip install -c constraints.txt "
            "deepspeed (scripts/bootstrap.sh; CI installs it)"
        )
    if (backend == "horovod" or launcher.startswith("horovodrun")) and not HAVE_HOROVOD:
        pytest.skip(
            "horovod is not installed: bash launchers/install_horovod.sh "
            "(scripts/bootstrap.sh; CI builds it)"
        )
    if launcher in ("mpirun", "mpirun-mpi4py", "horovodrun-mpi") and not HAVE_MPIRUN:
        pytest.skip("mpirun is not installed: apt-get install openmpi-bin libopenmpi-dev")
    if launcher == "mpirun-mpi4py" and importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed: pip install -c constraints.txt mpi4py")


# (launcher, backend): every supported pair of docs/backends.md's table, torchrun × torch being
# the reference itself.
PAIRS = [
    ("torchrun", "ds-zero2"),
    ("deepspeed", "ds-zero0"),
    ("deepspeed", "torch"),
    ("mpirun", "torch"),
    ("mpirun", "ds-zero1"),
    ("mpirun", "horovod"),
    ("mpirun-mpi4py", "torch"),
    ("mpirun-mpi4py", "horovod"),
    ("horovodrun-gloo", "horovod"),
    ("horovodrun-mpi", "horovod"),
    ("srun", "torch"),
    ("srun", "ds-zero2"),
    ("srun", "horovod"),
    ("torchrun", "ds-zero3"),
    ("distgrow-launch", "ds-zero3"),
    ("deepspeed", "ds-zero3"),
    ("mpirun", "ds-zero3"),
    ("srun", "ds-zero3"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("launcher", "backend"), PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_launcher_backend_pair(
    launcher: str,
    backend: str,
    syn_config: Path,
    torch_reference: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The pair trains 2 ranks through a growth event to torch/DDP's parameters and metrics."""
    _skip_unless(launcher, backend)
    env = None
    if launcher == "srun":  # the session's local SLURM cluster (conftest.slurm)
        env = {"SLURM_CONF": request.getfixturevalue("slurm")["SLURM_CONF"]}
    overrides = BACKENDS[backend]
    if backend == "ds-zero3":
        overrides += (f"backend.deepspeed_config={request.getfixturevalue('zero3_json')}",)
    run_dir = tmp_path / "run"
    out = run_launcher(launcher, syn_config, run_dir, overrides, env=env)
    if launcher == "mpirun-mpi4py":
        assert "set WORLD_SIZE=2 (from mpi)" in out  # the ranks came from mpi4py
    if launcher == "distgrow-launch":  # one launch of 2 workers, forked by the preloaded spawner
        assert "-m distgrow.launch.spawn --nproc_per_node=2" in out
        assert "distgrow launch: done: 1 launch(es)" in out
    got, want = final_state(run_dir), final_state(torch_reference)
    assert got["step"] == want["step"] == SYN_UPDATES
    diff = max_abs_diff(got["model"], want["model"])
    print(f"{launcher} × {backend}: max |Δparameter| vs torch = {diff:.3g}")
    assert_same_model(got["model"], want["model"])
    assert metric_rows(run_dir) == metric_rows(torch_reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["growth_events"] == 1
    # The optimizer state is saved in torch's own format whatever the engine (ZeRO gathers its
    # partitions): the momentum buffers match torch/DDP's too.
    for index, entry in want["optimizer"]["state"].items():
        torch.testing.assert_close(
            got["optimizer"]["state"][index]["momentum_buffer"],
            entry["momentum_buffer"],
            rtol=1e-4,
            atol=1e-6,
        )


@needs_deepspeed
@pytest.mark.integration
@pytest.mark.parametrize("stage", [0, 2])
def test_deepspeed_checkpoints_resume_at_other_world_sizes(
    stage: int, syn_config: Path, torch_reference: Path, tmp_path: Path
) -> None:
    """2 ranks -> 1 rank -> 2 ranks (the last under torch/DDP for ZeRO-0, ZeRO-2 for ZeRO-2):
    the optimizer state (momentum) travels, so the run ends where the uninterrupted one does."""
    run_dir = tmp_path / "run"
    ds = BACKENDS[f"ds-zero{stage}"]
    run_launcher("torchrun", syn_config, run_dir, (*ds, "run.epochs=1"))
    out = run_launcher("none", syn_config, run_dir, (*ds, "run.epochs=2"), workers=1, resume=True)
    assert "resuming from" in out and "on 1 worker(s)" in out
    last = BACKENDS["torch"] if stage == 0 else ds
    run_launcher("torchrun", syn_config, run_dir, last, resume=True)
    got, want = final_state(run_dir), final_state(torch_reference)
    assert got["step"] == SYN_UPDATES and got["samples_seen"] == 3 * 1033
    diff = max_abs_diff(got["model"], want["model"])
    print(f"ZeRO-{stage} 2 -> 1 -> 2 ranks: max |Δparameter| vs torch = {diff:.3g}")
    assert_same_model(got["model"], want["model"])
    worlds = [
        r.get("world_size")
        for r in read_jsonl(run_dir / "metrics.jsonl")
        if r.get("event") in ("start", "resume")
    ]
    assert worlds == [2, 1, 2]


@needs_deepspeed
@pytest.mark.integration
def test_deepspeed_bf16_autocast_on_the_cpu(
    syn_config: Path, torch_reference: Path, tmp_path: Path
) -> None:
    """bf16 on the CPU is torch autocast: the matmuls round (the parameters differ from fp32),
    the weights and the checkpoint stay float32, and training ends close to fp32's."""
    run_dir = tmp_path / "run"
    run_launcher("torchrun", syn_config, run_dir, (*BACKENDS["ds-zero2"], "backend.precision=bf16"))
    got, want = final_state(run_dir)["model"], final_state(torch_reference)["model"]
    assert all(value.dtype == torch.float32 for value in got.values())
    diff = max_abs_diff(got, want)
    print(f"bf16 autocast vs fp32: max |Δparameter| = {diff:.3g}")
    assert 1e-5 < diff < 5e-2  # bf16 did run (not fp32), and it trained the same way
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((torch_reference / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(reference["val_loss"], rel=2e-2)


# Batch 32 on one worker (micro-batch 32), then 64 on two: the plan needs a second worker
# after epoch 1.
JOINING: dict[str, Any] = {
    **SYN,
    "run": {**SYN["run"], "epochs": 2},
    "growth": {
        "base_batch": 32,
        "micro_batch": 32,
        "max_micro_batch": 32,
        "max_dataset_fraction": None,
        "max_workers": 2,
    },
}


@needs_horovod
@pytest.mark.integration
def test_horovod_elastic_grows_the_job_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``distgrow launch`` with launch.elastic=true and horovodrun: one launch; the second
    worker joins the running job when the plan needs it, and the run ends where a one-process
    run of the same plan does."""
    clear_launcher_env(monkeypatch)
    single = tmp_path / "single"
    tree = {**JOINING, "run": {**JOINING["run"], "output_dir": str(single)}}
    reference = write_config(tmp_path / "single.yaml", tree)
    run_launcher("none", reference, single, ("growth.max_workers=1",), workers=1)

    run_dir = tmp_path / "elastic"
    tree = {
        **JOINING,
        "run": {**JOINING["run"], "output_dir": str(run_dir)},
        "backend": {"name": "horovod"},
        "launch": {
            "launcher": "horovodrun",
            "elastic": True,
            "elastic_wait_s": 60,
            "master_port": free_port(),
            "max_restarts": 0,
        },
    }
    config = write_config(tmp_path / "elastic.yaml", tree)
    lines: list[str] = []
    code = run_controller(str(config), [], load_config(config), log=lines.append)
    assert code == 0, "\n".join(lines)
    assert sorted(p.name for p in (run_dir / "launch").glob("attempt-*.log")) == [
        "attempt-01-1w.log"
    ], "\n".join(lines)  # one launch: the job grew in place
    records = read_jsonl(run_dir / "metrics.jsonl")
    starts = [
        (r["event"], r["world_size"]) for r in records if r.get("event") in ("start", "resume")
    ]
    assert starts == [("start", 1), ("resume", 2)]
    assert any(r.get("event") == "need_workers" for r in records)
    got, want = final_state(run_dir), final_state(single)
    assert got["step"] == want["step"] == 33 + 17
    diff = max_abs_diff(got["model"], want["model"])
    print(f"Horovod Elastic 1 -> 2 workers: max |Δparameter| vs one process = {diff:.3g}")
    assert_same_model(got["model"], want["model"])


# --------------------------------------------------------------------------------------------
# Single-process: a real DeepSpeed engine in this process
# --------------------------------------------------------------------------------------------


@needs_deepspeed
@pytest.mark.integration
def test_deepspeed_keeps_the_trainers_optimizer_and_learning_rate(tmp_path: Path) -> None:
    """One worker, in a subprocess (DeepSpeed's process group must not leak into pytest)."""
    code = """
import torch
from distgrow.backends import make_backend
from distgrow.config import load_config
from distgrow.runtime import Runtime
cfg = load_config(None, ["backend.name=deepspeed", "backend.zero_stage=2", "run.device=cpu"])
backend = make_backend(cfg, Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none"))
torch.manual_seed(0)
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
engine = backend.setup(model, opt)
for group in opt.param_groups:
    group["lr"] = 0.025
backend.begin_update(4, 3)
assert engine.get_lr() == [0.025], engine.get_lr()
assert engine.gradient_accumulation_steps() == 3 and engine.train_batch_size() == 12
assert engine.gradient_clipping() == 0.0
print("ok")
backend.shutdown(0)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=distgrow_job_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_runtime_asks_mpi_only_when_pmix_is_the_only_launcher_variable() -> None:
    from distgrow.runtime import MpiWorld

    asked: list[int] = []

    def fake_mpi() -> MpiWorld:
        asked.append(1)
        return MpiWorld(rank=3, size=4, local_rank=1, local_size=2, root_host="node07")

    rt = detect_runtime({"PMIX_RANK": "3"}, mpi=fake_mpi)
    assert (rt.launcher, rt.rank, rt.world_size, rt.local_rank, rt.local_world_size) == (
        "mpi",
        3,
        4,
        1,
        2,
    )
    assert rt.master_addr == "node07"  # rank 0's host, as MPI told it
    pinned = detect_runtime({"PMIX_RANK": "3", "MASTER_ADDR": "10.0.0.1"}, mpi=fake_mpi)
    assert pinned.master_addr == "10.0.0.1"
    # Under mpirun and srun their own variables are enough: MPI is not initialised.
    asked.clear()
    detect_runtime(
        {"PMIX_RANK": "0", "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, mpi=fake_mpi
    )
    detect_runtime({"PMIX_RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, mpi=fake_mpi)
    assert asked == []
