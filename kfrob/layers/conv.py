"""``nn.Conv1d``/``nn.Conv2d``: one block per group, one row per output location.

A convolution module that pads inside its ``forward`` (timm's ``Conv2dSame``, TensorFlow's
"SAME" padding) computes on a padded input the hooks never see. When a call's output size
differs from what the module's own padding gives, the padding is inferred from the input
and output sizes (the smallest total padding that gives the output size, split as
TensorFlow does: the odd pixel on the right and bottom) and checked once per input size by
recomputing the convolution from the padded input. If the check fails, the layer reports
why (:meth:`ConvMath.check_call`) and falls back to a plain update: never a wrong factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register

__all__ = ["ConvMath"]


class ConvMath(LayerMath):
    """``nn.Conv1d``/``nn.Conv2d`` with any stride, padding (``'same'``, ``'valid'``, padding
    modes), dilation and groups; one block per group, one row per output location."""

    output_feature_dim = 1

    def __init__(self, module: nn.Conv1d | nn.Conv2d, weight_sharing: str = "expand") -> None:
        super().__init__(module, blocks=module.groups, weight_sharing=weight_sharing)
        self.spatial_dims = len(module.kernel_size)
        self._pad = _explicit_padding(module)
        self._pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        self._call_pad = self._pad  # the padding of the call being recorded
        self._inferred: dict[tuple[int, ...], list[int] | None] = {}

    def _as_2d(self, values: Sequence[int], fill: int) -> tuple[int, int]:
        return (fill, values[0]) if self.spatial_dims == 1 else (values[0], values[1])

    def unfold_input(self, x: Tensor) -> Tensor:
        conv: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        if any(self._call_pad):
            x = F.pad(x, self._call_pad, mode=self._pad_mode)
        if self.spatial_dims == 1:
            x = x.unsqueeze(-2)
        return F.unfold(
            x,
            kernel_size=self._as_2d(conv.kernel_size, 1),
            dilation=self._as_2d(conv.dilation, 1),  # type: ignore[arg-type]
            stride=self._as_2d(conv.stride, 1),
        )

    def sample_dims(self, t: Tensor) -> int:
        return 0 if t.dim() == self.spatial_dims + 1 else 1

    def input_sketch(self, x: Tensor, basis: Tensor) -> tuple[Tensor, Tensor, int]:
        """``Σ a (aQ)ᵀ`` without unfolding the patches (``"expand"``): ``aQ`` at every
        location is a convolution of the input with ``Q``'s columns as ``r`` filters per
        group (plus ``Q``'s bias row), and ``Σ_l a_l (a_l Q)ᵀ`` is the weight gradient of
        that convolution for those outputs; ``Σ ‖a‖²`` is the input's square convolved with
        a filter of ones. Two convolutions instead of a ``(rows, in)`` patch matrix."""
        if self.weight_sharing == "reduce":
            return super().input_sketch(x, basis)
        conv: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        x = x.to(self.factor_dtype)
        if any(self._call_pad):
            x = F.pad(x, self._call_pad, mode=self._pad_mode)
        if self.spatial_dims == 1:
            x = x.unsqueeze(-2)
        groups, rank = self.blocks, basis.shape[-1]
        channels = x.shape[1] // groups
        kernel = self._as_2d(conv.kernel_size, 1)
        stride, dilation = self._as_2d(conv.stride, 1), self._as_2d(conv.dilation, 1)  # type: ignore[arg-type]
        patch = channels * kernel[0] * kernel[1]
        filters = basis[:, :patch].mT.reshape(groups * rank, channels, *kernel)
        projected = F.conv2d(x, filters, None, stride, 0, dilation, groups)
        if self.has_bias:
            projected = projected + basis[:, patch].reshape(1, -1, 1, 1)
        products = (
            torch.nn.grad.conv2d_weight(x, filters.shape, projected, stride, 0, dilation, groups)
            .reshape(groups, rank, patch)
            .mT
        )
        ones = x.new_ones(groups, channels, *kernel)
        squares = F.conv2d(x.square(), ones, None, stride, 0, dilation, groups).sum((0, 2, 3))
        rows = projected.shape[0] * projected.shape[2] * projected.shape[3]
        if self.has_bias:  # the bias coordinate: a (aQ)ᵀ's last row, and a 1 in ‖a‖²
            products = torch.cat([products, projected.sum((0, 2, 3)).reshape(groups, 1, rank)], 1)
            squares = squares + rows
        return products, squares, rows

    def flatten_output(self, y: Tensor) -> Tensor:
        if y.dim() == self.spatial_dims + 1:  # unbatched output
            y = y.unsqueeze(0)
        return y.flatten(2)  # (samples, channels, locations), also for an empty batch

    def check_call(self, x: Tensor, output: Tensor) -> str | None:
        conv: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        size_in, size_out = x.shape[-self.spatial_dims :], output.shape[-self.spatial_dims :]
        if _output_size(conv, size_in, self._pad) == tuple(size_out):
            self._call_pad = self._pad
            return None
        key = tuple(size_in)
        if key not in self._inferred:
            self._inferred[key] = self._infer_padding(x, output)
        pads = self._inferred[key]
        if pads is None:
            return (
                f"its output size {tuple(size_out)} does not follow from its input size "
                f"{tuple(size_in)} and padding, and no padding kfrob could infer reproduces it"
            )
        self._call_pad = pads
        return None

    def _infer_padding(self, x: Tensor, output: Tensor) -> list[int] | None:
        """The padding of a module that pads inside ``forward``, verified by recomputing its
        output from the padded input (once per input size); ``None`` if none reproduces it."""
        conv: nn.Conv1d | nn.Conv2d = self.module  # type: ignore[assignment]
        if self._pad_mode != "constant":
            return None
        pads: list[int] = []
        for dim in reversed(range(self.spatial_dims)):
            at = dim - self.spatial_dims
            size_in, size_out = x.shape[at], output.shape[at]
            reach = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
            total = max((size_out - 1) * conv.stride[dim] + reach - size_in, 0)
            pads += [total // 2, total - total // 2]
        if _output_size(conv, x.shape[-self.spatial_dims :], pads) != tuple(
            output.shape[-self.spatial_dims :]
        ):
            return None
        convolve = F.conv1d if self.spatial_dims == 1 else F.conv2d
        with torch.no_grad():
            again = convolve(
                F.pad(x, pads), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups
            )
        scale = output.detach().abs().amax().clamp(min=1.0)
        same = torch.allclose(again.float(), output.detach().float(), rtol=1e-3, atol=1e-3 * scale)
        return pads if same else None


def _output_size(
    conv: nn.Conv1d | nn.Conv2d, size_in: Sequence[int], pads: Sequence[int]
) -> tuple[int, ...]:
    """The output size of ``conv`` on an input of ``size_in`` padded by ``pads`` (an
    ``F.pad`` list)."""
    dims = len(size_in)
    out = []
    for dim in range(dims):
        padded = size_in[dim] + pads[2 * (dims - 1 - dim)] + pads[2 * (dims - 1 - dim) + 1]
        reach = conv.dilation[dim] * (conv.kernel_size[dim] - 1) + 1
        out.append((padded - reach) // conv.stride[dim] + 1)
    return tuple(out)


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
