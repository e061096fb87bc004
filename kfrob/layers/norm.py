"""Affine normalisation layers: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.BatchNorm1d/2d/3d`` and ``nn.InstanceNorm1d/2d/3d`` with ``affine=True``; and, served
by name without importing their libraries, transformers' ``LlamaRMSNorm`` and timm's
``LayerNorm2d`` (a layer norm over the channels of ``(B, C, H, W)``).

Each of them normalises its input to ``x̂`` and then scales and shifts every normalised
feature ``k`` on its own: ``y_k = γ_k x̂_k + β_k``. Feature ``k`` is therefore a linear layer
with one input and one output, ``[γ_k, β_k] @ [x̂_k, 1]``, and the layer as a whole is a
grouped linear layer with one block per feature, exactly like a depthwise convolution:

* the domain factor of block ``k`` is the ``2 × 2`` second moment of ``[x̂_k, 1]``
  (``1 × 1`` without a shift), the co-domain factor the ``1 × 1`` mean square of ``g_k``;
* so each feature's scale and shift get the Kronecker-factored Fisher of their own
  ``2 × 2`` block, and features are independent of each other.

``x̂`` is recomputed from the layer's input in the forward hook with the layer's own
statistics: per row for layer and RMS norms, per group for group norm, per instance for
instance norm, and the batch's for batch norm in training (its running statistics only
when it has none of the batch, which the hooks do not record). The dependence of the
statistics on the inputs does not enter the factors: they are the Fisher of ``γ`` and ``β``
for the ``x̂`` the layer computed.

Locations: the ``(B, C, *spatial)`` layers (batch, group and instance norm) share ``γ``,
``β`` over their spatial positions, which are locations as for a convolution; the
row-wise layers (layer and RMS norm over trailing dimensions) treat every leading index as a
sample, as ``nn.Linear`` does. timm's ``LayerNorm2d`` normalises each position over the
channels and is served like the ``(B, C, *spatial)`` layers (positions are locations).

A subclass that normalises other dimensions than its class does (a ``nn.LayerNorm``
subclass that permutes inside ``forward``) would get wrong factors: each layer checks, once
per input shape, that ``γ x̂ + β`` reproduces the call's output, and otherwise falls back to
plain SGD with the reason (:meth:`_AffineNormMath.check_call`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from kfrob.layers.base import LayerMath
from kfrob.layers.registry import register, register_by_name

__all__ = ["ChannelNormMath", "ChannelsFirstLayerNormMath", "LastDimRMSNormMath", "RowNormMath"]


class _AffineNormMath(LayerMath):
    """One block per normalised feature, each ``(1, 1 [+1 for the shift])``."""

    def __init__(self, module: nn.Module, weight_sharing: str = "expand") -> None:
        weight: Tensor = module.weight  # type: ignore[assignment]
        super().__init__(module, blocks=weight.numel(), weight_sharing=weight_sharing)
        self.out_features, self.in_features = 1, 1 + int(self.has_bias)
        self._checked: dict[tuple[int, ...], str | None] = {}

    def normalized(self, x: Tensor) -> Tensor:
        """``x̂``: the input normalised as the layer does, before its scale and shift."""
        raise NotImplementedError

    def check_call(self, x: Tensor, output: Tensor) -> str | None:
        """Whether ``γ x̂ + β`` reproduces the output (checked once per input shape)."""
        key = tuple(x.shape)
        if key not in self._checked:
            self._checked[key] = self._reproduces(x, output)
        return self._checked[key]

    def _reproduces(self, x: Tensor, output: Tensor) -> str | None:
        if output.shape != x.shape:
            return f"its output shape {tuple(output.shape)} differs from its input's"
        module = self.module
        bias = getattr(module, "bias", None)  # a frozen bias still shifts the output
        try:
            with torch.no_grad():
                x_hat = self.unfold_input(x)  # (samples, blocks, locations)
                again = x_hat * module.weight.detach().to(x_hat.dtype).reshape(1, -1, 1)
                if bias is not None:
                    again = again + bias.detach().to(x_hat.dtype).reshape(1, -1, 1)
        except RuntimeError as error:  # a shape the layer's math does not accept
            return f"kfrob cannot normalise its input {tuple(x.shape)} as it does ({error})"
        want = self.flatten_output(output.detach()).to(again.dtype)
        if not want.numel():
            return None
        tol = max(1e-3, 8 * torch.finfo(output.dtype).eps)
        scale = float(want.abs().amax().clamp(min=1.0))
        if not torch.allclose(again, want, rtol=tol, atol=tol * scale):
            return "its output is not the scaled and shifted normalisation kfrob computes"
        return None


class RowNormMath(_AffineNormMath):
    """``nn.LayerNorm`` and ``nn.RMSNorm`` over the trailing ``normalized_shape``: every
    leading index is a sample with one location."""

    def normalized(self, x: Tensor) -> Tensor:
        module = self.module
        shape = tuple(module.normalized_shape)  # type: ignore[arg-type]
        dims = tuple(range(-len(shape), 0))
        x = x.to(self.factor_dtype)
        if isinstance(module, nn.LayerNorm):
            return F.layer_norm(x, shape, eps=module.eps)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps  # type: ignore[attr-defined]
        return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)

    def unfold_input(self, x: Tensor) -> Tensor:
        return self.flatten_output(self.normalized(x))

    def flatten_output(self, y: Tensor) -> Tensor:
        return y.reshape(-1, self.blocks, 1)

    def sample_dims(self, t: Tensor) -> int:
        return t.dim() - len(self.module.normalized_shape)  # type: ignore[arg-type]


class LastDimRMSNormMath(RowNormMath):
    """transformers' ``LlamaRMSNorm``: ``y = γ ⊙ x / sqrt(mean(x², -1) + variance_epsilon)``
    over the last dimension, no shift (its ``forward`` in float32 for lower precisions, as
    here)."""

    def normalized(self, x: Tensor) -> Tensor:
        x = x.to(self.factor_dtype)
        eps = self.module.variance_epsilon
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)

    def sample_dims(self, t: Tensor) -> int:
        return t.dim() - 1


class ChannelNormMath(_AffineNormMath):
    """Batch, group and instance norm on ``(B, C, *spatial)`` (or unbatched ``(C, *spatial)``
    for instance norm): one block per channel, spatial positions are locations."""

    output_feature_dim = 1

    def normalized(self, x: Tensor) -> Tensor:
        module = self.module
        x = x.to(self.factor_dtype)
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x, module.num_groups, eps=module.eps)
        if isinstance(module, _InstanceNorm):
            return F.instance_norm(x, eps=module.eps)
        assert isinstance(module, _BatchNorm)
        batch_statistics = module.training or module.running_mean is None
        mean = None if batch_statistics else module.running_mean
        var = None if batch_statistics else module.running_var
        return F.batch_norm(x, mean, var, training=batch_statistics, eps=module.eps)

    def _batched(self, t: Tensor) -> Tensor:
        unbatched = isinstance(self.module, _InstanceNorm) and t.dim() == _spatial(self.module) + 1
        return t.unsqueeze(0) if unbatched else t

    def unfold_input(self, x: Tensor) -> Tensor:
        return self.flatten_output(self.normalized(self._batched(x)))

    def sample_dims(self, t: Tensor) -> int:
        return 0 if self._batched(t) is not t else 1

    def flatten_output(self, y: Tensor) -> Tensor:
        y = self._batched(y)
        return y.reshape(y.shape[0], self.blocks, math.prod(y.shape[2:]))


class ChannelsFirstLayerNormMath(ChannelNormMath):
    """timm's ``LayerNorm2d``: a layer norm over the channels of ``(B, C, H, W)`` (it permutes
    to channels-last inside ``forward``): one block per channel, positions are locations."""

    def normalized(self, x: Tensor) -> Tensor:
        module = self.module
        x = x.to(self.factor_dtype).movedim(1, -1)
        return F.layer_norm(x, module.normalized_shape, eps=module.eps).movedim(-1, 1)


def _spatial(module: nn.Module) -> int:
    """The number of spatial dimensions of an instance norm (1, 2 or 3)."""
    return int(type(module).__name__[-2])


register((nn.LayerNorm, nn.RMSNorm), RowNormMath)
register((_BatchNorm, nn.GroupNorm, _InstanceNorm), ChannelNormMath)
register_by_name("transformers.models.llama.modeling_llama.LlamaRMSNorm", LastDimRMSNormMath)
register_by_name("timm.layers.norm.LayerNorm2d", ChannelsFirstLayerNormMath)
