"""The GPU-ready paths, as far as the CPU can check them: where data lives, channels_last,
torch.compile, and CUDA memory per phase (absent on the CPU). The CUDA runs themselves are the
``gpu``-marked tests at the end (skipped without a CUDA device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import SINGLE, syn_config, train
from torch import nn

from distgrow.backends import BackendError
from distgrow.backends.torch_ddp import resolve_dist_backend
from distgrow.config import ConfigError, load_config
from distgrow.data import ArrayDataset
from distgrow.data.transforms import Compose, NormalizeImages, RandomCropFlip
from distgrow.exits import EXIT_OK
from distgrow.gpu import (
    PinnedArrays,
    cuda_peak_memory,
    data_placement,
    has_conv2d,
    place_data,
    prepare_model,
    wants_channels_last,
)
from distgrow.models import build_model
from distgrow.planner import Split
from distgrow.report import build_report, load_run
from distgrow.savings import CUDA_MEMORY, PhaseTracker
from distgrow.startup import load_data

pytestmark = pytest.mark.usefixtures("one_thread")

GIB = 2**30


@pytest.mark.parametrize(
    ("data_bytes", "free", "fraction", "device", "want"),
    [
        (GIB, 10 * GIB, 0.5, "cuda", "device"),
        (5 * GIB, 10 * GIB, 0.5, "cuda", "device"),  # exactly the budget
        (5 * GIB + 1, 10 * GIB, 0.5, "cuda", "pinned"),
        (GIB, 10 * GIB, 0.0, "cuda", "pinned"),  # data.device_fraction=0: never
        (GIB, None, 0.5, "cuda", "pinned"),
        (GIB, 10 * GIB, 0.5, "cpu", "host"),
    ],
)
def test_where_in_memory_data_lives(
    data_bytes: int, free: int | None, fraction: float, device: str, want: str
) -> None:
    assert data_placement(data_bytes, free, fraction, device) == want


def test_data_on_the_cpu_is_left_as_it_is(tmp_path: Path) -> None:
    data = load_data(syn_config(tmp_path))
    assert place_data(data, torch.device("cpu"), 0.5, print) is data


def test_pinned_batches_equal_the_plain_ones_with_the_transform_after_the_copy() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    transform = Compose(
        RandomCropFlip(seed=3, padding=2, flip=True),
        NormalizeImages((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)),
    )
    plain = ArrayDataset(x, y, transform)
    staged = PinnedArrays(x, y, transform, device=torch.device("cpu"), pin=False)
    for indices in (
        torch.tensor([3, 0, 39, 7]),
        torch.tensor([-1, 5]),
        torch.tensor([], dtype=torch.long),
    ):
        want, got = plain.batch(indices, epoch=2), staged.batch(indices, epoch=2)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].dtype == torch.float32
    with pytest.raises(ValueError, match="1-D integer tensor"):
        staged.batch(torch.tensor([0.5]))


@pytest.mark.parametrize(
    ("setting", "device", "conv", "want"),
    [
        ("auto", "cuda", True, True),
        ("auto", "cuda", False, False),
        ("auto", "cpu", True, False),
        (True, "cpu", True, True),
        (True, "cuda", False, False),  # nothing to convert in an MLP
        (False, "cuda", True, False),
    ],
)
def test_when_channels_last_applies(setting: Any, device: str, conv: bool, want: bool) -> None:
    assert wants_channels_last(setting, device, conv) is want


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", input_shape=(3, 16, 16), num_outputs=10)


def test_channels_last_converts_weights_and_inputs_and_keeps_the_outputs(tmp_path: Path) -> None:
    reference, model = _cnn(), _cnn()
    assert has_conv2d(model) and not has_conv2d(nn.Linear(2, 2))
    run = syn_config(tmp_path, "run.channels_last=true").run
    prepare_model(model, torch.device("cpu"), run)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not convs[0].weight.is_contiguous()  # really NHWC, not a 1×1 accident
    seen: list[torch.Tensor] = []
    convs[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(4, 3, 16, 16)
    out = model(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == reference.state_dict().keys()
    # The default (auto) leaves a CPU model alone.
    untouched = prepare_model(_cnn(), torch.device("cpu"), syn_config(tmp_path).run)
    assert all(p.is_contiguous() for p in untouched.parameters())


def test_compile_traces_the_forward_in_place_and_keeps_the_state_keys(tmp_path: Path) -> None:
    """``run.compile`` with a graph-counting backend: inductor's C++ build takes minutes on a
    loaded 2-core CPU, so the default backend itself is not run here."""
    graphs: list[int] = []

    def counting(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    model.load_state_dict(reference.state_dict())
    run = syn_config(tmp_path, "run.compile=true").run
    assert prepare_model(model, torch.device("cpu"), run, compile_backend=counting) is model
    x = torch.randn(5, 8)
    out = model(x)
    assert graphs and graphs[0] > 3  # dynamo captured the forward
    torch.testing.assert_close(out, reference(x))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert list(model.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.device_fraction=1.5", r"data.device_fraction = 1.5: must be in \[0, 1\]"),
        ("run.channels_last=sometimes", "run.channels_last"),
        ("run.oom_fallback=maybe", "run.oom_fallback"),
    ],
)
def test_bad_gpu_settings_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_new_settings_load_with_their_defaults() -> None:
    cfg = load_config(None, [])
    assert cfg.run.channels_last == "auto" and cfg.run.compile is False
    assert cfg.run.oom_fallback is None and cfg.data.device_fraction == 0.5
    assert cfg.growth.max_micro_batch is None
    assert load_config(None, ["growth.max_micro_batch=auto"]).growth.max_micro_batch == "auto"
    with pytest.raises(ConfigError, match="growth.max_micro_batch"):
        load_config(None, ["growth.max_micro_batch=-3"])


# -- CUDA memory per phase --------------------------------------------------------------------


def test_each_phase_keeps_its_peak_memory_and_a_cpu_phase_has_none() -> None:
    peaks = iter([(100, 200), (300, 400), (50, 60), (700, 900), (10, 20), (5, 6)])
    clock = iter(range(100))
    tracker = PhaseTracker(clock=lambda: float(next(clock)), memory=lambda: next(peaks))
    tracker.start()
    kw: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "start_epoch": 0.0, "world_size": 1}
    tracker.begin(split=Split(32, 1, 32, 1), start_step=0, **kw)  # (100, 200): no phase yet
    tracker.tick()  # (300, 400) → phase 1
    tracker.tick()  # (50, 60) → phase 1 keeps its maximum
    tracker.begin(split=Split(64, 1, 64, 1), start_step=5, **kw)  # (700, 900) → phase 1
    tracker.tick()  # (10, 20) → phase 2
    first, second = tracker.to_list()
    assert (first["cuda_peak_allocated_bytes"], first["cuda_peak_reserved_bytes"]) == (700, 900)
    assert (second["cuda_peak_allocated_bytes"], second["cuda_peak_reserved_bytes"]) == (10, 20)
    # Checkpointed and restored with the phases.
    restored = PhaseTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.phases[0].cuda_peak_allocated_bytes == 700
    cpu = PhaseTracker(clock=lambda: 0.0)
    cpu.begin(split=Split(32, 1, 32, 1), start_step=0, **kw)
    assert not set(CUDA_MEMORY) & set(cpu.to_list()[0])
    assert cuda_peak_memory(torch.device("cpu")) is None


def test_a_cpu_run_records_no_cuda_memory_and_the_report_shows_it_only_when_measured(
    tmp_path: Path,
) -> None:
    assert train(syn_config(tmp_path / "run"))[0] == EXIT_OK
    summary_file = tmp_path / "run" / "summary.json"
    summary = json.loads(summary_file.read_text())
    assert all(not set(CUDA_MEMORY) & set(p) for p in summary["phases"])
    build_report([load_run(tmp_path / "run")], tmp_path / "cpu-report")
    assert "CUDA peak" not in (tmp_path / "cpu-report" / "report.md").read_text()
    # The same run as a CUDA run would have written it: the report gains two columns.
    for i, phase in enumerate(summary["phases"]):
        phase["cuda_peak_allocated_bytes"] = (i + 1) * GIB
        phase["cuda_peak_reserved_bytes"] = (i + 2) * GIB + GIB // 2
    summary_file.write_text(json.dumps(summary))
    report = build_report([load_run(tmp_path / "run")], tmp_path / "cuda-report")
    text = (tmp_path / "cuda-report" / "report.md").read_text()
    assert "CUDA peak allocated GiB | CUDA peak reserved GiB" in text
    assert "| 1.00 | 2.50 |" in text and "| 2.00 | 3.50 |" in text
    assert report["runs"][0]["phases"][1]["cuda_peak_allocated_bytes"] == 2 * GIB


# -- on a CUDA device (skipped here: no GPU in this project's CI) -----------------------------


def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch sees none")


@pytest.mark.gpu
def test_on_cuda_the_data_moves_to_the_device_and_phases_record_memory(tmp_path: Path) -> None:
    _needs_cuda()
    from distgrow.backends.torch_ddp import TorchBackend
    from distgrow.trainer import Trainer

    cfg = syn_config(tmp_path / "run", "run.device=cuda")
    backend = TorchBackend(cfg.backend, SINGLE, device="cuda")
    data = place_data(load_data(cfg), backend.device, 0.5, print)
    assert isinstance(data.train, ArrayDataset) and data.train.x.is_cuda
    assert Trainer(cfg, backend, data).train() == EXIT_OK
    phases = json.loads((tmp_path / "run" / "summary.json").read_text())["phases"]
    assert all(p["cuda_peak_allocated_bytes"] > 0 for p in phases)
    assert all(p["cuda_peak_reserved_bytes"] >= p["cuda_peak_allocated_bytes"] for p in phases)


@pytest.mark.gpu
def test_on_cuda_pinned_batches_equal_the_host_ones() -> None:
    _needs_cuda()
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (40,))
    transform = NormalizeImages((0.5,), (0.2,))
    staged = PinnedArrays(x, y, transform, device=torch.device("cuda"))
    got = staged.batch(torch.tensor([4, 1, 30]))
    want = ArrayDataset(x, y, transform).batch(torch.tensor([4, 1, 30]))
    assert (
        got[0].is_cuda and torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    )


@pytest.mark.parametrize(
    ("requested", "device", "want"),
    [("auto", "cuda", "nccl"), ("auto", "cpu", "gloo"), ("gloo", "cuda", "gloo")],
)
def test_the_process_group_is_nccl_on_cuda(requested: str, device: str, want: str) -> None:
    assert resolve_dist_backend(requested, torch.device(device)) == want


def test_nccl_on_the_cpu_is_refused() -> None:
    with pytest.raises(BackendError, match=r"'nccl' needs CUDA devices.*Fix: set"):
        resolve_dist_backend("nccl", torch.device("cpu"))
