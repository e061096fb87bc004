"""Tests for kfrob.norms against independent dense references (float64)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from kfrob.norms import (
    average_response,
    frobenius_inner,
    frobenius_norm,
    metric_trace,
    nuclear_to_frobenius_ratio,
    operator_norm,
    riesz_representative,
    schatten_norm,
    stable_rank,
    steepest_descent,
)

DTYPE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}
SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The matrices here are tiny: intra-op threads only add contention on busy CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- helpers


# Functions of one map and its two Grams, checked alike by several properties.
GRAM_FUNCTIONS = (
    frobenius_norm,
    operator_norm,
    riesz_representative,
    stable_rank,
    nuclear_to_frobenius_ratio,
)


def random_spd(n: int, gen: torch.Generator, batch: tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """Return (M, M⁻¹) with M = Q diag(λ) Qᵀ, λ in [e^-1.5, e^1.5]; the inverse is exact."""
    q, _ = torch.linalg.qr(torch.randn(*batch, n, n, generator=gen, dtype=DTYPE))
    lam = torch.exp(3 * torch.rand(*batch, n, generator=gen, dtype=DTYPE) - 1.5)
    m = (q * lam.unsqueeze(-2)) @ q.mT
    m_inv = (q / lam.unsqueeze(-2)) @ q.mT
    return (m + m.mT) / 2, (m_inv + m_inv.mT) / 2


def random_invertible(n: int, gen: torch.Generator) -> Tensor:
    """U diag(s) Vᵀ with s in [0.5, 2]: a well-conditioned invertible matrix."""
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    s = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=DTYPE)
    return (u * s) @ v.mT


def sym_power(m: Tensor, power: float) -> Tensor:
    """Symmetric matrix power via eigh (the reference route for square roots)."""
    lam, q = torch.linalg.eigh(m)
    return (q * lam.pow(power).unsqueeze(-2)) @ q.mT


def vec(S: Tensor) -> Tensor:
    """Column-major vectorisation."""
    return S.mT.reshape(-1)


def unvec(v: Tensor, out: int, inn: int) -> Tensor:
    return v.reshape(inn, out).mT


@dataclass
class Case:
    S: Tensor
    T: Tensor
    MX: Tensor  # dense domain Gram (identity when not passed)
    MX_inv: Tensor
    MY: Tensor  # dense co-domain Gram (identity when not passed)
    kwargs: dict[str, Any]  # Gram arguments as passed to the functions
    gen: torch.Generator


@st.composite
def cases(draw: st.DrawFn) -> Case:
    out = draw(st.integers(1, 5))
    inn = draw(st.integers(1, 5))
    domain_mode = draw(st.sampled_from(["none", "domain", "domain_inverse"]))
    with_codomain = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    S = torch.randn(out, inn, generator=gen, dtype=DTYPE)
    T = torch.randn(out, inn, generator=gen, dtype=DTYPE)
    MX, MX_inv = random_spd(inn, gen)
    MY, _ = random_spd(out, gen)
    kwargs: dict[str, Any] = {}
    if domain_mode == "none":
        MX = MX_inv = torch.eye(inn, dtype=DTYPE)
    else:
        kwargs[domain_mode] = MX if domain_mode == "domain" else MX_inv
    if with_codomain:
        kwargs["codomain"] = MY
    else:
        MY = torch.eye(out, dtype=DTYPE)
    return Case(S, T, MX, MX_inv, MY, kwargs, gen)


def dense_inner(c: Case, S: Tensor, T: Tensor) -> Tensor:
    """vec(S)ᵀ (M_X⁻¹ ⊗ M_Y) vec(T)."""
    return vec(S) @ torch.kron(c.MX_inv, c.MY) @ vec(T)


def whitened_svdvals(c: Case, S: Tensor) -> Tensor:
    """Singular values of M_Y^{1/2} S M_X^{-1/2} with symmetric square roots."""
    return torch.linalg.svdvals(sym_power(c.MY, 0.5) @ S @ sym_power(c.MX, -0.5))


def close(a: Tensor, b: Tensor | float, **tol: float) -> None:
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), **(tol or TOL))


P_VALUES = st.one_of(st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.floats(1.0, 8.0))


# ----------------------------------------------------------------- identity Gram = classical


@SETTINGS
@given(c=cases(), p=P_VALUES)
def test_identity_grams_reproduce_classical_norms(c: Case, p: float) -> None:
    S = c.S
    out, inn = S.shape
    eye_kwargs = [
        {},
        {"domain": torch.eye(inn, dtype=DTYPE), "codomain": torch.eye(out, dtype=DTYPE)},
        {"domain_inverse": torch.eye(inn, dtype=DTYPE)},
    ]
    for kw in eye_kwargs:
        close(frobenius_norm(S, **kw), torch.linalg.matrix_norm(S, "fro"))
        close(schatten_norm(S, 1, **kw), torch.linalg.matrix_norm(S, "nuc"))
        close(operator_norm(S, **kw), torch.linalg.matrix_norm(S, 2))
        close(schatten_norm(S, p, **kw), torch.linalg.vector_norm(torch.linalg.svdvals(S), p))
        close(frobenius_inner(S, c.T, **kw), torch.trace(S.mT @ c.T))
        close(steepest_descent(S, **kw), -S)


def test_none_gram_is_exactly_the_elementwise_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    S, T = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    assert torch.equal(frobenius_inner(S, T), (S * T).sum((-2, -1)))
    assert riesz_representative(S) is S


# ----------------------------------------------------------------- inner product structure


@SETTINGS
@given(c=cases())
def test_inner_matches_kronecker_formula(c: Case) -> None:
    close(frobenius_inner(c.S, c.T, **c.kwargs), dense_inner(c, c.S, c.T))
    close(frobenius_norm(c.S, **c.kwargs) ** 2, dense_inner(c, c.S, c.S))


@SETTINGS
@given(c=cases(), p=P_VALUES)
def test_domain_and_domain_inverse_agree(c: Case, p: float) -> None:
    a = {"domain": c.MX, "codomain": c.MY}
    b = {"domain_inverse": c.MX_inv, "codomain": c.MY}
    for f in GRAM_FUNCTIONS:
        close(f(c.S, **a), f(c.S, **b))
    close(frobenius_inner(c.S, c.T, **a), frobenius_inner(c.S, c.T, **b))
    close(schatten_norm(c.S, p, **a), schatten_norm(c.S, p, **b))


@SETTINGS
@given(c=cases(), scale=st.floats(-3.0, 3.0))
def test_symmetry_positivity_cauchy_schwarz(c: Case, scale: float) -> None:
    S, T = c.S, c.S * scale + c.T  # partly aligned, so Cauchy–Schwarz is not trivially loose
    st_ = frobenius_inner(S, T, **c.kwargs)
    close(st_, frobenius_inner(T, S, **c.kwargs))
    assert frobenius_inner(S, S, **c.kwargs) > 0
    assert st_.abs() <= frobenius_norm(S, **c.kwargs) * frobenius_norm(T, **c.kwargs) * (1 + 1e-12)
    # Equality case: T parallel to S.
    close(
        frobenius_inner(S, 2 * S, **c.kwargs).abs(),
        frobenius_norm(S, **c.kwargs) * frobenius_norm(2 * S, **c.kwargs),
    )


@SETTINGS
@given(c=cases())
def test_metric_trace(c: Case) -> None:
    B = torch.randn(c.MX.shape, generator=c.gen, dtype=DTYPE)  # not symmetric
    close(metric_trace(B, c.MX), torch.trace(torch.linalg.inv(c.MX) @ B))
    close(metric_trace(B), torch.trace(B))
    # ⟨S, T⟩ is the metric trace over X of the form (u, v) ↦ ⟨S u, T v⟩_{M_Y}.
    close(frobenius_inner(c.S, c.T, **c.kwargs), metric_trace(c.S.mT @ c.MY @ c.T, c.MX))


# ------------------------------------------------------------------------ change of basis


@SETTINGS
@given(c=cases(), p=P_VALUES)
def test_change_of_basis_invariance(c: Case, p: float) -> None:
    # New coordinates x = P x' in X and y' = Q y in Y.  Then
    #   ⟨x1, x2⟩ = x1'ᵀ (Pᵀ M_X P) x2'          →  M_X' = Pᵀ M_X P,  M_X'⁻¹ = P⁻¹ M_X⁻¹ P⁻ᵀ
    #   ⟨y1, y2⟩ = y1'ᵀ (Q⁻ᵀ M_Y Q⁻¹) y2'        →  M_Y' = Q⁻ᵀ M_Y Q⁻¹
    #   y' = Q S x = Q S P x'                     →  S' = Q S P
    # and every quantity built from the inner products must be unchanged.
    out, inn = c.S.shape
    P, Q = random_invertible(inn, c.gen), random_invertible(out, c.gen)
    Pinv, Qinv = torch.linalg.inv(P), torch.linalg.inv(Q)
    sym = lambda m: (m + m.mT) / 2  # noqa: E731
    new = {
        "domain": sym(P.mT @ c.MX @ P),
        "codomain": sym(Qinv.mT @ c.MY @ Qinv),
    }
    new_inv = {"domain_inverse": sym(Pinv @ c.MX_inv @ Pinv.mT), "codomain": new["codomain"]}
    old = {"domain": c.MX, "codomain": c.MY}
    S2, T2 = Q @ c.S @ P, Q @ c.T @ P
    tol = {"rtol": 1e-8, "atol": 1e-9}
    for kw in (new, new_inv):
        close(frobenius_inner(S2, T2, **kw), frobenius_inner(c.S, c.T, **old), **tol)
        close(frobenius_norm(S2, **kw), frobenius_norm(c.S, **old), **tol)
        close(operator_norm(S2, **kw), operator_norm(c.S, **old), **tol)
        close(schatten_norm(S2, p, **kw), schatten_norm(c.S, p, **old), **tol)
        # The gradient is a covector: grad' = Q⁻ᵀ grad P⁻ᵀ, and the step is a vector:
        # it transforms like S, Δ' = Q Δ P.
        grad2 = Qinv.mT @ c.T @ Pinv.mT
        close(steepest_descent(grad2, **kw), Q @ steepest_descent(c.T, **old) @ P, **tol)


# ----------------------------------------------------------------------------- inequalities


@SETTINGS
@given(c=cases(), rank=st.integers(1, 5))
def test_norm_inequalities(c: Case, rank: int) -> None:
    out, inn = c.S.shape
    rank = min(rank, out, inn)
    S = torch.randn(out, rank, generator=c.gen, dtype=DTYPE) @ torch.randn(
        rank, inn, generator=c.gen, dtype=DTYPE
    )
    op = operator_norm(S, **c.kwargs)
    fro = frobenius_norm(S, **c.kwargs)
    eps = 1e-10
    assert op <= fro * (1 + eps)
    assert fro <= math.sqrt(rank) * op * (1 + eps)
    ratio = nuclear_to_frobenius_ratio(S, **c.kwargs)
    assert 1 - eps <= ratio <= math.sqrt(rank) * (1 + eps)
    srank = stable_rank(S, **c.kwargs)
    assert 1 - eps <= srank <= rank * (1 + eps)
    close(srank, fro**2 / op**2)


def test_zero_matrix_ratios_are_zero() -> None:
    Z = torch.zeros(2, 3, 4, dtype=DTYPE)
    assert torch.equal(nuclear_to_frobenius_ratio(Z), torch.zeros(2, dtype=DTYPE))
    assert torch.equal(stable_rank(Z), torch.zeros(2, dtype=DTYPE))


# -------------------------------------------------------------------------- Monte Carlo


@settings(max_examples=25, deadline=None)
@given(c=cases())
def test_average_response_estimates_squared_norm(c: Case) -> None:
    gen = torch.Generator().manual_seed(1234)
    est = average_response(c.S, n_samples=20000, generator=gen, **c.kwargs)
    # Relative standard deviation is at most sqrt(2 / 20000) = 1%; allow 5%.
    close(est, frobenius_norm(c.S, **c.kwargs) ** 2, rtol=0.05, atol=1e-12)


def test_average_response_is_reproducible_and_batched() -> None:
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(3, 4, 2, generator=gen, dtype=DTYPE)
    A, _ = random_spd(2, gen)
    a = average_response(S, domain_inverse=A, generator=torch.Generator().manual_seed(7))
    b = average_response(S, domain_inverse=A, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3,)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------- steepest descent


@SETTINGS
@given(c=cases())
def test_steepest_descent_matches_dense_solve(c: Case) -> None:
    grad = c.T
    out, inn = grad.shape
    v = -torch.linalg.solve(torch.kron(c.MX_inv, c.MY), vec(grad))
    delta = steepest_descent(grad, **c.kwargs)
    close(delta, unvec(v, out, inn))
    # Riesz property: ⟨R, Δ⟩ equals the Euclidean pairing for an arbitrary Δ.
    R = riesz_representative(grad, **c.kwargs)
    close(frobenius_inner(R, c.S, **c.kwargs), (grad * c.S).sum())


@SETTINGS
@given(c=cases(), t=st.floats(-2.0, 2.0))
def test_steepest_descent_minimises_quadratic_model(c: Case, t: float) -> None:
    grad = c.T

    def objective(delta: Tensor) -> Tensor:
        return (grad * delta).sum() + 0.5 * frobenius_norm(delta, **c.kwargs) ** 2

    delta = steepest_descent(grad, **c.kwargs).requires_grad_(True)
    f0 = objective(delta)
    (g,) = torch.autograd.grad(f0, delta)
    close(g, torch.zeros_like(g), atol=1e-9, rtol=0)  # stationary point
    E = c.S  # arbitrary perturbation direction
    with torch.no_grad():
        f1 = objective(delta + t * E)
        # Exact quadratic: f(Δ* + tE) = f(Δ*) + ½ t² ‖E‖² ≥ f(Δ*).
        close(f1, f0 + 0.5 * t**2 * frobenius_norm(E, **c.kwargs) ** 2)
        assert f1 >= f0 - 1e-10 * (1 + f0.abs())


# ---------------------------------------------------------------- spectral quantities


@SETTINGS
@given(c=cases(), p=P_VALUES)
def test_schatten_matches_symmetric_square_root_svd(c: Case, p: float) -> None:
    sv = whitened_svdvals(c, c.S)
    close(schatten_norm(c.S, p, **c.kwargs), torch.linalg.vector_norm(sv, p))
    close(schatten_norm(c.S, 2, **c.kwargs), frobenius_norm(c.S, **c.kwargs))
    close(schatten_norm(c.S, math.inf, **c.kwargs), operator_norm(c.S, **c.kwargs))
    close(nuclear_to_frobenius_ratio(c.S, **c.kwargs), sv.sum() / sv.norm())


@SETTINGS
@given(c=cases())
def test_operator_norm_is_root_of_largest_generalised_eigenvalue(c: Case) -> None:
    # Generalised eigenproblem Sᵀ M_Y S v = λ M_X v  ⇔  M_X⁻¹ Sᵀ M_Y S v = λ v.
    pencil = torch.linalg.inv(c.MX) @ c.S.mT @ c.MY @ c.S
    lam_max = torch.linalg.eigvals(pencil).real.max()
    close(operator_norm(c.S, **c.kwargs) ** 2, lam_max, rtol=1e-8, atol=1e-9)
    # Sup definition: no random direction x gives a larger response ratio.
    x = torch.randn(c.S.shape[1], 64, generator=c.gen, dtype=DTYPE)
    y = c.S @ x
    ratio = ((y * (c.MY @ y)).sum(0) / (x * (c.MX @ x)).sum(0)).sqrt()
    assert ratio.max() <= operator_norm(c.S, **c.kwargs) * (1 + 1e-10)


# ---------------------------------------------------------------- batching and autograd


def test_batch_equals_separate_calls() -> None:
    gen = torch.Generator().manual_seed(3)
    S = torch.randn(3, 4, 2, generator=gen, dtype=DTYPE)
    T = torch.randn(3, 4, 2, generator=gen, dtype=DTYPE)
    MX, MX_inv = random_spd(2, gen, batch=(3,))
    MY, _ = random_spd(4, gen, batch=(3,))
    for kw_of in (
        lambda i: {"domain": MX[i], "codomain": MY[i]},
        lambda i: {"domain_inverse": MX_inv[i], "codomain": MY[i]},
        lambda i: {"domain": MX[i]},
    ):
        batched = kw_of(slice(None))
        single = [kw_of(i) for i in range(3)]
        for f in GRAM_FUNCTIONS:
            close(f(S, **batched), torch.stack([f(S[i], **single[i]) for i in range(3)]))
        close(
            schatten_norm(S, 1.5, **batched),
            torch.stack([schatten_norm(S[i], 1.5, **single[i]) for i in range(3)]),
        )
        close(
            frobenius_inner(S, T, **batched),
            torch.stack([frobenius_inner(S[i], T[i], **single[i]) for i in range(3)]),
        )
    # An unbatched Gram broadcasts over a batch of matrices.
    close(
        frobenius_norm(S, codomain=MY[0]),
        torch.stack([frobenius_norm(S[i], codomain=MY[0]) for i in range(3)]),
    )
    close(
        metric_trace(S.mT @ S, MX),
        torch.stack([metric_trace(S[i].mT @ S[i], MX[i]) for i in range(3)]),
    )


def test_gradcheck_through_matrix_and_grams() -> None:
    gen = torch.Generator().manual_seed(5)
    S = torch.randn(3, 2, generator=gen, dtype=DTYPE, requires_grad=True)
    X = torch.randn(2, 2, generator=gen, dtype=DTYPE, requires_grad=True)
    Y = torch.randn(3, 3, generator=gen, dtype=DTYPE, requires_grad=True)

    def spd(m: Tensor) -> Tensor:  # symmetric parametrisation, so perturbations stay SPD
        return m @ m.mT + 0.5 * torch.eye(m.shape[-1], dtype=DTYPE)

    def fro(S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return frobenius_norm(S, spd(X), spd(Y))

    def fro_inv(S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return frobenius_norm(S, codomain=spd(Y), domain_inverse=spd(X))

    def riesz(S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return riesz_representative(S, spd(X), spd(Y))

    def riesz_inv(S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return riesz_representative(S, codomain=spd(Y), domain_inverse=spd(X))

    def op(S: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        return operator_norm(S, spd(X), spd(Y))

    for f in (fro, fro_inv, riesz, riesz_inv, op):
        assert torch.autograd.gradcheck(f, (S, X, Y))


# ------------------------------------------------------------------------------ validation


def _good() -> dict[str, Tensor]:
    return {"S": torch.ones(3, 2, dtype=DTYPE)}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": torch.eye(3, dtype=DTYPE)}, "domain.*2x2"),
        ({"codomain": torch.eye(2, dtype=DTYPE)}, "codomain.*3x3"),
        ({"domain_inverse": torch.eye(3, dtype=DTYPE)}, "domain_inverse.*2x2"),
        ({"domain": torch.ones(2, 3, dtype=DTYPE)}, "domain must be square"),
        ({"domain": torch.eye(2, dtype=DTYPE).expand(4, 2, 2)}, "domain batch shape"),
        ({"domain": torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DTYPE)}, "domain is not symm"),
        (
            {"codomain": torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=DTYPE))},
            "codomain is not positive definite",
        ),
        ({"domain_inverse": torch.zeros(2, 2, dtype=DTYPE)}, "domain_inverse is not positive"),
        ({"domain": torch.full((2, 2), math.nan, dtype=DTYPE)}, "domain has non-finite"),
        (
            {"domain": torch.eye(2, dtype=DTYPE), "domain_inverse": torch.eye(2, dtype=DTYPE)},
            "both domain and domain_inverse",
        ),
    ],
)
@pytest.mark.parametrize(
    "fn",
    [
        frobenius_norm,
        operator_norm,
        riesz_representative,
        steepest_descent,
        stable_rank,
        nuclear_to_frobenius_ratio,
        average_response,
        lambda S, **kw: frobenius_inner(S, S, **kw),
        lambda S, **kw: schatten_norm(S, 1.5, **kw),
    ],
)
def test_invalid_grams_raise(fn: Any, kwargs: dict[str, Tensor], match: str) -> None:
    S = torch.ones(4, 3, 2, dtype=DTYPE)  # batch of 4
    if "batch shape" in match:
        S = S[:3]
    with pytest.raises(ValueError, match=match):
        fn(S, **kwargs)


def test_other_invalid_inputs_raise() -> None:
    S = torch.ones(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="S must be"):
        frobenius_norm(torch.ones(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="grad must be"):
        steepest_descent(torch.ones(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="T must have the same matrix shape"):
        frobenius_inner(S, S.mT)
    with pytest.raises(ValueError, match="batch shapes of S"):
        frobenius_inner(S.expand(2, 3, 2), S.expand(3, 3, 2))
    for p in (0.5, 0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="p must be"):
            schatten_norm(S, p)
    with pytest.raises(ValueError, match="B must be square"):
        metric_trace(S)
    with pytest.raises(ValueError, match=r"gram.*not positive definite"):
        metric_trace(torch.eye(2, dtype=DTYPE), -torch.eye(2, dtype=DTYPE))
    with pytest.raises(ValueError, match="gram is 3x3"):
        metric_trace(torch.eye(2, dtype=DTYPE), torch.eye(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="n_samples"):
        average_response(S, n_samples=0)


def test_check_false_skips_value_checks_but_agrees_on_valid_input() -> None:
    gen = torch.Generator().manual_seed(11)
    S = torch.randn(3, 2, generator=gen, dtype=DTYPE)
    MX, _ = random_spd(2, gen)
    MY, _ = random_spd(3, gen)
    close(frobenius_norm(S, MX, MY, check=False), frobenius_norm(S, MX, MY))
    close(steepest_descent(S, MX, MY, check=False), steepest_descent(S, MX, MY))
    # A slightly asymmetric Gram is rejected when checking, accepted (and used) without.
    bad = MX + torch.tensor([[0.0, 1e-3], [0.0, 0.0]], dtype=DTYPE)
    with pytest.raises(ValueError, match="domain is not symmetric"):
        frobenius_norm(S, bad)
    assert torch.isfinite(frobenius_norm(S, bad, check=False))


def test_float32_covariance_passes_symmetry_check() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 7, generator=gen)
    A = x.mT @ x / 1000  # float32 covariance, symmetric only up to round-off
    S = torch.randn(5, 7, generator=gen)
    assert torch.isfinite(frobenius_norm(S, domain_inverse=A))
