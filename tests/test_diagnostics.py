"""Tests for kfrob.diagnostics against exact values on tiny models.

Exact references come from ``torch.func``: the full Hessian of the loss as a function of the
flattened parameters, and per-sample input–output Jacobians. Monte-Carlo estimates are compared
with a tolerance of five standard errors, where the standard error is computed from the exact
variance of one probe's contribution (see the helpers below), so the tolerance is neither loose
nor flaky; every random draw is seeded as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from kfrob.diagnostics import geometric_complexity, hessian_trace

# torch.func.hessian's forward-mode AD loads jit-scripted decompositions on first use, which
# emits torch's own deprecation warning for torch.jit.script; it is not about this code.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

DTYPE = torch.float64
N_STD_ERRORS = 5.0


@pytest.fixture(autouse=True, scope="module")
def _single_intra_op_thread() -> Iterator[None]:
    """Run on one intra-op thread: the models are tiny, and on a busy machine OpenMP workers
    spinning for a core cost far more than they save (about 50x on the probe loops here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Tiny models and exact references
# ---------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp(seed: int = 0, sizes: tuple[int, ...] = (3, 4, 2)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        if i > 0:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(DTYPE)


def _mlp_with_batchnorm(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Dropout(0.25), nn.Linear(4, 2)
    ).to(DTYPE)


def _regression_batch(seed: int = 1, n: int = 8) -> tuple[Tensor, Tensor]:
    g = _generator(seed)
    return torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randn(n, 2, generator=g, dtype=DTYPE)


def _classification_batch(seed: int = 1, n: int = 8) -> tuple[Tensor, Tensor]:
    g = _generator(seed)
    return torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randint(0, 2, (n,), generator=g)


def _exact_hessian(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: tuple[Tensor, Tensor],
    names: list[str] | None = None,
) -> Tensor:
    """Hessian of the loss w.r.t. the flattened parameters ``names`` (default: all)."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    inputs, targets = batch

    def loss_of(theta: Tensor) -> Tensor:
        chunks = theta.split(sizes)
        params = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return loss_fn(functional_call(model, params, (inputs,)), targets)

    return hessian(loss_of)(flat).detach()


def _rademacher_std_error(h: Tensor, n_samples: int) -> float:
    """Standard error of Hutchinson's mean: Var[vᵀHv] = 2 Σ_{i≠j} H_ij² for Rademacher v."""
    h = (h + h.T) / 2
    off_diagonal = h.square().sum() - h.diagonal().square().sum()
    return float((2 * off_diagonal / n_samples).sqrt())


def _per_sample_jacobians(model: nn.Module, inputs: Tensor) -> Tensor:
    """Jacobians ``J_b`` of shape ``(B, out_features, in_features)``, one sample at a time."""

    def single(x: Tensor) -> Tensor:
        return model(x.unsqueeze(0)).squeeze(0)

    jac = vmap(jacrev(single))(inputs)
    batch_size = inputs.shape[0]
    in_features = inputs[0].numel()
    return jac.reshape(batch_size, -1, in_features).detach()


def _gaussian_std_error(jacobians: Tensor, n_samples: int) -> float:
    """Standard error of the GC estimate: Var = (2 / (n B²)) Σ_b ‖J_b J_bᵀ‖²_F."""
    batch_size = jacobians.shape[0]
    gram = jacobians @ jacobians.transpose(1, 2)
    return float((2 * gram.square().sum() / (n_samples * batch_size**2)).sqrt())


def _assert_within_std_errors(estimate: Tensor, exact: Tensor, std_error: float) -> None:
    assert std_error > 0
    error = abs(float(estimate) - float(exact))
    assert error <= N_STD_ERRORS * std_error, (float(estimate), float(exact), std_error)


# ---------------------------------------------------------------------------------------------
# hessian_trace
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_fn", "make_batch"),
    [(F.mse_loss, _regression_batch), (F.cross_entropy, _classification_batch)],
    ids=["mse", "cross_entropy"],
)
def test_hessian_trace_matches_exact_trace(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    make_batch: Callable[[], tuple[Tensor, Tensor]],
) -> None:
    model, batch, n_samples = _mlp(), make_batch(), 1500
    h = _exact_hessian(model, loss_fn, batch)
    estimate = hessian_trace(model, loss_fn, batch, n_samples=n_samples, generator=_generator(0))
    _assert_within_std_errors(estimate, h.trace(), _rademacher_std_error(h, n_samples))


def test_hessian_trace_with_params_is_trace_of_the_block() -> None:
    model, batch, n_samples = _mlp(), _regression_batch(), 1000
    names = ["0.weight", "0.bias"]
    h = _exact_hessian(model, F.mse_loss, batch, names)
    named = dict(model.named_parameters())
    estimate = hessian_trace(
        model,
        F.mse_loss,
        batch,
        n_samples=n_samples,
        generator=_generator(0),
        params=[named[n] for n in names],
    )
    _assert_within_std_errors(estimate, h.trace(), _rademacher_std_error(h, n_samples))
    full_trace = _exact_hessian(model, F.mse_loss, batch).trace()
    assert abs(float(h.trace()) - float(full_trace)) > 1e-3  # the block really is a sub-block


class _Coordinates(nn.Module):
    """Returns its parameter vector θ whatever the input."""

    def __init__(self, theta: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta)

    def forward(self, x: Tensor) -> Tensor:
        return self.theta


def _weighted_square_loss(theta: Tensor, c: Tensor) -> Tensor:
    return (c * theta.square()).sum()


@settings(max_examples=25, deadline=None)
@given(
    c=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=6),
    n_samples=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_hutchinson_is_exact_for_diagonal_hessian(
    c: list[float], n_samples: int, seed: int
) -> None:
    # L(θ) = Σ c_i θ_i², so H = diag(2c) and vᵀHv = Σ 2 c_i v_i² = tr(H) for every ±1 probe.
    coefficients = torch.tensor(c, dtype=DTYPE)
    model = _Coordinates(torch.randn(len(c), generator=_generator(seed), dtype=DTYPE))
    batch = (torch.zeros(1, dtype=DTYPE), coefficients)
    estimate = hessian_trace(
        model, _weighted_square_loss, batch, n_samples=n_samples, generator=_generator(seed)
    )
    torch.testing.assert_close(estimate, 2 * coefficients.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_hutchinson_is_exact_for_per_feature_scaling(n_samples: int) -> None:
    # f(x) = θ ⊙ x with MSE: every θ_i only touches feature i, so H is diagonal.
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.theta = nn.Parameter(torch.randn(3, generator=_generator(3), dtype=DTYPE))

        def forward(self, x: Tensor) -> Tensor:
            return self.theta * x

    model = Scale()
    batch = (
        torch.randn(5, 3, generator=_generator(4), dtype=DTYPE),
        torch.zeros(5, 3, dtype=DTYPE),
    )
    h = _exact_hessian(model, F.mse_loss, batch)
    torch.testing.assert_close(h, torch.diag(h.diagonal()))
    estimate = hessian_trace(model, F.mse_loss, batch, n_samples=n_samples, generator=_generator(5))
    torch.testing.assert_close(estimate, h.trace(), rtol=1e-12, atol=1e-12)


def test_hessian_trace_is_zero_when_loss_is_linear_in_parameters() -> None:
    model = nn.Linear(3, 2).to(DTYPE)
    batch = (torch.randn(4, 3, dtype=DTYPE), torch.zeros(4, 2, dtype=DTYPE))
    estimate = hessian_trace(model, lambda out, _: out.sum(), batch, n_samples=3)
    assert float(estimate) == 0.0


def test_hessian_trace_works_under_no_grad() -> None:
    model, batch = _mlp(), _regression_batch()
    expected = hessian_trace(model, F.mse_loss, batch, n_samples=8, generator=_generator(0))
    with torch.no_grad():
        got = hessian_trace(model, F.mse_loss, batch, n_samples=8, generator=_generator(0))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_hessian_trace_rejects_bad_arguments() -> None:
    model, batch = _mlp(), _regression_batch()
    with pytest.raises(ValueError, match="params"):
        hessian_trace(model, F.mse_loss, batch, params=[torch.zeros(3, dtype=DTYPE)])
    with pytest.raises(ValueError, match="parameter"):
        hessian_trace(model, F.mse_loss, batch, params=[])
    with pytest.raises(ValueError, match="scalar"):
        hessian_trace(model, lambda out, t: (out - t).square(), batch)


# ---------------------------------------------------------------------------------------------
# geometric_complexity
# ---------------------------------------------------------------------------------------------


def test_geometric_complexity_matches_exact_mean_jacobian_norm() -> None:
    model, n_samples = _mlp(sizes=(3, 5, 4, 2)), 1000
    inputs = torch.randn(6, 3, generator=_generator(1), dtype=DTYPE)
    jacobians = _per_sample_jacobians(model, inputs)
    exact = jacobians.square().sum(dim=(1, 2)).mean()
    estimate = geometric_complexity(model, inputs, n_samples=n_samples, generator=_generator(0))
    _assert_within_std_errors(estimate, exact, _gaussian_std_error(jacobians, n_samples))


def test_geometric_complexity_of_linear_model_is_squared_frobenius_norm() -> None:
    torch.manual_seed(0)
    model, n_samples = nn.Linear(4, 3).to(DTYPE), 1000
    inputs = torch.randn(5, 4, generator=_generator(1), dtype=DTYPE)
    exact = model.weight.detach().square().sum()
    jacobians = model.weight.detach().expand(5, 3, 4)
    estimate = geometric_complexity(model, inputs, n_samples=n_samples, generator=_generator(0))
    _assert_within_std_errors(estimate, exact, _gaussian_std_error(jacobians, n_samples))


def test_geometric_complexity_with_multidimensional_inputs_and_outputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, kernel_size=3, padding=1), nn.Tanh()).to(DTYPE)
    inputs = torch.randn(4, 2, 5, generator=_generator(1), dtype=DTYPE)  # (B, C, L)
    jacobians = _per_sample_jacobians(model, inputs)  # (4, 3·5, 2·5)
    exact = jacobians.square().sum(dim=(1, 2)).mean()
    n_samples = 1000
    estimate = geometric_complexity(model, inputs, n_samples=n_samples, generator=_generator(0))
    _assert_within_std_errors(estimate, exact, _gaussian_std_error(jacobians, n_samples))


def test_geometric_complexity_is_zero_when_output_ignores_input() -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.ones(2, dtype=DTYPE))

        def forward(self, x: Tensor) -> Tensor:
            return self.bias.expand(x.shape[0], 2)

    inputs = torch.randn(3, 4, dtype=DTYPE)
    assert float(geometric_complexity(Constant(), inputs, n_samples=2)) == 0.0


def test_geometric_complexity_rejects_bad_shapes() -> None:
    class SumOverBatch(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x.sum(dim=0)

    with pytest.raises(ValueError, match="batch size"):
        geometric_complexity(SumOverBatch(), torch.randn(3, 4))
    with pytest.raises(ValueError, match="batch dim"):
        geometric_complexity(nn.Identity(), torch.randn(0, 4))


# ---------------------------------------------------------------------------------------------
# Shared contract: no side effects, determinism, argument checks
# ---------------------------------------------------------------------------------------------


def _run_hessian_trace(model: nn.Module, seed: int, n_samples: int = 4) -> Tensor:
    return hessian_trace(
        model, F.mse_loss, _regression_batch(), n_samples=n_samples, generator=_generator(seed)
    )


def _run_geometric_complexity(model: nn.Module, seed: int, n_samples: int = 4) -> Tensor:
    inputs = _regression_batch()[0]
    return geometric_complexity(model, inputs, n_samples=n_samples, generator=_generator(seed))


DIAGNOSTICS = pytest.mark.parametrize(
    "run",
    [_run_hessian_trace, _run_geometric_complexity],
    ids=["hessian_trace", "geometric_complexity"],
)


@DIAGNOSTICS
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_side_effects(run: Callable[..., Tensor], training: bool) -> None:
    model = _mlp_with_batchnorm()
    model.train(training)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    modes_before = [m.training for m in model.modules()]

    result = run(model, seed=0)

    assert result.dim() == 0 and not result.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    assert [m.training for m in model.modules()] == modes_before


@DIAGNOSTICS
def test_existing_gradients_are_left_alone(run: Callable[..., Tensor]) -> None:
    model = _mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    run(model, seed=0)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_geometric_complexity_leaves_input_gradients_alone() -> None:
    inputs = torch.randn(4, 3, dtype=DTYPE, requires_grad=True)
    geometric_complexity(_mlp(), inputs, n_samples=2)
    assert inputs.grad is None


@DIAGNOSTICS
def test_same_seed_same_value(run: Callable[..., Tensor]) -> None:
    model = _mlp()
    first, second, other = run(model, seed=11), run(model, seed=11), run(model, seed=12)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, other)


@DIAGNOSTICS
@pytest.mark.parametrize("n_samples", [0, -1])
def test_rejects_non_positive_n_samples(run: Callable[..., Tensor], n_samples: int) -> None:
    with pytest.raises(ValueError, match="n_samples"):
        run(_mlp(), seed=0, n_samples=n_samples)
