"""The layer table: which of a model's modules kfrob preconditions, with their factors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfrob.alerts import warn
from kfrob.capture import TrackedLayer
from kfrob.factors import RunningFactor
from kfrob.inverses import InverseMethod
from kfrob.layers import layer_math, unsupported_reason
from kfrob.options import CurvatureOptions

__all__ = ["factor_matrices", "track_layers"]


def track_layers(
    model: nn.Module, curvature: CurvatureOptions, method: InverseMethod
) -> tuple[dict[str, TrackedLayer], dict[str, str]]:
    """The model's registered layers, and why each other module with parameters is not one
    (warned once, listing them)."""
    owners: dict[int, list[str]] = {}
    modules = list(model.named_modules())
    for name, module in modules:
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    layers: dict[str, TrackedLayer] = {}
    unsupported: dict[str, str] = {}
    for name, module in modules:
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        math = layer_math(module, curvature.weight_sharing)
        shared = sorted({other for p in own for other in owners[id(p)]} - {name})
        label = name or type(module).__name__
        if math is None:
            unsupported[label] = str(unsupported_reason(module))
        elif shared:
            tied = ", ".join(other or type(model).__name__ for other in shared)
            unsupported[label] = f"its parameters are tied to {tied}"
        else:
            layer = TrackedLayer(
                name, module, math,
                _factor(curvature.domain, math.blocks, math.in_features, False, math.device),
                _factor(curvature.codomain, math.blocks, math.out_features, True, math.device),
            )  # fmt: skip
            method.attach(layer)
            layers[name] = layer
    if unsupported:
        listing = "; ".join(f"{n} ({why})" for n, why in unsupported.items())
        warn(f"kfrob: these modules' parameters get plain SGD updates: {listing}")
    return layers, unsupported


def _factor(
    kind: str, blocks: int, size: int, codomain: bool, device: torch.device
) -> RunningFactor | None:
    if kind == "identity":
        return None
    diagonal = kind == "diagonal"
    return RunningFactor(blocks, size, diagonal=diagonal, per_sample_scale=codomain, device=device)


def _as_matrix(
    factor: RunningFactor | None, blocks: int, size: int, device: torch.device
) -> Tensor:
    if factor is None:
        return torch.eye(size, device=device).expand(blocks, size, size)
    if factor.diagonal:
        return torch.diag_embed(factor.value)
    return factor.value


def factor_matrices(layer: TrackedLayer) -> tuple[Tensor, Tensor]:
    """The layer's ``(A, G)`` as matrices (see :meth:`KroneckerPreconditioner.factors`)."""
    math = layer.math
    pair = [
        _as_matrix(factor, math.blocks, size, math.device)
        for factor, size in ((layer.domain, math.in_features), (layer.codomain, math.out_features))
    ]
    a, g = (m.squeeze(0) if math.blocks == 1 else m for m in pair)
    return a, g
