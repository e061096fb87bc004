"""``step_rule="eigenbasis_adam"``: Adam in the Kronecker eigenbasis, against AdamW (identity
factors) and against an independent float64 reimplementation from the running factors
(explicit ``eigh``, rotation, Adam's moments); its validation, non-finite steps and
checkpoints."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.kronecker import InverseFactors
from kfrob.rules import eigenbasis_adam
from kfrob.structure import LowRankPower
from tests.adam_rules import (
    backward,
    batches,
    check_a_checkpoint_resumes_the_same_trajectory,
    check_a_non_finite_gradient_changes_nothing,
    check_the_gradients_are_left_as_they_were,
    model,
)

BETAS, EPS, LR, WD = (0.9, 0.95), 1e-8, 1e-2, 1e-2


def adam(**options: object) -> FrobPreconditionedSGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LayerNorm's plain-update warning
        return FrobPreconditionedSGD(
            options.pop("net"),  # type: ignore[arg-type]
            lr=LR, weight_decay=WD, step_rule="eigenbasis_adam", eps=EPS,
            **{"betas": BETAS, **options},
        )  # fmt: skip


def move(layer: nn.Module, step: Tensor) -> None:
    """AdamW's update of a Linear layer by the ``[W, b]`` direction ``step``."""
    layer.weight.mul_(1 - LR * WD).sub_(LR * step[:, :-1])
    layer.bias.mul_(1 - LR * WD).sub_(LR * step[:, -1])


def step_the_norm_and_compare(net: nn.Module, reference: nn.Module, ref: ReferenceAdam) -> None:
    """Plain AdamW for the unregistered LayerNorm, then the two models must agree."""
    norm = reference.get_submodule("2")
    for key, p in (("2.w", norm.weight), ("2.b", norm.bias)):
        p.mul_(1 - LR * WD).sub_(LR * ref.direction(key, p.grad, None))
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_identity_factors_give_adamw() -> None:
    net, reference = model(), model()
    opt = adam(net=net, domain="identity", codomain="identity")
    adamw = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    for x, y in batches(6):
        for m, o in ((net, opt), (reference, adamw)):
            backward(m, x, y)
            o.step()
    for p, q in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class ReferenceAdam:
    """Adam in the eigenbases of given factors, float64, written from the formulas."""

    def __init__(self) -> None:
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.t = 0

    def direction(self, key: str, grad: Tensor, bases: tuple[Tensor, Tensor] | None) -> Tensor:
        rotate = (lambda z: z) if bases is None else (lambda z: bases[0].T @ z @ bases[1])
        back = (lambda z: z) if bases is None else (lambda z: bases[0] @ z @ bases[1].T)
        b1, b2 = BETAS
        self.m[key] = b1 * self.m.get(key, torch.zeros_like(grad)) + (1 - b1) * grad
        r = rotate(grad)
        self.v[key] = b2 * self.v.get(key, torch.zeros_like(r)) + (1 - b2) * r.square()
        m_hat = rotate(self.m[key]) / (1 - b1**self.t)
        v_hat = self.v[key] / (1 - b2**self.t)
        return back(m_hat / (v_hat.sqrt() + EPS))


@pytest.mark.parametrize("masked", [True, False])
def test_no_step_along_a_null_direction_of_the_factors(
    masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A softmax layer's output gradients sum to zero, so the all-ones output direction is
    a null vector of ``G``: in float32 its rotated gradient is rounding noise, and the
    layer must not move along it (without the rounding floor it moves as far along it as
    along any other direction)."""
    if not masked:
        monkeypatch.setattr(eigenbasis_adam, "_support", lambda v, bases: 1.0)
    torch.manual_seed(0)
    net = nn.Linear(5, 4)
    opt = FrobPreconditionedSGD(net, lr=1e-2, factor_update_freq=1, inverse_update_freq=1)
    before = torch.cat([net.weight, net.bias[:, None]], 1).detach().clone()
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(16, 5, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    moved = torch.cat([net.weight, net.bias[:, None]], 1).detach() - before
    along = moved.sum(0).abs().max() / moved.abs().max()  # 1ᵀ ΔV against ΔV
    assert (along < 1e-4) == masked, float(along)


def test_the_rounding_floor_measures_an_entry_against_what_the_rotation_mixed_into_it() -> None:
    """A column ``10⁻¹²`` as large as the others survives when only the co-domain is
    rotated (the rotation mixes within columns: an embedding's rare token against itself),
    and is at the floor when both sides are (it mixes everything); nothing is masked when no
    side is rotated."""
    v = torch.ones(1, 4, 3)
    v[..., 2] = 1e-24  # √v: 10⁻¹² of the others
    basis = torch.linalg.qr(torch.randn(1, 4, 4))[0]
    codomain_only, both, neither = (basis, None), (basis, torch.eye(3)[None]), (None, None)
    assert bool((eigenbasis_adam._support(v, codomain_only) == 1).all())
    masked = eigenbasis_adam._support(v, both)
    assert bool((masked[..., 2] == 0).all()) and bool((masked[..., :2] == 1).all())
    assert eigenbasis_adam._support(v, neither) == 1.0


def test_a_non_finite_gradient_changes_nothing() -> None:
    check_a_non_finite_gradient_changes_nothing(lambda net: adam(net=net))


@pytest.mark.parametrize("structure", ["dense", "low_rank"])
def test_the_gradients_are_left_as_they_were(structure: str) -> None:
    """Rotated (dense sides) and grafted (low-rank sides, rank 2) layers alike."""
    sides = {"domain_structure": structure, "codomain_structure": structure}
    extra = {"rank": 2} if structure == "low_rank" else {}
    check_the_gradients_are_left_as_they_were(
        lambda net: adam(net=net, inverse_update_freq=1, **sides, **extra)
    )


def test_a_checkpoint_resumes_the_same_trajectory() -> None:
    check_a_checkpoint_resumes_the_same_trajectory(lambda net: adam(net=net, inverse_update_freq=3))


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_layers_take_adam_steps_in_the_eigenbases_of_their_factors(refresh_every: int) -> None:
    """Every step Adam runs in the eigenbases of the factors of the last refresh (every
    step, or every third: the moments then live in bases older than the factors)."""
    net = model()
    reference = copy.deepcopy(net)
    opt = adam(net=net, inverse_update_freq=refresh_every, fisher="empirical")
    ref = ReferenceAdam()
    bases_of: dict[str, tuple[Tensor, Tensor]] = {}
    for t, (x, y) in enumerate(batches(7)):
        backward(net, x, y)
        backward(reference, x, y)
        opt.step()
        ref.t += 1
        if t % refresh_every == 0:  # what this step's refresh decomposed
            for name, (a, g) in opt.preconditioner.factors().items():
                bases_of[name] = (
                    torch.linalg.eigh(g.double())[1],
                    torch.linalg.eigh(a.double())[1],
                )
        with torch.no_grad():
            for name in ("0", "3"):
                layer = reference.get_submodule(name)
                bases = bases_of[name]
                grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
                step = ref.direction(name, grad, bases)
                move(layer, step)
            step_the_norm_and_compare(net, reference, ref)
    assert set(opt.preconditioner.layers) == {"0", "3"}


def test_layers_of_one_shape_rotate_as_one_batch_as_each_would_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three Linear layers of one shape rotate as one stacked batch (and the head alone);
    the steps equal those of every layer rotated on its own, across refreshes (the stacked
    bases follow each refresh)."""

    def run() -> list[Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
            nn.Linear(5, 3),
        ).double()  # fmt: skip
        opt = adam(net=net, factor_update_freq=1, inverse_update_freq=2)
        gen = torch.Generator().manual_seed(4)
        for _ in range(7):
            x = torch.randn(16, 5, generator=gen, dtype=torch.float64)
            backward(net, x, torch.randint(0, 3, (16,), generator=gen))
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    sizes: list[int] = []
    batches_of = eigenbasis_adam._batches

    def recorded(matrices: list[Tensor], bases: list) -> list[list[int]]:
        found = batches_of(matrices, bases)
        sizes.extend(len(members) for members in found)
        return found

    monkeypatch.setattr(eigenbasis_adam, "_batches", recorded)
    batched = run()
    assert max(sizes) == 3
    monkeypatch.setattr(eigenbasis_adam, "_batches", lambda m, b: [[i] for i in range(len(m))])
    for p, q in zip(batched, run(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def dense_side(operator: object, width: int) -> Tensor:
    """A side of an :class:`InverseFactors` as a dense matrix (``None``: the identity)."""
    if operator is None:
        return torch.eye(width, dtype=torch.float64)
    if isinstance(operator, Tensor):
        return operator[0]
    return operator.dense()[0]  # type: ignore[attr-defined]


@pytest.mark.parametrize("refresh_every", [1, 3])
def test_a_layer_with_a_structured_side_grafts_adam_onto_its_kfac_direction(
    refresh_every: int,
) -> None:
    """Low-rank domains hold no eigenbasis: each layer runs Adam in its coordinates and
    moves along its structured inverse applied to ``m̂``, at the length of its Adam step."""
    net = model()
    reference = copy.deepcopy(net)
    opt = adam(
        net=net, inverse_update_freq=refresh_every, factor_update_freq=1, rank=2,
        domain_structure="low_rank",
    )  # fmt: skip
    ref = ReferenceAdam()
    for x, y in batches(7):
        backward(net, x, y)
        backward(reference, x, y)
        opt.step()
        ref.t += 1
        with torch.no_grad():
            for name in ("0", "3"):
                inverse = opt.preconditioner.inverses[name]  # what this step applied
                assert isinstance(inverse, InverseFactors)
                assert isinstance(inverse.domain, LowRankPower)
                layer = reference.get_submodule(name)
                grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
                adam_step = ref.direction(name, grad, None)
                mean = ref.m[name] / (1 - BETAS[0] ** ref.t)
                direction = (
                    dense_side(inverse.codomain, grad.shape[0])
                    @ mean
                    @ dense_side(inverse.domain, grad.shape[1])
                )
                step = direction * adam_step.norm() / direction.norm()
                move(layer, step)
            step_the_norm_and_compare(net, reference, ref)


def test_the_rule_has_its_own_defaults_and_explicit_values_win() -> None:
    """Eigenbases where a layer's sides are dense, no KL clip, factors every 10 steps and
    bases every 40, the empirical Fisher, a dense budget of 0.4, unless given."""
    opt = adam(net=model(), loss="cross_entropy")
    options = opt.preconditioner.options
    assert (options.schedule.factor_update_freq, options.schedule.inverse_update_freq) == (10, 40)
    assert options.inverse.damping_method == "exact_where_dense" and options.kl_clip is None
    assert options.curvature.fisher == "empirical" and options.inverse.dense_budget == 0.4
    assert (
        adam(net=model(), loss="cross_entropy", fisher="mc").preconditioner.options.curvature.fisher
        == "mc"
    )
    opt = adam(net=model(), factor_update_freq=2, inverse_update_freq=4)
    schedule = opt.preconditioner.options.schedule
    assert (schedule.factor_update_freq, schedule.inverse_update_freq) == (2, 4)
    assert adam(net=model(), dense_budget=0.7).preconditioner.options.inverse.dense_budget == 0.7
    sgd = FrobPreconditionedSGD(model(), lr=0.1, step_rule="preconditioned_sgd")
    assert sgd.preconditioner.options.schedule.factor_update_freq == 1  # the global ones
    assert sgd.preconditioner.options.inverse.dense_budget == 0.5


def test_it_is_the_default_and_momentum_is_its_first_moment() -> None:
    """``FrobPreconditionedSGD(model, lr, loss)`` runs this rule with betas (0.9, 0.95);
    ``momentum=μ`` is ``β₁ = μ`` (SGD's momentum stays 0), for the constructor and for a
    parameter group; ``momentum=0.9`` takes the very steps of the default."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FrobPreconditionedSGD(model(), lr=LR, loss="cross_entropy")
        assert plain.step_rule == "eigenbasis_adam"
        assert plain.defaults["betas"] == (0.9, 0.95) and plain.defaults["momentum"] == 0.0
        net = model()
        grouped = FrobPreconditionedSGD(
            net, [{"params": list(net[0].parameters()), "momentum": 0.5},
                  {"params": list(net[2:].parameters())}],
            lr=LR, momentum=0.8,
        )  # fmt: skip
    assert [g["betas"] for g in grouped.param_groups] == [(0.5, 0.95), (0.8, 0.95)]
    assert all(g["momentum"] == 0.0 for g in grouped.param_groups)
    runs = []
    for settings in (
        {}, {"momentum": 0.9, "betas": None}, {"momentum": 0.5, "betas": None},
        {"betas": (0.5, 0.95)},
    ):  # fmt: skip
        net = model()
        opt = adam(net=net, **settings)
        for x, y in batches(4):
            backward(net, x, y)
            opt.step()
        runs.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    torch.testing.assert_close(runs[2], runs[3], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"step_rule": "adam"}, "step_rule"),
        ({"momentum": 0.9, "betas": (0.8, 0.95)}, "momentum"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": 0.9, "nesterov": True}, "nesterov"),
        ({"damping_method": "factored"}, "damping_method"),
        ({"kl_clip": 1e-3}, "kl_clip"),
        ({"eigenvalue_correction": True}, "eigenvalue_correction"),
        ({"adaptive_damping": True}, "adaptive_damping"),
        ({"inverse_placement": "owner"}, "inverse_placement"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": 0.0}, "eps"),
    ],
)
def test_invalid_settings_name_the_parameter(options: dict[str, object], name: str) -> None:
    settings: dict[str, object] = {"step_rule": "eigenbasis_adam", **options}
    with pytest.raises(ValueError, match=name):
        FrobPreconditionedSGD(nn.Linear(3, 2), lr=0.1, **settings)  # type: ignore[arg-type]
