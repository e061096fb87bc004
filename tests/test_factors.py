"""``A`` and ``G`` from the hooks equal their brute-force definitions (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.factors import RunningFactor
from tests.reference import (
    codomain_factor,
    domain_factor_conv,
    domain_factor_linear,
    per_sample_output_grads,
)


def ce_term(logits: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(logits, target, reduction="sum")


def captured_factors(
    model: nn.Module, x: Tensor, targets: Tensor, reduction: str, **options: object
) -> dict[str, tuple[Tensor, Tensor]]:
    """Factors after one step: the first update sets the running average to the batch's."""
    opt = FrobPreconditionedSGD(
        model, lr=0.0, loss_reduction=reduction, **{"step_rule": "preconditioned_sgd", **options}
    )  # type: ignore[arg-type]
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1), reduction=reduction)
    loss.backward()
    opt.step()
    opt.close()
    return opt.preconditioner.factors()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7,), (3, 4)], ids=["2d", "3d"])
def test_linear_factors(reduction: str, bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 4, bias=bias)
    head = nn.Sequential(nn.Tanh(), nn.Linear(4, 3))
    model = nn.Sequential(layer, head)
    x = torch.randn(*shape, 5)
    targets = torch.randint(0, 3, shape)

    a, g = captured_factors(model, x, targets, reduction)["0"]

    y = layer(x).detach().reshape(-1, 4)
    grads = per_sample_output_grads(head, ce_term, y, targets.reshape(-1))
    torch.testing.assert_close(a.double(), domain_factor_linear(x, bias), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), codomain_factor(grads)[0], rtol=1e-4, atol=1e-7)


CONVS = {
    "conv1d": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "conv1d-same-dilated": lambda: nn.Conv1d(2, 3, 4, padding="same", dilation=2, bias=False),
    "conv1d-circular": lambda: nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
    "conv2d": lambda: nn.Conv2d(2, 3, 3),
    "conv2d-stride-pad-dilate": lambda: nn.Conv2d(
        2, 3, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(1, 2)
    ),
    "conv2d-same-even": lambda: nn.Conv2d(2, 3, 4, padding="same", bias=False),
    "conv2d-reflect": lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
    "conv2d-grouped": lambda: nn.Conv2d(4, 6, 3, groups=2, padding=1),
    "conv2d-depthwise": lambda: nn.Conv2d(3, 3, 3, groups=3, stride=2),
}


def conv_case(name: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor]:
    """The convolution, a head on it, an input batch of 5, the conv's output and targets."""
    torch.manual_seed(0)
    conv = CONVS[name]()
    spatial = (9,) if isinstance(conv, nn.Conv1d) else (7, 6)
    x = torch.randn(5, conv.in_channels, *spatial)
    y = conv(x).detach()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(y[0].numel(), 3))
    return conv, head, x, y, torch.randint(0, 3, (5,))


def conv_factors(
    name: str, reduction: str, **options: object
) -> tuple[nn.Module, nn.Module, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`conv_case` and the conv's captured ``A``, ``G`` as ``(groups, ·, ·)``."""
    conv, head, x, y, targets = conv_case(name)
    a, g = captured_factors(nn.Sequential(conv, head), x, targets, reduction, **options)["0"]
    if conv.groups == 1:  # type: ignore[operator]
        a, g = a.unsqueeze(0), g.unsqueeze(0)
    return conv, head, x, y, targets, a, g


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv_factors(name: str, reduction: str) -> None:
    conv, head, x, y, targets, a, g = conv_factors(name, reduction)

    grads = per_sample_output_grads(head, ce_term, y, targets)
    torch.testing.assert_close(a.double(), domain_factor_conv(conv, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        g.double(), codomain_factor(grads, conv.groups), rtol=1e-4, atol=1e-7
    )


def test_mse_loss_codomain_factor() -> None:
    """``G`` for a mean-reduced MSE on a last linear layer: ``g = ∂ℓ_n/∂y_n``."""
    torch.manual_seed(1)
    layer = nn.Linear(4, 3)
    x, t = torch.randn(6, 4), torch.randn(6, 3)
    opt = FrobPreconditionedSGD(layer, lr=0.0, step_rule="preconditioned_sgd")
    F.mse_loss(layer(x), t, reduction="mean").backward()
    opt.step()
    _, g = opt.preconditioner.factors()[""]

    def own(y: Tensor, target: Tensor) -> Tensor:
        # per-sample term of mean-over-elements MSE, times the number of samples
        return F.mse_loss(y, target, reduction="sum") / y.shape[-1]

    grads = per_sample_output_grads(nn.Identity(), own, layer(x).detach(), t)
    torch.testing.assert_close(g.double(), codomain_factor(grads)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("warmup", [False, True])
def test_fold_is_the_decayed_average_and_ignores_rejected_windows(warmup: bool) -> None:
    """Without warm-up: the first accepted statistic, then ``F ← d·F + (1 − d)·S``. With it,
    the ``k``-th accepted statistic has weight ``max(1/k, 1 − d)``: the plain mean of the
    statistics so far while ``1 − 1/k < d``. Rejected (even NaN) windows change nothing."""
    decay = 0.6  # warm-up ends at k = 3: weights 1, 1/2, 2/5, 2/5, ...
    gen = torch.Generator().manual_seed(0)
    stats = [torch.randn(1, 3, 3, generator=gen) for _ in range(5)]
    factor = RunningFactor(1, 3)
    expected = None
    for i, stat in enumerate(stats):
        if i == 2:  # a rejected, non-finite window in between
            factor.fold(torch.full_like(stat, float("nan")), decay, torch.tensor(False), warmup)
            torch.testing.assert_close(factor.value, expected)
        factor.fold(stat, decay, torch.tensor(True), warmup)
        accepted = i + 1
        weight = 1.0 if accepted == 1 else (max(1 / accepted, 1 - decay) if warmup else 1 - decay)
        expected = stat if expected is None else (1 - weight) * expected + weight * stat
        torch.testing.assert_close(factor.value, expected)
    assert int(factor.folds) == 5  # accepted windows only
    restored = RunningFactor(1, 3)
    restored.load_state_dict(factor.state_dict())
    assert int(restored.folds) == 5 and bool(restored.initialized)
    older = RunningFactor(1, 3)  # a state saved before folds were counted
    older.load_state_dict({"value": factor.value, "initialized": torch.tensor(True)})
    assert int(older.folds) == 1 and bool(older.initialized)


@pytest.mark.parametrize("shape", [(7,), (3, 4)], ids=["2d", "3d"])
def test_float64_layers_get_float64_factors_to_float64_precision(shape: tuple[int, ...]) -> None:
    """A float64 layer's factors are float64 and equal the brute-force float64 definitions
    to ~1e-12, where float32 factors agree only to ~1e-6."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 4).double()
    head = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).double()
    model = nn.Sequential(layer, head)
    x = torch.randn(*shape, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, shape)

    a, g = captured_factors(model, x, targets, "mean")["0"]

    assert a.dtype == g.dtype == torch.float64
    y = layer(x).detach().reshape(-1, 4)
    grads = per_sample_output_grads(head, ce_term, y, targets.reshape(-1))
    torch.testing.assert_close(a, domain_factor_linear(x, True), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, codomain_factor(grads)[0], rtol=1e-12, atol=1e-14)
