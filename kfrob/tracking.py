"""The layer table: which of a model's modules kfrob preconditions, with their factors."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kfrob.alerts import warn
from kfrob.capture import TrackedLayer
from kfrob.factors import BlockDiagonalFactor, RunningFactor
from kfrob.inverses import InverseMethod
from kfrob.kronecker import EigenInverse, InverseFactors
from kfrob.layers import LayerMath, functional_users, layer_math, unsupported_reason
from kfrob.options import CurvatureOptions

__all__ = ["eigenvalues_of", "factor_matrices", "track_layers"]


def track_layers(
    model: nn.Module, curvature: CurvatureOptions, method: InverseMethod
) -> tuple[dict[str, TrackedLayer], dict[str, str]]:
    """The model's registered layers, and why each other module with parameters is not one
    (warned once, listing them).

    Tied modules (several modules holding the very same parameters, e.g. a language model's
    output head tied to its token embedding) are preconditioned once, with the curvature of
    the *last* of them in the model's order that kfrob supports (the output head): its
    hooks record the factors, and the step preconditions the parameters' whole gradient,
    which sums the contributions of all uses. The same holds for a supported module that
    holds all the parameters of every module it shares one with (BERT's decoder: its
    weight is the token embedding's, its bias its parent's). Modules that share only some
    of their parameters otherwise get plain SGD."""
    owners: dict[int, list[str]] = {}
    modules = list(model.named_modules())
    maths = {name: layer_math(module, curvature.weight_sharing) for name, module in modules}
    functional = functional_users(model)
    order = {name: i for i, (name, _) in enumerate(modules)}
    own: dict[str, set[int]] = {}
    for name, module in modules:
        own[name] = {id(p) for p in module.parameters(recurse=False)}
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    shared = {
        name: sorted({other for p in ids for other in owners[p]} - {name})
        for name, ids in own.items()
        if ids
    }
    # a carrier holds every parameter of each module it shares one with (a head whose weight
    # is a token embedding's and whose bias is its parent's); of several with the very same
    # parameters, the last in the model's order carries them
    carriers = [
        name
        for name, others in shared.items()
        if maths[name] is not None
        and name not in functional
        and all(own[other] <= own[name] for other in others)
    ]
    carriers = [
        name
        for name in carriers
        if not any(own[o] == own[name] and order[o] > order[name] for o in carriers)
    ]
    layers: dict[str, TrackedLayer] = {}
    unsupported: dict[str, str] = {}
    for name, module in modules:
        if name not in shared:
            continue
        math = maths[name]
        label = name or type(module).__name__
        if name not in carriers and any(
            own[name] <= own[carrier] for carrier in carriers if carrier in shared[name]
        ):
            continue  # preconditioned through the carrier that holds all its parameters
        if name in functional:
            unsupported[label] = functional[name]
        elif math is None:
            unsupported[label] = str(unsupported_reason(module))
        elif name not in carriers:
            tied = ", ".join(other or type(model).__name__ for other in shared[name])
            unsupported[label] = f"some of its parameters are tied to {tied}"
        else:
            layer = TrackedLayer(
                name, module, math,
                _factor(curvature.domain, math, math.in_features, False, method),
                _factor(curvature.codomain, math, math.out_features, True, method),
            )  # fmt: skip
            method.attach(layer)
            layers[name] = layer
    if unsupported:
        listing = "; ".join(f"{n} ({why})" for n, why in unsupported.items())
        warn(f"kfrob: these modules' parameters get plain updates (no curvature): {listing}")
    return layers, unsupported


def _factor(
    kind: str, math: LayerMath, size: int, codomain: bool, method: InverseMethod
) -> RunningFactor | None:
    if kind == "identity":
        return None
    diagonal = kind == "diagonal" or (math.diagonal_domain and not codomain)
    options = getattr(method, "options", None)  # a factored method's structures
    structure = getattr(options, "codomain_structure" if codomain else "domain_structure", None)
    if not diagonal and structure == "block_diagonal" and size > options.max_block_size:  # type: ignore[union-attr]
        return BlockDiagonalFactor(
            math.blocks, size, options.max_block_size, per_sample_scale=codomain,  # type: ignore[union-attr]
            device=math.device, dtype=math.factor_dtype,
        )  # fmt: skip
    return RunningFactor(
        math.blocks, size, diagonal=diagonal, per_sample_scale=codomain,
        device=math.device, dtype=math.factor_dtype,
    )  # fmt: skip


def _as_matrix(factor: RunningFactor | None, math: LayerMath, size: int) -> Tensor:
    if factor is None:
        eye = torch.eye(size, device=math.device, dtype=math.factor_dtype)
        return eye.expand(math.blocks, size, size)
    if factor.diagonal:
        return torch.diag_embed(factor.value)
    return factor.value


def factor_matrices(layer: TrackedLayer) -> tuple[Tensor, Tensor]:
    """The layer's ``(A, G)`` as matrices (see :meth:`KroneckerPreconditioner.factors`)."""
    math = layer.math
    pair = [
        _as_matrix(factor, math, size)
        for factor, size in ((layer.domain, math.in_features), (layer.codomain, math.out_features))
    ]
    a, g = (m.squeeze(0) if math.blocks == 1 else m for m in pair)
    return a, g


def eigenvalues_of(
    layers: dict[str, TrackedLayer], inverses: dict[str, Any]
) -> dict[str, dict[str, Tensor]]:
    """``{layer: {"A": eigenvalues, "G": eigenvalues}}`` of the factors behind each held
    inverse, ascending, ``(blocks, n)``, identity sides left out: stored by an eigenbasis
    inverse, else computed from the current factors in float64 (left out if that fails, or
    if the inverse is held by another rank)."""
    out = {}
    for name, inverse in inverses.items():
        layer = layers[name]
        if isinstance(inverse, EigenInverse):
            sides = {"A": inverse.domain, "G": inverse.codomain}
            out[name] = {k: s.eigenvalues for k, s in sides.items() if s.estimated}
        elif isinstance(inverse, InverseFactors):
            try:  # in float64: float32 eigvalsh fails on some ill-conditioned factors
                out[name] = {
                    k: torch.linalg.eigvalsh(f.value.double()).to(f.value.dtype).clamp(min=0)
                    for k, f in (("A", layer.domain), ("G", layer.codomain))
                    if f is not None
                }
            except torch.linalg.LinAlgError:
                continue
    return out
