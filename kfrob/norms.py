"""Frobenius-type inner products and norms of linear maps between inner-product spaces.

Setting
-------
A layer weight ``S`` of shape ``(..., out, in)`` is a linear map from the *domain*
X = R^in to the *co-domain* Y = R^out.  Each space carries an inner product given by
a symmetric positive definite (SPD) Gram matrix:

* domain:     ⟨u, v⟩_X = uᵀ M_X v,  with ``domain``   = M_X of shape ``(..., in, in)``;
* co-domain:  ⟨y, w⟩_Y = yᵀ M_Y w,  with ``codomain`` = M_Y of shape ``(..., out, out)``.

The Frobenius-type inner product of two maps S, T of shape ``(..., out, in)`` is

    ⟨S, T⟩ = tr(M_X⁻¹ Sᵀ M_Y T),        ‖S‖ = sqrt(⟨S, S⟩).

It does not depend on the coordinates chosen in X and Y, only on the two inner
products.  Identity Grams give the classical Frobenius product ``(S * T).sum()``.

Two readings of the size of S
-----------------------------
* Average response: ‖S‖² = E‖S x‖²_{M_Y} for x ~ N(0, M_X⁻¹).
* Maximal response: the operator norm sup_x ‖S x‖_{M_Y} / ‖x‖_{M_X}, which equals the
  square root of the largest generalised eigenvalue of the pencil (Sᵀ M_Y S, M_X).

Both are Schatten norms (p = 2 and p = ∞) of the singular values of the "whitened"
matrix M_Y^{1/2} S M_X^{-1/2}; p = 1 gives the nuclear norm.

K-FAC
-----
K-FAC corresponds to M_X⁻¹ = A (covariance of the layer inputs) and M_Y = G (the
Fisher factor of the output gradients).  Because A is the *inverse* domain Gram, every
function that takes ``domain`` also takes the keyword ``domain_inverse`` (M_X⁻¹ given
directly); the two are mutually exclusive and ``domain_inverse`` is used as given,
never inverted back.  With it, ``steepest_descent(grad, codomain=G, domain_inverse=A)``
is the K-FAC step −G⁻¹ grad A⁻¹.

Conventions
-----------
* ``None`` for a Gram means the identity and costs nothing.
* All functions broadcast over leading (batch) dimensions of the matrix and the Grams
  and are differentiable with autograd.  Only real floating-point tensors are intended.
* Shape errors always raise ``ValueError``.  With ``check=True`` (the default) the Grams
  are also checked to be symmetric (up to a relative tolerance sqrt(eps) of the dtype)
  and positive definite; this needs a host synchronisation.  ``check=False`` skips
  these value checks; an invalid Gram then silently yields NaN or meaningless values.
* Solves go through Cholesky factorisations; no explicit inverse is ever formed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfrob.grams import (
    apply_domain,
    apply_gram,
    check_gram,
    check_matrix,
    safe_denominator,
    singular_values,
    times_domain_factor,
    validate,
)

__all__ = [
    "average_response",
    "frobenius_inner",
    "frobenius_norm",
    "metric_trace",
    "nuclear_to_frobenius_ratio",
    "operator_norm",
    "riesz_representative",
    "schatten_norm",
    "stable_rank",
    "steepest_descent",
]


# -------------------------------------------------------------------------- public API


def metric_trace(B: Tensor, gram: Tensor | None = None, *, check: bool = True) -> Tensor:
    """Trace of a bilinear form relative to an inner product: tr(gram⁻¹ B).

    The bilinear form is b(u, v) = uᵀ B v on R^n and the inner product is
    ⟨u, v⟩ = uᵀ gram v.  For any basis e_1..e_n that is orthonormal for the inner
    product, tr(gram⁻¹ B) = Σ_i b(e_i, e_i), so the value is basis independent.

    Link with the Frobenius-type product: for maps S, T : X → Y, the bilinear form
    (u, v) ↦ ⟨S u, T v⟩_{M_Y} = uᵀ (Sᵀ M_Y T) v on X has matrix B = Sᵀ M_Y T, and

        ⟨S, T⟩ = tr(M_X⁻¹ Sᵀ M_Y T) = metric_trace(Sᵀ M_Y T, M_X).

    (:func:`frobenius_inner` evaluates the same trace as an elementwise sum, which avoids
    forming the in×in matrix B.)

    Args:
        B: matrix of the bilinear form, shape ``(..., n, n)`` (need not be symmetric).
        gram: SPD Gram matrix of the inner product, shape ``(..., n, n)``; ``None`` means
            the identity (plain trace).
        check: validate that ``gram`` is symmetric positive definite.

    Returns:
        Tensor of shape ``(...)`` (the broadcast batch shape).
    """
    check_matrix(B, "B")
    n = B.shape[-1]
    if B.shape[-2] != n:
        raise ValueError(f"B must be square with shape (..., n, n), got shape {tuple(B.shape)}")
    if gram is not None:
        check_gram(gram, "gram", n, B.shape[:-2], "the size of B", check)
    return apply_gram(gram, B, inverse=True, right=False).diagonal(dim1=-2, dim2=-1).sum(-1)


def frobenius_inner(
    S: Tensor,
    T: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Frobenius-type inner product ⟨S, T⟩ = tr(M_X⁻¹ Sᵀ M_Y T).

    Equivalently ⟨S, T⟩ = metric_trace(Sᵀ M_Y T, M_X): the trace over the domain of the
    bilinear form (u, v) ↦ ⟨S u, T v⟩_{M_Y}.  It is evaluated as the elementwise sum
    Σ (S M_X⁻¹) ⊙ (M_Y T), so identity Grams reduce exactly to ``(S * T).sum((-2, -1))``.

    Args:
        S, T: maps X → Y, shape ``(..., out, in)`` (batch dims broadcast).
        domain: M_X, SPD, shape ``(..., in, in)``; ``None`` means identity.
        codomain: M_Y, SPD, shape ``(..., out, out)``; ``None`` means identity.
        domain_inverse: M_X⁻¹ given directly (e.g. the K-FAC input covariance A), shape
            ``(..., in, in)``; mutually exclusive with ``domain``.
        check: validate the Grams (symmetric positive definite).

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    check_matrix(S, "S")
    check_matrix(T, "T")
    if T.shape[-2:] != S.shape[-2:]:
        raise ValueError(
            f"T must have the same matrix shape as S, got {tuple(T.shape[-2:])} and "
            f"{tuple(S.shape[-2:])}"
        )
    try:
        batch = torch.broadcast_shapes(S.shape[:-2], T.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"batch shapes of S {tuple(S.shape[:-2])} and T {tuple(T.shape[:-2])} do not broadcast"
        ) from None
    validate(S, domain, codomain, domain_inverse, check, batch=batch)
    S_dual = apply_domain(S, domain, domain_inverse, inverse=True)  # S M_X⁻¹
    T_dual = apply_gram(codomain, T, inverse=False, right=False)  # M_Y T
    return (S_dual * T_dual).sum((-2, -1))


def frobenius_norm(
    S: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Frobenius-type norm ‖S‖ = sqrt(tr(M_X⁻¹ Sᵀ M_Y S)).

    This is the root-mean-square response sqrt(E‖S x‖²_{M_Y}) for x ~ N(0, M_X⁻¹), and
    the Schatten-2 norm of M_Y^{1/2} S M_X^{-1/2}.

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    sq = frobenius_inner(S, S, domain, codomain, domain_inverse=domain_inverse, check=check)
    return sq.clamp_min(0).sqrt()  # clamp guards against tiny negative round-off


def riesz_representative(
    grad: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Riesz representative R = M_Y⁻¹ grad M_X of the Euclidean pairing with ``grad``.

    R is the unique map with ⟨R, Δ⟩ = Σ grad ⊙ Δ for every Δ, since
    tr(M_X⁻¹ (M_X gradᵀ M_Y⁻¹) M_Y Δ) = tr(gradᵀ Δ).  For K-FAC (M_X⁻¹ = A, M_Y = G)
    this is the natural-gradient direction G⁻¹ grad A⁻¹.

    Args:
        grad: Euclidean gradient (a covector), shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of shape ``(..., out, in)`` (broadcast batch shape).
    """
    validate(grad, domain, codomain, domain_inverse, check, name="grad")
    grad_mx = apply_domain(grad, domain, domain_inverse, inverse=False)  # grad M_X
    return apply_gram(codomain, grad_mx, inverse=True, right=False)  # M_Y⁻¹ grad M_X


def steepest_descent(
    grad: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Steepest-descent step Δ = −M_Y⁻¹ grad M_X = −riesz_representative(grad).

    Δ is the unique minimiser of Σ grad ⊙ Δ + ½‖Δ‖² in the Frobenius-type norm (the
    objective is ⟨R, Δ⟩ + ½⟨Δ, Δ⟩ with R the Riesz representative, minimised at Δ = −R).

    Args:
        grad: Euclidean gradient, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of shape ``(..., out, in)`` (broadcast batch shape).
    """
    rep = riesz_representative(grad, domain, codomain, domain_inverse=domain_inverse, check=check)
    return -rep


def average_response(
    S: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    n_samples: int = 1024,
    generator: torch.Generator | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Monte Carlo estimate of the average squared response E‖S x‖²_{M_Y}, x ~ N(0, M_X⁻¹).

    Samples x = F z with z ~ N(0, I) drawn from ``generator`` and F the Cholesky factor
    of M_X⁻¹ (if ``domain_inverse`` is given) or F = L⁻ᵀ with M_X = L Lᵀ (if ``domain`` is
    given); both satisfy Cov(x) = F Fᵀ = M_X⁻¹.  The estimate is unbiased for
    ``frobenius_norm(S, ...) ** 2``, since E[xᵀ Sᵀ M_Y S x] = tr(M_X⁻¹ Sᵀ M_Y S); its
    relative standard deviation is at most sqrt(2 / n_samples).  Meant for tests and
    illustration; use :func:`frobenius_norm` for the exact value.

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.
        n_samples: number of samples x (positive).
        generator: ``torch.Generator`` for z (on the device of ``S``); ``None`` uses the
            global generator.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    validate(S, domain, codomain, domain_inverse, check)
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    SF = times_domain_factor(S, domain, domain_inverse)  # (..., out, in)
    z = torch.randn(
        (*SF.shape[:-2], S.shape[-1], n_samples),
        generator=generator,
        dtype=S.dtype,
        device=S.device,
    )
    y = SF @ z  # columns are S x with x = F z ~ N(0, M_X⁻¹); shape (..., out, n_samples)
    sq_norms = (y * apply_gram(codomain, y, inverse=False, right=False)).sum(-2)  # yᵀ M_Y y
    return sq_norms.mean(-1)


def operator_norm(
    S: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Operator norm sup_x ‖S x‖_{M_Y} / ‖x‖_{M_X} (the maximal response).

    Equals sqrt(λ_max) for the largest generalised eigenvalue of Sᵀ M_Y S v = λ M_X v, and
    the largest singular value of M_Y^{1/2} S M_X^{-1/2} (computed with Cholesky factors).

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    validate(S, domain, codomain, domain_inverse, check)
    return singular_values(S, domain, codomain, domain_inverse)[..., 0]


def schatten_norm(
    S: Tensor,
    p: float,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Schatten-p norm: the ℓ_p norm of the singular values of M_Y^{1/2} S M_X^{-1/2}.

    ``p = float('inf')`` is :func:`operator_norm`, ``p = 2`` is :func:`frobenius_norm`
    and ``p = 1`` is the nuclear norm.  The singular values do not depend on which
    square roots of the Grams are used (see the module notes); Cholesky factors are used.

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        p: exponent in [1, inf].
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    if not p >= 1:  # also rejects NaN
        raise ValueError(f"p must be in [1, inf] for a Schatten norm, got p={p}")
    validate(S, domain, codomain, domain_inverse, check)
    sv = singular_values(S, domain, codomain, domain_inverse)
    return torch.linalg.vector_norm(sv, ord=p, dim=-1)


def nuclear_to_frobenius_ratio(
    S: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Ratio of the nuclear (Schatten-1) to the Frobenius-type (Schatten-2) norm.

    Scale invariant and between 1 and sqrt(rank S) (by Cauchy–Schwarz on the singular
    values): a smooth effective-rank measure.  A zero matrix returns 0 (not NaN),
    consistent with rank 0.

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    validate(S, domain, codomain, domain_inverse, check)
    sv = singular_values(S, domain, codomain, domain_inverse)
    fro = torch.linalg.vector_norm(sv, dim=-1)
    return sv.sum(-1) / safe_denominator(fro)


def stable_rank(
    S: Tensor,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    *,
    domain_inverse: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Stable rank ‖S‖² / ‖S‖²_op (Frobenius-type over operator norm, squared).

    Scale invariant and between 1 and rank S.  A zero matrix returns 0 (not NaN),
    consistent with rank 0.

    Args:
        S: map X → Y, shape ``(..., out, in)``.
        domain, codomain, domain_inverse, check: as in :func:`frobenius_inner`.

    Returns:
        Tensor of the broadcast batch shape ``(...)``.
    """
    validate(S, domain, codomain, domain_inverse, check)
    sv = singular_values(S, domain, codomain, domain_inverse)
    return sv.square().sum(-1) / safe_denominator(sv[..., 0].square())
