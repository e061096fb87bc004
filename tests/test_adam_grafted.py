"""``step_rule="adam_grafted"``: each layer's preconditioned first moment at the length of
its Adam step, against an independent float64 reimplementation (Adam's moments, an explicit
solve with the dense Kronecker product ``A ⊗ G + λI`` of the running factors, the graft);
its validation, defaults, non-finite steps and checkpoints."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.finite import descend_gated
from kfrob.rules.adam import adam_step_all, graft_scale
from tests.adam_rules import (
    backward,
    batches,
    check_a_checkpoint_resumes_the_same_trajectory,
    check_a_non_finite_gradient_changes_nothing,
    check_the_gradients_are_left_as_they_were,
    model,
)

BETAS, EPS, LR, WD, DAMPING = (0.9, 0.95), 1e-8, 1e-2, 1e-2, 0.1


def grafted(net: nn.Module, **options: object) -> FrobPreconditionedSGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm's plain-update warning
        return FrobPreconditionedSGD(
            net,
            lr=LR,
            weight_decay=WD,
            step_rule="adam_grafted",
            betas=BETAS,
            eps=EPS,
            **options,
        )


class ReferenceGraft:
    """Adam's moments per parameter and the graft, float64, written from the formulas."""

    def __init__(self) -> None:
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.t = 0

    def moments(self, key: str, grad: Tensor) -> tuple[Tensor, Tensor]:
        """``(m̂, m̂ / (√v̂ + ε))`` after this gradient."""
        b1, b2 = BETAS
        self.m[key] = b1 * self.m.get(key, torch.zeros_like(grad)) + (1 - b1) * grad
        self.v[key] = b2 * self.v.get(key, torch.zeros_like(grad)) + (1 - b2) * grad.square()
        m_hat = self.m[key] / (1 - b1**self.t)
        v_hat = self.v[key] / (1 - b2**self.t)
        return m_hat, m_hat / (v_hat.sqrt() + EPS)


def kronecker_solve(a: Tensor, g: Tensor, damping: float, matrix: Tensor) -> Tensor:
    """``D`` with ``vec(D) = (A ⊗ G + λI)⁻¹ vec(M)`` (column-major ``vec``), densely."""
    out, width = matrix.shape
    system = torch.kron(a, g) + damping * torch.eye(out * width, dtype=a.dtype)
    solution = torch.linalg.solve(system, matrix.T.reshape(-1))
    return solution.reshape(width, out).T


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_layers_take_their_preconditioned_first_moment_at_adams_length(
    refresh_every: int,
) -> None:
    """Every step each layer moves along ``(A ⊗ G + λI)⁻¹ vec(M̂)`` (the factors of its
    last refresh: every step, or every third) scaled to the norm of its Adam step; the
    unregistered LayerNorm takes AdamW's step."""
    net = model()
    reference = copy.deepcopy(net)
    opt = grafted(
        net, damping_method="exact", damping=DAMPING, factor_update_freq=1,
        inverse_update_freq=refresh_every,
    )  # fmt: skip
    ref = ReferenceGraft()
    factors_of: dict[str, tuple[Tensor, Tensor]] = {}
    for t, (x, y) in enumerate(batches(7)):
        backward(net, x, y)
        backward(reference, x, y)
        opt.step()
        ref.t += 1
        if t % refresh_every == 0:  # what this step's refresh inverted
            factors_of = {
                name: (a.double(), g.double())
                for name, (a, g) in opt.preconditioner.factors().items()
            }
        with torch.no_grad():
            for name in ("0", "3"):
                layer = reference.get_submodule(name)
                mean_w, adam_w = ref.moments(f"{name}.w", layer.weight.grad)
                mean_b, adam_b = ref.moments(f"{name}.b", layer.bias.grad)
                mean = torch.cat([mean_w, mean_b[:, None]], dim=1)
                adam = torch.cat([adam_w, adam_b[:, None]], dim=1)
                direction = kronecker_solve(*factors_of[name], DAMPING, mean)
                step = direction * adam.norm() / direction.norm()
                layer.weight.mul_(1 - LR * WD).sub_(LR * step[:, :-1])
                layer.bias.mul_(1 - LR * WD).sub_(LR * step[:, -1])
            norm = reference.get_submodule("2")
            for key, p in (("2.w", norm.weight), ("2.b", norm.bias)):
                p.mul_(1 - LR * WD).sub_(LR * ref.moments(key, p.grad)[1])
        for p, q in zip(net.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert set(opt.preconditioner.layers) == {"0", "3"}


def test_the_batched_adam_step_equals_the_per_parameter_one() -> None:
    """``adam_step_all`` (foreach kernels, moments updated in place) against Adam's
    formulas one parameter at a time, over steps that include a non-finite one, which must
    change nothing."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (5,), ()]
    batched: list[dict] = [{} for _ in shapes]
    m = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    v = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    (b1, b2), t = BETAS, 0
    for k in range(5):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        finite = torch.tensor(k != 2)
        if k == 2:
            grads[0][0, 0] = float("nan")
        before = [{key: x.clone() for key, x in state.items()} for state in batched]
        means, steps = adam_step_all(batched, grads, finite, *BETAS, EPS)
        if k == 2:  # bit for bit as they were
            for state, old in zip(batched, before, strict=True):
                assert all(torch.equal(state[key], old[key]) for key in old)
            continue
        t += 1
        for i, g in enumerate(grads):
            m[i], v[i] = b1 * m[i] + (1 - b1) * g, b2 * v[i] + (1 - b2) * g**2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            torch.testing.assert_close(means[i], m_hat, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(
                steps[i], m_hat / (v_hat.sqrt() + EPS), rtol=1e-12, atol=1e-14
            )
            torch.testing.assert_close(batched[i]["exp_avg_sq"], v[i], rtol=1e-12, atol=1e-14)
            assert batched[i]["step"].item() == t


@pytest.mark.parametrize("finite", [True, False])
def test_a_gated_descent_moves_by_lr_times_the_direction_or_not_at_all(finite: bool) -> None:
    """``p − lr · d`` in each parameter's dtype (float32 and float64 together), every
    parameter as it was when the step is not finite."""
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, 4, generator=gen),
        torch.randn(5, generator=gen, dtype=torch.float64),
    ]
    steps = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    lr = 0.1234567891
    expected = [p - lr * d if finite else p.clone() for p, d in zip(params, steps, strict=True)]
    descend_gated(params, [d.clone() for d in steps], torch.tensor(finite), lr)
    for p, e in zip(params, expected, strict=True):  # the same roundings: exactly
        torch.testing.assert_close(p, e, rtol=0, atol=0)


def test_the_graft_scale_is_the_ratio_of_the_lengths_taken_together() -> None:
    """``‖N‖_F / ‖D‖_F`` over each list concatenated, in float32 for half-precision
    tensors (whose squares would overflow), and finite for a zero ``D``, which stays zero."""
    g = torch.Generator().manual_seed(0)
    adam = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    kfac = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    expected = (
        torch.cat([t.flatten() for t in adam]).norm()
        / torch.cat([t.flatten() for t in kfac]).norm()
    )
    torch.testing.assert_close(graft_scale(adam, kfac), expected)
    big = [torch.full((300,), 400.0, dtype=torch.float16)]  # Σ x² = 4.8e7 > float16's max
    scale = graft_scale(big, [t / 2 for t in big])
    assert scale.dtype == torch.float32 and scale.item() == pytest.approx(2.0)
    zero = [torch.zeros(3, 4), torch.zeros(3)]
    scale = graft_scale(adam, zero)
    assert scale.isfinite() and all((t * scale == 0).all() for t in zero)


def test_the_step_length_is_adams_whatever_the_factors_scale() -> None:
    """Scaling the loss by 1000 scales the gradients and ``G`` (by 10⁶) but leaves Adam's
    step, so the graft takes the same step with and without the factor (exact damping
    scaled alike keeps the direction)."""
    nets = [model(), model()]
    opts = [
        grafted(nets[0], damping_method="exact", damping=1e-3),
        grafted(nets[1], damping_method="exact", damping=1e-3 * 1e6),
    ]
    for x, y in batches(4):
        for net, opt, scale in zip(nets, opts, (1.0, 1000.0), strict=True):
            net.zero_grad()
            (scale * F.cross_entropy(net(x), y)).backward()
            opt.step()
    for p, q in zip(*(n.parameters() for n in nets), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-8)


def test_a_non_finite_gradient_changes_nothing() -> None:
    check_a_non_finite_gradient_changes_nothing(grafted)


def test_the_gradients_are_left_as_they_were() -> None:
    check_the_gradients_are_left_as_they_were(grafted)


def test_a_checkpoint_resumes_the_same_trajectory() -> None:
    """With the MC Fisher: the sampler's generator resumes too."""
    check_a_checkpoint_resumes_the_same_trajectory(
        lambda net: grafted(
            net,
            inverse_update_freq=3,
            loss="cross_entropy",
            fisher="mc",
            generator=torch.Generator().manual_seed(5),
        )
    )


def test_the_rule_has_its_own_defaults_and_explicit_values_win() -> None:
    """No KL clip, factors every 5 steps and inverses every 20, the empirical Fisher; the
    damping, structures and placement stay kfrob's defaults."""
    options = grafted(model(), loss="cross_entropy").preconditioner.options
    default = FrobPreconditionedSGD(
        model(), lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd"
    ).preconditioner.options
    assert options.kl_clip is None and default.kl_clip is not None
    schedule = options.schedule
    assert (schedule.factor_update_freq, schedule.inverse_update_freq) == (5, 20)
    assert options.curvature.fisher == "empirical" and default.curvature.fisher == "mc"
    assert options.inverse == default.inverse
    explicit = grafted(
        model(), loss="cross_entropy", fisher="mc", factor_update_freq=1, inverse_update_freq=10
    ).preconditioner.options
    assert explicit.curvature.fisher == "mc"
    assert (explicit.schedule.factor_update_freq, explicit.schedule.inverse_update_freq) == (1, 10)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"momentum": 0.9, "betas": (0.8, 0.95)}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": 0.9, "nesterov": True}, "nesterov"),
        ({"kl_clip": 1e-3}, "kl_clip"),
        ({"adaptive_damping": True}, "adaptive_damping"),
        ({"betas": (1.0, 0.95)}, "betas"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_invalid_settings_name_the_parameter(options: dict[str, object], name: str) -> None:
    settings: dict[str, object] = {"step_rule": "adam_grafted", **options}
    with pytest.raises(ValueError, match=name):
        FrobPreconditionedSGD(nn.Linear(3, 2), lr=0.1, **settings)  # type: ignore[arg-type]
