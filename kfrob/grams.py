"""Gram matrices of inner products: validation and the linear algebra on them.

The building blocks of :mod:`kfrob.norms`: a Gram ``M`` ``(..., n, n)`` (``None`` for the
identity) is checked for shape, symmetry and positive definiteness, and applied or solved
against matrices by Cholesky factorisations, never by explicit inverses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "apply_domain",
    "apply_gram",
    "check_gram",
    "check_matrix",
    "safe_denominator",
    "singular_values",
    "times_domain_factor",
    "validate",
]


# --------------------------------------------------------------------------- validation


def check_matrix(S: Tensor, name: str) -> None:
    if S.ndim < 2:
        raise ValueError(
            f"{name} must be a (batch of) matrix with shape (..., rows, cols), "
            f"got shape {tuple(S.shape)}"
        )


def check_gram(
    gram: Tensor, name: str, size: int, batch_shape: torch.Size, what: str, check: bool
) -> None:
    """Raise ValueError (naming ``name``) unless ``gram`` is a valid SPD Gram of ``size``.

    Shapes are always checked (free); symmetry and positive definiteness only if ``check``.
    """
    if gram.ndim < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(
            f"{name} must be square with shape (..., {size}, {size}), got shape {tuple(gram.shape)}"
        )
    if gram.shape[-1] != size:
        n = gram.shape[-1]
        raise ValueError(f"{name} is {n}x{n} but must be {size}x{size} to match {what}")
    try:
        torch.broadcast_shapes(batch_shape, gram.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{name} batch shape {tuple(gram.shape[:-2])} does not broadcast with the "
            f"batch shape {tuple(batch_shape)} of {what}"
        ) from None
    if not check:
        return
    if not gram.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {gram.dtype}")
    g = gram.detach()
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{name} has non-finite entries")
    tol = math.sqrt(torch.finfo(g.dtype).eps)
    asym = (g - g.mT).abs().amax((-2, -1))
    scale = g.abs().amax((-2, -1))
    if not bool((asym <= tol * scale).all()):
        raise ValueError(f"{name} is not symmetric: max |G - Gᵀ| exceeds {tol:.1e} times max |G|")
    if bool((torch.linalg.cholesky_ex(g).info != 0).any()):
        raise ValueError(f"{name} is not positive definite (Cholesky factorisation failed)")


def validate(
    S: Tensor,
    domain: Tensor | None,
    codomain: Tensor | None,
    domain_inverse: Tensor | None,
    check: bool,
    name: str = "S",
    batch: torch.Size | None = None,
) -> None:
    """Validate a map S (..., out, in) together with its domain and co-domain Grams.

    ``batch`` overrides the batch shape the Grams must broadcast with (default S's).
    """
    check_matrix(S, name)
    if domain is not None and domain_inverse is not None:
        raise ValueError("got both domain and domain_inverse; pass at most one of them")
    out, inn = S.shape[-2], S.shape[-1]
    batch = S.shape[:-2] if batch is None else batch
    grams = (
        (domain, "domain", inn, f"the number of columns (in) of {name}"),
        (domain_inverse, "domain_inverse", inn, f"the number of columns (in) of {name}"),
        (codomain, "codomain", out, f"the number of rows (out) of {name}"),
    )
    for gram, gram_name, size, what in grams:
        if gram is not None:
            check_gram(gram, gram_name, size, batch, what, check)


# ---------------------------------------------------------------------- linear algebra


def apply_gram(gram: Tensor | None, X: Tensor, *, inverse: bool, right: bool) -> Tensor:
    """Multiply X by a Gram or its inverse: G X, G⁻¹ X (``right=False``), X G, X G⁻¹.

    ``gram=None`` is the identity and returns X itself.  Inverses are applied by a
    Cholesky solve.
    """
    if gram is None:
        return X
    if not inverse:
        return X @ gram if right else gram @ X
    chol = torch.linalg.cholesky_ex(gram).L  # no error check: no host sync
    if right:
        # X G⁻¹ = (G⁻¹ Xᵀ)ᵀ because G is symmetric.
        return torch.cholesky_solve(X.mT, chol).mT
    return torch.cholesky_solve(X, chol)


def apply_domain(
    X: Tensor, domain: Tensor | None, domain_inverse: Tensor | None, *, inverse: bool
) -> Tensor:
    """Right-multiply by M_X (``inverse=False``) or M_X⁻¹, whichever Gram was given."""
    if domain_inverse is not None:
        return apply_gram(domain_inverse, X, inverse=not inverse, right=True)
    return apply_gram(domain, X, inverse=inverse, right=True)


def times_domain_factor(X: Tensor, domain: Tensor | None, domain_inverse: Tensor | None) -> Tensor:
    """Return X F for a square root F of the domain covariance: F Fᵀ = M_X⁻¹.

    With M_X⁻¹ = L Lᵀ given, F = L.  With M_X = L Lᵀ given, F = L⁻ᵀ (a triangular solve).
    """
    if domain_inverse is not None:
        return X @ torch.linalg.cholesky_ex(domain_inverse).L
    if domain is not None:
        chol = torch.linalg.cholesky_ex(domain).L
        return torch.linalg.solve_triangular(chol.mT, X, upper=True, left=False)
    return X


def singular_values(
    S: Tensor, domain: Tensor | None, codomain: Tensor | None, domain_inverse: Tensor | None
) -> Tensor:
    """Singular values (descending, shape (..., min(out, in))) of the whitened map.

    The whitened map is K = L_Yᵀ S F with M_Y = L_Y L_Yᵀ and F Fᵀ = M_X⁻¹ (Cholesky
    factors rather than symmetric square roots).  This choice does not matter: any two
    square roots of the same SPD matrix differ by an orthogonal factor (e.g.
    M_Y^{1/2} = U L_Yᵀ with U orthogonal), and orthogonal factors on either side leave
    singular values unchanged.  Equivalently, σ(K)² are the eigenvalues of
    K Kᵀ = L_Yᵀ (S M_X⁻¹ Sᵀ) L_Y, which is similar to M_Y S M_X⁻¹ Sᵀ.
    """
    K = times_domain_factor(S, domain, domain_inverse)
    if codomain is not None:
        K = torch.linalg.cholesky_ex(codomain).L.mT @ K
    return torch.linalg.svdvals(K)


def safe_denominator(x: Tensor) -> Tensor:
    """x with zeros replaced by ones, so that 0 / x is 0 (and its gradient finite)."""
    return torch.where(x > 0, x, torch.ones_like(x))
