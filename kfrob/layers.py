"""Per-layer math: how a layer turns its inputs and output gradients into factor rows.

Every supported layer is viewed the same way. Its forward pass is a batched matrix product
``y[b, :, l] = W_k @ a[b, :, l]`` over ``blocks`` independent blocks ``k`` (the groups of a
grouped convolution; one block for everything else), where for sample ``b`` and location ``l``

* ``a`` is the input patch that location ``l`` sees (the whole input row for ``nn.Linear``,
  an unfolded receptive field for a convolution), with a trailing 1 appended when the layer
  has a bias, and
* ``W_k`` is the block's weight matrix of shape ``(out, in)`` with the bias as its last column.

A :class:`LayerMath` therefore only needs to know how to *unfold* its input into
``(samples, features, locations)`` and how to *flatten* its output (or output gradient) into
``(samples, channels, locations)``; everything else (rows, factors, gradient matrices) is
shared. ``nn.Linear`` treats every leading index of its ``(..., d_in)`` input as a sample and
has a single location; ``nn.Conv1d``/``nn.Conv2d`` have ``B`` samples and one location per
output position.

A convolution shares its weight over locations, and there are two ways to turn that into
factor rows (Eschenhagen et al. 2023, "Kronecker-factored approximate curvature for modern
neural network architectures"):

* ``"expand"`` (the default): every (sample, location) is a row, ``A = mean_{n,l} a aᵀ`` and
  ``G = mean_n Σ_l g gᵀ``, i.e. locations are treated like extra samples;
* ``"reduce"``: one row per sample, the mean patch ``â_n = mean_l a_{n,l}`` and the summed
  output gradient ``ĝ_n = Σ_l g_{n,l}``, so ``A = mean_n â âᵀ`` and ``G = mean_n ĝ ĝᵀ``. This
  is exact for a sample whose patches are all equal (its gradient is then ``ĝ âᵀ``) and costs
  ``locations`` times less to accumulate.

Both coincide for ``nn.Linear`` (one location).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WEIGHT_SHARING",
    "ConvMath",
    "LayerMath",
    "LinearMath",
    "layer_math",
    "unsupported_reason",
]

WEIGHT_SHARING = ("expand", "reduce")


class LayerMath:
    """Shared per-layer math; subclasses implement :meth:`unfold_input` and
    :meth:`flatten_output`.

    Shapes (``k = blocks``): factor rows are ``(k, rows, features)``; the domain factor
    ``A`` is ``(k, in, in)`` with ``in = in_features (+1 for the bias)``; the co-domain factor
    ``G`` is ``(k, out, out)``; a gradient matrix is ``(k, out, in)``.
    """

    def __init__(self, module: nn.Module, blocks: int = 1, weight_sharing: str = "expand") -> None:
        self.module = module
        self.blocks = blocks
        self.weight_sharing = weight_sharing
        bias = getattr(module, "bias", None)
        # a frozen bias is a constant shift: the weight's curvature then has no bias column
        self.has_bias = bias is not None and bias.requires_grad
        weight: Tensor = module.weight  # type: ignore[assignment]
        self.out_features = weight.shape[0] // blocks
        self.in_features = math.prod(weight.shape[1:]) + int(self.has_bias)

    # --- the two layer-specific pieces -------------------------------------------------
    def unfold_input(self, x: Tensor) -> Tensor:
        """Input ``x`` as ``(samples, blocks * features, locations)`` (no bias column)."""
        raise NotImplementedError

    def flatten_output(self, y: Tensor) -> Tensor:
        """Output-shaped ``y`` as ``(samples, blocks * out, locations)``."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def _rows(self, t: Tensor) -> Tensor:
        """``(samples, blocks * f, locations)`` → float32 ``(blocks, samples * locations, f)``."""
        samples, _, locations = t.shape
        t = t.reshape(samples, self.blocks, -1, locations).permute(1, 0, 3, 2)
        return t.reshape(self.blocks, samples * locations, -1).float()

    def input_rows(self, x: Tensor) -> Tensor:
        """Domain rows ``a`` of shape ``(blocks, rows, in)``, bias column of ones last
        (``"reduce"``: one row per sample, the mean over locations)."""
        patches = self.unfold_input(x)
        if self.weight_sharing == "reduce":
            patches = patches.mean(-1, keepdim=True)
        rows = self._rows(patches)
        if self.has_bias:
            rows = F.pad(rows, (0, 1), value=1.0)
        return rows

    def output_rows(self, grad_output: Tensor) -> Tensor:
        """Co-domain rows ``g`` of shape ``(blocks, rows, out)`` from ``dL/dy``
        (``"reduce"``: one row per sample, the sum over locations)."""
        grads = self.flatten_output(grad_output)
        if self.weight_sharing == "reduce":
            grads = grads.sum(-1, keepdim=True)
        return self._rows(grads)

    def num_samples(self, t: Tensor) -> int:
        """Number of samples in an input or output tensor (what the loss averages over)."""
        return self.flatten_output(t).shape[0]

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Weight-shaped (and bias-shaped) tensors as one ``(blocks, out, in)`` matrix."""
        mat = weight.reshape(self.blocks, self.out_features, -1)
        if self.has_bias:
            if bias is None:
                bias = weight.new_zeros(weight.shape[0])
            mat = torch.cat([mat, bias.reshape(self.blocks, self.out_features, 1)], dim=-1)
        return mat

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: ``(weight_like, bias_like or None)``."""
        weight: Tensor = self.module.weight  # type: ignore[assignment]
        if not self.has_bias:
            return mat.reshape(weight.shape), None
        return mat[..., :-1].reshape(weight.shape), mat[..., -1].reshape(-1)


class LinearMath(LayerMath):
    """``nn.Linear`` on inputs of shape ``(..., d_in)``: every leading index is a sample."""

    def unfold_input(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1], 1)

    def flatten_output(self, y: Tensor) -> Tensor:
        return y.reshape(-1, y.shape[-1], 1)


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
        return y.reshape(y.shape[0], y.shape[1], -1)


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


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``'s own parameters cannot be preconditioned (``None`` when they can)."""
    if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} is not a supported convolution"
    return f"{type(module).__name__} has no Kronecker-factored curvature in kfrob"


def layer_math(module: nn.Module, weight_sharing: str = "expand") -> LayerMath | None:
    """The :class:`LayerMath` for a supported module, else ``None``; ``weight_sharing``
    (``"expand"`` or ``"reduce"``) applies to convolutions."""
    if isinstance(module, nn.Linear):
        return LinearMath(module)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        return ConvMath(module, weight_sharing)
    return None
