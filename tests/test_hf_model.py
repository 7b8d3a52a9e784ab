"""A Hugging Face ``transformers`` causal LM through distgrow's entry-point path
(examples/hf_gpt2): built from a ``GPT2Config`` (no download), causal, an empty micro-batch
passes, and a few updates of grow_batch train it in nats per token."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distgrow.backends.torch_ddp import TorchBackend
from distgrow.config import load_config
from distgrow.entrypoints import resolve_entry_point
from distgrow.exits import EXIT_OK
from distgrow.metrics import read_jsonl
from distgrow.runtime import Runtime
from distgrow.startup import load_data
from distgrow.trainer import Trainer

# Importing transformers takes seconds: these tests are in the integration tier.
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "hf_gpt2"
SINGLE = Runtime(0, 1, 0, 1, "127.0.0.1", 29500, "none")


def _transformers() -> None:
    pytest.importorskip(
        "transformers",
        reason="transformers is not installed: pip install -c constraints.txt -e '.[dev]' "
        "(its hf extra)",
    )


def test_the_gpt2_is_built_from_its_config_causal_and_takes_an_empty_batch() -> None:
    _transformers()
    from transformers import GPT2LMHeadModel

    build = resolve_entry_point("model.name", f"{EXAMPLE / 'gpt2_model.py'}:build")
    torch.manual_seed(0)
    model = build(vocab_size=50, n_positions=16, n_layer=2, n_embd=32, n_head=2).eval()
    assert isinstance(model.lm, GPT2LMHeadModel)
    # Tied embeddings, as GPT-2's: 2 blocks of 12·32² + 13·32 weights, 50 + 16 embeddings.
    blocks = 2 * (12 * 32 * 32 + 13 * 32)
    assert sum(p.numel() for p in model.parameters()) == blocks + (50 + 16) * 32 + 2 * 32
    tokens = torch.randint(0, 50, (3, 16), generator=torch.Generator().manual_seed(1))
    logits = model(tokens)
    assert logits.shape == (3, 16, 50)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 50
    after = model(changed)
    torch.testing.assert_close(after[:, :10], logits[:, :10])  # position t sees 0..t only
    assert not torch.allclose(after[:, 10:], logits[:, 10:])
    # The same seed draws the same weights (every rank builds the model after the run's seed).
    torch.manual_seed(0)
    again = build(vocab_size=50, n_positions=16, n_layer=2, n_embd=32, n_head=2).eval()
    torch.testing.assert_close(again(tokens), logits)
    # A rank's empty share of a last, partial batch: zero rows, every parameter in the graph.
    empty = model(torch.zeros(0, 16, dtype=torch.long))
    assert empty.shape == (0, 16, 50)
    empty.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_a_transformers_gpt2_trains_with_batch_growth_through_the_entry_point(
    tmp_path: Path,
) -> None:
    _transformers()
    run_dir = tmp_path / "run"
    cfg = load_config(
        EXAMPLE / "config.yaml",
        [
            "data.limit_train=256",
            "data.size=256",
            "data.limit_val=64",
            "data.seq_len=32",
            "model.kwargs.n_positions=32",
            "growth.base_batch=32",
            "optim.lr=0.003",
            "schedule.warmup=2",
            f"run.output_dir={run_dir}",
            "run.threads=1",
            "logging.progress=off",
            "logging.wandb.mode=disabled",
        ],
    )
    trainer = Trainer(cfg, TorchBackend(cfg.backend, SINGLE, device="cpu"), load_data(cfg))
    assert type(trainer.model).__name__ == "CausalLM"
    before = trainer.validate()
    assert before["val_loss"] == pytest.approx(math.log(256), abs=0.2)  # untrained: ~uniform
    assert trainer.train() == EXIT_OK
    epochs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["val_acc"] is None
    # Bytes of Python source: well below uniform (5.55 nats) after 2 epochs of 256 sequences.
    assert epochs[-1]["val_loss"] < math.log(256) - 1.0
    # The cosine became batch growth: 8 updates at 32, then 4 at larger batches (the plan's
    # 12), against 16 at a fixed batch of 32.
    assert trainer.state.step == 12
