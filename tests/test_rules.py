"""Step rules and curvature sources: the registry, a rule added from one file, gradient-fed
factors against their definitions, the defaults that signatures show, and diagnostics of
the step taken."""

from __future__ import annotations

import inspect
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from kfrob import FrobPreconditionedSGD, KroneckerPreconditioner
from kfrob.optimizer import DEFAULT_RULE
from kfrob.rules import RULES

ROOT = Path(__file__).parents[1]


def batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, generator=gen, dtype=torch.float64),
         torch.randint(0, 2, (16,), generator=gen))
        for _ in range(n)
    ]  # fmt: skip


def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 2).double()


def gradient_matrix(net: nn.Linear, x: Tensor, y: Tensor) -> Tensor:
    """``V = [∇W, ∇b]`` ``(2, 4)`` by ``torch.func``, apart from any hook."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    grads = grad(lambda p: F.cross_entropy(functional_call(net, p, (x,)), y))(params)
    return torch.cat([grads["weight"], grads["bias"][:, None]], dim=1)


def test_gradient_factors_and_their_inverse_roots_equal_their_definitions() -> None:
    """``L = EMA(V Vᵀ)``, ``R = EMA(Vᵀ V)`` (the first statistic sets them), and the step
    ``(R ⊗ L + λI)^{-1/4} vec(V)`` from an explicit ``eigh`` of the dense Kronecker
    product."""
    net, decay, lam = linear(), 0.7, 1e-2
    pre = KroneckerPreconditioner(
        net, curvature_source="gradients", kl_clip=None, damping_method="exact",
        exponent=0.25, factor_decay=decay, inverse_update_freq=1, damping=lam,
    )  # fmt: skip
    left = right = None
    for x, y in batches(4):
        v = gradient_matrix(net, x, y)
        left = v @ v.T if left is None else decay * left + (1 - decay) * v @ v.T
        right = v.T @ v if right is None else decay * right + (1 - decay) * v.T @ v
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        pre.step()
        r, g = pre.factors()[""]
        torch.testing.assert_close(r, right)
        torch.testing.assert_close(g, left)
        # vec(L V R) = (Rᵀ ⊗ L) vec(V), vec stacking columns
        e, q = torch.linalg.eigh(torch.kron(right, left))
        power = q @ torch.diag((e.clamp(min=0) + lam) ** -0.25) @ q.T
        want = (power @ v.T.reshape(-1)).reshape(4, 2).T
        got = torch.cat([net.weight.grad, net.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(got, want)


def test_gradient_factors_feed_every_rule_and_skip_a_non_finite_step() -> None:
    for rule in ("eigenbasis_adam", "adam_grafted", "preconditioned_sgd"):
        net = linear()
        extra = {"kl_clip": None} if rule == "preconditioned_sgd" else {}
        opt = FrobPreconditionedSGD(
            net, lr=1e-2, step_rule=rule, curvature_source="gradients",
            factor_update_freq=1, **extra,
        )  # fmt: skip
        data = batches(6)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if i == 3:
                before = [f.clone() for f in opt.preconditioner.factors()[""]]
                net.weight.grad[0, 0] = math.nan
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step()
                after = opt.preconditioner.factors()[""]
                for a, b in zip(before, after, strict=True):
                    torch.testing.assert_close(a, b)
                continue
            opt.step()
        assert all(torch.isfinite(p).all() for p in net.parameters()), rule


def test_a_rule_from_one_file_trains() -> None:
    """``examples/sign_descent_rule.py``: a subclass and one registration line. Each step
    moves the parameters by ``−lr · sign(P g)`` with ``P`` the inverse the step used."""
    import examples.sign_descent_rule  # noqa: F401  (registers "sign_descent")

    net, lr = linear(), 1e-2
    opt = FrobPreconditionedSGD(net, lr=lr, step_rule="sign_descent", damping=1e-2)
    losses = []
    for x, y in batches(40):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        v = torch.cat([net.weight.grad, net.bias.grad[:, None]], dim=1).clone()
        before = torch.cat([net.weight, net.bias[:, None]], dim=1).detach().clone()
        opt.step()
        after = torch.cat([net.weight, net.bias[:, None]], dim=1).detach()
        want = opt.preconditioner.precondition("", v[None])[0].sign()
        torch.testing.assert_close((before - after) / lr, want)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert opt.rule.plain_update == "SGD" and "sign_descent" in RULES


def test_unknown_rules_and_sources_and_a_source_a_rule_cannot_use_are_refused() -> None:
    import examples.sign_descent_rule  # noqa: F401

    with pytest.raises(ValueError, match=r"invalid step_rule='sgn'.*eigenbasis_adam"):
        FrobPreconditionedSGD(linear(), lr=0.1, step_rule="sgn")
    with pytest.raises(ValueError, match=r"invalid curvature_source='grads'.*gradients"):
        FrobPreconditionedSGD(linear(), lr=0.1, curvature_source="grads")
    with pytest.raises(ValueError, match=r"curvature_source='gradients'.*sign_descent"):
        FrobPreconditionedSGD(
            linear(), lr=0.1, step_rule="sign_descent", curvature_source="gradients"
        )
    with pytest.raises(ValueError, match=r"invalid kl_clip=0.001.*Fisher"):
        FrobPreconditionedSGD(
            linear(), lr=0.1, step_rule="preconditioned_sgd", curvature_source="gradients"
        )
    with pytest.raises(ValueError, match=r"eigenvalue_correction"):
        KroneckerPreconditioner(
            linear(), curvature_source="gradients", damping_method="exact",
            eigenvalue_correction=True,
        )  # fmt: skip


def test_the_signature_shows_the_default_rules_values() -> None:
    parameters = inspect.signature(FrobPreconditionedSGD).parameters
    assert parameters["step_rule"].default == DEFAULT_RULE
    for name, value in RULES[DEFAULT_RULE].defaults.items():
        assert parameters[name].default == value, name
    assert parameters["kl_clip"].default is None
    # the engine's own signature keeps the engine's defaults
    engine = inspect.signature(KroneckerPreconditioner.__init__).parameters
    assert "kl_clip" not in engine or engine["kl_clip"].default == 1e-3


@pytest.mark.parametrize("rule", ["eigenbasis_adam", "adam_grafted", "preconditioned_sgd"])
def test_diagnostics_report_the_step_taken_and_change_nothing(rule: str) -> None:
    def run(diagnose: bool) -> tuple[list[float], list[Tensor]]:
        net = linear()
        opt = FrobPreconditionedSGD(
            net, lr=1e-2, step_rule=rule, factor_update_freq=1, inverse_update_freq=100,
        )  # fmt: skip
        norms = []
        for x, y in batches(5):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            before = torch.cat([net.weight, net.bias[:, None]], dim=1).detach().clone()
            report = opt.diagnostics() if diagnose else {}
            opt.step()
            after = torch.cat([net.weight, net.bias[:, None]], dim=1).detach()
            if diagnose:
                norms.append((report["/update_norm"], float((before - after).norm())))
        return norms, [p.detach().clone() for p in net.parameters()]

    norms, diagnosed = run(True)
    _, plain = run(False)
    for a, b in zip(diagnosed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # diagnostics changed nothing
    # after the first refresh the inverses stay, so the report previews the very step taken
    # (the KL-clipped rule's report is its step before momentum, here none)
    for reported, taken in norms[1:]:
        assert reported == pytest.approx(taken, rel=1e-6), (reported, taken)


def _sources() -> dict[Path, str]:
    return {p: p.read_text() for p in (ROOT / "kfrob").rglob("*.py")}


def test_no_rule_name_or_fisher_string_is_tested_outside_the_rules_and_options() -> None:
    pattern = re.compile(
        r"(step_rule|fisher)\s*[!=]=|[!=]=\s*\"(mc|empirical)\"|"
        r"[!=]=\s*\"(preconditioned_sgd|eigenbasis_adam|adam_grafted)\""
    )
    allowed = {ROOT / "kfrob" / "options.py"}
    for path, text in _sources().items():
        if path in allowed or (ROOT / "kfrob" / "rules") in path.parents:
            continue
        assert not pattern.search(text), f"{path}: {pattern.search(text)}"


def test_modules_are_short_and_use_no_other_modules_private_members() -> None:
    private = re.compile(r"from kfrob[\w.]* import [^\n]*\b_[a-z]\w*|kfrob\.\w+\._[a-z]\w*")
    for path, text in _sources().items():
        assert len(text.splitlines()) <= 450, path
        assert not private.search(text), f"{path}: {private.search(text)}"
