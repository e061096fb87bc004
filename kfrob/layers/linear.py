"""``nn.Linear``: every leading index of its ``(..., d_in)`` input is a sample, one location."""

from __future__ import annotations

from torch import Tensor, nn

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register

__all__ = ["LinearMath"]


class LinearMath(LayerMath):
    """``nn.Linear`` on inputs of shape ``(..., d_in)``: every leading index is a sample."""

    def __init__(self, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(module)

    def unfold_input(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1], 1)

    def flatten_output(self, y: Tensor) -> Tensor:
        return y.reshape(-1, y.shape[-1], 1)


register(nn.Linear, LinearMath)
