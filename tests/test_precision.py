"""Mixed precision under the torch backend: bf16 autocast on the CPU, float32 weights and
checkpoints that resume under any precision, and fp16's loss scaler in the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import distgrow_job_argv
from test_trainer import SINGLE, syn_config, train
from torch import nn

from distgrow.backends import BackendError, make_backend
from distgrow.backends.base import check_precision
from distgrow.backends.torch_ddp import SCALER_KEY, AutocastModule, TorchBackend
from distgrow.checkpoint import load_latest
from distgrow.exits import EXIT_OK
from distgrow.startup import load_data
from distgrow.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def summary(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())


def saved_model(run_dir: Path) -> dict[str, torch.Tensor]:
    found = load_latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return found[1]["model"]


def test_autocast_module_runs_the_forward_in_bf16_and_returns_float32() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    x = torch.randn(4, 64)
    out = AutocastModule(linear, "cpu", torch.bfloat16)(x)
    assert out.dtype == torch.float32 and linear.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(x)
    assert want.dtype == torch.bfloat16
    assert torch.equal(out, want.float())
    assert not torch.equal(out, linear(x))  # a float32 forward differs in the low bits


def test_bf16_trains_like_fp32_with_float32_weights(tmp_path: Path) -> None:
    code32, _ = train(syn_config(tmp_path / "fp32"))
    code16, bf16 = train(syn_config(tmp_path / "bf16", "backend.precision=bf16"))
    assert code32 == code16 == EXIT_OK
    assert isinstance(bf16.train_model, AutocastModule)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(v.dtype == torch.float32 for v in saved_model(tmp_path / "bf16").values())
    want, got = summary(tmp_path / "fp32"), summary(tmp_path / "bf16")
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=0.05)
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=0.05)
    # It did train in bf16: the weights are not the float32 run's bit for bit.
    a, b = saved_model(tmp_path / "fp32"), saved_model(tmp_path / "bf16")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("first", "then"), [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_checkpoint_resumes_under_the_other_precision(
    tmp_path: Path, first: str, then: str
) -> None:
    run = tmp_path / "run"
    assert train(syn_config(run, "run.epochs=1", f"backend.precision={first}"))[0] == EXIT_OK
    after_one = saved_model(run)
    code, resumed = train(
        syn_config(run, "run.epochs=2", "run.resume=true", f"backend.precision={then}")
    )
    assert code == EXIT_OK and resumed.state.step == 33 + 17
    final = saved_model(run)
    assert all(v.dtype == torch.float32 for v in final.values())
    assert any(not torch.equal(after_one[k], final[k]) for k in final)
    assert summary(run)["total_updates"] == 50


def test_fp16_is_refused_on_the_cpu(tmp_path: Path) -> None:
    cfg = syn_config(tmp_path, "backend.precision=fp16")
    with pytest.raises(BackendError, match=r"'fp16' needs a CUDA device.*bf16 or fp32"):
        TorchBackend(cfg.backend, SINGLE, device="cpu")


def _scaled_backend(tmp_path: Path) -> tuple[TorchBackend, nn.Module, torch.optim.Optimizer]:
    """A CPU backend with a loss scaler, as fp16 on CUDA has (fp16 itself is CUDA-only)."""
    backend = TorchBackend(syn_config(tmp_path).backend, SINGLE, device="cpu")
    backend.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backend.setup(model, optimizer)
    return backend, model, optimizer


def test_the_loss_scaler_is_exact_over_accumulation_and_saved_with_the_optimizer(
    tmp_path: Path,
) -> None:
    backend, model, optimizer = _scaled_backend(tmp_path)
    torch.manual_seed(0)
    xs = [torch.randn(4, 3) for _ in range(2)]
    reference = nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for x in xs:  # two micro-steps, one update
            backend.backward(model(x).square().sum())
            reference(x).square().sum().backward()
        backend.step(optimizer, grad_clip=None)
        ref_opt.step()
        ref_opt.zero_grad()
    assert backend.scaler is not None
    assert backend.scaler.get_scale() == 4096.0  # grown once per finite update
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)  # powers of two scale and unscale exactly
    state = backend.optimizer_state_dict(optimizer)
    assert state[SCALER_KEY]["scale"] == 4096.0
    restored, _, opt2 = _scaled_backend(tmp_path)
    restored.load_optimizer_state_dict(opt2, state)
    assert restored.scaler is not None and restored.scaler.get_scale() == 4096.0
    assert opt2.state_dict()["state"][0]["momentum_buffer"].equal(
        optimizer.state_dict()["state"][0]["momentum_buffer"]
    )
    # A backend without a scaler (fp32, bf16) loads the same state and ignores the scaler.
    plain = TorchBackend(syn_config(tmp_path).backend, SINGLE, device="cpu")
    opt3 = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    plain.load_optimizer_state_dict(opt3, state)
    assert SCALER_KEY not in plain.optimizer_state_dict(opt3)


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="horovod is not installed")
def test_bf16_under_horovod_trains_as_under_torch(tmp_path: Path) -> None:
    cfg = syn_config(tmp_path / "hvd", "backend.name=horovod", "backend.precision=bf16")
    trainer = Trainer(cfg, make_backend(cfg, SINGLE), load_data(cfg))
    assert trainer.train() == EXIT_OK
    assert isinstance(trainer.train_model, AutocastModule)
    assert train(syn_config(tmp_path / "torch", "backend.precision=bf16"))[0] == EXIT_OK
    hvd, torch_run = saved_model(tmp_path / "hvd"), saved_model(tmp_path / "torch")
    assert all(v.dtype == torch.float32 for v in hvd.values())
    assert all(torch.allclose(hvd[k], torch_run[k], atol=1e-5) for k in hvd)


@pytest.mark.gpu
def test_fp16_trains_on_cuda_with_a_scaler_in_the_checkpoint(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("fp16 needs a CUDA device; torch sees none")
    cfg = syn_config(tmp_path / "run", "backend.precision=fp16", "run.device=cuda")
    trainer = Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cuda"), load_data(cfg))
    assert trainer.train() == EXIT_OK
    found = load_latest(tmp_path / "run")
    assert found is not None
    assert found[1]["optimizer"][SCALER_KEY]["scale"] > 0
    assert all(v.dtype == torch.float32 for v in found[1]["model"].values())
    fp32 = tmp_path / "fp32"
    assert train(syn_config(fp32))[0] == EXIT_OK
    assert summary(tmp_path / "run")["val_loss"] == pytest.approx(
        summary(fp32)["val_loss"], rel=0.05
    )


@pytest.mark.integration
def test_bf16_on_two_gloo_ranks_trains_like_one_process(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(
        "data: {name: synthetic_classification, synthetic_samples: 1291, "
        "synthetic_features: 16}\nmodel: {name: mlp, hidden: [32]}\n"
        "optim: {lr: 0.05, momentum: 0.9}\nbackend: {precision: bf16}\n"
        "growth: {base_batch: 32, micro_batch: 8, max_micro_batch: 8, "
        "max_dataset_fraction: null}\nschedule: {type: multistep, milestones: [1], gamma: 0.5}\n"
        f"run: {{epochs: 2, threads: 1, output_dir: {tmp_path / 'two'}}}\n"
        "logging: {progress: 'off', wandb: {mode: disabled}}\n"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        distgrow_job_argv(2, [str(config)]),
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert train(syn_config(tmp_path / "one", "backend.precision=bf16"))[0] == EXIT_OK
    two, one = summary(tmp_path / "two"), summary(tmp_path / "one")
    assert two["world_size"] == 2 and two["total_updates"] == one["total_updates"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=0.05)
    assert all(v.dtype == torch.float32 for v in saved_model(tmp_path / "two").values())


@pytest.mark.skipif(importlib.util.find_spec("horovod") is None, reason="horovod is not installed")
@pytest.mark.parametrize(("first", "then"), [("torch", "horovod"), ("horovod", "torch")])
def test_a_bf16_checkpoint_resumes_in_fp32_under_the_other_backend(
    tmp_path: Path, first: str, then: str
) -> None:
    """The checkpoint is float32 whatever the precision and the backend: a bf16 epoch under
    one backend, then an fp32 epoch under the other, ends where the same two epochs under the
    torch backend alone end (one process: both backends compute the same updates)."""

    def run(run_dir: Path, backend: str, *overrides: str) -> Trainer:
        cfg = syn_config(run_dir, f"backend.name={backend}", *overrides)
        trainer = Trainer(cfg, make_backend(cfg, SINGLE), load_data(cfg))
        assert trainer.train() == EXIT_OK
        return trainer

    mixed, same = tmp_path / "mixed", tmp_path / "same"
    run(mixed, first, "run.epochs=1", "backend.precision=bf16")
    resumed = run(mixed, then, "run.epochs=2", "run.resume=true", "backend.precision=fp32")
    assert resumed.state.step == 33 + 17 and not isinstance(resumed.train_model, AutocastModule)
    run(same, "torch", "run.epochs=1", "backend.precision=bf16")
    run(same, "torch", "run.epochs=2", "run.resume=true", "backend.precision=fp32")
    got, want = saved_model(mixed), saved_model(same)
    assert all(v.dtype == torch.float32 for v in got.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("native", "refused"), [(True, False), (False, True)])
def test_bf16_on_a_gpu_that_only_emulates_it_is_refused(
    monkeypatch: pytest.MonkeyPatch, native: bool, refused: bool
) -> None:
    """A pre-Ampere GPU passes torch's default bf16 check by emulation: distgrow asks for native."""
    asked: list[bool] = []

    def bf16_supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native or including_emulation  # emulation always "works", as on a V100

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    if refused:
        with pytest.raises(
            BackendError, match=r"Tesla V100.*compute capability 8\.0.*fp16 or fp32"
        ):
            check_precision("bf16", torch.device("cuda", 0))
    else:
        check_precision("bf16", torch.device("cuda", 0))
    assert asked == [False]
