"""The eigenvalue correction (EKFAC) against per-sample gradients from ``torch.func``.

References: per-sample gradients of each sample's own loss term with
``vmap(grad(functional_call))`` on a separate copy of the model (so kfrob's hooks never see
them), factors from :mod:`tests.reference`, bases from ``torch.linalg.eigh`` of those in
float64, and dense solves with ``kron(Q_A, Q_G) diag(vec(S) + λ) kron(Q_A, Q_G)ᵀ``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from kfrob import FrobPreconditionedSGD
from kfrob.correction import EigenbasisMoment
from kfrob.fisher import draw_categorical
from kfrob.preconditioner import KroneckerPreconditioner
from tests.reference import (
    codomain_factor,
    dense_solve,
    domain_factor_conv,
    domain_factor_linear,
    per_sample_output_grads,
    unvec,
    vec,
)

DAMPING = 0.05
N = 16


def make_model(kind: str) -> nn.Sequential:
    """A tiny classifier whose first layer (``"0"``, with bias) is the one checked."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3))


def make_batch(kind: str, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (N, 5) if kind == "linear" else (N, 2, 4, 4)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def ekfac(model: nn.Module, **options: object) -> FrobPreconditionedSGD:
    defaults: dict[str, object] = {
        "lr": 0.0,
        "kl_clip": None,
        "damping": DAMPING,
        "damping_method": "exact",
        "eigenvalue_correction": True,
    }
    return FrobPreconditionedSGD(
        model, **{"step_rule": "preconditioned_sgd", **defaults, **options}
    )  # type: ignore[arg-type]


def train_step(
    model: nn.Module, opt: FrobPreconditionedSGD, batch: tuple[Tensor, Tensor], reduction: str
) -> Tensor:
    """One step; returns the labels ``G`` (and ``S``) are built from: the batch's, or for
    the MC Fisher those drawn from the model, redrawn here from the generator's state."""
    x, y = batch
    gen = opt.generator
    state = None if gen is None else gen.get_state()
    opt.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, y, reduction=reduction).backward()
    opt.step()
    if opt.preconditioner.options.curvature.fisher == "empirical":
        return y
    assert state is not None
    redraw = torch.Generator().set_state(state)
    return draw_categorical(torch.softmax(logits.detach(), -1), redraw)


def per_sample_matrices(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    """``U_n``: the first layer's gradient of each sample's own loss term, ``(N, out, in)``
    in float64 with the bias column last."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}

    def own_loss(p: dict[str, Tensor], x_n: Tensor, t_n: Tensor) -> Tensor:
        out = functional_call(model, p, (x_n.unsqueeze(0),))
        return F.cross_entropy(out, t_n.unsqueeze(0))

    grads = vmap(grad(own_loss), in_dims=(None, 0, 0))(params, x.double(), targets)
    weight = grads["0.weight"].reshape(x.shape[0], grads["0.weight"].shape[1], -1)
    return torch.cat([weight, grads["0.bias"].unsqueeze(-1)], dim=-1).detach()


def reference_factors(model: nn.Sequential, x: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, G)`` of the first layer from :mod:`tests.reference` (float64)."""
    layer = model[0]
    if isinstance(layer, nn.Linear):
        a = domain_factor_linear(x, bias=True)
    else:
        a = domain_factor_conv(layer, x)[0]  # type: ignore[arg-type]
    double = copy.deepcopy(model).double()
    with torch.no_grad():
        y = double[0](x.double())
    grads = per_sample_output_grads(double[1:], F.cross_entropy, y, targets)
    return a.detach(), codomain_factor(grads)[0].detach()


def moment(u: Tensor, q_g: Tensor, q_a: Tensor) -> Tensor:
    """``S = mean_n (Q_Gᵀ U_n Q_A)²``."""
    return (q_g.mT.double() @ u @ q_a.double()).square().mean(0)


def dense_ekfac(q_a: Tensor, q_g: Tensor, s: Tensor, v: Tensor, damping: float) -> Tensor:
    """Solve ``(Q diag(vec(S) + λ) Qᵀ) vec(X) = vec(V)`` with ``Q = Q_A ⊗ Q_G`` densely."""
    q = torch.kron(q_a.double(), q_g.double())
    matrix = q @ torch.diag(vec(s.double()) + damping) @ q.T
    return unvec(torch.linalg.solve(matrix, vec(v.double())), v.shape[0], v.shape[1])


def correction_of(opt: FrobPreconditionedSGD) -> EigenbasisMoment:
    correction = opt.preconditioner.layers["0"].correction
    assert correction is not None
    return correction


def preconditioned(opt: FrobPreconditionedSGD, v: Tensor) -> Tensor:
    out = opt.preconditioner.precondition("0", v.float().unsqueeze(0))
    assert out is not None
    return out[0].double()


def own_basis_update(correction: EigenbasisMoment, v: Tensor, s: Tensor) -> Tensor:
    assert correction.domain_basis is not None and correction.codomain_basis is not None
    return dense_ekfac(correction.domain_basis[0], correction.codomain_basis[0], s, v, DAMPING)


# --- against the references ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("fisher", "reduction"), [("empirical", "mean"), ("empirical", "sum"), ("mc", "mean")]
)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_moment_and_update_match_per_sample_reference(
    kind: str, fisher: str, reduction: str
) -> None:
    model = make_model(kind)
    reference = copy.deepcopy(model)  # before kfrob's hooks: torch.func calls never record
    mc = {"loss": "cross_entropy", "generator": torch.Generator().manual_seed(5)}
    opt = ekfac(
        model,
        factor_decay=0.0,  # the statistic is this batch's
        inverse_update_freq=100,  # one refresh, at the first step: the bases of batch 1
        fisher=fisher,
        loss_reduction=reduction,
        **(mc if fisher == "mc" else {}),
    )
    batch1, batch2 = make_batch(kind, 1), make_batch(kind, 2)
    targets1 = train_step(model, opt, batch1, reduction)
    targets2 = train_step(model, opt, batch2, reduction)

    a, g = reference_factors(reference, batch1[0], targets1)
    q_a, q_g = torch.linalg.eigh(a)[1], torch.linalg.eigh(g)[1]
    u = per_sample_matrices(reference, batch2[0], targets2)
    s_ref = moment(u, q_g, q_a)
    correction = correction_of(opt)
    s = correction.value[0].double()
    assert s.shape == u.shape[1:]
    scale = float(s_ref.max())
    # S in kfrob's own bases (no sign/order ambiguity) and, elementwise, in the reference's
    assert correction.domain_basis is not None and correction.codomain_basis is not None
    s_own = moment(u, correction.codomain_basis[0], correction.domain_basis[0])
    torch.testing.assert_close(s, s_own, rtol=1e-4, atol=1e-6 * scale)
    torch.testing.assert_close(s, s_ref, rtol=1e-3, atol=1e-4 * scale)

    v = torch.randn(*s.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = dense_ekfac(q_a, q_g, s_ref, v, DAMPING)
    torch.testing.assert_close(
        preconditioned(opt, v), want, rtol=1e-3, atol=1e-4 * float(want.abs().max())
    )
    # EKFAC is not K-FAC here: the update differs from the exact-damped Kronecker solve
    a2, g2 = opt.preconditioner.factors()["0"]
    kfac = dense_solve(a2, g2, v, DAMPING)
    assert (preconditioned(opt, v) - kfac).abs().max() > 1e-2 * kfac.abs().max()


@pytest.mark.parametrize("warmup", [False, True])
def test_moment_is_averaged_between_refreshes_and_restarts_at_each(warmup: bool) -> None:
    decay = 0.8
    model = make_model("conv")
    reference = copy.deepcopy(model)
    opt = ekfac(model, factor_decay=decay, inverse_update_freq=3, factor_decay_warmup=warmup)
    correction = correction_of(opt)
    v = torch.randn(3, 19, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    updates = []
    for step in range(5):
        batch = make_batch("conv", 10 + step)
        before = correction.value[0].double().clone()
        train_step(model, opt, batch, "mean")
        update = preconditioned(opt, v)
        updates.append(update)
        inverse = opt.preconditioner.inverses["0"]
        if step % 3 == 0:  # a refresh: S restarts from K-FAC's e_G e_Aᵀ, the step is K-FAC's
            e_g, e_a = inverse.codomain.eigenvalues[0], inverse.domain.eigenvalues[0]  # type: ignore[union-attr]
            torch.testing.assert_close(correction.value[0], e_g[:, None] * e_a[None, :])
            a, g = opt.preconditioner.factors()["0"]
            want = dense_solve(a, g, v, DAMPING)
        else:  # S moves towards this batch's statistic in the bases of the last refresh
            k = step + 1  # the factors' count of statistics, which S's weight follows
            weight = max(1 / k, 1 - decay) if warmup else 1 - decay
            u = per_sample_matrices(reference, *batch)
            assert correction.codomain_basis is not None and correction.domain_basis is not None
            stat = moment(u, correction.codomain_basis[0], correction.domain_basis[0])
            s_want = (1 - weight) * before + weight * stat
            torch.testing.assert_close(
                correction.value[0].double(), s_want, rtol=1e-4, atol=1e-6 * float(s_want.max())
            )
            want = own_basis_update(correction, v, s_want)
        torch.testing.assert_close(update, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    # the update followed S between refreshes (the inverse itself was not refreshed)
    assert not torch.allclose(updates[1], updates[2], rtol=1e-3)


def test_sum_over_locations_is_not_kfac_expand() -> None:
    """A convolution's S squares each sample's gradient summed over locations: the
    per-location squares (what treating locations as samples would give) differ."""
    model = make_model("conv")
    reference = copy.deepcopy(model)
    opt = ekfac(model, factor_decay=0.0, inverse_update_freq=100)
    for seed in (1, 2):
        batch = make_batch("conv", seed)
        train_step(model, opt, batch, "mean")
    correction = correction_of(opt)
    assert correction.codomain_basis is not None and correction.domain_basis is not None
    q_g, q_a = correction.codomain_basis[0].double(), correction.domain_basis[0].double()
    x, y = batch
    ref = copy.deepcopy(reference).double()
    patches = torch.nn.functional.unfold(F.pad(x.double(), (1, 1, 1, 1)), 3)  # (N, 18, 16)
    rows = torch.cat([patches, torch.ones(N, 1, 16, dtype=torch.float64)], 1)
    grads = per_sample_output_grads(ref[1:], F.cross_entropy, ref[0](x.double()), y)
    # (N, out, in, locations): g̃_l ã_lᵀ for every sample and location
    per_location = (q_g.T @ grads.reshape(N, 3, 16)).unsqueeze(-2) * (q_a.T @ rows).unsqueeze(-3)
    expand = per_location.square().sum(-1).mean(0)  # Σ_l (g̃_l ã_lᵀ)², not (Σ_l g̃_l ã_lᵀ)²
    summed = per_location.sum(-1).square().mean(0)
    s = correction.value[0].double()
    torch.testing.assert_close(s, summed, rtol=1e-4, atol=1e-6 * float(summed.max()))
    assert (s - expand).abs().max() > 1e-2 * s.max()


class Twice(nn.Module):
    """One ``nn.Linear`` called twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_a_module_called_twice_squares_each_calls_gradient() -> None:
    """The documented convention for repeated calls: each call's per-sample gradient is
    squared on its own (as ``G`` treats calls like locations), over the true samples."""
    model = Twice()
    reference = copy.deepcopy(model)
    opt = ekfac(model, factor_decay=0.0, inverse_update_freq=100)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x, y = torch.randn(N, 4, generator=gen), torch.randint(0, 3, (N,), generator=gen)
        train_step(model, opt, (x, y), "mean")
    params = {k: v.detach().double() for k, v in reference.named_parameters()}

    def own_loss(w: tuple[Tensor, Tensor], x_n: Tensor, t_n: Tensor) -> Tensor:
        (w1, b1), (w2, b2) = w[0], w[1]
        hidden = torch.tanh(F.linear(torch.tanh(F.linear(x_n, w1, b1)), w2, b2))
        out = F.linear(hidden, params["head.weight"], params["head.bias"])
        return F.cross_entropy(out.unsqueeze(0), t_n.unsqueeze(0))

    pair = (params["shared.weight"], params["shared.bias"])
    grads = vmap(grad(own_loss), in_dims=(None, 0, 0))((pair, pair), x.double(), y)
    correction = opt.preconditioner.layers["shared"].correction
    assert correction is not None and correction.codomain_basis is not None
    assert correction.domain_basis is not None
    s_want = sum(
        moment(
            torch.cat([w.detach(), b.detach().unsqueeze(-1)], -1),
            correction.codomain_basis[0],
            correction.domain_basis[0],
        )
        for w, b in grads
    )
    assert isinstance(s_want, Tensor)
    s = correction.value[0].double()
    torch.testing.assert_close(s, s_want, rtol=1e-4, atol=1e-6 * float(s_want.max()))


def test_grad_scaler_scale_does_not_leak_into_the_moment() -> None:
    plain, scaled = make_model("linear"), make_model("linear")
    opt_plain = ekfac(plain, inverse_update_freq=100)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt_scaled = ekfac(scaled, inverse_update_freq=100, grad_scaler=scaler)
    for seed in (1, 2):
        x, y = make_batch("linear", seed)
        opt_plain.zero_grad()
        opt_scaled.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    s_plain, s_scaled = correction_of(opt_plain).value, correction_of(opt_scaled).value
    torch.testing.assert_close(s_scaled, s_plain, rtol=1e-5, atol=1e-6 * float(s_plain.max()))


# --- reliability and persistence --------------------------------------------------------
def test_non_finite_batch_leaves_the_moment_untouched() -> None:
    model = make_model("linear")
    opt = ekfac(model, inverse_update_freq=100)
    for seed in (1, 2):
        train_step(model, opt, make_batch("linear", seed), "mean")
    correction = correction_of(opt)
    saved = (correction.value.clone(), correction.folds.clone())
    scaling = opt.preconditioner.inverses["0"].scaling.clone()  # type: ignore[union-attr]
    x, y = make_batch("linear", 3)
    x[0, 0] = float("nan")
    train_step(model, opt, (x, y), "mean")
    assert torch.equal(correction.value, saved[0]) and torch.equal(correction.folds, saved[1])
    assert torch.equal(opt.preconditioner.inverses["0"].scaling, scaling)  # type: ignore[union-attr]
    assert not correction.pending
    train_step(model, opt, make_batch("linear", 4), "mean")
    assert not torch.equal(correction.value, saved[0])


def test_state_dict_round_trip_reproduces_the_next_steps_exactly() -> None:
    def run(model: nn.Module, opt: FrobPreconditionedSGD, seeds: range) -> None:
        for seed in seeds:
            train_step(model, opt, make_batch("conv", seed), "mean")

    options = {"lr": 0.1, "momentum": 0.9, "factor_decay": 0.9, "inverse_update_freq": 3}
    model = make_model("conv")
    opt = ekfac(model, **options)
    run(model, opt, range(4))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert "correction" in opt.state_dict()["kfrob"]["engine"]["layers"]["0"]
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = make_model("conv")
    resumed.load_state_dict(saved["model"])
    opt_resumed = ekfac(resumed, **options)
    opt_resumed.load_state_dict(saved["opt"])
    torch.testing.assert_close(correction_of(opt_resumed).value, correction_of(opt).value)
    run(model, opt, range(4, 8))  # steps 4, 5 between refreshes, 6 a refresh, 7 after it
    run(resumed, opt_resumed, range(4, 8))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(correction_of(opt_resumed).value, correction_of(opt).value)


def test_nothing_is_recorded_off_update_steps_or_before_the_first_bases() -> None:
    model = make_model("linear")
    opt = ekfac(model, factor_update_freq=2, inverse_update_freq=100)
    correction = correction_of(opt)
    x, y = make_batch("linear", 1)
    F.cross_entropy(model(x), y).backward()
    assert not correction.ready and not correction.pending  # no bases yet
    opt.step()
    assert correction.ready
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # step 1: not a factor-update step
    assert not correction.pending
    opt.step()
    F.cross_entropy(model(x), y).backward()  # step 2: recorded
    assert correction.pending


def test_option_off_keeps_no_correction_and_no_state() -> None:
    model = make_model("linear")
    opt = FrobPreconditionedSGD(
        model, lr=0.1, damping_method="exact", step_rule="preconditioned_sgd"
    )
    for seed in (1, 2):
        train_step(model, opt, make_batch("linear", seed), "mean")
    assert all(layer.correction is None for layer in opt.preconditioner.layers.values())
    assert all("correction" not in entry for entry in _layers_state(opt).values())


def _layers_state(opt: FrobPreconditionedSGD) -> dict[str, dict[str, object]]:
    return opt.state_dict()["kfrob"]["engine"]["layers"]


# --- validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"eigenvalue_correction": 1, "damping_method": "exact"}, "eigenvalue_correction=1"),
        ({"eigenvalue_correction": True}, "eigenvalue_correction.*damping_method='exact'"),
        (
            {"eigenvalue_correction": True, "damping_method": "exact", "domain": "diagonal"},
            "eigenvalue_correction.*domain='covariance'",
        ),
        (
            {"eigenvalue_correction": True, "damping_method": "exact", "codomain": "identity"},
            "eigenvalue_correction.*codomain='fisher'",
        ),
    ],
)
def test_invalid_combinations_raise(options: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FrobPreconditionedSGD(
            nn.Linear(3, 2), lr=0.1, **{"step_rule": "preconditioned_sgd", **options}
        )  # type: ignore[arg-type]


def test_preconditioner_refuses_a_communicator() -> None:
    with pytest.raises(ValueError, match=r"eigenvalue_correction.*data parallelism"):
        KroneckerPreconditioner(
            nn.Linear(3, 2),
            damping_method="exact",
            eigenvalue_correction=True,
            communicator=object(),  # type: ignore[arg-type]
        )


def test_lightning_callback_takes_the_option() -> None:
    lightning = pytest.importorskip("kfrob.lightning")
    make: Callable[..., object] = lightning.FrobPreconditioner
    with pytest.raises(ValueError, match=r"eigenvalue_correction.*damping_method='exact'"):
        make(eigenvalue_correction=True)
    callback = make(damping_method="exact", eigenvalue_correction=True)
    assert callback.options.inverse.eigenvalue_correction is True  # type: ignore[attr-defined]
