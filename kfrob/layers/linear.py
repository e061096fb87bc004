"""``nn.Linear`` on ``(..., d_in)`` inputs, and linear layers that store their weight
transposed (transformers' ``Conv1D``).

Every index of the leading dimensions is a sample of the loss (a token of a
``(batch, sequence, features)`` input, for a loss averaged over tokens). With
``weight_sharing="expand"`` every such index is also a factor row. With ``"reduce"`` an input
of three or more dimensions has one row per index of its first dimension (a sequence): the
mean input over the other leading dimensions and the summed output gradient, as for a
convolution; ``G`` is still normalised by the number of tokens, so both conventions estimate
the Fisher of the same token-averaged loss.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register, register_by_name

__all__ = ["LinearMath", "TransposedLinearMath"]


class LinearMath(LayerMath):
    """``nn.Linear`` on inputs of shape ``(..., d_in)``: every leading index is a sample."""

    def __init__(self, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(module, weight_sharing=weight_sharing)

    def _sequences(self, t: Tensor) -> bool:
        return self.weight_sharing == "reduce" and t.dim() >= 3

    def unfold_input(self, x: Tensor) -> Tensor:
        if self._sequences(x):  # (B, ..., d) -> (B, d, locations)
            return x.reshape(x.shape[0], -1, x.shape[-1]).mT
        return x.reshape(-1, x.shape[-1], 1)

    def flatten_output(self, y: Tensor) -> Tensor:
        if self._sequences(y):
            return y.reshape(y.shape[0], -1, y.shape[-1]).mT
        return y.reshape(-1, y.shape[-1], 1)

    def num_samples(self, t: Tensor) -> int:
        return math.prod(t.shape[:-1])

    def sample_dims(self, t: Tensor) -> int:
        # under "reduce" a row is a whole sequence: a mask of tokens cannot select rows
        return 1 if self._sequences(t) else t.dim() - 1


class TransposedLinearMath(LinearMath):
    """A linear layer ``y = x W + b`` whose weight is stored as ``(in, out)``: transformers'
    ``Conv1D`` (GPT-2's projections). The matrix ``V = [Wᵀ, b]`` is ``(out, in + 1)``."""

    def __init__(self, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(module, weight_sharing)
        d_in, self.out_features = self.weight.shape
        self.in_features = d_in + int(self.has_bias)

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super().to_matrix(weight.mT, bias)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        weight = mat[..., : self.weight.shape[0]].squeeze(0).mT
        return weight, (mat[..., -1].reshape(-1) if self.has_bias else None)


register(nn.Linear, LinearMath)
register_by_name("transformers.pytorch_utils.Conv1D", TransposedLinearMath)
