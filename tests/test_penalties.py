"""kfrob.penalties against brute-force definitions: SVDs, explicit Jacobians and Hessians."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from kfrob import FrobPreconditionedSGD
from kfrob.diagnostics import geometric_complexity, hessian_trace
from kfrob.penalties import (
    frobenius_penalty,
    geometric_complexity_penalty,
    hessian_trace_penalty,
    linear_chain_fisher_trace,
    matrix_penalty,
    nuclear_frobenius_penalty,
    nuclear_penalty,
    schatten_penalty,
)

DT = torch.float64


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=gen, dtype=DT)
    return m @ m.T + n * torch.eye(n, dtype=DT)


def _sym_power(m: torch.Tensor, power: float) -> torch.Tensor:
    e, v = torch.linalg.eigh(m)
    return (v * e.pow(power)) @ v.T


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0])
def test_schatten_matches_svd_batched(p: float) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 4, generator=gen, dtype=DT)
    expected = torch.linalg.svdvals(w).pow(p).sum(-1).pow(1 / p)
    torch.testing.assert_close(schatten_penalty(w, p), expected)


def test_schatten_in_a_metric_is_the_whitened_svd() -> None:
    gen = torch.Generator().manual_seed(1)
    w, my, mx = torch.randn(4, 6, generator=gen, dtype=DT), _spd(4, gen), _spd(6, gen)
    whitened = _sym_power(my, 0.5) @ w @ _sym_power(mx, -0.5)
    sv = torch.linalg.svdvals(whitened)
    torch.testing.assert_close(schatten_penalty(w, 1, domain=mx, codomain=my), sv.sum())
    ratio = nuclear_frobenius_penalty(w, domain_inverse=torch.linalg.inv(mx), codomain=my)
    torch.testing.assert_close(ratio, sv.sum() / sv.norm())


def test_nuclear_and_ratio_gradients_match_their_formulas() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 3, generator=gen, dtype=DT, requires_grad=True)
    u, s, vh = torch.linalg.svd(w.detach(), full_matrices=False)
    (grad,) = torch.autograd.grad(nuclear_penalty(w), w)
    torch.testing.assert_close(grad, u @ vh)  # d Σσ = tr(U Vᵀ dWᵀ)
    (grad,) = torch.autograd.grad(nuclear_frobenius_penalty(w), w)
    nuc, fro = s.sum(), s.norm()
    torch.testing.assert_close(grad, u @ vh / fro - nuc * w.detach() / fro**3)


def test_frobenius_penalty_in_the_kfac_metric() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, generator=gen, dtype=DT, requires_grad=True)
    a, g = _spd(6, gen), _spd(4, gen)
    value = frobenius_penalty(w, codomain=g, domain_inverse=a)
    torch.testing.assert_close(value, torch.trace(a @ w.T @ g @ w))
    (grad,) = torch.autograd.grad(value, w)
    torch.testing.assert_close(grad, 2 * g @ w.detach() @ a)
    torch.testing.assert_close(frobenius_penalty(w), w.square().sum())


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc1 = nn.Linear(12, 5)
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(self.conv(x).flatten(1))))))


@pytest.mark.parametrize("kind", ["nuclear", "schatten", "nuclear_frobenius", "frobenius"])
def test_matrix_penalty_sums_the_layers(kind: str) -> None:
    torch.manual_seed(0)
    net = _Net().double()
    weights = [m.weight.flatten(1) for m in (net.conv, net.fc1, net.fc2, net.fc3)]

    def reference(ws: list[torch.Tensor]) -> torch.Tensor:
        sv = [torch.linalg.svdvals(w) for w in ws]
        if kind == "nuclear":
            return sum(s.sum() for s in sv)
        if kind == "schatten":
            return sum(s.pow(3).sum().pow(1 / 3) for s in sv)
        if kind == "nuclear_frobenius":
            return sum(s.sum() / s.norm() for s in sv)
        return sum(w.square().sum() for w in ws)

    value = matrix_penalty(net, kind, p=3.0)  # fc2 and fc3 share a shape: one batched call
    torch.testing.assert_close(value, reference(weights))
    grads = torch.autograd.grad(value, [net.conv.weight, net.fc2.weight])
    expected = torch.autograd.grad(reference(weights), [net.conv.weight, net.fc2.weight])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    chosen = matrix_penalty(net, kind, p=3.0, layers=["fc1"])
    torch.testing.assert_close(chosen, reference([net.fc1.weight]))


def test_matrix_penalty_refuses_bad_arguments() -> None:
    net = _Net()
    with pytest.raises(ValueError, match=r"kind must be one of \['nuclear'"):
        matrix_penalty(net, "trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layers: \['fc9'\].*allowed: \['conv', 'fc1'"):
        matrix_penalty(net, layers=["fc9"])
    with pytest.raises(ValueError, match="p must be in"):
        matrix_penalty(net, "schatten", p=0.5)
    with pytest.raises(ValueError, match="factors: kind='metric_frobenius' needs"):
        matrix_penalty(net, "metric_frobenius")


def test_metric_frobenius_reads_the_optimizers_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))
    opt = FrobPreconditionedSGD(model, lr=0.1, step_rule="preconditioned_sgd")
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    F.mse_loss(model(x), y).backward()
    opt.step()
    factors = opt.preconditioner.factors()
    value = matrix_penalty(model, "metric_frobenius", factors=opt)
    expected = 0
    for name, module in (("0", model[0]), ("2", model[2])):
        a, g = factors[name]
        v = module.weight
        if module.bias is not None:
            v = torch.cat([v, module.bias[:, None]], 1)
        expected = expected + torch.trace(a @ v.T @ g @ v)
    torch.testing.assert_close(value, expected)
    only = matrix_penalty(model, "metric_frobenius", factors=factors, layers=["2"])
    a, g = factors["2"]
    torch.testing.assert_close(only, torch.trace(a @ model[2].weight.T @ g @ model[2].weight))
    with pytest.raises(ValueError, match=r"layers: \['1'\]"):
        matrix_penalty(model, "metric_frobenius", factors=factors, layers=["1"])


def _grads(value: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def test_geometric_complexity_penalty_is_the_projection_estimate_of_the_jacobians() -> None:
    model, n = _tiny_mlp(), 3
    x = torch.randn(5, 3, dtype=DT)
    params = dict(model.named_parameters())
    value = geometric_complexity_penalty(model, x, n, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)  # the same probes, drawn as the estimator draws them
    probes = [torch.randn(5, 2, generator=gen, dtype=DT) for _ in range(n)]

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        def f(xb: torch.Tensor) -> torch.Tensor:
            return functional_call(model, p, (xb[None],))[0]

        jac = torch.stack([jacrev(f)(xb) for xb in x])  # (B, out, in), explicit Jacobians
        return sum(torch.einsum("bo,boi->bi", u, jac).square().sum() for u in probes) / (n * 5)

    torch.testing.assert_close(value, reference(params))
    grads = _grads(value, list(params.values()))
    expected = _grads(reference(params), list(params.values()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    many = geometric_complexity(model, x, 4000, torch.Generator().manual_seed(0))
    exact = sum(jacrev(model)(xb[None])[0, :, 0].square().sum() for xb in x) / 5
    assert abs(many / exact - 1) < 0.05
    assert not many.requires_grad  # the diagnostic itself stays detached


def test_hessian_trace_penalty_is_hutchinson_on_the_explicit_hessian() -> None:
    model, n = _tiny_mlp(), 2
    batch = (torch.randn(6, 3, dtype=DT), torch.randn(6, 2, dtype=DT))
    params = dict(model.named_parameters())
    value = hessian_trace_penalty(model, F.mse_loss, batch, n, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # Rademacher probes, parameter by parameter
    probes = [
        {k: torch.randint(0, 2, p.shape, generator=gen).to(DT) * 2 - 1 for k, p in params.items()}
        for _ in range(n)
    ]

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.mse_loss(functional_call(model, p, (batch[0],)), batch[1])

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        h = hessian(loss)(p)  # nested dict of blocks
        total = 0
        for v in probes:
            for i, vi in v.items():
                for j, vj in v.items():
                    block = h[i][j].reshape(vi.numel(), vj.numel())
                    total = total + vi.flatten() @ block @ vj.flatten()
        return total / n

    torch.testing.assert_close(value, reference(params))
    grads = _grads(value, list(params.values()))
    expected = _grads(reference(params), list(params.values()))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not hessian_trace(model, F.mse_loss, batch, 1).requires_grad


def test_linear_chain_fisher_trace_is_the_hessian_trace_at_zero_residual() -> None:
    gen = torch.Generator().manual_seed(4)
    shapes = [(5, 3), (4, 5), (2, 4)]
    weights = [torch.randn(*s, generator=gen, dtype=DT, requires_grad=True) for s in shapes]
    x = torch.randn(7, 3, generator=gen, dtype=DT)
    cov = x.T @ x / 7

    def chain(ws: list[torch.Tensor]) -> torch.Tensor:
        out = x
        for w in ws:
            out = out @ w.T
        return out

    target = chain(weights).detach()  # zero residual: the Hessian is the Gauss–Newton matrix

    def loss(*ws: torch.Tensor) -> torch.Tensor:
        return 0.5 * (chain(list(ws)) - target).square().sum() / 7

    h = hessian(loss, argnums=(0, 1, 2))(*weights)
    trace = sum(torch.diagonal(h[i][i].reshape(w.numel(), w.numel())).sum() for i, w in
                enumerate(weights))  # fmt: skip
    value = linear_chain_fisher_trace(weights, cov)
    torch.testing.assert_close(value, trace)

    def gauss_newton_trace(ws: list[torch.Tensor]) -> torch.Tensor:  # E‖∂f/∂θ‖²_F, explicit
        jac = jacrev(lambda *w: chain(list(w)), argnums=(0, 1, 2))(*ws)
        return sum(j.square().sum() for j in jac) / 7

    grads = torch.autograd.grad(value, weights)
    expected = torch.autograd.grad(gauss_newton_trace(weights), weights)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)
    identity = linear_chain_fisher_trace(weights)
    torch.testing.assert_close(identity, linear_chain_fisher_trace(weights, torch.eye(3, dtype=DT)))
    with pytest.raises(ValueError, match="does not compose"):
        linear_chain_fisher_trace([weights[0], weights[0]])


def test_metric_penalty_refuses_what_holds_no_factors() -> None:
    with pytest.raises(ValueError, match="factors must be"):
        matrix_penalty(nn.Sequential(nn.Linear(2, 2)), "metric_frobenius", factors=object())
