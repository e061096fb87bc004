"""Preconditioned gradients equal explicit dense solves with ``kron(A, G) + λI``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.kronecker import (
    Side,
    apply_eigen,
    decompose,
    decompose_all,
    exact_scaling,
    factored_inverses,
    factored_powers,
    factored_scaling,
)
from tests.reference import dense_solve, random_spd


def fitted(
    model: nn.Module, input_shape: tuple[int, ...] = (16, 5), **options: object
) -> FrobPreconditionedSGD:
    """An optimizer after one step (lr 0) on random data: factors and inverses exist."""
    torch.manual_seed(0)
    opt = FrobPreconditionedSGD(model, lr=0.0, **{"step_rule": "preconditioned_sgd", **options})  # type: ignore[arg-type]
    out = model(torch.randn(*input_shape))
    F.cross_entropy(out.reshape(out.shape[0], -1), torch.randint(0, 2, (16,))).backward()
    opt.step()
    return opt


def factored_reference(a: Tensor, g: Tensor, v: Tensor, damping: float) -> Tensor:
    pi = math.sqrt((a.trace() / a.shape[0]) / (g.trace() / g.shape[0]))
    eye_a, eye_g = torch.eye(a.shape[0]), torch.eye(g.shape[0])
    a_d = a + pi * math.sqrt(damping) * eye_a
    g_d = g + math.sqrt(damping) / pi * eye_g
    return dense_solve(a_d, g_d, v, 0.0)


@pytest.mark.parametrize("exponent", [1.0, 0.5])
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_linear_matches_dense_solve(method: str, exponent: float) -> None:
    damping = 0.05
    opt = fitted(nn.Linear(5, 2), damping=damping, damping_method=method, exponent=exponent)
    a, g = opt.preconditioner.factors()[""]
    v = torch.randn(1, 2, 6)
    got = opt.preconditioner.precondition("", v)[0].double()
    if method == "exact":
        want = dense_solve(a, g, v[0], damping, exponent)
    else:
        pi = math.sqrt((a.trace() / 6) / (g.trace() / 2))
        a_d = a.double() + pi * math.sqrt(damping) * torch.eye(6, dtype=torch.float64)
        g_d = g.double() + math.sqrt(damping) / pi * torch.eye(2, dtype=torch.float64)
        want = dense_solve(a_d, g_d, v[0], 0.0, exponent)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "factored"])
def test_grouped_conv_matches_blockwise_dense_solve(method: str) -> None:
    damping = 0.1
    conv = nn.Conv1d(4, 4, 3, groups=2)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(16, 2))
    opt = fitted(model, (16, 4, 6), damping=damping, damping_method=method)
    a, g = opt.preconditioner.factors()["0"]
    v = torch.randn(2, 2, 7)
    got = opt.preconditioner.precondition("0", v).double()
    for k in range(2):
        if method == "exact":
            want = dense_solve(a[k], g[k], v[k], damping)
        else:
            want = factored_reference(a[k].double(), g[k].double(), v[k], damping)
        torch.testing.assert_close(got[k], want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("domain", "codomain"),
    [
        ("diagonal", "fisher"),
        ("covariance", "identity"),
        ("identity", "diagonal"),
        ("diagonal", "diagonal"),
    ],
)
@pytest.mark.parametrize("method", ["exact", "factored"])
def test_other_inner_products_match_dense_solve(domain: str, codomain: str, method: str) -> None:
    damping = 0.05
    opt = fitted(
        nn.Linear(5, 3), damping=damping, domain=domain, codomain=codomain, damping_method=method
    )
    a, g = opt.preconditioner.factors()[""]
    if domain == "diagonal":
        assert torch.count_nonzero(a - torch.diag(torch.diagonal(a))) == 0
    v = torch.randn(1, 3, 6)
    got = opt.preconditioner.precondition("", v)[0].double()
    if method == "exact" or "identity" in (domain, codomain):
        # one identity side takes the whole damping in both methods
        want = dense_solve(a, g, v[0], damping)
    else:
        want = factored_reference(a.double(), g.double(), v[0], damping)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6)


def test_identity_on_both_sides_is_the_identity_map() -> None:
    opt = fitted(nn.Linear(5, 3), domain="identity", codomain="identity")
    v = torch.randn(1, 3, 6)
    torch.testing.assert_close(opt.preconditioner.precondition("", v), v)
    assert not opt.preconditioner.layers[""].factors  # no memory, no hooks' work


def test_pure_functions_on_random_spd_factors() -> None:
    gen = torch.Generator().manual_seed(3)
    a, g = random_spd(4, gen).unsqueeze(0), random_spd(3, gen, scale=5.0).unsqueeze(0)
    v = torch.randn(1, 3, 4, generator=gen, dtype=torch.float64)
    sa, sg = decompose(a), decompose(g)
    assert sa is not None and sg is not None
    exact = apply_eigen(v, sg, sa, exact_scaling(sg, sa, 0.01))
    torch.testing.assert_close(exact[0], dense_solve(a[0], g[0], v[0], 0.01))
    inverses = factored_inverses(g, a, 0.01)
    assert inverses is not None
    torch.testing.assert_close(inverses.apply(v)[0], factored_reference(a[0], g[0], v[0], 0.01))
    factored_eigen = apply_eigen(v, sg, sa, factored_scaling(sg, sa, 0.01))
    torch.testing.assert_close(factored_eigen, inverses.apply(v))


def test_factored_powers_are_damped_matrix_powers() -> None:
    gen = torch.Generator().manual_seed(4)
    a, g = random_spd(5, gen).unsqueeze(0), random_spd(3, gen, scale=4.0).unsqueeze(0)
    sa, sg = decompose(a), decompose(g)
    assert sa is not None and sg is not None
    for exponent in (1.0, 0.5):
        powers = factored_powers(sg, sa, 0.01, exponent)
        pi = torch.sqrt((a[0].trace() / 5) / (g[0].trace() / 3))
        for power, factor, shift in ((powers.domain, a, pi * 0.1), (powers.codomain, g, 0.1 / pi)):
            e, q = torch.linalg.eigh(factor[0] + shift * torch.eye(factor.shape[-1]).double())
            reference = q @ torch.diag(e.pow(-exponent)) @ q.T
            assert power is not None
            torch.testing.assert_close(power[0], reference)
    # p = 1 agrees with the Cholesky inverses; an identity side stays None
    cholesky = factored_inverses(g, a, 0.01)
    assert cholesky is not None
    torch.testing.assert_close(factored_powers(sg, sa, 0.01, 1.0).domain, cholesky.domain)
    identity = Side(None, torch.ones(1, 3, dtype=torch.float64), estimated=False)
    one_sided = factored_powers(identity, sa, 0.01, 1.0)
    assert one_sided.codomain is None
    torch.testing.assert_close(
        one_sided.domain[0], torch.linalg.inv(a[0] + 0.01 * torch.eye(5).double())
    )


def test_decompose_all_batches_by_size_and_isolates_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(5)
    factors = [random_spd(n, gen).unsqueeze(0) for n in (4, 3, 4, 4)]
    factors[2] = torch.stack([random_spd(4, gen), random_spd(4, gen)])  # two blocks
    calls = []
    real_eigh = torch.linalg.eigh

    def counting(matrix: Tensor) -> tuple[Tensor, Tensor]:
        calls.append(tuple(matrix.shape))
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    sides = decompose_all(factors)
    assert sorted(calls) == [(1, 3, 3), (4, 4, 4)]  # one call per size
    for factor, side in zip(factors, sides, strict=True):
        assert side is not None and side.basis is not None
        rebuilt = side.basis @ torch.diag_embed(side.eigenvalues) @ side.basis.mT
        torch.testing.assert_close(rebuilt, factor)
    factors[3] = torch.full((1, 4, 4), float("nan"))
    sides = decompose_all(factors)
    assert sides[3] is None
    assert all(side is not None for side in sides[:3])


def test_decompose_survives_non_finite_factor() -> None:
    bad = torch.full((1, 3, 3), float("nan"))
    assert decompose(bad) is None
    assert factored_inverses(bad, None, 0.1) is None


@pytest.mark.parametrize("damping_method", ["exact", "factored"])
def test_eigenvalues_are_those_of_the_factors(damping_method: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = FrobPreconditionedSGD(
        model, lr=0.1, damping_method=damping_method, step_rule="preconditioned_sgd"
    )
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # step 0 folds the factors and refreshes the inverses from them
    eigenvalues = opt.preconditioner.eigenvalues()
    for name, (a, g) in opt.preconditioner.factors().items():
        for side, factor in (("A", a), ("G", g)):
            reference = torch.linalg.eigvalsh(factor.double()).float()
            got = eigenvalues[name][side].reshape(-1)
            torch.testing.assert_close(got, reference.clamp(min=0), atol=1e-5, rtol=1e-4)
