"""What the tests of the two Adam step rules share: the tiny model (two Linear layers and a
LayerNorm kfrob does not register), its batches, and the checks that a non-finite step
changes nothing and that a checkpoint resumes the same trajectory."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from tests.reference import UnregisteredLayerNorm

Factory = Callable[[nn.Module], FrobPreconditionedSGD]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), UnregisteredLayerNorm(6), nn.Linear(6, 3)
    ).double()


def batches(n: int) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(n)
    ]


def backward(net: nn.Module, x: Tensor, y: Tensor) -> None:
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()


def check_a_non_finite_gradient_changes_nothing(make: Factory) -> None:
    """After two steps, a NaN in one gradient leaves parameters and optimizer state
    bit-identical, and the next finite step moves every parameter."""
    net = model()
    opt = make(net)
    data = batches(3)
    for x, y in data[:2]:
        backward(net, x, y)
        opt.step()
    params = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    backward(net, *data[2])
    net[0].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    for p, q in zip(net.parameters(), params, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for key, entry in opt.state_dict()["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                torch.testing.assert_close(value, state[key][name], rtol=0, atol=0)
    backward(net, *data[0])
    opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), params, strict=True))


def check_the_gradients_are_left_as_they_were(make: Factory) -> None:
    """A step reads the gradients and writes nothing into them, finite or not, for a layer
    with a bias (its gradient matrix is a copy) and one without (a view of the weight's
    gradient)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    opt = make(net)
    for step, (x, y) in enumerate(batches(3)):
        backward(net, x, y)
        if step == 2:
            for layer in (net[0], net[2]):
                layer.weight.grad[0, 0] = float("nan")
        grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        for p, kept in zip(net.parameters(), grads, strict=True):
            torch.testing.assert_close(p.grad, kept, rtol=0, atol=0, equal_nan=True)
    assert all(p.isfinite().all() for p in net.parameters())


def check_a_checkpoint_resumes_the_same_trajectory(make: Factory) -> None:
    """Four steps, a checkpoint, four more; a fresh model and optimizer loaded from the
    checkpoint take the same four."""
    data = batches(8)
    straight = model()
    opt = make(straight)
    for x, y in data[:4]:
        backward(straight, x, y)
        opt.step()
    saved = copy.deepcopy({"model": straight.state_dict(), "opt": opt.state_dict()})
    for x, y in data[4:]:
        backward(straight, x, y)
        opt.step()
    resumed = model()
    resumed.load_state_dict(saved["model"])
    again = make(resumed)
    again.load_state_dict(saved["opt"])
    for x, y in data[4:]:
        backward(resumed, x, y)
        again.step()
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # bit for bit
