"""Cheaper refresh schedules: staggered refreshes and subspace-iteration eigenbases.

References: which layers a refresh touches is read off the inverses the optimizer holds;
every refreshed inverse is checked against a dense solve with the factors of that step;
subspace steps against ``torch.linalg.eigh`` and Rayleigh quotients computed here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.kronecker import EigenInverse, decompose_all, subspace_step
from tests.reference import dense_solve, random_spd
from tests.test_optimizer import batches, quiet, small_model


def step(model: nn.Module, opt: FrobPreconditionedSGD, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def optimizer(model: nn.Module, **options: object) -> FrobPreconditionedSGD:
    return quiet(model, lr=0.05, **options)


def assert_inverse_fits_factors(opt: FrobPreconditionedSGD, name: str, damping: float) -> None:
    """The layer's inverse is ``(A ⊗ G + λI)⁻¹`` of its current factors (dense solve)."""
    a, g = opt.preconditioner.factors()[name]
    v = torch.randn(1, g.shape[-1], a.shape[-1], generator=torch.Generator().manual_seed(3))
    got = opt.preconditioner.precondition(name, v)
    assert got is not None
    want = dense_solve(a, g, v[0], damping)
    torch.testing.assert_close(got[0].double(), want, rtol=3e-3, atol=1e-6)  # float32 eigh


# --- staggered refreshes -------------------------------------------------------------------
def test_refresh_slots_balance_the_decomposition_cost() -> None:
    opt = optimizer(small_model(), stagger_refreshes=True)
    slots = opt.preconditioner.refresh_slots(2)
    # costs n³ per side: conv 7³+3³ = 370, linear "3" 25³+6³ = 15841, linear "6" 7³+3³ = 370
    assert slots["3"] == 0 and {slots["0"], slots["6"]} == {1}
    assert set(opt.preconditioner.refresh_slots(5).values()) == {0, 1, 2}  # one layer per step


@pytest.mark.parametrize("damping_method", ["exact", "factored"])
def test_staggered_layers_refresh_on_their_own_steps_from_current_factors(
    damping_method: str,
) -> None:
    model = small_model()
    period, damping = 3, 1e-2
    opt = optimizer(
        model,
        inverse_update_freq=period,
        stagger_refreshes=True,
        damping=damping,
        damping_method=damping_method,
        kl_clip=None,
    )
    slots = opt.preconditioner.refresh_slots(period)
    assert sorted(slots.values()) == [0, 1, 2]
    held: dict[str, object] = {}
    for s, (x, y) in enumerate(batches(7)):
        step(model, opt, x, y)
        for name, inverse in opt.preconditioner.inverses.items():
            refreshed = held.get(name) is not inverse
            # step 0 builds every inverse; afterwards each layer refreshes in its slot only
            assert refreshed == (s == 0 or s % period == slots[name]), (s, name)
            if refreshed and damping_method == "exact":
                assert_inverse_fits_factors(opt, name, damping)
            held[name] = inverse
    assert opt.refreshes == 7  # something was refreshed on every step


def test_staggering_with_one_step_cycles_changes_nothing() -> None:
    runs = []
    for stagger in (False, True):
        model = small_model()
        opt = optimizer(model, inverse_update_freq=1, stagger_refreshes=stagger)
        for x, y in batches(4):
            step(model, opt, x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)


def test_update_inverses_only_missing_keeps_its_meaning() -> None:
    model = small_model()
    opt = optimizer(model, damping_method="exact")
    step(model, opt, *batches(1)[0])
    held = dict(opt.preconditioner.inverses)
    damping = dict.fromkeys(held, 1e-3)
    opt.preconditioner.inverses.pop("3")
    opt.preconditioner.update_inverses(damping, only_missing=True)
    assert "3" in opt.preconditioner.inverses
    assert all(opt.preconditioner.inverses[n] is held[n] for n in held if n != "3")


# --- subspace iteration --------------------------------------------------------------------
def test_subspace_step_from_the_exact_eigenbasis_keeps_it() -> None:
    gen = torch.Generator().manual_seed(0)
    m = torch.stack([random_spd(5, gen), random_spd(5, gen)])
    eigenvalues, basis = torch.linalg.eigh(m)
    side = subspace_step(m, basis)
    assert side is not None and side.basis is not None
    torch.testing.assert_close(side.eigenvalues, eigenvalues)
    rebuilt = side.basis @ torch.diag_embed(side.eigenvalues) @ side.basis.mT
    torch.testing.assert_close(rebuilt, m)


def test_subspace_steps_converge_to_the_eigendecomposition() -> None:
    """From a rotated basis the Rayleigh quotients are exactly diag(QᵀMQ) (ascending, Q
    orthonormal), and repeated steps approach the eigendecomposition."""
    gen = torch.Generator().manual_seed(1)
    eigenvalues = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    m = (q * eigenvalues) @ q.T
    basis, _ = torch.linalg.qr(q + 0.3 * torch.randn(6, 6, generator=gen, dtype=torch.float64))
    errors = []
    for _ in range(60):
        side = subspace_step(m[None], basis[None])
        assert side is not None and side.basis is not None
        new = side.basis[0]
        torch.testing.assert_close(new.T @ new, torch.eye(6, dtype=torch.float64))
        rayleigh = torch.diagonal(new.T @ m @ new)
        torch.testing.assert_close(side.eigenvalues[0], rayleigh.clamp(min=0))
        assert bool((side.eigenvalues[0].diff() >= 0).all())
        errors.append(float(torch.linalg.matrix_norm(new @ torch.diag(rayleigh) @ new.T - m)))
        basis = new
    assert errors[-1] < 1e-6 * errors[0] and errors[5] < errors[0]
    torch.testing.assert_close(side.eigenvalues[0], eigenvalues)


def test_decompose_all_warm_starts_in_batches_and_falls_back_to_eigh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(2)
    factors = [random_spd(4, gen)[None] for _ in range(3)]
    previous = [torch.linalg.eigh(f)[1] for f in factors]
    calls: list[tuple[int, ...]] = []
    real_eigh, real_qr = torch.linalg.eigh, torch.linalg.qr
    monkeypatch.setattr(
        torch.linalg, "eigh", lambda m: calls.append(("eigh", *m.shape)) or real_eigh(m)
    )
    monkeypatch.setattr(torch.linalg, "qr", lambda m: calls.append(("qr", *m.shape)) or real_qr(m))
    sides = decompose_all(factors, [previous[0], None, previous[2]])
    assert sorted(calls) == [("eigh", 1, 4, 4), ("qr", 2, 4, 4)]  # one batch of each
    for factor, side in zip(factors, sides, strict=True):
        assert side is not None and side.basis is not None
        torch.testing.assert_close(
            side.basis @ torch.diag_embed(side.eigenvalues) @ side.basis.mT, factor
        )
    calls.clear()
    factors[2] = torch.full((1, 4, 4), float("nan"), dtype=torch.float64)
    sides = decompose_all(factors, previous)  # the failing batch is redone one by one
    assert sides[2] is None and sides[0] is not None and sides[1] is not None
    assert calls.count(("qr", 3, 4, 4)) == 1 and calls.count(("eigh", 1, 4, 4)) >= 3


def test_optimizer_refreshes_by_subspace_steps_after_the_first_eigh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eighs = []
    real_eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: eighs.append(m.shape) or real_eigh(m))
    model = small_model()
    damping = 1e-2
    opt = optimizer(
        model,
        damping_method="exact",
        eigenbasis_refresh="subspace",
        inverse_update_freq=2,
        damping=damping,
    )
    data = batches(5)
    step(model, opt, *data[0])
    first = len(eighs)
    assert first > 0
    for x, y in data[1:]:
        step(model, opt, x, y)
    assert len(eighs) == first  # refreshes at steps 2 and 4 were subspace steps
    factors = opt.preconditioner.factors()
    for name, inverse in opt.preconditioner.inverses.items():
        assert isinstance(inverse, EigenInverse)
        a, g = factors[name]
        for side, factor in ((inverse.domain, a), (inverse.codomain, g)):
            assert side.basis is not None
            q = side.basis[0]
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[0]), atol=1e-5, rtol=0)
            rayleigh = torch.diagonal(q.T @ factor @ q).clamp(min=0)
            torch.testing.assert_close(side.eigenvalues[0], rayleigh, rtol=1e-4, atol=1e-6)
        # the inverse is the exact-damped inverse of Q diag(e) Qᵀ on both sides
        a_hat = (
            inverse.domain.basis[0]
            @ torch.diag(inverse.domain.eigenvalues[0])
            @ inverse.domain.basis[0].T
        )  # type: ignore[index]
        g_hat = (
            inverse.codomain.basis[0]
            @ torch.diag(inverse.codomain.eigenvalues[0])
            @ inverse.codomain.basis[0].T
        )  # type: ignore[index]
        v = torch.randn(1, g.shape[0], a.shape[0])
        got = opt.preconditioner.precondition(name, v)
        assert got is not None
        torch.testing.assert_close(
            got[0].double(), dense_solve(a_hat, g_hat, v[0], damping), rtol=1e-3, atol=1e-6
        )


def test_subspace_refresh_resumes_exactly_from_a_state_dict() -> None:
    options = {
        "damping_method": "exact",
        "eigenbasis_refresh": "subspace",
        "inverse_update_freq": 2,
    }
    data = batches(6)
    model = small_model()
    opt = optimizer(model, **options)
    for x, y in data[:3]:
        step(model, opt, x, y)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    for x, y in data[3:]:
        step(model, opt, x, y)
    resumed_model = small_model()
    resumed_model.load_state_dict(saved_model)
    resumed = optimizer(resumed_model, **options)
    resumed.load_state_dict(saved)
    for x, y in data[3:]:
        step(resumed_model, resumed, x, y)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"stagger_refreshes": 1}, "stagger_refreshes"),
        ({"eigenbasis_refresh": "lanczos"}, "eigenbasis_refresh"),
        ({"eigenbasis_refresh": "subspace"}, "eigenbasis_refresh"),  # needs exact damping
    ],
)
def test_invalid_refresh_options_name_the_argument(options: dict, name: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid {name}="):
        FrobPreconditionedSGD(
            nn.Linear(2, 2), lr=0.1, **{"step_rule": "preconditioned_sgd", **options}
        )
