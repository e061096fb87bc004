"""Adam in each layer's Kronecker eigenbasis: the ``step_rule="eigenbasis_adam"`` of
:class:`kfrob.FrobPreconditionedSGD`.

A layer's gradient matrix ``V`` ``(k, out, in)`` is rotated into the eigenbases of its
factors, ``A = Q_A diag(e_A) Q_Aᵀ`` and ``G = Q_G diag(e_G) Q_Gᵀ`` (from the layer's last
exact-damping refresh; a diagonal or identity side's basis is the coordinate basis), and
Adam runs on the rotated entries:

    m ← β₁ m + (1 − β₁) V                          (in the parameters' own coordinates)
    v ← β₂ v + (1 − β₂) (Q_Gᵀ V Q_A)²              (elementwise, in the eigenbasis)
    Δ = Q_G [ (Q_Gᵀ m Q_A / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) ] Q_Aᵀ

and the parameters move by ``−lr · Δ`` (with decoupled weight decay ``−lr · wd · W``, as
in AdamW). This is SOAP's rule (Vyas et al., 2025) with K-FAC's factors in place of
Shampoo's: K-FAC supplies the directions, Adam's second moment the scale along each, so the
step needs neither damping nor a KL clip to be well scaled. The first moment lives in the
parameters' coordinates and is rotated each step, so a refresh of the bases never stales
it; the second moment is kept across refreshes. Between refreshes the rotated first moment
``Q_Gᵀ m Q_A`` is advanced by the same recursion with the rotated gradient (the rotation is
linear), so a step rotates twice (the gradient in, the direction out), not three times; it
is rotated afresh from ``m`` after each refresh. Parameters without Kronecker factors get
plain Adam (their basis is the coordinate basis).

Rotated entries whose root mean square ``√v`` is at the rounding level of the rotation
(at most ``n · ε_machine`` times the largest entry mixed into them, ``n`` the width mixed
over) take no step: the gradient has no component there (e.g. along the all-ones direction
of a softmax layer's outputs, where the loss is constant), so they are rounding noise,
which Adam's normalisation would otherwise turn into steps as long as any other. A side
held in coordinates (diagonal, identity) mixes nothing: an embedding's column of a rare
token is measured against itself, not against the common tokens'.

A layer whose inverse holds no eigenbases (a structured side: low-rank or block-diagonal,
under ``damping_method="exact_where_dense"``) runs Adam in its own coordinates and takes
the K-FAC direction of the bias-corrected first moment at the length of that Adam step,
``Δ = D · ‖N‖_F / ‖D‖_F`` with ``D = (A ⊗ G + λI)⁻¹ m̂`` and ``N = m̂ / (√v̂ + ε)`` (as
:mod:`kfrob.adam_grafted` does): rotating a wide side every step would cost more than the
layer's own pass, and the structured inverse keeps the curvature's direction for less.

State per parameter, in ``optimizer.state[p]``: ``"step"``, ``"exp_avg"`` and
``"exp_avg_sq"``, parameter-shaped, except that a layer's weight holds its layer's
``(k, out, in)`` matrices (``m`` in the parameters' coordinates, ``v`` rotated, and
``"exp_avg_rotated"``, ``m`` in the eigenbases, so that a checkpoint resumes bit for bit)
and its bias none of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfrob.adam import advance_moments, normalised
from kfrob.finite import select
from kfrob.kronecker import EigenInverse, InverseFactors, rotate

__all__ = ["EIGENBASIS_ADAM_DEFAULTS", "adam_directions", "held_bases"]

#: what ``step_rule="eigenbasis_adam"`` changes in the defaults of the flat keywords: exact
#: eigenbases where every side of a layer is dense (``"exact_where_dense"``; the cost model
#: makes wide sides low-rank, and those layers graft), no KL clip, a slower schedule (its
#: bases move slowly: factors every 5 steps and bases every 20 cost less per step than
#: every step and every 10 for about the same steps to target), and the empirical Fisher
#: (Adam's second moment sets the scale, so the factors only supply the bases, and the
#: empirical ones need no sampled backward pass: AdamW's transformer loss in 0.65× its time
#: against 0.70× with the MC Fisher, the same steps on the MLP); see
#: ``docs/performance.md#step-rules``
EIGENBASIS_ADAM_DEFAULTS = {
    "damping_method": "exact_where_dense",
    "kl_clip": None,
    "factor_update_freq": 5,
    "inverse_update_freq": 20,
    "fisher": "empirical",
}


#: the smallest K-FAC norm a grafted direction is scaled from (a zero one stays zero)
_TINY = 1e-30


def _rotate(
    matrix: Tensor, inverse: EigenInverse | InverseFactors | None, back: bool = False
) -> Tensor:
    """Into (or, with ``back``, out of) the eigenbases of ``inverse``; none: unrotated."""
    if not isinstance(inverse, EigenInverse):
        return matrix
    return rotate(matrix, inverse.codomain, inverse.domain, back)


def _support(v: Tensor, inverse: EigenInverse) -> Tensor | float:
    """``(k, out, in)``: 1 where an entry's root mean square ``√v`` is above the rounding
    floor of the rotation, else 0. A rotated side mixes the entries along its dimension, so
    the floor is ``n · ε_machine`` times the largest entry the rotation mixed into this one
    (``n`` the width it mixed over); with no side rotated there is no floor (``1.0``)."""
    mixed = [
        d for d, side in ((-2, inverse.codomain), (-1, inverse.domain)) if side.basis is not None
    ]
    if not mixed:
        return 1.0
    rms = v.sqrt()
    width = sum(v.shape[d] for d in mixed)
    floor = rms.amax(dim=mixed, keepdim=True) * (width * torch.finfo(v.dtype).eps)
    return (rms > floor).to(v.dtype)


def _bases_of(inverse: EigenInverse) -> tuple[Tensor | None, Tensor | None]:
    return inverse.codomain.basis, inverse.domain.basis


def _rotated_mean(
    kept: dict[Tensor, Any], state: dict[str, Any], weight: Tensor, inverse: EigenInverse,
    m: Tensor, rotated: Tensor, finite: Tensor, beta1: float,
) -> Tensor:  # fmt: skip
    """``Q_Gᵀ m Q_A`` for the layer of ``weight``: the state's ``"exp_avg_rotated"``
    advanced by ``β₁`` and the rotated gradient while ``kept`` says it was rotated into
    these bases, else rotated afresh (after a refresh, or with nothing kept)."""
    bases = _bases_of(inverse)
    previous, held = kept.get(weight), state.get("exp_avg_rotated")
    fresh = previous is None or any(a is not b for a, b in zip(previous, bases, strict=True))
    if held is None or fresh:
        mean = _rotate(m, inverse)
    else:
        mean = select(finite, torch.lerp(held, rotated, 1 - beta1), held)
    kept[weight], state["exp_avg_rotated"] = bases, mean
    return mean


def held_bases(
    layers: Mapping[Tensor, tuple[Any, EigenInverse | InverseFactors | None]],
    state: Mapping[Tensor, dict[str, Any]],
) -> dict[Tensor, Any]:
    """What :func:`adam_directions` keeps in ``rotated_means`` for a state just loaded
    together with its inverses: each layer's rotated first moment was rotated into the
    bases of the inverse it was saved with."""
    return {
        weight: _bases_of(inverse)
        for weight, (_, inverse) in layers.items()
        if isinstance(inverse, EigenInverse) and "exp_avg_rotated" in state.get(weight, {})
    }


@torch.no_grad()
def adam_directions(
    groups: list[dict[str, Any]],
    state: Mapping[Tensor, dict[str, Any]],
    directions: dict[Tensor, Tensor],
    layers: Mapping[Tensor, tuple[Any, EigenInverse | InverseFactors | None]],
    finite: Tensor,
    rotated_means: dict[Tensor, Any],
) -> None:
    """Replace each entry of ``directions`` (raw gradients) by its Adam direction ``Δ``.

    ``layers`` maps each preconditioned layer's weight to ``(its LayerMath, its inverse
    or None)`` (an :class:`InverseFactors` grafts, see the module docstring); a layer's
    weight and bias share one rotated second moment, so the layer's whole matrix moves
    together. ``groups`` are the optimizer's parameter groups (``betas``, ``eps``);
    ``state`` its per-parameter state (with each rotated layer's rotated first moment);
    ``rotated_means`` records the bases each was rotated into (the optimizer's; rebuilt by
    :func:`held_bases` when a state is loaded)."""
    settings = {p: g for g in groups for p in g["params"]}
    done: set[Tensor] = set()
    for weight, (math, inverse) in layers.items():
        if weight not in directions or not math.covers(directions):
            continue
        group = settings[weight]
        (beta1, beta2), eps = group["betas"], group["eps"]
        gradient = math.gradient_matrix(directions).to(math.factor_dtype)  # type: ignore[union-attr]
        rotated = _rotate(gradient, inverse)
        if "exp_avg" not in state[weight]:  # a fresh state: nothing kept applies
            rotated_means.pop(weight, None)
        m, v, step = advance_moments(state[weight], gradient, rotated, finite, beta1, beta2)
        if isinstance(inverse, EigenInverse):
            mean = _rotated_mean(
                rotated_means, state[weight], weight, inverse, m, rotated, finite, beta1
            )  # fmt: skip
            adam = normalised(mean, v, step, beta1, beta2, eps) * _support(v, inverse)
            direction = _rotate(adam, inverse, back=True)
        else:
            direction = normalised(m, v, step, beta1, beta2, eps)
        if isinstance(inverse, InverseFactors):
            direction = _grafted(inverse, m, direction, step, beta1)
        for p, value in math.split(direction).items():
            directions[p] = value.to(p.dtype)
            done.add(p)
    for p, gradient in directions.items():
        if p in done:
            continue
        group = settings[p]
        (beta1, beta2), eps = group["betas"], group["eps"]
        dense = gradient.to_dense() if gradient.is_sparse else gradient
        m, v, step = advance_moments(state[p], dense, dense, finite, beta1, beta2)
        directions[p] = normalised(m, v, step, beta1, beta2, eps)


def _grafted(
    inverse: InverseFactors, m: Tensor, adam: Tensor, step: Tensor, beta1: float
) -> Tensor:
    """``D · ‖N‖_F / ‖D‖_F``: the K-FAC direction ``D`` of the bias-corrected first moment
    at the length of the Adam direction ``N`` (``adam``)."""
    direction = inverse.apply(m / (1 - beta1 ** step.clamp(min=1)))
    length = direction.norm().clamp(min=_TINY)
    return direction * (adam.norm() / length)
