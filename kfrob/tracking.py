"""The layer table: which of a model's modules kfrob preconditions (:class:`TrackedLayer`),
with their factors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from kfrob.alerts import warn
from kfrob.correction import EigenbasisMoment
from kfrob.factors import RunningFactor, factor_for
from kfrob.kronecker import EigenInverse, InverseFactors
from kfrob.layers import LayerMath, functional_users, layer_math, unsupported_reason
from kfrob.options import CurvatureOptions

if TYPE_CHECKING:
    from kfrob.inverses import InverseMethod

__all__ = ["Selection", "TrackedLayer", "eigenvalues_of", "factor_matrices", "track_layers"]

#: the samples a loss mask keeps: ``(dims, indices)``, flat indices into a tensor's first
#: ``dims`` dimensions
Selection = tuple[int, Tensor]


@dataclass(eq=False)
class TrackedLayer:
    """A preconditioned layer: its math, its two running factors (``None`` for a side whose
    metric is the identity), its eigenvalue correction (``None`` when off), and what its
    hooks have seen: for the MC Fisher, each output of this forward pass with its call's
    projected input rows (``None`` unless the correction records) and its loss mask's
    selection (``None`` without one)."""

    name: str
    module: nn.Module
    math: LayerMath
    domain: RunningFactor | None
    codomain: RunningFactor | None
    correction: EigenbasisMoment | None = None
    forward_calls: int = 0
    outputs: list[tuple[Tensor, Tensor | None, Selection | None]] = field(default_factory=list)
    #: why the hooks could not record a call (the layer then falls back to a plain update)
    failure: str | None = None

    @property
    def factors(self) -> tuple[RunningFactor, ...]:
        """The estimated factors, domain first."""
        return tuple(f for f in (self.domain, self.codomain) if f is not None)

    @property
    def sides(self) -> tuple[RunningFactor | None, RunningFactor | None]:
        """``(codomain, domain)``, ``None`` for an identity side."""
        return self.codomain, self.domain

    def checksum(self) -> Tensor:
        """A cheap fingerprint of the factors (their summed entries), for comparing ranks."""
        return sum((f.average.sum(dtype=torch.float64) for f in self.factors), torch.zeros(()))

    @property
    def refresh_cost(self) -> float:
        """The estimated cost of decomposing the factors, ``Σ_sides blocks · n³`` (``n²``
        for a diagonal side)."""
        return float(
            sum(
                f.average.shape[0] * f.average.shape[-1] ** (2 if f.diagonal else 3)
                for f in self.factors
            )
        )


def track_layers(
    model: nn.Module, curvature: CurvatureOptions, method: InverseMethod, per_step: bool = False
) -> tuple[dict[str, TrackedLayer], dict[str, str]]:
    """The model's registered layers, and why each other module with parameters is not one
    (warned once, listing them). Their factors are :func:`kfrob.factors.factor_for`'s, for
    the structures the inverse method asks for; ``per_step``: fed once a step (gradient
    factors, :mod:`kfrob.sources`).

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
                factor_for(math, "domain", curvature.domain, method.options, per_step),
                factor_for(math, "codomain", curvature.codomain, method.options, per_step),
            )  # fmt: skip
            method.attach(layer)
            layers[name] = layer
    if unsupported:
        listing = "; ".join(f"{n} ({why})" for n, why in unsupported.items())
        warn(f"kfrob: these modules' parameters get plain updates (no curvature): {listing}")
    return layers, unsupported


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
