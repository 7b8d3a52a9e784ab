"""A small decoder-only transformer: the language model of ``model.name = transformer``.

Pre-norm blocks of causal self-attention (torch's ``scaled_dot_product_attention``) and a 4×
GELU MLP, learned positions, tied input and output embeddings (GPT-2's layout, as in
nanoGPT). It takes ``int64`` tokens ``(batch, seq)`` and returns logits ``(batch, seq,
vocab)``; position ``t``'s logits see only tokens ``0..t``. No batch norm, so how a batch is
split over workers and micro-batches does not change what it computes.

Weights come from torch's global RNG, like every model of :mod:`distgrow.models`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HEAD_DIM", "TinyTransformer"]

HEAD_DIM = 32
"""Channels per attention head: the width fixes the number of heads (width / 32)."""


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        # The head width spelled out, not -1: an empty micro-batch (batch 0) must reshape too.
        head = width // self.heads
        q, k, v = (t.view(batch, seq, self.heads, head).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, width))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A GPT-style decoder: token + position embeddings, ``depth`` blocks, tied head.

    Args:
        vocab: Number of tokens (the output width).
        max_len: Longest sequence it accepts (the learned positions).
        depth: Number of blocks.
        width: Model width, a multiple of :data:`HEAD_DIM`.
        dropout: Dropout on embeddings, attention and MLP outputs.

    Raises:
        ValueError: A size outside its constraint (the message says which and a fix).
    """

    def __init__(
        self, vocab: int, max_len: int, *, depth: int, width: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"transformer depth ({depth}) must be >= 1: e.g. model.depth=2.")
        if width < HEAD_DIM or width % HEAD_DIM:
            raise ValueError(
                f"transformer width ({width}) must be a positive multiple of {HEAD_DIM} (the "
                f"channels per head): e.g. model.width=128."
            )
        self.max_len = max_len
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(max_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, width // HEAD_DIM, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.token.weight  # tied embeddings
        self.apply(self._init)
        # GPT-2: residual projections scaled down with depth so the residual stream's variance
        # does not grow with the number of blocks.
        for block in self.blocks:
            assert isinstance(block, _Block)
            for proj in (block.proj, block.mlp[2]):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * depth))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(batch, seq, vocab)`` of the next token at every position of ``tokens``.

        Raises:
            ValueError: ``tokens`` is not ``(batch, seq)`` with ``seq <= max_len``.
        """
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(
                f"transformer input of shape {tuple(tokens.shape)}: expected (batch, seq) token "
                f"ids with seq <= {self.max_len} (data.seq_len)."
            )
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.token(tokens.long()) + self.position(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
