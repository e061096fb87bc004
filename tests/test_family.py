"""The norm family inside the optimizer: least-squares exactness, the MC Fisher, diagnostics."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfrob import FrobPreconditionedSGD
from kfrob.diagnostics import fisher_trace
from kfrob.fisher import draw_categorical
from tests.reference import vec


def test_covariance_preconditioning_solves_least_squares_in_one_step() -> None:
    """``min ½‖X Wᵀ − Y‖²/N``: one step of ``∇W A⁻¹`` with lr 1 lands on the LS solution."""
    gen = torch.Generator().manual_seed(0)
    n, d_in, d_out = 200, 6, 3
    x = torch.randn(n, d_in, generator=gen) * torch.linspace(0.2, 3.0, d_in)
    y = torch.randn(n, d_out, generator=gen)
    layer = nn.Linear(d_in, d_out, bias=False)
    opt = FrobPreconditionedSGD(
        layer,
        lr=1.0,
        damping=1e-9,
        kl_clip=None,
        domain="covariance",
        codomain="identity",
        step_rule="preconditioned_sgd",
    )
    loss = 0.5 * (layer(x) - y).square().sum() / n
    loss.backward()
    opt.step()
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.T
    torch.testing.assert_close(layer.weight.double(), solution, rtol=1e-4, atol=1e-5)
    assert opt.preconditioner.layers[""].codomain is None  # no G recorded or stored


def test_mc_fisher_converges_to_closed_form_for_softmax() -> None:
    """Last linear layer, softmax cross-entropy: ``E[g gᵀ] = mean_n diag(p_n) − p_n p_nᵀ``."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 5)
    base = torch.randn(8, 4)
    with torch.no_grad():
        p = torch.softmax(layer(base), -1).double()
    closed_form = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)

    errors = []
    for repeats in (16, 2048):
        x = base.repeat(repeats, 1)
        targets = torch.zeros(len(x), dtype=torch.long)  # training labels: irrelevant to G
        opt = FrobPreconditionedSGD(
            layer,
            lr=0.0,
            fisher="mc",
            loss="cross_entropy",
            generator=torch.Generator().manual_seed(1),
            step_rule="preconditioned_sgd",
        )
        F.cross_entropy(layer(x), targets).backward()
        grad_before_step = layer.weight.grad.clone()
        opt.step()
        opt.close()
        _, g = opt.preconditioner.factors()[""]
        errors.append((g.double() - closed_form).abs().max().item())
        # the training gradients are untouched by the sampled backward
        layer.zero_grad()
        F.cross_entropy(layer(x), targets).backward()
        torch.testing.assert_close(grad_before_step, layer.weight.grad)
        layer.zero_grad()
    assert errors[1] < 0.01 < errors[0], errors


def test_categorical_draws_follow_their_probabilities() -> None:
    """Frequencies of 200,000 draws per row are within 5 standard errors of each row's
    probabilities (unnormalised rows included); classes of probability 0 are never drawn."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 2.0, 0.0], [0.1, 0.2, 0.3, 0.0]])
    draws = 200_000
    labels = draw_categorical(probs.repeat_interleave(draws, 0), gen).reshape(3, draws)
    counts = F.one_hot(labels, 4).sum(1).double()
    p = probs.double() / probs.double().sum(-1, keepdim=True)
    standard_error = (p * (1 - p) / draws).sqrt()
    assert ((counts / draws - p).abs() <= 5 * standard_error + 1e-12).all(), counts / draws
    assert (counts[p == 0] == 0).all()


def test_mc_fisher_for_mse_is_identity_on_last_layer() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(20000, 3)
    opt = FrobPreconditionedSGD(
        layer, lr=0.0, fisher="mc", loss="mse", step_rule="preconditioned_sgd"
    )
    F.mse_loss(layer(x), torch.zeros(20000, 2)).backward()
    opt.step()
    _, g = opt.preconditioner.factors()[""]
    torch.testing.assert_close(g, torch.eye(2), atol=0.03, rtol=0)


def test_mc_fisher_trains_a_classifier() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = (x @ torch.randn(10, 3, generator=gen)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = FrobPreconditionedSGD(
        model,
        lr=0.3,
        momentum=0.9,
        fisher="mc",
        loss="cross_entropy",
        step_rule="preconditioned_sgd",
    )
    first = F.cross_entropy(model(x), y).item()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y).item() < 0.5 * first


def test_step_diagnostics_match_dense_references() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    lr, damping = 0.2, 0.05
    opt = FrobPreconditionedSGD(
        layer,
        lr=lr,
        damping=damping,
        kl_clip=1e-4,
        damping_method="exact",
        step_rule="preconditioned_sgd",
    )
    x, t = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(layer(x), t).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(layer(x), t).backward()
    stats = opt.diagnostics()

    a, g = (f.double() for f in opt.preconditioner.factors()[""])
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    metric = torch.kron(a, g)
    damped = metric + damping * torch.eye(metric.shape[0], dtype=torch.float64)
    direction = torch.linalg.solve(damped, vec(grad))
    kl = lr**2 * vec(grad) @ direction
    nu = min(1.0, (1e-4 / kl).sqrt().item())
    update = lr * nu * direction
    expected = {
        "/grad_norm": grad.norm(),
        "/grad_norm_metric": (vec(grad) @ direction).sqrt(),
        "/update_norm": update.norm(),
        "/update_norm_metric": (update @ metric @ update).sqrt(),
        "/cond_A": torch.linalg.cond(a),
        "/cond_G": torch.linalg.cond(g),
        "/damping": damping,
        "kl_clip_factor": nu,
        "fisher_trace": torch.trace(metric),
    }
    for key, value in expected.items():
        assert abs(stats[key] - float(value)) <= 1e-3 * abs(float(value)) + 1e-6, key
    s = torch.linalg.svdvals(torch.cat([layer.weight, layer.bias[:, None]], 1).detach())
    assert abs(stats["/nuclear_frobenius_ratio"] - (s.sum() / s.norm()).item()) < 1e-5


def test_fisher_trace_of_grouped_conv_sums_blocks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FrobPreconditionedSGD(model, lr=0.0, step_rule="preconditioned_sgd")
    F.cross_entropy(model(torch.randn(8, 4, 6)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    want = sum(
        torch.trace(torch.kron(a[k], g[k])) if a.dim() == 3 else torch.trace(torch.kron(a, g))
        for a, g in opt.preconditioner.factors().values()
        for k in range(a.shape[0] if a.dim() == 3 else 1)
    )
    torch.testing.assert_close(fisher_trace(opt), torch.as_tensor(want), rtol=1e-5, atol=1e-6)


def test_mc_fisher_warns_once_when_the_model_output_is_not_a_tensor() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.linear(x)}

    model = Wrapped()
    opt = FrobPreconditionedSGD(
        model, lr=0.1, fisher="mc", loss="cross_entropy", step_rule="preconditioned_sgd"
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(
                model(torch.randn(4, 3))["logits"], torch.zeros(4, dtype=torch.long)
            ).backward()
            opt.step()
    assert sum("fisher='mc' needs" in str(r.message) for r in record) == 1
    assert not opt.preconditioner.layers["linear"].codomain.pending


def test_default_fisher_is_mc_when_the_loss_is_known() -> None:
    layer = nn.Linear(3, 2)
    assert (
        FrobPreconditionedSGD(
            layer, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd"
        ).preconditioner.options.curvature.fisher
        == "mc"
    )
    assert (
        FrobPreconditionedSGD(
            layer, lr=0.1, step_rule="preconditioned_sgd"
        ).preconditioner.options.curvature.fisher
        == "empirical"
    )
    forced = FrobPreconditionedSGD(
        layer, lr=0.1, fisher="empirical", loss="mse", step_rule="preconditioned_sgd"
    )
    assert forced.preconditioner.options.curvature.fisher == "empirical"


def test_mc_fisher_survives_a_nan_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for bad in (False, True, False):
        xb = x.clone()
        if bad:
            xb[0, 0] = float("nan")
        opt.zero_grad()
        F.cross_entropy(model(xb), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(
        torch.isfinite(a).all() and torch.isfinite(g).all()
        for a, g in opt.preconditioner.factors().values()
    )


def test_mc_fisher_ignores_the_training_loss_scale() -> None:
    """The sampled loss is differentiated unscaled: a GradScaler must not touch MC's ``G``."""
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    factors = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=enabled)
        opt = FrobPreconditionedSGD(
            model,
            lr=0.1,
            loss="cross_entropy",
            grad_scaler=scaler,
            generator=torch.Generator().manual_seed(3),
            step_rule="preconditioned_sgd",
        )
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        factors.append(opt.preconditioner.factors())
    for name, (_, g) in factors[0].items():
        torch.testing.assert_close(factors[1][name][1], g)


@pytest.mark.parametrize(("reduction", "micro_batches"), [("mean", 1), ("sum", 1), ("mean", 4)])
def test_mc_fisher_is_independent_of_reduction_and_accumulation(
    reduction: str, micro_batches: int
) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = torch.randn(8000, 3)
    opt = FrobPreconditionedSGD(
        layer, lr=0.0, loss="mse", loss_reduction=reduction, step_rule="preconditioned_sgd"
    )
    for part in x.chunk(micro_batches):
        loss = F.mse_loss(layer(part), torch.zeros(len(part), 2), reduction=reduction)
        (loss / micro_batches).backward()
    opt.step()
    _, g = opt.preconditioner.factors()[""]
    torch.testing.assert_close(g, torch.eye(2), atol=0.05, rtol=0)
