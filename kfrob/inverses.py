"""Inverse methods: how a layer's damped inverse is computed from its factors.

One :class:`InverseMethod` is chosen at construction (:func:`method_for`) and never asked
about by name again:

* :class:`FactoredDamping` (the default): π-damping of each factor. For ``p = 1`` and full
  factors the two damped inverses by Cholesky; otherwise the damped matrix powers from the
  eigendecompositions (or, with a diagonal side, the eigenbasis scaling).
* :class:`ExactDamping`: eigendecompositions, damping ``A ⊗ G`` exactly; the eigenbases are
  refreshed by ``eigh`` or, with ``refresh="subspace"``, by one subspace-iteration step from
  the previous basis.
* :class:`EigenvalueCorrected`: exact damping whose scaling follows the running per-sample
  second moment ``S`` in the eigenbases (EKFAC, :mod:`kfrob.correction`).
* :class:`ExactWhereDense`: exact damping in eigenbases where a layer's sides are all
  dense, factored damping where one is structured (as :class:`FactoredDamping` chooses).

A method computes inverses for a list of layers (full sides of one size decomposed in one
batched call), rebuilds an inverse from the state that travels between ranks, and owns its
per-layer state and ``state_dict`` part. The math itself is in :mod:`kfrob.kronecker`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kfrob.correction import EigenbasisMoment
from kfrob.factors import BlockDiagonalFactor, RunningFactor, SketchedFactor, sketch_of
from kfrob.kronecker import (
    EigenInverse,
    InverseFactors,
    Side,
    decompose,
    decompose_all,
    dense_power,
    exact_scaling,
    factored_damping,
    factored_inverses,
    factored_powers,
    factored_scaling,
)
from kfrob.options import InverseOptions, PreconditionerOptions
from kfrob.structure import (
    BlockDiagonalPower,
    DiagonalPower,
    LowRankPower,
    SideOperator,
    StructureChoice,
    choose_structure,
    leading_eigenpairs,
    low_rank_power,
    nystrom,
)
from kfrob.tracking import TrackedLayer

__all__ = [
    "EigenvalueCorrected",
    "ExactDamping",
    "ExactWhereDense",
    "FactoredDamping",
    "Inverse",
    "InverseMethod",
    "inverse_from_state",
    "method_for",
]

Inverse = EigenInverse | InverseFactors


class InverseMethod:
    """The base: eigendecomposition-based inverses with a method-specific scaling.

    Subclasses choose :meth:`scaling` (exact or factored damping), may compute some layers
    without eigendecompositions (:meth:`by_cholesky`), may start decompositions from the
    previous eigenbasis (:meth:`previous_basis`), and may keep per-layer state
    (:meth:`attach`, :meth:`adopt`, :meth:`after_fold`, :meth:`layer_state`).
    """

    #: why the method cannot run under data parallelism (``None``: it can)
    parallel_conflict: str | None = None
    #: the structures asked of the factors (:func:`kfrob.factors.factor_for`; dense here)
    options: InverseOptions = InverseOptions()

    def __init__(self, exponent: float = 1.0) -> None:
        self.exponent = exponent

    # --- what subclasses choose --------------------------------------------------------------
    def scaling(self, codomain: Side, domain: Side, damping: float) -> Tensor:
        raise NotImplementedError

    def by_cholesky(self, layer: TrackedLayer) -> bool:
        """Whether the layer's inverse comes without eigendecompositions."""
        return False

    def previous_basis(self, inverse: Inverse | None, side: str, factor: Tensor) -> Tensor | None:
        """The basis a decomposition of ``factor`` starts from (``None``: a full one)."""
        return None

    def from_sides(self, codomain: Side, domain: Side, damping: float) -> Inverse:
        """The inverse from the two decomposed sides."""
        return EigenInverse(codomain, domain, self.scaling(codomain, domain, damping))

    # --- computing -------------------------------------------------------------------------
    def compute(
        self,
        layers: Sequence[TrackedLayer],
        damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | None]:
        """Each layer's damped inverse from its current factors (``None`` where a
        decomposition failed). ``held`` maps layer names to their current inverses."""
        eigen = [layer for layer in layers if not self.by_cholesky(layer)]
        full = [  # in the order _side takes them: co-domain first
            (layer.name, side, f.value)
            for layer in eigen
            for side, f in (("codomain", layer.codomain), ("domain", layer.domain))
            if f is not None and not f.diagonal
        ]
        previous = [
            self.previous_basis(_local(held.get(name)), side, value) for name, side, value in full
        ]
        decomposed = iter(decompose_all([value for *_, value in full], previous))
        out: dict[str, Inverse | None] = {}
        for layer in layers:
            lam = damping[layer.name]
            if not self.by_cholesky(layer):
                sides = [
                    _side(factor, size, decomposed, layer)
                    for factor, size in (
                        (layer.codomain, layer.math.out_features),
                        (layer.domain, layer.math.in_features),
                    )
                ]
                ok = sides[0] is not None and sides[1] is not None
                out[layer.name] = self.from_sides(*sides, lam) if ok else None  # type: ignore[arg-type]
                continue
            out[layer.name] = factored_inverses(*(_value(f) for f in layer.sides), lam)
        return out

    def shared_state(self, inverse: Inverse) -> dict[str, Any]:
        """What travels to the other ranks: the inverse's state, without an eigenbasis
        scaling (cheap to recompute on arrival, :meth:`assemble`)."""
        return {k: v for k, v in inverse.state_dict().items() if k != "scaling"}

    def assemble(self, state: dict[str, Any], damping: float, device: torch.device) -> Inverse:
        """An inverse from :meth:`shared_state`, computed exactly as its owner did."""
        if state["kind"] != "eigen":
            return inverse_from_state(state, device)
        inverse = EigenInverse.from_state_dict({**state, "scaling": torch.empty(0)}, device)
        inverse.scaling = self.scaling(inverse.codomain, inverse.domain, damping)
        return inverse

    def structures(self, layer: TrackedLayer) -> dict[str, StructureChoice]:
        """``{"domain"/"codomain": choice}`` for the layer's full sides (dense here)."""
        why = "damping_method='exact' keeps dense eigenbases"
        return {side: StructureChoice("dense", why) for side in _full_sides(layer)}

    # --- per-layer state (none by default) -------------------------------------------------
    def attach(self, layer: TrackedLayer) -> None:
        """Give a new layer the method's per-layer state."""

    def adopt(self, layer: TrackedLayer, inverse: Inverse, damping: float) -> None:
        """A new inverse was taken for ``layer``."""

    def after_fold(self, layer: TrackedLayer, inverse: Inverse | None) -> None:
        """The layer's factors were folded (its inverse, if any, may follow them)."""

    def layer_state(self, layer: TrackedLayer) -> dict[str, Any]:
        return {}

    def load_layer_state(
        self, layer: TrackedLayer, entry: dict[str, Any], inverse: Inverse | None
    ) -> None:
        """Restore :meth:`layer_state` (``entry`` is the layer's whole saved entry)."""


class FactoredDamping(InverseMethod):
    """π-damping: ``((A + π√λ I) ⊗ (G + √λ/π I))^{-p}``, two products per step.

    Each full side is dense or low-rank (:mod:`kfrob.structure`), as ``options`` ask or, for
    ``"auto"``, as :func:`~kfrob.structure.choose_structure` decides from the layer's shapes
    and the rows it saw in its last window. A low-rank side is refreshed from its previous
    basis by subspace iteration; π comes from the traces, which the low-rank structure
    keeps."""

    def __init__(
        self,
        exponent: float = 1.0,
        options: InverseOptions | None = None,
        inverse_update_freq: int = 10,
        dense_only: str | None = None,
        factor_update_freq: int = 1,
    ) -> None:
        super().__init__(exponent)
        self.options = options if options is not None else InverseOptions()
        self.inverse_update_freq = inverse_update_freq
        self.factor_update_freq = factor_update_freq
        #: why every side must stay dense (``None``: structures may be chosen)
        self.dense_only = dense_only

    def scaling(self, codomain: Side, domain: Side, damping: float) -> Tensor:
        return factored_scaling(codomain, domain, damping, self.exponent)

    def by_cholesky(self, layer: TrackedLayer) -> bool:
        """``p = 1`` and no diagonal side: Cholesky inverses."""
        return self.exponent == 1.0 and not any(f.diagonal for f in layer.factors)

    def from_sides(self, codomain: Side, domain: Side, damping: float) -> Inverse:
        if all(s.basis is not None or not s.estimated for s in (codomain, domain)):
            return factored_powers(codomain, domain, damping, self.exponent)
        return super().from_sides(codomain, domain, damping)

    # --- structures ----------------------------------------------------------------------
    def structures(self, layer: TrackedLayer) -> dict[str, StructureChoice]:
        """``{"domain"/"codomain": choice}`` for the layer's full (dense-capable) sides."""
        math, sides, options = layer.math, _full_sides(layer), self.options
        rows = max((f.rows_per_window for f in layer.factors), default=0)
        widths = {"codomain": math.out_features, "domain": math.in_features}
        choices = {}
        for side, (factor, size) in sides.items():
            other = widths["domain" if side == "codomain" else "codomain"]
            requested = getattr(options, f"{side}_structure")
            if isinstance(factor, SketchedFactor):  # a sketch stays one
                choices[side] = StructureChoice("low_rank", factor.reason)
            elif isinstance(factor, BlockDiagonalFactor):
                choices[side] = StructureChoice("block_diagonal", factor.reason)
            elif requested == "block_diagonal":  # narrow enough for one block
                why = f"width {size} ≤ max_block_size {options.max_block_size}: one block"
                choices[side] = StructureChoice("dense", why)
            elif self.dense_only is not None:
                choices[side] = StructureChoice("dense", self.dense_only)
            else:
                choices[side] = choose_structure(
                    requested, size, other, rows, options.rank,
                    options.dense_budget, self.inverse_update_freq, self.factor_update_freq,
                )  # fmt: skip
        return choices

    def compute(
        self, layers: Sequence[TrackedLayer], damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | None]:  # fmt: skip
        structured = {
            layer.name
            for layer in layers
            if any(c.structure != "dense" for c in self.structures(layer).values())
        }
        plain = super().compute([la for la in layers if la.name not in structured], damping, held)
        return {
            layer.name: (
                self._structured(layer, damping[layer.name])
                if layer.name in structured
                else plain[layer.name]
            )
            for layer in layers
        }

    def _structured(self, layer: TrackedLayer, damping: float) -> Inverse | None:
        """The layer's inverse with at least one structured side; ``None`` if a
        decomposition fails."""
        choices = self.structures(layer)
        factors = {"codomain": layer.codomain, "domain": layer.domain}
        math = layer.math
        widths = (math.out_features, math.in_features)
        traced = [_traced(f, n, layer) for f, n in zip(factors.values(), widths, strict=True)]
        shifts = dict(zip(factors, factored_damping(*traced, damping), strict=True))
        operators: dict[str, SideOperator] = {}
        for side, factor in factors.items():
            shift, p = shifts[side], self.exponent
            if factor is None:
                operators[side] = None
            elif factor.diagonal:
                operators[side] = DiagonalPower((factor.value.clamp(min=0) + shift).pow(-p))
            elif isinstance(factor, BlockDiagonalFactor):
                parts = dense_power(factor.average, shift.repeat_interleave(factor.parts, 0), p)
                if parts is None:
                    return None
                operators[side] = BlockDiagonalPower(parts, factor.size)
            elif choices[side].structure == "low_rank":
                rank = self.options.rank
                if isinstance(factor, SketchedFactor):
                    approximation = nystrom(factor.basis, factor.sketch, factor.trace(), rank)
                else:  # the first time: from the dense factor
                    approximation = leading_eigenpairs(factor.value, rank)
                if approximation is None:
                    return None
                operators[side] = low_rank_power(approximation, shift, p)
            else:
                operators[side] = dense_power(factor.value, shift, p)
                if operators[side] is None:
                    return None
        return InverseFactors(operators["codomain"], operators["domain"])

    def adopt(self, layer: TrackedLayer, inverse: Inverse, damping: float) -> None:
        """A low-rank side's factor is held as a sketch on the new eigenbasis from now on
        (on every rank: the inverse carries the basis)."""
        if not isinstance(inverse, InverseFactors):
            return
        choices = None
        for side in ("codomain", "domain"):
            power, factor = getattr(inverse, side), getattr(layer, side)
            if not isinstance(power, LowRankPower) or factor is None:
                continue
            if isinstance(factor, SketchedFactor):
                factor.restart(power.basis, power.eigenvalues)
                continue
            choices = choices or self.structures(layer)
            reason = choices[side].reason
            setattr(layer, side, sketch_of(factor, power.basis, power.eigenvalues, reason))


class ExactDamping(InverseMethod):
    """``(A ⊗ G + λI)^{-p}`` in the eigenbases; ``refresh`` is ``"eigh"`` or
    ``"subspace"``."""

    def __init__(self, exponent: float = 1.0, refresh: str = "eigh") -> None:
        super().__init__(exponent)
        self.refresh = refresh

    def scaling(self, codomain: Side, domain: Side, damping: float) -> Tensor:
        return exact_scaling(codomain, domain, damping, self.exponent)

    def previous_basis(self, inverse: Inverse | None, side: str, factor: Tensor) -> Tensor | None:
        """With subspace refreshes, the current basis on that side if it has the factor's
        shape."""
        if self.refresh != "subspace" or not isinstance(inverse, EigenInverse):
            return None
        basis = getattr(inverse, side).basis
        return basis if basis is not None and basis.shape == factor.shape else None


class ExactWhereDense(FactoredDamping):
    """Exact damping ``(A ⊗ G + λI)^{-p}`` in the eigenbases of a layer whose full sides
    are all dense; :class:`FactoredDamping`'s structures and π-damping otherwise."""

    scaling = ExactDamping.scaling
    from_sides = InverseMethod.from_sides  # the eigenbases and the exact scaling

    def by_cholesky(self, layer: TrackedLayer) -> bool:
        return False


class EigenvalueCorrected(ExactDamping):
    """Exact damping with EKFAC's scaling ``(S + λ)^{-p}`` (:mod:`kfrob.correction`)."""

    parallel_conflict = "False under data parallelism (S is not averaged over ranks)"

    def attach(self, layer: TrackedLayer) -> None:
        math = layer.math
        layer.correction = EigenbasisMoment(
            math.blocks, math.out_features, math.in_features, math.device, math.factor_dtype
        )

    def adopt(self, layer: TrackedLayer, inverse: Inverse, damping: float) -> None:
        if layer.correction is not None and isinstance(inverse, EigenInverse):
            assert layer.codomain is not None
            layer.correction.restart(inverse, layer.codomain.folds, damping, self.exponent)

    def after_fold(self, layer: TrackedLayer, inverse: Inverse | None) -> None:
        if layer.correction is not None and isinstance(inverse, EigenInverse):
            inverse.scaling = layer.correction.scaling()  # the step follows S (on device)

    def layer_state(self, layer: TrackedLayer) -> dict[str, Any]:
        return {} if layer.correction is None else {"correction": layer.correction.state_dict()}

    def load_layer_state(
        self, layer: TrackedLayer, entry: dict[str, Any], inverse: Inverse | None
    ) -> None:
        """Restore ``S`` and its bases (those of the loaded inverse). A state saved without
        the correction leaves it unset: the loaded inverse's scaling is used and ``S``
        starts at the next refresh."""
        correction = layer.correction
        if correction is None:
            return
        held = inverse if isinstance(inverse, EigenInverse) else None
        if entry.get("correction") is None or held is None:
            correction.codomain_basis = correction.domain_basis = None
            correction.discard()
            return
        correction.load_state_dict(entry["correction"], held)


def method_for(options: PreconditionerOptions) -> InverseMethod:
    """The method the inverse options name (the schedule enters the structures' cost model;
    owner placement keeps every side dense)."""
    inverse = options.inverse
    match inverse.damping_method, inverse.eigenvalue_correction:
        case "exact", True:
            return EigenvalueCorrected(inverse.exponent, inverse.eigenbasis_refresh)
        case "exact", False:
            return ExactDamping(inverse.exponent, inverse.eigenbasis_refresh)
        case method, _:
            owner = options.parallel.inverse_placement == "owner"
            why = "inverse_placement='owner' keeps no eigenbasis on the other ranks"
            schedule = options.schedule
            kind = ExactWhereDense if method == "exact_where_dense" else FactoredDamping
            return kind(
                inverse.exponent, inverse, schedule.inverse_update_freq, why if owner else None,
                schedule.factor_update_freq,
            )  # fmt: skip


def inverse_from_state(state: dict[str, Any], device: torch.device) -> Inverse:
    """An inverse from its ``state_dict`` (either kind)."""
    kind = EigenInverse if state["kind"] == "eigen" else InverseFactors
    return kind.from_state_dict(state, device)


def _local(inverse: Any) -> Inverse | None:
    return inverse if isinstance(inverse, EigenInverse | InverseFactors) else None


def _value(factor: RunningFactor | None) -> Tensor | None:
    return None if factor is None else factor.value


def _side(
    factor: RunningFactor | None, size: int, decomposed: Iterator[Side | None], layer: TrackedLayer
) -> Side | None:
    """One side of a layer: an identity, a diagonal, or the next full decomposition."""
    if factor is None:
        return _identity(layer, size)
    if factor.diagonal:
        return decompose(factor.value, diagonal=True)
    return next(decomposed)


def _full_sides(layer: TrackedLayer) -> dict[str, tuple[RunningFactor, int]]:
    """The layer's full (neither diagonal nor identity) sides and their widths."""
    math = layer.math
    sides = {"domain": (layer.domain, math.in_features)}
    sides["codomain"] = (layer.codomain, math.out_features)
    return {s: (f, n) for s, (f, n) in sides.items() if f is not None and not f.diagonal}


def _traced(factor: RunningFactor | None, width: int, layer: TrackedLayer) -> Side:
    """A side with only what π needs (its mean eigenvalue ``tr F / width``), or an identity."""
    if factor is None:
        return _identity(layer, 1)
    return Side(None, factor.trace() / width)


def _identity(layer: TrackedLayer, size: int) -> Side:
    """An identity side: no basis, eigenvalues of one ``(blocks, size)``."""
    math = layer.math
    ones = torch.ones(math.blocks, size, device=math.device, dtype=math.factor_dtype)
    return Side(None, ones, estimated=False)
