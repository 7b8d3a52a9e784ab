"""A Hugging Face ``transformers`` GPT-2 as your own model file (docs/own_code.md).

distgrow builds it with ``model.name: "gpt2_model.py:build"`` and ``model.kwargs`` (config.yaml
beside this file). The model is made from a ``GPT2Config``, never downloaded: its weights are
drawn by transformers' own initialisation from torch's global RNG, which distgrow seeds with
``run.seed`` before it calls ``build``, so every rank starts from the same model. Any causal LM
class of transformers goes the same way (``LlamaForCausalLM(LlamaConfig(...))``, ...).

distgrow's contract for a model is a module that maps inputs to outputs, so a thin wrapper
turns token ids ``(batch, seq)`` into logits ``(batch, seq, vocab)``; distgrow's loss then
counts each sequence's mean cross-entropy per token (nats/token), as for its own transformer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CausalLM(nn.Module):
    """``logits = lm(input_ids=tokens).logits``: a transformers causal LM as a plain module.

    Args:
        lm: A transformers causal language model (``GPT2LMHeadModel``, ...).
        vocab: Its output width (the vocabulary).
    """

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm = lm
        self.vocab = vocab

    def forward(self, tokens: Tensor) -> Tensor:
        """The next-token logits at every position of ``tokens``."""
        if tokens.shape[0] == 0:
            # A rank's share of an epoch's last, partial batch can be empty; transformers'
            # attention cannot reshape 0 rows. Zero logits that still touch every parameter
            # (with gradient 0), so a DDP all-reduce finds each one used.
            touch = sum(p.sum() for p in self.parameters()) * 0.0
            return torch.zeros(0, tokens.shape[1], self.vocab, device=tokens.device) + touch
        return self.lm(input_ids=tokens.long()).logits


def build(
    vocab_size: int = 256,
    n_positions: int = 256,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """A GPT-2 (pre-norm blocks, learned positions, tied embeddings) from its config alone.

    Args:
        vocab_size: Token ids the model reads and predicts: 256 for byte data
            (``data.name: text`` or ``python_stdlib``), the token file's ``vocab_size``
            (its ``.json``) for ``data.name: tokens``.
        n_positions: Longest sequence (at least ``data.seq_len``).
        n_layer: Blocks.
        n_embd: Width (a multiple of ``n_head``).
        n_head: Attention heads.
        dropout: GPT-2's three dropouts (residual, embedding, attention); 0 keeps runs
            independent of how a batch is split.

    Raises:
        ImportError: transformers is not installed (the message says how to install it).
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise ImportError(
            "examples/hf_gpt2/gpt2_model.py needs Hugging Face transformers, which is not "
            "installed: pip install 'distgrow[hf]' (or pip install transformers)."
        ) from err
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        # GPT-2's 50256 is outside a small vocabulary; nothing here generates text.
        bos_token_id=None,
        eos_token_id=None,
    )
    return CausalLM(GPT2LMHeadModel(config), vocab_size)
