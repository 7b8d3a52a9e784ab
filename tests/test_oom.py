"""The CUDA out-of-memory fallback: the same update at a smaller micro-batch.

``torch.cuda.OutOfMemoryError`` can be raised on the CPU: a model whose training forward raises
it above a micro-batch size stands in for a GPU that runs out of memory there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_trainer import final_model, make_trainer, records, syn_config, train
from torch import nn

from distgrow.exits import EXIT_OK
from distgrow.oom import (
    OOM_EVENT,
    OomFallback,
    fallback_wanted,
    is_oom,
    smaller_split,
    within_ceiling,
)
from distgrow.planner import Setting, Split
from distgrow.state import TrainError

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = '''
import torch
from torch import nn


class RunsOutOfMemory(nn.Module):
    """Batch norm (its statistics move before the error), dropout, and a CUDA OOM error in
    training forwards of more than `threshold` samples."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(16)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))
        self.threshold = threshold

    def forward(self, x):
        h = self.norm(x) if x.shape[0] > 1 else x  # (a last micro-batch of one sample)
        if self.training and x.shape[0] > self.threshold:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate for {x.shape[0]} samples"
            )
        return self.net(h)


def make_model(threshold: int = 1_000_000):
    return RunsOutOfMemory(threshold)
'''


# -- the split arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "multiple", "want"),
    [
        (Split(64, 1, 16, 4), 1, Split(64, 1, 8, 8)),
        (Split(128, 2, 64, 1), 1, Split(128, 2, 32, 2)),
        (Split(36, 1, 12, 3), 4, Split(36, 1, 4, 9)),  # 12/2 = 6 is no multiple of 4: ÷3
        (Split(27, 1, 9, 3), 1, Split(27, 1, 3, 9)),  # odd: its smallest factor
        (Split(8, 1, 8, 1), 8, None),  # one ghost batch already
        (Split(1, 1, 1, 1), 1, None),
        (Split(14, 1, 7, 2), 1, Split(14, 1, 1, 14)),  # a prime: one sample per micro-step
    ],
)
def test_a_smaller_split_keeps_the_global_batch(
    split: Split, multiple: int, want: Split | None
) -> None:
    got = smaller_split(split, multiple)
    assert got == want
    if got is not None:
        assert got.workers * got.micro_batch * got.accum_steps == split.global_batch * (
            got.micro_batch * got.accum_steps // (split.micro_batch * split.accum_steps)
        )
        assert got.micro_batch * got.accum_steps == split.micro_batch * split.accum_steps


def test_a_ceiling_shrinks_later_splits_until_they_fit() -> None:
    assert within_ceiling(Split(256, 1, 64, 4), 16, 1) == Split(256, 1, 16, 16)
    assert within_ceiling(Split(256, 1, 64, 4), 20, 1) == Split(256, 1, 16, 16)
    assert within_ceiling(Split(256, 1, 8, 32), 16, 1) == Split(256, 1, 8, 32)
    assert within_ceiling(Split(256, 1, 64, 4), None, 1) == Split(256, 1, 64, 4)
    assert within_ceiling(Split(64, 1, 16, 4), 4, 8) == Split(64, 1, 8, 8)  # ghost batch: 8


@pytest.mark.parametrize(
    ("setting", "backend", "world", "device", "loader", "want"),
    [
        (None, "torch", 1, "cuda", False, True),
        (None, "torch", 1, "cpu", False, False),
        (None, "torch", 2, "cuda", False, False),
        (None, "deepspeed", 1, "cuda", False, False),
        (None, "horovod", 1, "cuda", False, False),
        (None, "torch", 1, "cuda", True, False),
        (True, "torch", 1, "cpu", False, True),
        (False, "torch", 1, "cuda", False, False),
    ],
)
def test_when_the_fallback_is_on(
    setting: bool | None, backend: str, world: int, device: str, loader: bool, want: bool
) -> None:
    assert fallback_wanted(setting, backend, world, device, loader) is want


def _setting(split: Split) -> Setting:
    return Setting(split=split, lr=0.1, momentum=0.9, ratio=1.0, ideal_batch=64.0)


def test_an_error_after_the_optimizer_step_began_is_not_retried() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = OomFallback(True, model, optimizer, optimizer.zero_grad, 1, _no_event, _no_line)

    def step(indices: torch.Tensor, setting: Setting) -> float:
        model(torch.ones(1, 2)).sum().backward()
        optimizer.step()  # the parameters moved: a retry would apply a second update
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (in the step)")

    with pytest.raises(torch.cuda.OutOfMemoryError, match="in the step"):
        guard.run(step, torch.arange(4), _setting(Split(4, 1, 4, 1)))
    assert guard.retries == 0 and guard.ceiling is None


def test_a_micro_batch_that_cannot_shrink_raises_the_error() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = OomFallback(True, model, optimizer, optimizer.zero_grad, 1, _no_event, _no_line)
    splits: list[Split] = []

    def step(indices: torch.Tensor, setting: Setting) -> float:
        splits.append(setting.split)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        guard.run(step, torch.arange(4), _setting(Split(4, 1, 4, 1)))
    assert splits == [Split(4, 1, 4, 1), Split(4, 1, 2, 2), Split(4, 1, 1, 4)]
    assert guard.retries == 2


def _no_event(*args: object, **kwargs: object) -> None:
    del args, kwargs


def _no_line(line: str) -> None:
    del line


# -- a whole run ------------------------------------------------------------------------------


def test_an_out_of_memory_run_ends_as_the_run_at_the_smaller_micro_batch(tmp_path: Path) -> None:
    """Micro-batch 16 runs out of memory (above 8 samples); the fallback halves it to 8 and
    doubles the accumulation. The run is the one configured with micro-batch 8 from the start:
    the same updates, and parameters and batch-norm statistics equal bit for bit (the same
    micro-batches in the same order, so the same float sums)."""
    (tmp_path / "oomy.py").write_text(MODEL)
    model = [f"model.name={tmp_path / 'oomy.py'}:make_model", "model.kwargs={threshold: 8}"]
    code, oomy = train(
        syn_config(
            tmp_path / "oom",
            *model,
            "growth.micro_batch=16",
            "growth.max_micro_batch=16",
            "run.oom_fallback=true",
        )
    )
    assert code == EXIT_OK
    code, reference = train(syn_config(tmp_path / "ref", *model))  # micro-batch 8 throughout
    assert code == EXIT_OK
    assert oomy.state.step == reference.state.step == 33 + 17
    got, want = final_model(tmp_path / "oom"), final_model(tmp_path / "ref")
    assert got.keys() == want.keys() and "norm.running_mean" in got
    for key in got:
        assert torch.equal(got[key], want[key]), key
    # One event: at the first update; afterwards micro-batches stay at 8 (the ceiling).
    events = [r for r in records(tmp_path / "oom", "event") if r["event"] == OOM_EVENT]
    assert len(events) == 1 and oomy.oom.retries == 1 and oomy.oom.ceiling == 8
    (event,) = events
    assert event["step"] == 0 and "CUDA out of memory" in event["error"]
    assert event["previous"] == {
        "global_batch": 32,
        "workers": 1,
        "micro_batch": 16,
        "accum_steps": 2,
    }
    assert event["retry"] == {"global_batch": 32, "workers": 1, "micro_batch": 8, "accum_steps": 4}
    # The step records say how the updates ran: at micro-batch 8, as many samples per update.
    steps = records(tmp_path / "oom", "step")
    assert {r["micro_batch"] for r in steps} == {8}
    assert [r["global_batch"] for r in steps] == [
        r["global_batch"] for r in records(tmp_path / "ref", "step")
    ]
    summary = json.loads((tmp_path / "oom" / "summary.json").read_text())
    assert summary["total_updates"] == 50
    assert "cuda_peak_allocated_bytes" not in summary["phases"][0]  # a CPU run: absent


def test_without_the_fallback_the_error_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "oomy.py").write_text(MODEL)
    cfg = syn_config(
        tmp_path / "run",
        f"model.name={tmp_path / 'oomy.py'}:make_model",
        "model.kwargs={threshold: 8}",
        "growth.micro_batch=16",
        "growth.max_micro_batch=16",
    )  # run.oom_fallback: null is off on the CPU
    with pytest.raises(torch.cuda.OutOfMemoryError, match="for 16 samples"):
        train(cfg)


# -- cuBLAS/cuDNN failures, several workers, and the ceiling across a relaunch ------------------


@pytest.mark.parametrize(
    ("error", "want"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
        (ValueError("CUDA out of memory"), False),  # not a runtime failure
    ],
)
def test_cublas_and_cudnn_allocation_failures_count_as_out_of_memory(
    error: BaseException, want: bool
) -> None:
    assert is_oom(error) is want


def test_a_cublas_allocation_failure_is_retried_at_a_smaller_micro_batch() -> None:
    model = nn.Linear(2, 2)
    fallback = OomFallback(
        True, model, torch.optim.SGD(model.parameters()), lambda: None, 1, _no_event, _no_line
    )
    seen: list[int] = []

    def step(indices: torch.Tensor, setting: Setting) -> float:
        seen.append(setting.split.micro_batch)
        if setting.split.micro_batch > 4:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")
        return 0.5

    loss, setting = fallback.run(step, torch.arange(16), _setting(Split(16, 1, 16, 1)))
    assert (loss, seen, setting.split) == (0.5, [16, 8, 4], Split(16, 1, 4, 4))
    assert fallback.state_dict() == {"ceiling": 4}


def test_the_fallback_on_several_workers_is_refused() -> None:
    with pytest.raises(TrainError, match=r"run.oom_fallback = true on 2 workers.*Fix:"):
        fallback_wanted(True, "torch", 2, "cuda", False)
    assert fallback_wanted(None, "torch", 2, "cuda", False) is False


def test_a_relaunch_keeps_the_ceiling_and_does_not_run_out_again(tmp_path: Path) -> None:
    (tmp_path / "oomy.py").write_text(MODEL)
    run = tmp_path / "run"
    args = [
        f"model.name={tmp_path / 'oomy.py'}:make_model",
        "model.kwargs={threshold: 8}",
        "growth.micro_batch=16",
        "growth.max_micro_batch=16",
        "run.oom_fallback=true",
    ]
    code, first = train(syn_config(run, *args, "run.epochs=1"))
    assert code == EXIT_OK and first.oom.ceiling == 8 and first.oom.retries == 1
    code, second = train(syn_config(run, *args, "run.epochs=2", "run.resume=true"))
    assert code == EXIT_OK and second.state.epoch == 2
    assert second.oom.ceiling == 8 and second.oom.retries == 0  # no second OOM
    events = [r for r in records(run, "event") if r["event"] == OOM_EVENT]
    assert len(events) == 1
    assert {r["micro_batch"] for r in records(run, "step")} == {8}


RECORDING = """
import torch
from torch import nn


class Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 10)
        self.seen = []  # (batch, autocast on) of each evaluation forward

    def forward(self, x):
        if not self.training:
            self.seen.append((x.shape[0], torch.is_autocast_enabled("cpu")))
        return self.net(x)


def make_model():
    return Recording()
"""


@pytest.mark.parametrize(("cap", "precision"), [("8", "bf16"), ("null", "fp32")])
def test_validation_runs_in_training_micro_batches_under_the_training_precision(
    tmp_path: Path, cap: str, precision: str
) -> None:
    (tmp_path / "rec.py").write_text(RECORDING)
    trainer = make_trainer(
        syn_config(
            tmp_path / "run",
            f"model.name={tmp_path / 'rec.py'}:make_model",
            f"growth.max_micro_batch={cap}",
            "growth.micro_batch=8",
            f"backend.precision={precision}",
        )
    )
    seen: list[tuple[int, bool]] = trainer.model.seen  # type: ignore[assignment]
    seen.clear()  # (the loss check at start-up evaluates too)
    result = trainer.validate()
    n_val = len(trainer.data.val)  # 258 samples: 500-sample chunks, then the pieces
    assert sum(b for b, _ in seen) == n_val and result["val_loss"] is not None
    assert max(b for b, _ in seen) == (8 if cap == "8" else n_val)
    assert {on for _, on in seen} == {precision == "bf16"}
