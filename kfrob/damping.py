r"""The Levenberg–Marquardt rule for the damping ``λ`` (Martens & Grosse 2015, K-FAC §6.5).

After a step ``Δ`` the change of the objective ``h`` is predicted by the quadratic model

.. math::
    M(\Delta) = \sum_i \langle \nabla h_i, \Delta_i\rangle
        + \tfrac12 \sum_{i \in \text{layers}} \mathrm{tr}(A_i \Delta_i^\top G_i \Delta_i)
        + \tfrac12 \sum_i \lambda_i \lVert\Delta_i\rVert^2,

a sum over *pieces* ``i``: a preconditioned layer is one piece (its gradient and step as
``(blocks, out, in)`` matrices, bias last, with its Kronecker factors ``A (blocks, in, in)``
and ``G (blocks, out, out)``; ``tr(A Δᵀ G Δ) = vec(Δ)ᵀ (A ⊗ G) vec(Δ)`` summed over blocks),
any other parameter is a piece without curvature. The reduction ratio

.. math:: \rho = \bigl(h(\theta + \Delta) - h(\theta)\bigr) / M(\Delta)

says how well the model predicted the step, and the rule moves ``λ`` by a factor
``ω ∈ (0, 1)``: ``ρ < ¼ → λ/ω`` (the model was too optimistic: trust it less),
``ρ > ¾ → λ·ω``, clamped to ``[λ_min, λ_max]``. A failed measurement (a non-finite ``ρ``,
which includes non-finite losses, or ``M(Δ) > 0``, a step the model does not predict to
descend at all) counts as ``ρ < ¼``: the damping goes up; a step of length zero
(``M(Δ) = 0``) measures nothing and leaves it. ``M`` includes the damping term: it is the
model whose minimiser the damped step approximates, so ``ρ ≈ 1`` on an exact quadratic is
slightly above 1 (a choice; the undamped model would bias ``ρ`` the other way).

Everything here is pure: tensors in, tensors (or floats) out. The optimizer's bookkeeping
(which step, which batch, the re-evaluation) lives in :mod:`kfrob.adaptation`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ModelPiece", "adapted_damping", "curvature", "quadratic_model", "reduction_ratio"]


@dataclass
class ModelPiece:
    """One term of :math:`M`: a gradient and a step of the same shape, the damping ``λ``
    that acts on it, and, for a preconditioned layer, its factors ``(A, G)`` (the matrices
    then being ``(blocks, out, in)``; ``A`` and ``G`` may drop a leading block dimension
    of 1)."""

    gradient: Tensor
    step: Tensor
    damping: float
    factors: tuple[Tensor, Tensor] | None = None


def curvature(a: Tensor, g: Tensor, step: Tensor) -> Tensor:
    """``Σ_blocks tr(A Δᵀ G Δ)`` for symmetric ``A (…, in, in)``, ``G (…, out, out)`` and
    ``Δ (blocks, out, in)``: the squared length of ``Δ`` in the ``A ⊗ G`` metric, computed
    as ``⟨G Δ A, Δ⟩`` (a 0-dim float32 tensor)."""
    step = step.float()
    return ((g.float() @ step @ a.float()) * step).sum()


def quadratic_model(pieces: Iterable[ModelPiece]) -> Tensor:
    """:math:`M(\\Delta)` of the module docstring, summed over ``pieces``, as a 0-dim
    float32 tensor (no host sync)."""
    terms = []
    for piece in pieces:
        gradient, step = piece.gradient.float(), piece.step.float()
        if gradient.is_sparse:
            gradient = gradient.to_dense()
        term = (gradient * step).sum() + 0.5 * piece.damping * step.square().sum()
        if piece.factors is not None:
            term = term + 0.5 * curvature(*piece.factors, step)
        terms.append(term)
    return torch.stack(terms).sum() if terms else torch.zeros(())


def reduction_ratio(change: float, model: float) -> float:
    """``ρ = change / model`` (NaN when ``model`` is 0: a step of length 0 measures
    nothing)."""
    if model == 0.0:
        return math.nan
    return change / model


def adapted_damping(
    damping: float, ratio: float, model: float, factor: float, low: float, high: float
) -> float:
    """The damping after one measurement ``ρ = ratio`` of a step whose model value was
    ``model``: unchanged for a step of length zero (``model == 0``: a skipped step, a zero
    learning rate; nothing was measured), ``λ/ω`` if ``ρ < ¼`` or the measurement failed
    (``ρ`` not finite or ``model > 0``), ``λ·ω`` if ``ρ > ¾``, else ``λ``; then clamped to
    ``[low, high]``."""
    if model == 0.0:
        return min(max(damping, low), high)
    failed = not (math.isfinite(ratio) and model < 0.0)
    if failed or ratio < 0.25:
        damping = damping / factor
    elif ratio > 0.75:
        damping = damping * factor
    return min(max(damping, low), high)
