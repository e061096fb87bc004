"""``nn.Conv1d``/``nn.Conv2d``: one block per group, one row per output location."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register

__all__ = ["ConvMath"]


class ConvMath(LayerMath):
    """``nn.Conv1d``/``nn.Conv2d`` with any stride, padding (``'same'``, ``'valid'``, padding
    modes), dilation and groups; one block per group, one row per output location."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d, weight_sharing: str = "expand") -> None:
        super().__init__(module, blocks=module.groups, weight_sharing=weight_sharing)
        self.spatial_dims = len(module.kernel_size)
        self._pad = _explicit_padding(module)
        self._pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    def _as_2d(self, values: Sequence[int], fill: int) -> tuple[int, int]:
        return (fill, values[0]) if self.spatial_dims == 1 else (values[0], values[1])

    def unfold_input(self, x: Tensor) -> Tensor:
        conv: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        if any(self._pad):
            x = F.pad(x, self._pad, mode=self._pad_mode)
        if self.spatial_dims == 1:
            x = x.unsqueeze(-2)
        return F.unfold(
            x,
            kernel_size=self._as_2d(conv.kernel_size, 1),
            dilation=self._as_2d(conv.dilation, 1),  # type: ignore[arg-type]
            stride=self._as_2d(conv.stride, 1),
        )

    def flatten_output(self, y: Tensor) -> Tensor:
        if y.dim() == self.spatial_dims + 1:  # unbatched output
            y = y.unsqueeze(0)
        return y.flatten(2)  # (samples, channels, locations), also for an empty batch


def _explicit_padding(conv: nn.Conv1d | nn.Conv2d) -> list[int]:
    """The layer's padding as an ``F.pad`` list (last spatial dim first, left then right)."""
    pads: list[int] = []
    for dim in reversed(range(len(conv.kernel_size))):
        if conv.padding == "same":
            total = conv.dilation[dim] * (conv.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        elif conv.padding == "valid":
            pads += [0, 0]
        else:
            p = conv.padding[dim]  # type: ignore[index]
            pads += [p, p]
    return pads


register((nn.Conv1d, nn.Conv2d), ConvMath)
