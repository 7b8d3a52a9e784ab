"""The language-model workload: byte-level text reader, the decoder's causality, the loss in
nats per token, and a tiny end-to-end training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distgrow.backends.torch_ddp import TorchBackend
from distgrow.config import ConfigError, DataConfig, load_config
from distgrow.data import load_dataset
from distgrow.data.containers import ArrayDataset, DatasetNotFoundError, LoaderDataset
from distgrow.data.readers import text
from distgrow.exits import EXIT_OK
from distgrow.losses import loss_sum
from distgrow.metrics import read_jsonl
from distgrow.models import build_model
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")


def _corpus(tmp_path: Path, n_bytes: int) -> Path:
    """A file of seeded random bytes: every window of it is unique, so it can be located."""
    path = tmp_path / "corpus.txt"
    generator = torch.Generator().manual_seed(0)
    path.write_bytes(bytes(torch.randint(0, 256, (n_bytes,), generator=generator).tolist()))
    return path


def _all(split: ArrayDataset | LoaderDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of a split, in order."""
    return split.batch(torch.arange(len(split)))


def test_sequences_are_windows_with_targets_shifted_by_one() -> None:
    tokens = torch.arange(23, dtype=torch.uint8).numpy()
    x, y = text.sequences(tokens, 4)  # windows of 5: 0-4, 5-9, 10-14, 15-19; 20-22 dropped
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 4)
    assert x[1].tolist() == [5, 6, 7, 8] and y[1].tolist() == [6, 7, 8, 9]
    assert y[3].tolist() == [16, 17, 18, 19]


def test_reader_splits_by_blocks_without_sharing_a_byte(tmp_path: Path) -> None:
    seq_len = 8
    n_windows = 40 * text.BLOCK_SEQUENCES
    root = _corpus(tmp_path, n_windows * (seq_len + 1) + 3)
    cfg = DataConfig(name="python_stdlib", path=str(root), seq_len=seq_len, val_fraction=0.25)
    bundle = load_dataset(cfg, seed=3)
    assert bundle.input_shape == (seq_len,) and bundle.num_classes == 256
    assert bundle.task == "language_model"
    assert len(bundle.train) + len(bundle.val) == n_windows
    assert len(bundle.val) == 10 * text.BLOCK_SEQUENCES  # 10 of the 40 blocks
    for split in (bundle.train, bundle.val):
        x, y = _all(split)
        assert torch.equal(y[:, :-1], x[:, 1:])
    # Locate every sequence in the file's windows (window w covers bytes 9w .. 9w + 8).
    all_x, _ = text.sequences(text.corpus_bytes(str(root)), seq_len)
    where = {tuple(row): w for w, row in enumerate(all_x.tolist())}
    windows = {
        name: [where[tuple(row)] for row in _all(split)[0].tolist()]
        for name, split in (("train", bundle.train), ("val", bundle.val))
    }
    # Validation is whole blocks of consecutive windows, and no window is in both splits.
    assert not set(windows["train"]) & set(windows["val"])
    val_blocks = {w // text.BLOCK_SEQUENCES for w in windows["val"]}
    assert len(val_blocks) == 10
    block = text.BLOCK_SEQUENCES
    assert windows["val"] == [
        w for b in sorted(val_blocks) for w in range(b * block, (b + 1) * block)
    ]
    assert windows["train"] == sorted(set(range(n_windows)) - set(windows["val"]))
    # The split is seeded: another seed holds out other blocks.
    other = load_dataset(cfg, seed=4)
    assert not torch.equal(_all(other.val)[0], _all(bundle.val)[0])


def test_reader_errors_name_the_path(tmp_path: Path) -> None:
    cfg = DataConfig(name="python_stdlib", path=str(tmp_path / "nowhere"), seq_len=64)
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_dataset(cfg)
    with pytest.raises(ConfigError, match="data.seq_len"):
        load_config(None, ["data.name=python_stdlib", "data.seq_len=0"])
    with pytest.raises(ValueError, match="data.seq_len is null"):
        load_dataset(DataConfig(name="python_stdlib"))


def test_the_config_states_the_real_training_size() -> None:
    cfg = load_config(REPO / "configs" / "lm_tiny.yaml")
    assert len(load_dataset(cfg.data, seed=cfg.run.seed).train) == cfg.data.size == 2048
    cfg = load_config(REPO / "configs" / "lm_tiny.yaml", ["data.limit_train=null"])
    bundle = load_dataset(cfg.data, seed=cfg.run.seed)
    assert len(bundle.train) == 12899  # all of the 1 MiB: 16 131 windows of 65, 1/5 held out
    # The default corpus is the standard library's source, byte for byte.
    assert bytes(_all(bundle.train)[0][0].tolist()) == text.corpus_bytes(None)[:64].tobytes()


def test_the_transformer_is_causal() -> None:
    torch.manual_seed(0)
    model = build_model("transformer", input_shape=(16,), num_outputs=256, depth=2, width=64)
    model.eval()
    tokens = torch.randint(0, 256, (3, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 256
    out, out_changed = model(tokens), model(changed)
    assert out.shape == (3, 16, 256)
    torch.testing.assert_close(out[:, :9], out_changed[:, :9], rtol=0, atol=0)
    assert (out[:, 9:] - out_changed[:, 9:]).abs().amax(-1).min() > 0
    # Tied embeddings: the output layer is the token table.
    assert model.head.weight is model.token.weight  # type: ignore[union-attr]


def test_the_transformer_rejects_a_bad_width() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("transformer", input_shape=(16,), num_outputs=256, depth=2, width=48)


def test_sequence_loss_is_the_mean_nats_per_token_summed_over_sequences() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    by_hand = 0.0
    for b in range(2):
        per_token = []
        for t in range(3):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            per_token.append(log_z - row[targets[b, t]])
        by_hand += sum(per_token) / 3
    assert loss_sum(logits, targets, 5).item() == pytest.approx(by_hand, rel=1e-6)
    # Uniform logits cost log(vocab) nats per token, whatever the sequence length.
    assert loss_sum(torch.zeros(4, 7, 256), targets.new_zeros(4, 7), 256).item() == pytest.approx(
        4 * math.log(256), rel=1e-6
    )
    # Classification outputs keep their per-sample sum.
    flat = loss_sum(logits[:, 0], targets[:, 0], 5)
    torch.testing.assert_close(flat, F.cross_entropy(logits[:, 0], targets[:, 0], reduction="sum"))


def test_a_tiny_language_model_trains_and_reports_nats_per_token(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(
        REPO / "configs" / "lm_tiny.yaml",
        [
            "data.limit_train=256",
            "data.limit_val=64",
            "data.seq_len=32",
            "data.size=256",
            "growth.base_batch=32",
            "optim.lr=0.003",
            "schedule.warmup=2",
            "run.epochs=2",
            f"run.output_dir={run_dir}",
            "logging.progress='off'",
            "logging.wandb.mode=disabled",
            "growth.max_dataset_fraction=null",
        ],
    )
    trainer = Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cpu"), load_data(cfg))
    before = trainer.validate()
    assert before["val_acc"] is None
    assert before["val_loss"] == pytest.approx(math.log(256), abs=0.15)  # untrained: ~uniform
    assert trainer.train() == EXIT_OK
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["val_acc"] is None
    # Grown batch: 32 then more; the loss falls well below uniform in 16 sequences' updates.
    assert epochs[-1]["val_loss"] < math.log(256) - 1.0
    assert trainer.state.step < 2 * 256 // 32


def test_an_empty_micro_batch_passes_through_the_transformer() -> None:
    # The last, partial batch of an epoch leaves trailing micro-batches empty (found by
    # `distgrow compare configs/lm_tiny.yaml growth.max_micro_batch=4`).
    model = build_model("transformer", input_shape=(16,), num_outputs=256, depth=1, width=64)
    assert model(torch.zeros(0, 16, dtype=torch.long)).shape == (0, 16, 256)
