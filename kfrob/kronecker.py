"""Damped inverses of Kronecker-factored metrics, as pure functions on tensors.

A layer's curvature is ``F = A ⊗ G`` acting on ``vec(V)`` (column-major), so that
``F vec(V) = vec(G V A)`` for a gradient matrix ``V`` of shape ``(out, in)``, ``A``
``(in, in)`` and ``G`` ``(out, out)``. All functions take a leading block dimension
(``(k, in, in)``, ``(k, out, out)``, ``(k, out, in)``).

Each side ``M`` is held as a :class:`Side`: a basis ``Q`` (``None`` for a diagonal metric)
and eigenvalues ``e`` with ``M = Q diag(e) Qᵀ``. Two dampings are offered:

* **exact** (eigenvalue) damping: ``(A ⊗ G + λ I)^{-p} vec(V)`` is, in the two eigenbases,
  the elementwise scaling ``Ṽ / (e_G e_Aᵀ + λ)^p`` of ``Ṽ = Q_Gᵀ V Q_A``;
* **factored** (π-) damping: ``((A + π√λ I) ⊗ (G + √λ/π I))^{-p}`` with
  ``π² = (tr A / dim A) / (tr G / dim G)``, either in the eigenbases (the same scaling with
  ``(e_G + √λ/π)^p (e_A + π√λ)^p``) or, for ``p = 1``, with Cholesky inverses.

An *identity* side is exact, not estimated: it is never damped. With one estimated side the
whole damping ``λ`` goes to it, and with none the preconditioner is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kfrob.finite import all_finite
from kfrob.structure import (
    BlockDiagonalPower,
    DiagonalPower,
    LowRankPower,
    SideOperator,
    apply_left,
    apply_right,
)

__all__ = [
    "EigenInverse",
    "InverseFactors",
    "Side",
    "apply_eigen",
    "apply_inverses",
    "decompose",
    "decompose_all",
    "dense_power",
    "exact_scaling",
    "factored_damping",
    "factored_inverses",
    "factored_powers",
    "factored_scaling",
    "rotate",
    "rotate_by",
    "shifted_inverse",
    "subspace_step",
]


@dataclass
class Side:
    """One Kronecker factor as ``Q diag(eigenvalues) Qᵀ``; ``basis=None`` means ``Q = I``.

    ``estimated`` is False for an exact identity metric, which is never damped.
    """

    basis: Tensor | None
    eigenvalues: Tensor
    estimated: bool = True


@dataclass
class EigenInverse:
    """``(A ⊗ G + λI)^{-p}`` held as the two eigenbases and the elementwise scaling."""

    codomain: Side
    domain: Side
    scaling: Tensor

    def apply(self, matrix: Tensor) -> Tensor:
        return apply_eigen(matrix, self.codomain, self.domain, self.scaling)

    @property
    def eigenbases(self) -> tuple[Tensor | None, Tensor | None]:
        """``(Q_G, Q_A)`` (``None``: the coordinate basis of a diagonal or identity side)."""
        return self.codomain.basis, self.domain.basis

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "eigen",
            "codomain_basis": self.codomain.basis,
            "codomain_eigenvalues": self.codomain.eigenvalues,
            "codomain_estimated": self.codomain.estimated,
            "domain_basis": self.domain.basis,
            "domain_eigenvalues": self.domain.eigenvalues,
            "domain_estimated": self.domain.estimated,
            "scaling": self.scaling,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> EigenInverse:
        def side(prefix: str) -> Side:
            basis = state[f"{prefix}_basis"]
            return Side(
                None if basis is None else basis.to(device),
                state[f"{prefix}_eigenvalues"].to(device),
                state[f"{prefix}_estimated"],
            )

        return cls(side("codomain"), side("domain"), state["scaling"].to(device))


@dataclass
class InverseFactors:
    """Damped powers of the two sides, each a dense matrix, a structured operator
    (:mod:`kfrob.structure`) or ``None`` for an identity side:
    ``vec(V) ↦ vec(G_d⁻¹ V A_d⁻¹)``."""

    codomain: SideOperator
    domain: SideOperator

    def apply(self, matrix: Tensor) -> Tensor:
        return apply_inverses(matrix, self)

    @property
    def eigenbases(self) -> None:
        """No eigenbases: the sides are matrix powers or structured operators."""
        return None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"kind": "factored"}
        for prefix, side in (("codomain", self.codomain), ("domain", self.domain)):
            if side is None or isinstance(side, Tensor):
                state[prefix] = side
                continue
            state[prefix] = None
            state[f"{prefix}_structure"] = _STRUCTURES[type(side)]
            state.update(side.state(prefix))
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device) -> InverseFactors:
        def side(prefix: str) -> SideOperator:
            structure = state.get(f"{prefix}_structure")
            if structure is not None:
                kind = next(k for k, name in _STRUCTURES.items() if name == structure)
                return kind.from_state(state, prefix, device)
            value = state[prefix]
            return None if value is None else value.to(device)

        return cls(side("codomain"), side("domain"))


_STRUCTURES: dict[type, str] = {
    LowRankPower: "low_rank",
    DiagonalPower: "diagonal",
    BlockDiagonalPower: "block_diagonal",
}


def decompose(factor: Tensor, diagonal: bool = False) -> Side | None:
    """Eigendecomposition of a symmetric PSD ``factor`` ``(k, n, n)``, or of a diagonal one
    given as ``(k, n)``.

    A full decomposition uses ``torch.linalg.eigh``; if that fails or yields non-finite
    values it is retried once in float64 with a jitter of ``1e-6·mean(diag)``. Returns
    ``None`` when both attempts fail (callers then keep their last good decomposition).
    Negative round-off eigenvalues are clipped to zero.
    """
    if diagonal:  # a diagonal factor is held as its diagonal (k, n)
        return Side(None, factor.clamp(min=0))
    for attempt in range(2):
        matrix = factor if attempt == 0 else factor.double()
        if attempt == 1:
            jitter = 1e-6 * torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1).abs() + 1e-12
            matrix = matrix + jitter[:, None, None] * torch.eye(
                matrix.shape[-1], dtype=matrix.dtype, device=matrix.device
            )
        try:
            eigenvalues, basis = torch.linalg.eigh(matrix)
        except RuntimeError:
            continue
        if bool(all_finite([eigenvalues, basis])):
            # eigh returns column-major bases; row-major ones multiply the same on every
            # rank, whichever way the basis arrived (BLAS rounds layouts differently)
            basis = basis.to(factor.dtype).contiguous()
            return Side(basis, eigenvalues.to(factor.dtype).clamp(min=0))
    return None


def subspace_step(factor: Tensor, basis: Tensor) -> Side | None:
    """One step of subspace (orthogonal) iteration for a symmetric PSD ``factor``
    ``(k, n, n)`` from a previous orthonormal eigenbasis ``basis`` ``(k, n, n)`` whose
    columns are ordered by ascending eigenvalue.

    ``Q, _ = qr(M Q_prev)`` with the columns taken in descending order, so that the dominant
    directions lead the orthogonalisation; the eigenvalues are the Rayleigh quotients
    ``diag(Qᵀ M Q)``, sorted ascending with their columns and clipped at zero. Costs two
    matrix products and a QR factorisation instead of an eigendecomposition; ``M ≈ Q diag(e)
    Qᵀ`` is exact when ``Q_prev`` spans ``M``'s eigenvectors and improves with every step as
    the factor drifts slowly. Returns ``None`` if anything is non-finite.
    """
    q, _ = torch.linalg.qr(factor @ basis.flip(-1))
    eigenvalues = (q * (factor @ q)).sum(-2)
    order = eigenvalues.argsort(dim=-1)
    q = q.gather(-1, order[..., None, :].expand_as(q))
    eigenvalues = eigenvalues.gather(-1, order)
    if not bool(all_finite([eigenvalues, q])):
        return None
    return Side(q.contiguous(), eigenvalues.clamp(min=0))


def decompose_all(
    factors: list[Tensor], previous: list[Tensor | None] | None = None
) -> list[Side | None]:
    """:func:`decompose` of many full factors ``(k_i, n_i, n_i)``, batched: one
    ``torch.linalg.eigh`` call for all factors of the same size, dtype and device.

    A factor with a ``previous`` eigenbasis (same shape) takes one :func:`subspace_step`
    from it instead, batched the same way. If a batch fails (eigh even in float64, or a
    subspace step), its factors are decomposed one by one with ``eigh``, so that one bad
    factor costs only its own decomposition (its entry is then ``None``)."""
    previous = [None] * len(factors) if previous is None else previous
    groups: dict[tuple[int, torch.dtype, torch.device, bool], list[int]] = {}
    for i, factor in enumerate(factors):
        key = (factor.shape[-1], factor.dtype, factor.device, previous[i] is not None)
        groups.setdefault(key, []).append(i)
    sides: list[Side | None] = [None] * len(factors)
    for (*_, warm), members in groups.items():
        factor = _stacked([factors[i] for i in members])
        if warm:
            bases = [previous[i] for i in members]
            batch = subspace_step(factor, _stacked(bases))  # type: ignore[arg-type]
        else:
            batch = decompose(factor)
        if len(members) == 1 and (batch is not None or not warm):
            sides[members[0]] = batch
            continue
        if batch is None:
            for i in members:
                sides[i] = decompose(factors[i])
            continue
        assert batch.basis is not None
        counts = [factors[i].shape[0] for i in members]
        pieces = zip(batch.basis.split(counts), batch.eigenvalues.split(counts), strict=True)
        for i, (basis, eigenvalues) in zip(members, pieces, strict=True):
            # fresh tensors rather than views at an offset: BLAS kernels may round
            # differently for data at another alignment (and ranks must agree bit for bit)
            sides[i] = Side(basis.clone(), eigenvalues.clone())
    return sides


def _stacked(tensors: list[Tensor]) -> Tensor:
    """The tensors concatenated along the block dimension; a lone tensor is not copied."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def factored_damping(
    codomain: Side, domain: Side, damping: float | Tensor
) -> tuple[Tensor, Tensor]:
    """π-split of ``λ`` into per-side dampings ``(d_G, d_A)`` of shape ``(k, 1)``.

    Both sides estimated: ``d_A = π√λ``, ``d_G = √λ/π`` with ``π² = mean(e_A)/mean(e_G)``
    (guarded against zero traces). One estimated side gets ``λ``; identity sides get 0.
    """
    e_g, e_a = codomain.eigenvalues, domain.eigenvalues
    zero = torch.zeros_like(e_g[..., :1])
    if codomain.estimated and domain.estimated:
        tiny = torch.finfo(e_g.dtype).tiny
        pi = torch.sqrt((e_a.mean(-1, keepdim=True) + tiny) / (e_g.mean(-1, keepdim=True) + tiny))
        root = torch.as_tensor(damping, dtype=e_g.dtype, device=e_g.device).sqrt()
        return root / pi, root * pi
    lam = zero + damping
    return (lam if codomain.estimated else zero), (lam if domain.estimated else zero)


def exact_scaling(
    codomain: Side, domain: Side, damping: float | Tensor, exponent: float = 1.0
) -> Tensor:
    """Exact damping's elementwise scaling ``(e_G e_Aᵀ + λ)^{-p}`` ``(k, out, in)`` in the
    eigenbases (no ``λ`` if both sides are identities)."""
    e_g, e_a = codomain.eigenvalues, domain.eigenvalues
    estimated = codomain.estimated or domain.estimated
    denominator = e_g[..., :, None] * e_a[..., None, :] + (damping if estimated else 0.0)
    return denominator.pow(-exponent)


def factored_scaling(
    codomain: Side, domain: Side, damping: float | Tensor, exponent: float = 1.0
) -> Tensor:
    """Factored damping's elementwise scaling ``((e_G + d_G)(e_A + d_A)ᵀ)^{-p}``
    ``(k, out, in)`` with the per-side dampings of :func:`factored_damping`."""
    e_g, e_a = codomain.eigenvalues, domain.eigenvalues
    d_g, d_a = factored_damping(codomain, domain, damping)
    return ((e_g + d_g)[..., :, None] * (e_a + d_a)[..., None, :]).pow(-exponent)


def rotate(matrix: Tensor, codomain: Side, domain: Side, back: bool = False) -> Tensor:
    """``Q_Gᵀ V Q_A`` (with ``back``, ``Q_G V Q_Aᵀ``) for ``V = matrix`` ``(k, out, in)``; a
    side without a basis (``Q = I``) is not rotated."""
    return rotate_by(matrix, codomain.basis, domain.basis, back)


def rotate_by(matrix: Tensor, q_g: Tensor | None, q_a: Tensor | None, back: bool = False) -> Tensor:
    """``Q_Gᵀ V Q_A`` (with ``back``, ``Q_G V Q_Aᵀ``) for ``V = matrix`` ``(..., out, in)``
    and bases ``(..., n, n)`` broadcast over the leading dimensions; ``None``: ``Q = I``."""
    if back:  # the reverse order of the way in
        if q_a is not None:
            matrix = matrix @ q_a.mT
        return matrix if q_g is None else q_g @ matrix
    if q_g is not None:
        matrix = q_g.mT @ matrix
    return matrix if q_a is None else matrix @ q_a


def apply_eigen(matrix: Tensor, codomain: Side, domain: Side, scaling: Tensor) -> Tensor:
    """``Q_G ((Q_Gᵀ V Q_A) ⊙ scaling) Q_Aᵀ`` for ``V = matrix`` ``(k, out, in)``."""
    return rotate(rotate(matrix, codomain, domain) * scaling, codomain, domain, back=True)


def factored_inverses(
    codomain_factor: Tensor | None,
    domain_factor: Tensor | None,
    damping: float | Tensor,
) -> InverseFactors | None:
    """π-damped inverses ``(G + d_G I)⁻¹`` and ``(A + d_A I)⁻¹`` by Cholesky (``p = 1``).

    A factor of ``None`` is an identity side (never damped). ``π`` only needs the traces, so
    each side enters :func:`factored_damping` through its diagonal. Returns ``None`` if a
    Cholesky factorisation fails even after a float64 retry.
    """
    factors = (codomain_factor, domain_factor)
    device = next((f.device for f in factors if f is not None), None)
    sides = [
        Side(None, torch.ones(1, 1, device=device), estimated=False)
        if f is None
        else Side(None, torch.diagonal(f, dim1=-2, dim2=-1))
        for f in factors
    ]
    shifts = factored_damping(sides[0], sides[1], damping)
    try:
        inverses = [shifted_inverse(f, s) for f, s in zip(factors, shifts, strict=True)]
    except torch.linalg.LinAlgError:
        return None
    return InverseFactors(*inverses)


def factored_powers(
    codomain: Side, domain: Side, damping: float | Tensor, exponent: float
) -> InverseFactors:
    """π-damped matrix powers ``(G + d_G I)^{-p}`` and ``(A + d_A I)^{-p}`` from full
    eigendecompositions (``Q (e + d)^{-p} Qᵀ``); an identity side stays ``None``."""
    shifts = factored_damping(codomain, domain, damping)

    def power(side: Side, shift: Tensor) -> Tensor | None:
        if not side.estimated:
            return None
        assert side.basis is not None, "factored_powers needs full eigenbases"
        return (
            side.basis * (side.eigenvalues + shift).pow(-exponent)[..., None, :]
        ) @ side.basis.mT

    return InverseFactors(power(codomain, shifts[0]), power(domain, shifts[1]))


def shifted_inverse(factor: Tensor | None, shift: Tensor) -> Tensor | None:
    """``(factor + shift·I)⁻¹`` via Cholesky, retried in float64; ``None`` stays ``None``."""
    if factor is None:
        return None
    for matrix in (factor, factor.double()):
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        chol, info = torch.linalg.cholesky_ex(matrix + shift.to(matrix)[..., None] * eye)
        inverse = torch.cholesky_inverse(chol)
        if not bool(info.any()) and bool(all_finite([inverse])):
            return inverse.to(factor.dtype).contiguous()  # row-major, as in decompose
    raise torch.linalg.LinAlgError("Cholesky factorisation failed")


def apply_inverses(matrix: Tensor, inverses: InverseFactors) -> Tensor:
    """``G_d⁻¹ V A_d⁻¹``; a ``None`` side is the identity (either side may be structured).
    ``V`` is left as it was; the product ``G_d⁻¹ V``, when there is one, is a new tensor,
    which the domain side may overwrite (unless autograd records it)."""
    left = apply_left(inverses.codomain, matrix)
    owned = left is not matrix and not left.requires_grad
    return apply_right(left, inverses.domain, in_place=owned)


def dense_power(factor: Tensor, shift: Tensor, exponent: float) -> Tensor | None:
    """``(M + d I)^{-p}`` of a dense side: by Cholesky for ``p = 1``, else from ``eigh``
    (``None`` if that fails)."""
    if exponent == 1.0:
        try:
            return shifted_inverse(factor, shift)
        except torch.linalg.LinAlgError:
            return None
    side = decompose(factor)
    if side is None or side.basis is None:
        return None
    powers = (side.eigenvalues + shift).pow(-exponent)
    return (side.basis * powers[..., None, :]) @ side.basis.mT
