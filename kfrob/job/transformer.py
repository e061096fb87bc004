"""A small decoder-only transformer (GPT) over bytes, built from standard modules only.

``tokens`` (``nn.Embedding(256, d)``) and ``positions`` (``nn.Embedding(context, d)``,
learned) feed ``n_layers`` pre-LayerNorm blocks ``blocks.<i>``, each ``x + attn(ln1(x))``
then ``x + mlp(ln2(x))``: causal self-attention with the ``nn.Linear`` projections
``blocks.<i>.attn.qkv`` (d → 3d) and ``blocks.<i>.attn.proj`` (d → d) around
``F.scaled_dot_product_attention(..., is_causal=True)``, and an MLP ``blocks.<i>.mlp.fc``
(d → 4d), GELU, ``blocks.<i>.mlp.proj`` (4d → d). A final LayerNorm ``norm`` and the
``nn.Linear`` ``head`` (d → 256, no bias) give the logits; ``tied=True`` makes ``head``
share the token embedding's weight. Weights start as in GPT-2: normal with standard
deviation 0.02 (0.02/√(2·n_layers) for the projections into the residual stream), biases
zero, so the initial loss is close to ln 256 ≈ 5.55 nats per byte.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob.text import VOCABULARY

__all__ = ["GPT", "Block", "CausalSelfAttention", "FeedForward", "transformer"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``(B, T, d)``, returning ``(B, T, d)``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        heads = self.qkv(x).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4)  # each (B, heads, T, d / heads)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(mixed.transpose(1, 2).reshape(batch, length, width))


class FeedForward(nn.Module):
    """``proj(gelu(fc(x)))`` on ``(B, T, d)``, 4d wide inside."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """A pre-LayerNorm transformer block on ``(B, T, d)``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Bytes ``(B, T)`` (int64, ``T <= context``) to next-byte logits ``(B, T, 256)``."""

    def __init__(
        self,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        context: int = 128,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(VOCABULARY, d_model)
        self.positions = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCABULARY, bias=False)
        self.apply(_init)
        for block in self.blocks:  # the two projections into the residual stream
            for projection in (block.attn.proj, block.mlp.proj):  # type: ignore[union-attr]
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * n_layers))
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, idx: Tensor) -> Tensor:
        length = idx.shape[1]
        if length > self.context:
            raise ValueError(f"{length} bytes in a window; the model's context is {self.context}")
        where = torch.arange(length, device=idx.device)
        x = self.tokens(idx) + self.positions(where)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def transformer(
    d_model: int = 128, n_layers: int = 4, n_heads: int = 4, context: int = 128, tied: bool = False
) -> nn.Module:
    """The byte-level GPT (see the module docstring); logits ``(B, T, 256)``."""
    return GPT(d_model, n_layers, n_heads, context, tied)
