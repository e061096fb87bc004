"""Adaptive damping (the Levenberg–Marquardt rule): the quadratic model against dense
Kronecker products, the reduction ratio against independently computed losses and
gradients, the rule, its schedule, the re-evaluation's side effects, checkpoints,
validation, data parallelism and the benchmark's closure."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.damping import ModelPiece, adapted_damping, quadratic_model
from tests.distributed_harness import GLOBAL_BATCH, STEPS, batches, make_model, run_ranks
from tests.reference import CountingMethod, random_spd, vec
from tests.test_optimizer import quiet, small_model

OMEGA = (19 / 20) ** 5


def data(seed: int = 1, n: int = 10) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def closure_for(
    opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor, set_to_none: bool = True
) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def damping_of(opt: FrobPreconditionedSGD) -> float:
    return float(opt.param_groups[0]["damping"])


# --- the quadratic model --------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2])
def test_quadratic_model_matches_dense_kronecker_products(blocks: int) -> None:
    gen = torch.Generator().manual_seed(0)
    out, inp, lam = 3, 4, 0.37
    a = torch.stack([random_spd(inp, gen) for _ in range(blocks)])
    g = torch.stack([random_spd(out, gen) for _ in range(blocks)])
    grad = torch.randn(blocks, out, inp, generator=gen, dtype=torch.float64)
    step = torch.randn(blocks, out, inp, generator=gen, dtype=torch.float64)
    plain_grad = torch.randn(5, generator=gen, dtype=torch.float64)
    plain_step = torch.randn(5, generator=gen, dtype=torch.float64)
    factors = (a.squeeze(0), g.squeeze(0)) if blocks == 1 else (a, g)
    pieces = [
        ModelPiece(grad.float(), step.float(), lam, tuple(f.float() for f in factors)),  # type: ignore[arg-type]
        ModelPiece(plain_grad.float(), plain_step.float(), 2 * lam),
    ]
    expected = plain_grad @ plain_step + lam * plain_step.square().sum()
    for k in range(blocks):
        d = vec(step[k])
        expected += vec(grad[k]) @ d + 0.5 * d @ torch.kron(a[k], g[k]) @ d
        expected += 0.5 * lam * d @ d
    torch.testing.assert_close(quadratic_model(pieces).double(), expected, rtol=1e-5, atol=1e-5)


def test_the_rule_moves_and_clamps_the_damping() -> None:
    rule = lambda lam, rho, m: adapted_damping(lam, rho, m, 0.5, 1e-3, 1.0)  # noqa: E731
    assert rule(0.1, 0.1, -1.0) == pytest.approx(0.2)  # ρ < 1/4: up
    assert rule(0.1, 0.9, -1.0) == pytest.approx(0.05)  # ρ > 3/4: down
    assert rule(0.1, 0.5, -1.0) == 0.1  # in between: kept
    assert rule(0.1, 0.9, 1.0) == pytest.approx(0.2)  # M >= 0 is a failure: up
    assert rule(0.1, math.nan, 0.0) == 0.1  # a step of length 0 measures nothing: kept
    assert rule(0.1, math.nan, -1.0) == pytest.approx(0.2)  # non-finite ρ: up
    assert rule(0.1, math.inf, -1.0) == pytest.approx(0.2)
    assert rule(0.8, 0.1, -1.0) == 1.0  # clamped above
    assert rule(1.5e-3, 0.9, -1.0) == 1e-3  # clamped below


# --- the ratio against an independent computation --------------------------------------------


def kronecker_energy(
    model: nn.Module, opt: FrobPreconditionedSGD, delta: dict[str, Tensor]
) -> Tensor:
    """``Σ_layers vec(Δ)ᵀ (A ⊗ G) vec(Δ)`` with dense Kronecker products; ``Δ = [W, b]`` is
    assembled here from the named parameter changes."""
    total = torch.zeros((), dtype=torch.float64)
    factors = opt.preconditioner.factors()
    for name, module in model.named_modules():
        if name not in factors:
            continue
        a, g = (f.double() for f in factors[name])
        w = delta[f"{name}.weight"].reshape(module.weight.shape[0], -1)
        d = vec(torch.cat([w, delta[f"{name}.bias"].unsqueeze(1)], dim=1))
        total += d @ torch.kron(a, g) @ d
    return total


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_reduction_ratio_matches_an_independent_computation(fisher: str) -> None:
    model = small_model()
    lam, wd, interval = 0.05, 0.01, 2
    opt = quiet(
        model, lr=0.5, momentum=0.9, weight_decay=wd, damping=lam, inverse_update_freq=1,
        kl_clip=1e-2, fisher=fisher, loss="cross_entropy", adaptive_damping=True,
        damping_adaptation_interval=interval, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    opt.step(closure_for(opt, model, *data(1)))  # momentum now carries the first step
    assert opt.last_reduction_ratio is None and damping_of(opt) == lam
    x, y = data(2)
    reference = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt.step(closure_for(opt, model, x, y))
    # independently: both losses and the gradient at θ, the step from the parameters
    loss_before = F.cross_entropy(reference(x), y)
    grads = dict(
        zip(
            before,
            torch.autograd.grad(loss_before, list(reference.parameters())),
            strict=True,
        )
    )
    with torch.no_grad():
        loss_after = F.cross_entropy(model(x), y)
    delta = {k: (v.detach() - before[k]).double() for k, v in model.named_parameters()}
    linear = sum(((grads[k].double() + wd * before[k].double()) * delta[k]).sum() for k in delta)
    squares = sum(d.square().sum() for d in delta.values())
    model_value = linear + 0.5 * kronecker_energy(model, opt, delta) + 0.5 * (lam + wd) * squares
    decay = sum(wd * (before[k].double() * delta[k] + 0.5 * delta[k].square()).sum() for k in delta)
    change = loss_after.double() - loss_before.detach().double() + decay
    rho = float(change / model_value)
    assert float(model_value) < 0
    assert opt.last_reduction_ratio == pytest.approx(rho, rel=1e-3, abs=1e-4)
    expected = lam / OMEGA if rho < 0.25 else lam * OMEGA if rho > 0.75 else lam
    assert damping_of(opt) == pytest.approx(expected, rel=1e-12)


# --- the rule in training --------------------------------------------------------------------


def test_a_loss_that_rises_raises_the_damping_up_to_its_bound() -> None:
    model = small_model()
    lam, high = 1e-2, 1.5e-2
    opt = quiet(
        model, lr=50.0, kl_clip=None, damping=lam, adaptive_damping=True,
        damping_adaptation_interval=1, max_damping=high,
    )  # fmt: skip
    x, y = data(1)
    seen = []
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
        seen.append((opt.last_reduction_ratio, damping_of(opt)))
    assert seen[0][0] < 0.25  # type: ignore[operator]
    assert seen[0][1] == pytest.approx(lam / OMEGA)
    assert [lam for _, lam in seen[1:]] == [high, high]  # clamped


def quadratic_problem() -> tuple[nn.Module, Tensor, Tensor, Callable[..., Callable[[], Tensor]]]:
    """Linear regression with ``L = mean_n ½‖W a_n + b − y_n‖²``: its Hessian is exactly
    ``A ⊗ I`` for ``A`` the mean of ``a aᵀ`` over the batch."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen)

    def make(opt: torch.optim.Optimizer) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            opt.zero_grad()
            loss = 0.5 * (model(x) - y).square().sum(1).mean()
            loss.backward()
            return loss

        return closure

    return model, x, y, make


def test_an_exact_quadratic_model_lowers_the_damping_down_to_its_bound() -> None:
    model, _, _, make = quadratic_problem()
    lam, low = 1e-4, 1e-4 * OMEGA**1.5
    opt = quiet(
        model, lr=0.1, kl_clip=None, damping=lam, codomain="identity", factor_decay=0.0,
        inverse_update_freq=1, adaptive_damping=True, damping_adaptation_interval=1,
        min_damping=low,
    )  # fmt: skip
    opt.step(make(opt))
    # the model is the loss plus ½ λ ‖Δ‖²: ρ = 1 + ½ λ ‖Δ‖² / (−M), a little above 1
    assert 1.0 <= opt.last_reduction_ratio < 1.01  # type: ignore[operator]
    assert damping_of(opt) == pytest.approx(lam * OMEGA)
    opt.step(make(opt))
    assert damping_of(opt) == pytest.approx(low)  # clamped
    opt.step(make(opt))
    assert damping_of(opt) == pytest.approx(low)


def test_damping_adapts_only_every_interval_th_step() -> None:
    model, _, _, make = quadratic_problem()
    opt = quiet(
        model, lr=0.1, kl_clip=None, damping=1e-3, codomain="identity",
        adaptive_damping=True, damping_adaptation_interval=3,
    )  # fmt: skip
    calls = []
    closure = make(opt)

    def counted() -> Tensor:
        calls.append(opt.steps)
        return closure()

    history = []
    for _ in range(7):
        opt.step(counted)
        history.append((opt.last_reduction_ratio, damping_of(opt)))
    # the 3rd and 6th steps (steps 2 and 5 counted from 0) call the closure twice
    assert calls == [0, 1, 2, 2, 3, 4, 5, 5, 6]
    assert [r is None for r, _ in history] == [True, True, False, False, False, False, False]
    dampings = [lam for _, lam in history]
    assert dampings[0] == dampings[1] == 1e-3
    assert dampings[2] == pytest.approx(1e-3 * OMEGA)
    assert dampings[2] == dampings[3] == dampings[4]
    assert dampings[5] == pytest.approx(1e-3 * OMEGA**2) and dampings[6] == dampings[5]


def test_the_new_damping_acts_at_the_next_inverse_refresh() -> None:
    model, _, _, make = quadratic_problem()
    opt = quiet(
        model, lr=0.1, damping=1e-3, damping_method="exact", inverse_update_freq=2,
        adaptive_damping=True, damping_adaptation_interval=1,
    )  # fmt: skip
    counting = CountingMethod(opt.preconditioner.method)
    opt.preconditioner.method = counting  # type: ignore[assignment]
    dampings = []
    for _ in range(4):
        opt.step(make(opt))
        dampings.append(damping_of(opt))
    seen = [damping for _, damping in counting.calls]
    assert [d[""] for d in seen] == [1e-3, dampings[1]]  # refreshes at steps 0 and 2


# --- side effects of the re-evaluation --------------------------------------------------------


def step_checking_grads(
    adaptive: bool, fisher: str, set_to_none: bool
) -> tuple[FrobPreconditionedSGD, nn.Module]:
    """One step (measured when ``adaptive``); checks that every ``p.grad`` is afterwards the
    tensor the step used, with the values it used, and that no statistic is pending."""
    model = small_model()
    opt = quiet(
        model, lr=0.1, fisher=fisher, loss="cross_entropy", adaptive_damping=adaptive,
        damping_adaptation_interval=1, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    closure = closure_for(opt, model, *data(1), set_to_none)
    closure()  # gradients for the step's closure to zero (set_to_none=False)
    used: dict[Tensor, tuple[Tensor, Tensor]] = {}

    def recording() -> Tensor:
        loss = closure()
        if not used:  # the first call: the gradients the step uses
            used.update({p: (p.grad, p.grad.clone()) for p in model.parameters()})  # type: ignore[misc]
        return loss

    opt.step(recording)
    for p in model.parameters():
        assert p.grad is used[p][0]  # the same tensor ...
        assert torch.equal(p.grad, used[p][1])  # ... with the same values
    pre = opt.preconditioner
    # the step folded its window; the re-evaluation left nothing pending
    assert not any(f.pending for layer in pre.layers.values() for f in layer.factors)
    assert pre.capture.model_calls == 0
    return opt, model


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_reevaluation_restores_grads_and_records_nothing(fisher: str, set_to_none: bool) -> None:
    plain, plain_model = step_checking_grads(False, fisher, set_to_none)
    adaptive, adaptive_model = step_checking_grads(True, fisher, set_to_none)
    assert adaptive.last_reduction_ratio is not None
    # the MC labels drawn and the factors folded are those of the run without adaptation
    assert torch.equal(plain.generator.get_state(), adaptive.generator.get_state())  # type: ignore[union-attr]
    for name, (a, g) in plain.preconditioner.factors().items():
        b, h = adaptive.preconditioner.factors()[name]
        assert torch.equal(a, b) and torch.equal(g, h)
    # and so was the step (the damping changes only at the next refresh)
    for p, q in zip(plain_model.parameters(), adaptive_model.parameters(), strict=True):
        assert torch.equal(p, q)


# --- checkpoints ------------------------------------------------------------------------------


def run_lm(model: nn.Module, opt: FrobPreconditionedSGD, steps: range) -> list[float]:
    dampings = []
    for step in steps:
        x, y = data(10 + step)
        opt.step(closure_for(opt, model, x, y))
        dampings.append(damping_of(opt))
    return dampings


def test_state_dict_round_trip_continues_identically() -> None:
    options: dict[str, Any] = {
        "lr": 0.3, "momentum": 0.5, "damping": 1e-2, "inverse_update_freq": 2,
        "kl_clip": 1e-2, "adaptive_damping": True, "damping_adaptation_interval": 2,
        "loss": "cross_entropy",
    }  # fmt: skip
    model = small_model()
    opt = quiet(model, generator=torch.Generator().manual_seed(7), **options)
    straight = run_lm(model, opt, range(9))
    assert len(set(straight)) > 2  # the damping did move

    model = small_model()
    opt = quiet(model, generator=torch.Generator().manual_seed(7), **options)
    first = run_lm(model, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = small_model()
    resumed = quiet(resumed_model, generator=torch.Generator().manual_seed(99), **options)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["opt"])
    assert resumed.last_reduction_ratio == opt.last_reduction_ratio is not None
    assert damping_of(resumed) == first[-1]
    rest = run_lm(resumed_model, resumed, range(5, 9))
    assert first + rest == straight
    continued = run_lm(model, opt, range(5, 9))
    assert continued == rest
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)


# --- validation and the option off -------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"adaptive_damping": 1}, "adaptive_damping"),
        ({"damping_adaptation_interval": 0}, "damping_adaptation_interval"),
        ({"damping_adaptation_interval": 2.0}, "damping_adaptation_interval"),
        ({"damping_adaptation_factor": 1.0}, "damping_adaptation_factor"),
        ({"damping_adaptation_factor": 0.0}, "damping_adaptation_factor"),
        ({"damping_adaptation_factor": math.nan}, "damping_adaptation_factor"),
        ({"min_damping": 0.0}, "min_damping"),
        ({"min_damping": math.inf}, "min_damping"),
        ({"min_damping": 1.0, "max_damping": 0.5}, "max_damping"),
        ({"max_damping": math.inf}, "max_damping"),
        ({"adaptive_damping": True, "damping": 1e-9}, "damping"),
        ({"adaptive_damping": True, "damping": 1e4}, "damping"),
        ({"adaptive_damping": True, "loss_reduction": "sum"}, "loss_reduction"),
        (
            {"adaptive_damping": True, "grad_scaler": torch.amp.GradScaler("cpu")},
            "adaptive_damping",
        ),
    ],
)
def test_invalid_hyperparameters_are_refused(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"invalid {name}=.*expected"):
        quiet(small_model(), lr=0.1, **options)


def test_steps_without_a_closure_are_refused_before_anything_changes() -> None:
    model = small_model()
    opt = quiet(model, lr=0.1, adaptive_damping=True)
    closure_for(opt, model, *data(1))()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="needs step\\(closure\\)"):
        opt.step()
    assert opt.steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_a_closure_returning_nothing_is_refused() -> None:
    model = small_model()
    opt = quiet(model, lr=0.1, adaptive_damping=True, damping_adaptation_interval=1)
    x, y = data(1)

    def closure() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    with pytest.raises(ValueError, match="returns the loss"):
        opt.step(closure)


def test_the_option_off_changes_nothing() -> None:
    runs = []
    for options in ({}, {"adaptive_damping": False, "damping_adaptation_interval": 1}):
        model = small_model()
        opt = quiet(model, lr=0.3, momentum=0.9, inverse_update_freq=2, **options)
        for step in range(4):
            x, y = data(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()  # no closure needed
        assert opt.last_reduction_ratio is None and damping_of(opt) == 1e-3
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*runs, strict=True))


def test_precondition_grads_does_not_adapt() -> None:
    model = small_model()
    opt = quiet(model, lr=0.1, adaptive_damping=True, damping_adaptation_interval=1)
    for step in range(3):
        closure_for(opt, model, *data(step))()
        opt.precondition_grads()
    assert opt.last_reduction_ratio is None and damping_of(opt) == 1e-3


# --- data parallelism ------------------------------------------------------------------------


def train_lm(rank: int, world_size: int) -> dict[str, Any]:
    """Adaptive damping at every step on this rank's slice of the global batches; whether
    every step left the gradients it used (DDP's bucket views, which the re-evaluation's
    backward writes again)."""
    inner = make_model()
    model: nn.Module = inner
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(inner, gradient_as_bucket_view=True)
    opt = FrobPreconditionedSGD(
        model, lr=0.3, fisher="empirical", inverse_update_freq=1, damping=1e-2,
        adaptive_damping=True, damping_adaptation_interval=1, damping_adaptation_factor=0.5,
        step_rule="preconditioned_sgd",
    )  # fmt: skip
    x_all, y_all = batches()
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    ratios, dampings, restored = [], [], []
    for step in range(STEPS):
        closure = closure_for(opt, model, x_all[step, rows], y_all[step, rows])
        used: list[Tensor] = []

        def recording(closure: Callable[[], Tensor] = closure, used: list[Tensor] = used) -> Tensor:
            loss = closure()
            if not used:
                used.extend(p.grad.clone() for p in inner.parameters())  # type: ignore[union-attr]
            return loss

        opt.step(recording)
        grads = [p.grad for p in inner.parameters()]
        restored.append(all(torch.equal(g, u) for g, u in zip(grads, used, strict=True)))  # type: ignore[arg-type]
        ratios.append(opt.last_reduction_ratio)
        dampings.append(damping_of(opt))
    params = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    return {"ratios": ratios, "dampings": dampings, "params": params, "restored": restored}


@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
def test_ranks_take_the_decisions_of_the_global_batch(tmp_path: Path) -> None:
    single = train_lm(0, 1)
    ranks = run_ranks(2, train_lm, tmp_path)
    assert all(single["restored"]) and all(ranks[0]["restored"] + ranks[1]["restored"])
    assert ranks[0]["dampings"] == ranks[1]["dampings"]
    assert ranks[0]["ratios"] == ranks[1]["ratios"]
    assert len(set(single["dampings"])) > 1  # the damping moved
    # the mean of the ranks' losses is the global batch's: the same ratios, the same rule
    assert ranks[0]["ratios"] == pytest.approx(single["ratios"], rel=1e-3, abs=1e-4)
    assert ranks[0]["dampings"] == pytest.approx(single["dampings"], rel=1e-9)
    for key, value in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-4, atol=1e-5)


# --- the benchmark's closure ----------------------------------------------------------------------


def test_time_to_target_runs_the_adaptive_variant_with_a_closure(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "time_to_target.py"
    command = [
        sys.executable, str(script), "--workloads", "mlp", "--optimizers", "kfrob-lm",
        "--seeds", "1", "--max-steps", "6", "--embedded", "--out", str(tmp_path),
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env=env
    )  # this checkout's kfrob, whatever is installed
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "time_to_target.json").read_text())["results"]["mlp"]
    assert set(results) == {"kfrob-lm"} and len(results["kfrob-lm"]["grid"]) == 3
