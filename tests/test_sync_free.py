"""The hot path never waits for a GPU: host-device syncs per update are a small constant.

A sync is anything that makes the host read a device value or wait for the device:
``torch.cuda.synchronize``, ``Tensor.item``/``tolist``/``cpu`` and the ``int()``/``float()``/
``bool()``/index conversions of a tensor. On a CPU nothing syncs, so a counting shim counts the
calls the code makes on any tensor during an update: the same calls on CUDA tensors would each
stall the host. (``Tensor.numpy`` is not counted: it refuses device tensors, so it can only run
on the host's own index tensors.) The count must not grow with the micro-batches or the layers.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import SINGLE
from torch import nn

from distgrow.backends.torch_ddp import TorchBackend
from distgrow.bn_merge import RunningStatsMerger
from distgrow.config import load_config
from distgrow.data import ArrayDataset, DataBundle, LoaderDataset, TensorSamples
from distgrow.data.containers import to_device
from distgrow.data.feed import LoaderFeed
from distgrow.data.order import epoch_permutation
from distgrow.data.transforms import Compose, NormalizeImages, RandomCropFlip
from distgrow.gpu import prepare_model
from distgrow.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

READS = ("item", "tolist", "cpu", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter:
    """Counts host reads of tensor values and device synchronisations while ``on``."""

    def __init__(self) -> None:
        self.on = False
        self.calls: collections.Counter[str] = collections.Counter()
        self.where: collections.Counter[str] = collections.Counter()

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.calls[name] += 1
                caller = sys._getframe(1)
                self.where[f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}"] += 1
            return original(*args, **kwargs)

        return counted

    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> SyncCounter:
    counter = SyncCounter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(
        torch.cuda, "synchronize", counter.wrap("synchronize", torch.cuda.synchronize)
    )
    return counter


def _images(n: int = 64) -> DataBundle:
    """CIFAR-shaped uint8 images, augmented and normalised per batch (nothing cached)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    normalize = NormalizeImages((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    train = ArrayDataset(x, y, Compose(RandomCropFlip(0, 4, True), normalize))
    val = ArrayDataset(x[:16], y[:16], normalize)
    return DataBundle("cifar10", train, val, (3, 32, 32), 10, "classification")


def _wrn_trainer(tmp_path: Path, depth: int, accum: int) -> Trainer:
    """A ghost-batch-norm WRN-depth-1 trainer with the batch-norm merger of a DDP job on."""
    micro = 16 // accum
    cfg = load_config(
        None,
        [
            "data.name=synthetic_classification",
            "data.augment=true",
            "model.name=wrn",
            f"model.depth={depth}",
            "model.width=1",
            "model.ghost_batch=4",
            "growth.base_batch=16",
            f"growth.micro_batch={micro}",
            f"growth.max_micro_batch={micro}",
            "growth.max_dataset_fraction=null",
            "run.epochs=1",
            f"run.output_dir={tmp_path / f'wrn{depth}x{accum}'}",
            "logging.every_steps=100",
            "logging.progress='off'",
        ],
    )
    trainer = Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cpu"), _images())
    # One process has no merger (nothing to merge); a DDP job's is what runs per micro-batch.
    trainer.bn_merger = RunningStatsMerger(trainer.model, trainer.backend)
    assert trainer.open_run()
    return trainer


def _syncs_per_update(trainer: Trainer, syncs: SyncCounter, updates: int = 2) -> list[int]:
    order = epoch_permutation(trainer.num_train, trainer.cfg.run.seed, 0)
    counts = []
    for _ in range(updates):
        setting = trainer.next_setting()
        indices = order[trainer.state.position : trainer.state.position + setting.global_batch]
        syncs.calls.clear()
        syncs.on = True
        loss, setting = trainer.oom.run(trainer.train_step, indices, setting)
        trainer.after_update(int(indices.numel()), loss, setting)
        syncs.on = False
        counts.append(syncs.total())
    return counts


def test_an_update_reads_the_device_once_whatever_its_micro_batches_and_layers(
    tmp_path: Path, syncs: SyncCounter
) -> None:
    per_update = {}
    for depth, accum in ((10, 1), (10, 4), (16, 4)):  # 7 or 13 batch-norm layers
        trainer = _wrn_trainer(tmp_path, depth, accum)
        assert trainer.bn_merger is not None and len(trainer.bn_merger.layers) == depth - 3
        per_update[(depth, accum)] = _syncs_per_update(trainer, syncs)
        assert trainer.state.step == 2
    # The one read is the update's mean loss (every rank's loss finite before the step); the
    # old path read ~5 per batch-norm layer and micro-batch (78 for WRN-16-1 at 4 × 4).
    assert set(map(tuple, per_update.values())) == {(1, 1)}, (per_update, syncs.where)


def test_the_merged_statistics_stay_those_of_one_worker(tmp_path: Path) -> None:
    """On one rank, merging must leave the running statistics exactly as BN kept them."""
    trainer = _wrn_trainer(tmp_path, 10, 4)
    assert trainer.bn_merger is not None
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "running" in k}
    counter = SyncCounter()
    _syncs_per_update(trainer, counter, updates=1)
    state = trainer.model.state_dict()
    plain = _wrn_trainer(tmp_path / "plain", 10, 4)
    plain.bn_merger = None
    _syncs_per_update(plain, counter, updates=1)
    for name, value in plain.model.state_dict().items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(state[name], value, rtol=1e-6, atol=1e-7)
    changed = [k for k, v in before.items() if not torch.equal(v, state[k])]
    assert len(changed) == len(before)  # the update moved every statistic


def test_transforms_take_host_indices_and_copy_once_per_batch(syncs: SyncCounter) -> None:
    data = _images().train
    syncs.on = True
    x, y = data.batch(torch.tensor([3, -1, 7]), epoch=2)
    syncs.on = False
    assert syncs.total() == 0, syncs.where
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32) and y.shape == (3,)
    # -1 is sample 63, augmented as 63.
    torch.testing.assert_close(x[1], data.batch(torch.tensor([63]), epoch=2)[0][0], rtol=0, atol=0)


def test_to_device_pins_once_and_copies_without_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    pinned: set[int] = set()

    def pin_memory(self: torch.Tensor) -> torch.Tensor:
        calls.append(("pin", None))
        pinned.add(id(self))
        return self

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(("to", (str(args[0]) if args else None, kwargs.get("non_blocking"))))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: id(self) in pinned)
    monkeypatch.setattr(torch.Tensor, "to", to)
    t = torch.arange(4)
    to_device(t, torch.device("cuda", 0))
    assert calls == [("pin", None), ("to", ("cuda:0", True))]
    calls.clear()
    to_device(t, torch.device("cuda", 0))  # already pinned: not pinned again
    assert calls == [("to", ("cuda:0", True))]
    calls.clear()
    assert to_device(t, torch.device("cpu")) is t and calls == []


def test_normalisation_copies_its_constants_to_a_device_once() -> None:
    normalize = NormalizeImages((0.5,), (0.25,))
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    first = normalize(x, torch.arange(4), 0)
    cached = normalize._on[torch.device("cpu")]
    second = normalize(x, torch.arange(4), 0)
    assert normalize._on[torch.device("cpu")] is cached and torch.equal(first, second)
    torch.testing.assert_close(first, (x.float() / 255 - 0.5) / 0.25)


def test_the_loader_pins_in_its_own_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(12) % 3
    data = LoaderDataset(TensorSamples(x, y), y, NormalizeImages((0.5,), (0.25,)))
    batches = [[0, 1, 2], [3, 4, 5]]
    off = LoaderFeed(data, batches, workers=0, pin_memory=True, prefetch_factor=2)
    assert off.loader.pin_memory is False  # no CUDA: nothing to pin for
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on = LoaderFeed(data, batches, workers=0, pin_memory=True, prefetch_factor=2)
    assert on.loader.pin_memory is True
    no = LoaderFeed(data, batches, workers=0, pin_memory=False, prefetch_factor=2)
    assert no.loader.pin_memory is False


def test_the_loader_feed_transforms_on_its_device_as_the_dataset_does() -> None:
    x = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(12) % 3
    data = LoaderDataset(TensorSamples(x, y), y, NormalizeImages((0.5,), (0.25,)))
    feed = LoaderFeed(
        data,
        [[4, 1, 7]],
        workers=0,
        pin_memory=False,
        prefetch_factor=2,
        device=torch.device("cpu"),
    )
    feed.start()
    got = feed.batch(torch.tensor([4, 1, 7]), 0)
    want = data.batch(torch.tensor([4, 1, 7]), 0)
    assert feed.read_here == 0 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("tf32", [True, False])
def test_run_tf32_sets_cuda_matmul_and_cudnn_precision(tf32: bool, tf32_flags: None) -> None:
    assert load_config(None, []).run.tf32 is True  # on by default
    run = load_config(None, [f"run.tf32={str(tf32).lower()}"]).run
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    prepare_model(nn.Linear(2, 2), torch.device("cpu"), run)
    assert torch.backends.cuda.matmul.allow_tf32 is not tf32  # the CPU leaves CUDA's flags alone
    prepare_model(nn.Linear(2, 2), torch.device("cuda"), run)  # (nothing on it needs a GPU)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32
    assert torch.backends.cudnn.allow_tf32 is tf32
