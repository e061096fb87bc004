"""Factor structures: the low-rank-plus-identity side against dense references, the cost
model, and the structured inverses in the engine and the optimizer."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD, KroneckerPreconditioner
from kfrob.factors import RunningFactor, SketchedFactor
from kfrob.kronecker import EigenInverse, InverseFactors
from kfrob.layers import LayerMath, layer_math
from kfrob.structure import (
    OVERSAMPLING,
    BlockDiagonalPower,
    DiagonalPower,
    LowRankPower,
    StructureChoice,
    choose_structure,
    leading_eigenpairs,
    low_rank_power,
    nystrom,
)
from tests.reference import conv_patches

LOW_RANK = {"domain_structure": "low_rank", "codomain_structure": "low_rank"}
DENSE = {"domain_structure": "dense", "codomain_structure": "dense"}
BLOCKS = {"domain_structure": "block_diagonal", "codomain_structure": "block_diagonal"}


def psd(n: int, rank: int, seed: int = 0) -> Tensor:
    """A ``(1, n, n)`` float64 PSD matrix of the given rank with distinct eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, rank, generator=g, dtype=torch.float64)
    return x @ x.mT


def truncated(m: Tensor, rank: int) -> Tensor:
    """Reference: top-``rank`` eigenpairs of ``m`` plus ``σ (I − QQᵀ)``, ``σ`` keeping the
    trace, from a full ``eigh``."""
    n = m.shape[-1]
    e, q = torch.linalg.eigh(m[0])
    top, basis = e[-rank:], q[:, -rank:]
    sigma = (e.sum() - top.sum()) / (n - rank)
    eye = torch.eye(n, dtype=m.dtype)
    return (basis @ torch.diag(top) @ basis.T + sigma * (eye - basis @ basis.T))[None]


def orthonormal(n: int, r: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(1, n, r, generator=g, dtype=torch.float64))[0]


# --- the math --------------------------------------------------------------------------
@pytest.mark.parametrize("sketched", [False, True])
def test_low_rank_is_exact_when_the_factor_rank_is_at_most_k(sketched: bool) -> None:
    m = psd(40, 5)
    q = orthonormal(40, 8, seed=1)
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    side = nystrom(q, m @ q, trace, 8) if sketched else leading_eigenpairs(m, 8)
    assert side is not None
    torch.testing.assert_close(side.dense(), m)
    assert float(side.rest) == pytest.approx(0.0, abs=1e-9)


def test_low_rank_equals_the_truncated_eigendecomposition() -> None:
    m = psd(30, 30) + torch.diag(torch.linspace(0, 1, 30, dtype=torch.float64))[None]
    side = leading_eigenpairs(m, 6)
    assert side is not None
    torch.testing.assert_close(side.dense(), truncated(m, 6))
    torch.testing.assert_close(side.dense()[0].trace(), m[0].trace())


def small_eigh_only(monkeypatch: pytest.MonkeyPatch, widest: int) -> None:
    """Make any ``eigh`` of a matrix wider than ``widest`` fail the test."""
    eigh = torch.linalg.eigh

    def checked(matrix: Tensor, *args: object, **kwargs: object) -> object:
        assert matrix.shape[-1] <= widest, f"a full eigh of width {matrix.shape[-1]}"
        return eigh(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", checked)


def test_wide_side_is_exact_without_a_full_eigh_when_its_rank_is_at_most_k(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = psd(600, 20, seed=5)
    small_eigh_only(monkeypatch, widest=20 + OVERSAMPLING)
    side = leading_eigenpairs(m, 20)
    assert side is not None
    torch.testing.assert_close(side.dense(), m)


def test_wide_side_finds_the_leading_eigenpairs_of_a_decaying_spectrum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full rank, eigenvalues ``0.97^i`` (a slow decay): the randomized pairs are the
    truncated eigendecomposition's to a small error, and the approximation is nearly as
    good as the best rank-k one."""
    n, k = 600, 24
    q = orthonormal(n, n, seed=6)[0]
    m = (q @ torch.diag(0.97 ** torch.arange(n, dtype=torch.float64)) @ q.T)[None]
    best = truncated(m, k)
    small_eigh_only(monkeypatch, widest=k + OVERSAMPLING)
    side = leading_eigenpairs(m, k)
    assert side is not None
    exact = 0.97 ** torch.arange(k - 1, -1, -1, dtype=torch.float64)
    torch.testing.assert_close(side.eigenvalues[0], exact, rtol=2e-3, atol=0)
    error, best_error = (torch.linalg.matrix_norm(a - m) for a in (side.dense(), best))
    assert float(error) <= 1.02 * float(best_error), (error, best_error)
    torch.testing.assert_close(side.dense()[0].trace(), m[0].trace())


def test_sketch_refreshes_converge_to_the_leading_eigenpairs() -> None:
    q = orthonormal(50, 50, seed=2)[0]
    m = (q @ torch.diag(0.8 ** torch.arange(50, dtype=torch.float64)) @ q.T)[None]
    trace = m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    basis = orthonormal(50, 5, seed=3)
    for _ in range(60):  # each refresh sketches on the basis the last one found
        side = nystrom(basis, m @ basis, trace, 5)
        assert side is not None
        basis = side.basis
    assert side is not None
    torch.testing.assert_close(side.eigenvalues[0], torch.linalg.eigvalsh(m[0])[-5:])
    torch.testing.assert_close(side.dense(), truncated(m, 5))


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_low_rank_power_is_the_damped_power_of_the_approximation(exponent: float) -> None:
    m = psd(20, 20, seed=4)
    side = leading_eigenpairs(m, 4)
    assert side is not None
    shift = torch.tensor([[0.3]], dtype=torch.float64)
    power = low_rank_power(side, shift, exponent)
    e, q = torch.linalg.eigh((truncated(m, 4) + 0.3 * torch.eye(20, dtype=torch.float64))[0])
    reference = q @ torch.diag(e.pow(-exponent)) @ q.T
    torch.testing.assert_close(power.dense()[0], reference)
    v = torch.randn(1, 7, 20, dtype=torch.float64)
    torch.testing.assert_close(power.right(v)[0], v[0] @ reference)
    torch.testing.assert_close(power.left(v.mT)[0], reference @ v[0].T)


@pytest.mark.parametrize("domain", ["low_rank", "diagonal"])
@pytest.mark.parametrize("codomain", ["low_rank", "identity"])
def test_applying_inverses_leaves_the_matrix_and_autograd_intact(
    domain: str, codomain: str
) -> None:
    """``G_d⁻¹ V A_d⁻¹`` against explicit inverses of the damped approximations; the domain
    side writes into the codomain side's product, never into ``V`` itself (``V`` when the
    codomain is the identity), and a ``V`` that autograd records gets the same product and
    its gradient ``G_d⁻ᵀ 1 A_d⁻ᵀ``."""
    a, g = psd(12, 12, seed=5), psd(9, 9, seed=6)
    eye = torch.eye(12, dtype=torch.float64)
    if domain == "low_rank":
        shift = torch.tensor([[0.2]], dtype=torch.float64)
        right = low_rank_power(leading_eigenpairs(a, 3), shift, 1.0)  # type: ignore[arg-type]
        a_inv = torch.linalg.inv(truncated(a, 3)[0] + 0.2 * eye)
    else:
        diagonal = a[0].diagonal() + 0.2
        right, a_inv = DiagonalPower(1 / diagonal[None]), torch.diag(1 / diagonal)
    left, g_inv = None, torch.eye(9, dtype=torch.float64)
    if codomain == "low_rank":
        shift = torch.tensor([[0.2]], dtype=torch.float64)
        left = low_rank_power(leading_eigenpairs(g, 2), shift, 1.0)  # type: ignore[arg-type]
        g_inv = torch.linalg.inv(truncated(g, 2)[0] + 0.2 * torch.eye(9, dtype=torch.float64))
    inverses = InverseFactors(left, right)
    v = torch.randn(1, 9, 12, dtype=torch.float64)
    kept = v.clone()
    reference = g_inv @ v[0] @ a_inv
    torch.testing.assert_close(inverses.apply(v)[0], reference)
    assert torch.equal(v, kept)
    recorded = v.clone().requires_grad_()
    product = inverses.apply(recorded)
    product.sum().backward()
    torch.testing.assert_close(product.detach()[0], reference)
    assert recorded.grad is not None and torch.equal(recorded, kept)
    ones = torch.ones(9, 12, dtype=torch.float64)
    torch.testing.assert_close(recorded.grad[0], g_inv.T @ ones @ a_inv.T)


def test_a_non_finite_factor_gives_no_approximation() -> None:
    m = psd(10, 10)
    m[0, 0, 0] = float("nan")
    q = orthonormal(10, 3, 0)
    assert leading_eigenpairs(m, 3) is None
    assert nystrom(q, m @ q, m.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True), 3) is None


@pytest.mark.parametrize("codomain", [False, True])
def test_a_sketched_factor_averages_exactly_the_dense_factor_times_its_basis(
    codomain: bool,
) -> None:
    g = torch.Generator().manual_seed(0)
    dense = RunningFactor(1, 12, per_sample_scale=codomain, dtype=torch.float64)
    one = torch.ones((), dtype=torch.bool)
    dense.add(torch.randn(1, 30, 12, generator=g, dtype=torch.float64), 30)
    dense.fold(dense.statistic(), 0.9, one)
    e, q = torch.linalg.eigh(dense.value[0])
    basis, top = q[None, :, -4:], e[None, -4:]  # eigenpairs: F Q = Q diag(e) exactly
    sketch = SketchedFactor(dense, basis, top)
    for step in range(3):
        rows = torch.randn(1, 7 + step, 12, generator=g, dtype=torch.float64)
        accept = torch.tensor(step != 1)  # a rejected window changes neither
        for f in (dense, sketch):
            f.add(rows, 5)
            f.fold(f.statistic("mean", 1), 0.9, accept)
    torch.testing.assert_close(sketch.sketch, dense.value @ basis)
    torch.testing.assert_close(sketch.trace(), dense.trace())
    assert int(sketch.folds) == int(dense.folds) == 3


# --- the cost model --------------------------------------------------------------------
def test_the_cost_model_keeps_dense_where_it_is_cheap() -> None:
    wide = {"size": 785, "other": 512, "rank": 32, "budget": 1.0, "inverse_update_freq": 10}
    assert choose_structure("auto", rows=128, **wide).structure == "low_rank"
    assert choose_structure("auto", rows=8192, **wide).structure == "dense"  # many tokens
    # the statistics 2·rows·size² alone are size / (3·other) of the layer's pass
    assert choose_structure("auto", rows=8192, **{**wide, "budget": 0.5}).structure == "low_rank"
    sparse = {**wide, "budget": 0.5, "factor_update_freq": 10}  # statistics every 10 steps
    assert choose_structure("auto", rows=8192, **sparse).structure == "dense"
    assert choose_structure("auto", rows=0, **wide).structure == "dense"  # batch not seen
    assert choose_structure("dense", rows=128, **wide).reason == "requested"
    narrow = {**wide, "size": 60}
    assert choose_structure("auto", rows=1, **narrow).structure == "dense"  # 2·rank ≥ width
    assert choose_structure("low_rank", rows=10**6, **narrow).structure == "low_rank"
    # the threshold: 2·rows·size² + 2·size²·other + size³/10 ≤ 1.0 × 6·rows·size·other
    fixed = 2 * 785 * 785 * 512 + 785**3 / 10
    rows = fixed / (6 * 785 * 512 - 2 * 785 * 785)
    assert choose_structure("auto", rows=int(rows) + 1, **wide).structure == "dense"
    assert choose_structure("auto", rows=int(rows) - 1, **wide).structure == "low_rank"


# --- in the engine ---------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(90, 70), nn.Tanh(), nn.Linear(70, 5)).double()


def batch(rows: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 90, generator=g, dtype=torch.float64), torch.randint(
        0, 5, (rows,), generator=g
    )


def preconditioned(rows: int, **options: object) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One engine step on a fresh model: ``{param name: direction}``, and the first layer's
    gradient matrix and ``(A, G)``."""
    model = mlp()
    pre = KroneckerPreconditioner(model, kl_clip=None, **options)  # type: ignore[arg-type]
    x, y = batch(rows)
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], 1)  # type: ignore[index]
    pre.step()
    a, g = pre.factors()["0"]
    directions = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]
    return directions, grad, a, g


def test_low_rank_sides_equal_dense_ones_when_the_factors_have_low_rank() -> None:
    # 6 rows: A and G have rank ≤ 6 < 8, so rank-8 sides are exact
    low, *_ = preconditioned(6, rank=8, **LOW_RANK)
    dense, *_ = preconditioned(6, **DENSE)
    for name in dense:
        torch.testing.assert_close(low[name], dense[name])


def test_a_low_rank_step_equals_the_explicit_solve() -> None:
    rank = 4  # below the factors' rank (24 rows): the approximation is active
    out, grad, a, g = preconditioned(24, rank=rank, **LOW_RANK)
    a_tilde, g_tilde = truncated(a[None], rank)[0], truncated(g[None], rank)[0]
    # π-damping from the traces, which the approximation keeps
    pi = torch.sqrt((a.trace() / a.shape[-1]) / (g.trace() / g.shape[-1]))
    lam = 1e-3
    d_a, d_g = pi * lam**0.5, lam**0.5 / pi
    step = torch.linalg.solve(g_tilde + d_g * torch.eye(70, dtype=g.dtype), grad)
    step = torch.linalg.solve(a_tilde + d_a * torch.eye(91, dtype=a.dtype), step.T).T
    torch.testing.assert_close(out["0.weight"], step[:, :-1])
    torch.testing.assert_close(out["0.bias"], step[:, -1])


def test_a_low_rank_side_beside_a_diagonal_one_equals_the_explicit_solve() -> None:
    out, grad, a, g = preconditioned(24, rank=4, domain_structure="low_rank", codomain="diagonal")
    a_tilde = truncated(a[None], 4)[0]
    pi = torch.sqrt((a.trace() / a.shape[-1]) / (g.diagonal().sum() / g.shape[-1]))
    d_a, d_g = pi * 1e-3**0.5, 1e-3**0.5 / pi
    step = grad / (g.diagonal() + d_g)[:, None]  # the diagonal side: elementwise
    step = torch.linalg.solve(a_tilde + d_a * torch.eye(91, dtype=a.dtype), step.T).T
    torch.testing.assert_close(out["0.weight"], step[:, :-1])
    torch.testing.assert_close(out["0.bias"], step[:, -1])


def test_auto_chooses_per_side_and_says_why() -> None:
    model = mlp()
    opt = FrobPreconditionedSGD(model, lr=0.1, rank=8, step_rule="preconditioned_sgd")
    x, y = batch(4)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    got = opt.preconditioner.structures()
    assert got["0"]["domain"].structure == "low_rank"  # 91 wide, 4 rows a step
    assert got["2"]["codomain"].structure == "dense"  # 5 wide
    assert "dense would cost" in got["0"]["domain"].reason
    text = repr(opt)
    assert "0: A low_rank" in text and "G low_rank" in text and "2: A low_rank" in text
    assert opt.diagnostics()["0/rank_A"] == 8.0


def test_a_rank_not_below_the_width_is_a_dense_side() -> None:
    opt = FrobPreconditionedSGD(
        mlp(), lr=0.1, rank=70, **{"step_rule": "preconditioned_sgd", **LOW_RANK}
    )
    got = opt.preconditioner.structures()
    assert got["0"]["domain"].structure == "low_rank"  # 91 wide
    assert got["0"]["codomain"] == StructureChoice("dense", "rank 70 ≥ width 70: dense is exact")


def test_exact_damping_keeps_dense_sides() -> None:
    opt = FrobPreconditionedSGD(
        mlp(), lr=0.1, damping_method="exact", step_rule="preconditioned_sgd"
    )
    assert all(
        c.structure == "dense" for s in opt.preconditioner.structures().values() for c in s.values()
    )


def test_exact_where_dense_damps_dense_layers_exactly_and_structured_ones_by_pi() -> None:
    """``damping_method="exact_where_dense"``: the layer whose co-domain is low-rank gets
    the π-damped structured inverse (the same step as factored damping), the layer whose
    sides are dense the eigenbases of ``A ⊗ G + λI`` (its step the explicit solve)."""
    options = {"rank": 8, "domain_structure": "dense", "codomain_structure": "low_rank"}
    mixed, _, _, _ = preconditioned(24, damping_method="exact_where_dense", **options)
    factored, _, _, _ = preconditioned(24, **options)
    torch.testing.assert_close(mixed["0.weight"], factored["0.weight"])
    torch.testing.assert_close(mixed["0.bias"], factored["0.bias"])
    model = mlp()
    pre = KroneckerPreconditioner(
        model, kl_clip=None, damping_method="exact_where_dense", **options
    )  # type: ignore[arg-type]
    x, y = batch(24)
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], 1)  # type: ignore[index]
    pre.step()
    assert isinstance(pre.inverses["2"], EigenInverse)
    assert isinstance(pre.inverses["0"], InverseFactors)
    a, g = pre.factors()["2"]
    system = torch.kron(a, g) + 1e-3 * torch.eye(71 * 5, dtype=a.dtype)
    step = torch.linalg.solve(system, grad.T.reshape(-1)).reshape(71, 5).T
    torch.testing.assert_close(model[2].weight.grad, step[:, :-1])  # type: ignore[index]
    torch.testing.assert_close(model[2].bias.grad, step[:, -1])  # type: ignore[index]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rank": 0}, "invalid rank=0: expected an integer >= 1"),
        ({"dense_budget": 0.0}, "invalid dense_budget=0.0"),
        ({"domain_structure": "blocky"}, "invalid domain_structure='blocky'"),
        (
            {"domain_structure": "low_rank", "inverse_placement": "owner"},
            "invalid domain_structure='low_rank': expected 'auto' or 'dense' with inverse_pl",
        ),
        (
            {"codomain_structure": "low_rank", "damping_method": "exact"},
            "invalid codomain_structure='low_rank': expected 'auto' or 'dense' with damping_m",
        ),
    ],
)
def test_impossible_structures_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        FrobPreconditionedSGD(mlp(), lr=0.1, **{"step_rule": "preconditioned_sgd", **options})  # type: ignore[arg-type]


def test_a_failed_low_rank_refresh_keeps_the_last_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    opt = FrobPreconditionedSGD(
        model,
        lr=0.1,
        rank=8,
        inverse_update_freq=1,
        **{"step_rule": "preconditioned_sgd", **LOW_RANK},
    )
    x, y = batch(16)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    held = opt.preconditioner.inverses["0"]
    assert isinstance(held.domain, LowRankPower)
    monkeypatch.setattr("kfrob.inverses.nystrom", lambda *args: None)
    with pytest.warns(UserWarning, match="decomposition failed for 0; keeping its last inverse"):
        step()
    assert opt.preconditioner.inverses["0"] is held
    assert all(torch.isfinite(p).all() for p in model.parameters())


def trained(
    options: dict[str, object], steps: int, state: dict | None = None
) -> tuple[nn.Module, FrobPreconditionedSGD]:
    """The MLP after ``steps`` steps on one batch (resumed from ``state`` if given)."""
    x, y = batch(16)
    model = mlp()
    opt = FrobPreconditionedSGD(
        model, lr=0.1, inverse_update_freq=5, **{"step_rule": "preconditioned_sgd", **options}
    )  # type: ignore[arg-type]
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize(
    ("options", "structure"),
    [
        ({"rank": 8, **LOW_RANK}, "low_rank"),
        ({"max_block_size": 40, **BLOCKS}, "block_diagonal"),
    ],
)
def test_structured_inverses_survive_a_state_dict_round_trip(
    options: dict[str, object], structure: str
) -> None:
    model, opt = trained(options, 3)
    state = {"model": model.state_dict(), "opt": opt.state_dict()}
    assert (
        state["opt"]["kfrob"]["engine"]["layers"]["0"]["inverse"]["domain_structure"] == structure
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed, _ = trained(options, 4, state)
    straight, _ = trained(options, 7)
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(p, q)


# --- block-diagonal sides ----------------------------------------------------------------
def block_mask(width: int, part: int) -> Tensor:
    """Ones on the diagonal blocks of width ``part`` (the last one narrower)."""
    index = torch.arange(width) // part
    return (index[:, None] == index[None, :]).double()


def test_block_diagonal_factors_are_the_dense_factors_diagonal_blocks() -> None:
    """91 wide with blocks of at most 40: three parts of 31 (the last padded); 70 wide: two
    of 35. Several windows, so the running average is checked too."""
    models = mlp(), mlp()
    dense = FrobPreconditionedSGD(
        models[0], lr=0.0, fisher="empirical", **{"step_rule": "preconditioned_sgd", **DENSE}
    )
    blocks = FrobPreconditionedSGD(
        models[1],
        lr=0.0,
        fisher="empirical",
        max_block_size=40,
        **{"step_rule": "preconditioned_sgd", **BLOCKS},
    )
    for seed in range(3):
        x, y = batch(16, seed)
        for model, opt in zip(models, (dense, blocks), strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    a, g = dense.preconditioner.factors()["0"]
    a_blocks, g_blocks = blocks.preconditioner.factors()["0"]
    torch.testing.assert_close(a_blocks, a * block_mask(91, 31))
    torch.testing.assert_close(g_blocks, g * block_mask(70, 35))
    factor = blocks.preconditioner.layers["0"].domain
    assert factor.average.shape == (3, 31, 31)  # 2883 numbers instead of 8281
    structures = blocks.preconditioner.structures()
    assert structures["0"]["domain"] == StructureChoice(
        "block_diagonal", "requested: 3 blocks of width 31"
    )
    assert structures["2"]["codomain"].structure == "dense"  # 5 wide: one block
    assert "one block" in structures["2"]["codomain"].reason


def test_a_block_diagonal_step_equals_the_explicit_solve() -> None:
    """``(G_b + d_G I)⁻¹ ∇V (A_b + d_A I)⁻¹`` with the block-diagonal factors and π from
    their traces (the dense factors' traces)."""
    out, grad, a, g = preconditioned(24, max_block_size=40, **BLOCKS)
    assert torch.equal(a, a * block_mask(91, 31)) and torch.equal(g, g * block_mask(70, 35))
    pi = torch.sqrt((a.trace() / a.shape[-1]) / (g.trace() / g.shape[-1]))
    d_a, d_g = pi * 1e-3**0.5, 1e-3**0.5 / pi
    step = torch.linalg.solve(g + d_g * torch.eye(70, dtype=g.dtype), grad)
    step = torch.linalg.solve(a + d_a * torch.eye(91, dtype=a.dtype), step.T).T
    torch.testing.assert_close(out["0.weight"], step[:, :-1])
    torch.testing.assert_close(out["0.bias"], step[:, -1])


def test_block_diagonal_power_equals_dense_on_block_diagonal_matrices() -> None:
    """On a block-diagonal SPD matrix (two layer blocks, parts of 4 on a width of 10) the
    structured power applies exactly the dense inverse, from the left and the right."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * 3, 4, 6, generator=gen, dtype=torch.float64)
    parts = x @ x.mT + torch.eye(4, dtype=torch.float64)
    parts[2::3, 2:, :] = 0  # the last part of each block holds 2 real coordinates
    parts[2::3, :, 2:] = 0
    parts[2::3, 2:, 2:] = torch.eye(2, dtype=torch.float64)  # padding: any SPD value
    power = BlockDiagonalPower(torch.linalg.inv(parts), size=10)
    dense = torch.stack([torch.block_diag(*p)[:10, :10] for p in parts.reshape(2, 3, 4, 4)])
    v = torch.randn(2, 10, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(power.left(v), torch.linalg.solve(dense, v))
    torch.testing.assert_close(power.right(v.mT), torch.linalg.solve(dense, v).mT)
    torch.testing.assert_close(power.dense(), torch.linalg.inv(dense))


def test_a_block_diagonal_state_does_not_load_into_dense_sides() -> None:
    _, opt = trained({"max_block_size": 40, **BLOCKS}, 1)
    dense = FrobPreconditionedSGD(mlp(), lr=0.1, **{"step_rule": "preconditioned_sgd", **DENSE})
    with pytest.raises(ValueError, match=r"domain factor of shape \(3, 31, 31\), expected"):
        dense.load_state_dict(opt.state_dict())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_block_size": 0}, "invalid max_block_size=0: expected an integer >= 1"),
        (
            {"domain_structure": "block_diagonal", "damping_method": "exact"},
            "invalid domain_structure='block_diagonal': expected 'auto' or 'dense' with damping",
        ),
    ],
)
def test_impossible_block_structures_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrobPreconditionedSGD(mlp(), lr=0.1, **{"step_rule": "preconditioned_sgd", **options})  # type: ignore[arg-type]


# --- sketching a convolution's inputs without unfolding them -------------------------------
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), bias=False),
        nn.Conv2d(4, 6, 3, groups=2, padding="same", padding_mode="reflect"),
        nn.Conv1d(3, 5, 4, stride=2, padding=1),
    ],
    ids=["padded", "strided-dilated-no-bias", "grouped-reflect", "conv1d"],
)
def test_a_convolution_sketches_its_inputs_without_unfolding(conv: nn.Module) -> None:
    """``Σ a (aQ)ᵀ`` and ``Σ ‖a‖²`` by two convolutions equal the sums over the unfolded
    patch rows (with the bias coordinate), per group."""
    conv = conv.double()
    math = layer_math(conv, "expand")
    assert math is not None
    spatial = (9, 8) if isinstance(conv, nn.Conv2d) else (11,)
    x = torch.randn(3, conv.in_channels, *spatial, dtype=torch.float64)
    assert math.check_call(x, conv(x)) is None
    basis = orthonormal(math.in_features, 5, seed=7).expand(math.blocks, -1, -1)
    products, squares, rows = math.input_sketch(x, basis)
    reference = LayerMath.input_rows(math, x)  # the unfolded rows
    if conv.padding_mode == "zeros" and conv.groups == 1:  # and those rows are the patches
        patches = conv_patches(copy.deepcopy(conv).float(), x.float()).double()
        flat = patches.permute(0, 2, 1).reshape(-1, patches.shape[1])
        if conv.bias is not None:
            flat = torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], 1)
        torch.testing.assert_close(reference[0], flat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(products, reference.mT @ (reference @ basis))
    torch.testing.assert_close(squares, reference.square().sum((1, 2)))
    assert rows == reference.shape[1]
