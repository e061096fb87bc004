"""The engine and its homes: ``KroneckerPreconditioner`` under any optimizer, typed options,
injected inverse methods, the layer registry, parameter groups, warnings and state formats."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD, KfrobWarning, KroneckerPreconditioner
from kfrob.inverses import ExactDamping, FactoredDamping, method_for
from kfrob.layers import LinearMath, layer_math, register, unregister
from kfrob.options import InverseOptions, PreconditionerOptions
from tests.reference import CountingMethod
from tests.test_optimizer import batches, quiet, small_model, train


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


# --- the engine under any optimizer ---------------------------------------------------------


def test_engine_under_sgd_takes_the_steps_of_frob_sgd() -> None:
    """``pre.step(lr)`` between ``backward`` and ``torch.optim.SGD.step`` is exactly
    ``FrobPreconditionedSGD`` (MC Fisher, same sampler seed, momentum)."""
    model, reference = small_model(), small_model()
    options = {"loss": "cross_entropy", "inverse_update_freq": 3}
    frob = quiet(reference, lr=0.1, momentum=0.9, generator=torch.Generator().manual_seed(2),
                 **options)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = KroneckerPreconditioner(model, generator=torch.Generator().manual_seed(2), **options)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches(6):
        sgd.zero_grad()
        loss_of(model, x, y).backward()
        pre.step(lr=0.1 / (1 - 0.9))  # the KL clip's rate under momentum
        sgd.step()
    train(reference, frob, batches(6))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert pre.steps == frob.steps == 6


def test_engine_preconditions_adamw_gradients() -> None:
    """Under AdamW the engine hands the optimizer preconditioned, clipped gradients: the
    gradient AdamW sees is the plan's direction, not the raw one."""
    model = small_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre = KroneckerPreconditioner(model, kl_clip=None)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, (x, y) in enumerate(batches(3)):
        adamw.zero_grad()
        loss_of(model, x, y).backward()
        raw = {p: p.grad.clone() for p in model.parameters()}  # type: ignore[union-attr]
        plan = pre.plan(raw)  # between refreshes the inverses step() uses are these
        pre.step()
        if i == 0:  # step 0 refreshes first
            adamw.step()
            continue
        for step in plan.layers:
            for p, want in step.layer.math.split(step.preconditioned).items():
                torch.testing.assert_close(p.grad, want)
                assert not torch.allclose(p.grad, raw[p])  # curvature acted
        adamw.step()
    layer_norm = model[4]  # not registered: its gradient is untouched
    assert all(torch.isfinite(p).all() for p in layer_norm.parameters())


# --- options ----------------------------------------------------------------------------------


def test_options_object_and_flat_keywords_are_one_thing() -> None:
    flat = {"damping_method": "exact", "exponent": 0.5, "inverse_update_freq": 2, "damping": 0.01}
    options = PreconditionerOptions.from_flat(**flat)
    assert options.inverse.damping_method == "exact" and options.schedule.inverse_update_freq == 2
    assert PreconditionerOptions.from_flat(**options.flat()) == options
    runs = []
    for kwargs in ({"options": options}, flat):
        model = small_model()
        train(model, quiet(model, lr=0.1, **kwargs), batches(4))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_options_refuse_unknown_keywords_and_mixtures() -> None:
    with pytest.raises(TypeError, match="damping_methd"):
        PreconditionerOptions.from_flat(damping_methd="exact")
    with pytest.raises(TypeError, match="not both"):
        FrobPreconditionedSGD(
            nn.Linear(2, 2),
            lr=0.1,
            options=PreconditionerOptions(),
            damping=1.0,
            step_rule="preconditioned_sgd",
        )
    with pytest.raises(ValueError, match="invalid exponent="):
        InverseOptions(exponent=-1.0)


def test_the_method_is_chosen_once_from_the_options() -> None:
    assert type(method_for(PreconditionerOptions())) is FactoredDamping
    exact = method_for(
        PreconditionerOptions(
            inverse=InverseOptions(damping_method="exact", eigenbasis_refresh="subspace")
        )
    )
    assert type(exact) is ExactDamping and exact.refresh == "subspace"


# --- injected inverse methods -----------------------------------------------------------------


class FailingAfterFirst(CountingMethod):
    """Succeeds on the first refresh, fails every layer afterwards."""

    def compute(self, layers, damping, held):  # type: ignore[no-untyped-def]
        out = super().compute(layers, damping, held)
        return out if len(self.calls) == 1 else dict.fromkeys(out)


def test_an_injected_failing_method_keeps_the_last_inverses() -> None:
    model = small_model()
    opt = quiet(model, lr=0.1, inverse_update_freq=2)
    failing = FailingAfterFirst(opt.preconditioner.method)
    opt.preconditioner.method = failing  # type: ignore[assignment]
    train(model, opt, batches(1))
    held = dict(opt.preconditioner.inverses)
    with pytest.warns(KfrobWarning, match="keeping its last inverse"):
        train(model, opt, batches(3, seed=4))
    assert len(failing.calls) == 2
    assert all(opt.preconditioner.inverses[name] is inverse for name, inverse in held.items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- the layer registry -----------------------------------------------------------------------


class TransposedLinear(nn.Module):
    """A linear layer storing its weight as ``(in, out)`` (transformers' GPT-2 ``Conv1D``)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().T.clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class TransposedLinearMath(LinearMath):
    """The whole layer kind: the layout of its weight; everything else is ``LinearMath``."""

    def __init__(self, module: nn.Module, weight_sharing: str = "expand") -> None:
        super().__init__(module)
        self.out_features = module.weight.shape[1]  # type: ignore[index]
        self.in_features = module.weight.shape[0] + int(self.has_bias)  # type: ignore[index]

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super().to_matrix(weight.T, bias)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        weight = mat[0, :, : mat.shape[-1] - int(self.has_bias)].T
        return weight, mat[0, :, -1] if self.has_bias else None


@pytest.fixture
def transposed_kind() -> Iterator[None]:
    register(TransposedLinear, TransposedLinearMath)
    yield
    unregister(TransposedLinear)


def test_a_registered_layer_kind_trains_like_its_twin(transposed_kind: None) -> None:
    """One registration line makes a new kind a preconditioned layer; it takes exactly the
    steps of the ``nn.Linear`` it transposes."""
    torch.manual_seed(0)
    twin = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model = nn.Sequential(TransposedLinear(twin[0]), nn.Tanh(), TransposedLinear(twin[2]))
    assert isinstance(layer_math(model[0]), TransposedLinearMath)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))] * 4
    opts = [
        FrobPreconditionedSGD(m, lr=0.2, inverse_update_freq=2, step_rule="preconditioned_sgd")
        for m in (model, twin)
    ]
    for net, opt in zip((model, twin), opts, strict=True):
        train(net, opt, data)
    assert set(opts[0].preconditioner.layers) == {"0", "2"}
    for mine, theirs in ((model[0], twin[0]), (model[2], twin[2])):
        torch.testing.assert_close(mine.weight.T, theirs.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.bias, theirs.bias, rtol=1e-5, atol=1e-6)


def test_without_registration_the_kind_gets_plain_sgd() -> None:
    model = nn.Sequential(TransposedLinear(nn.Linear(3, 2)))
    with pytest.warns(KfrobWarning, match="TransposedLinear has no Kronecker-factored"):
        opt = FrobPreconditionedSGD(model, lr=0.1, step_rule="preconditioned_sgd")
    assert not opt.preconditioner.layers


# --- parameter groups -------------------------------------------------------------------------


def split_decay(model: nn.Module) -> list[dict[str, object]]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]


def test_param_groups_without_decay_on_biases_train_like_sgd() -> None:
    model, reference = small_model(), small_model()
    opt = quiet(model, params=split_decay(model), lr=0.1, momentum=0.9, kl_clip=None,
                domain="identity", codomain="identity")  # fmt: skip
    sgd = torch.optim.SGD(split_decay(reference), lr=0.1, momentum=0.9)  # type: ignore[arg-type]
    train(model, opt, batches(5))
    train(reference, sgd, batches(5))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_layer_takes_damping_and_lr_from_its_weights_group() -> None:
    model = small_model()
    groups = [{"params": model[0].parameters(), "damping": 0.5, "lr": 0.01},
              {"params": [p for i in (3, 4, 6) for p in model[i].parameters()]}]  # fmt: skip
    opt = quiet(model, params=groups, lr=0.1)
    assert opt.layer_damping() == {"0": 0.5, "3": 1e-3, "6": 1e-3}
    assert opt.learning_rates()[model[0].weight] == 0.01
    train(model, opt, batches(2))
    with pytest.raises(ValueError, match="invalid lr="):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": -1.0})
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})


def test_parameters_instead_of_the_model_say_what_to_pass() -> None:
    model = small_model()
    with pytest.raises(TypeError, match=r"pass the model itself.*parameter groups"):
        FrobPreconditionedSGD(model.parameters(), lr=0.1, step_rule="preconditioned_sgd")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a learning rate"):
        FrobPreconditionedSGD(model, step_rule="preconditioned_sgd")
    positional = FrobPreconditionedSGD(model, 0.1, momentum=0.5, step_rule="preconditioned_sgd")  # type: ignore[arg-type]
    assert positional.param_groups[0]["lr"] == 0.1 and len(positional.param_groups) == 1


# --- warnings and state formats -----------------------------------------------------------------


def test_warnings_are_kfrob_warnings_at_the_users_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = FrobPreconditionedSGD(
            small_model(), lr=0.1, step_rule="preconditioned_sgd"
        )  # UnregisteredLayerNorm: plain SGD
        model = small_model()
        opt = FrobPreconditionedSGD(
            model, lr=0.1, inverse_update_freq=1, step_rule="preconditioned_sgd"
        )
        x, y = batches(1)[0]
        F.cross_entropy(model(x * float("nan")), y).backward()
        opt.step()  # a non-finite step, warned at the next refresh
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    kinds = {w.category for w in caught if "kfrob" in str(w.message)}
    assert kinds == {KfrobWarning}
    for w in caught:
        if "kfrob" in str(w.message):
            assert Path(w.filename).resolve() == Path(__file__).resolve(), (w.message, w.filename)
    messages = " | ".join(str(w.message) for w in caught)
    assert "plain updates" in messages and "non-finite" in messages


def test_a_state_of_a_newer_format_is_refused_by_version() -> None:
    model = small_model()
    opt = quiet(model, lr=0.1)
    train(model, opt, batches(1))
    state = copy.deepcopy(opt.state_dict())
    state["kfrob"]["engine"]["version"] = 99
    with pytest.raises(ValueError, match=r"format version 99.*newer kfrob"):
        opt.load_state_dict(state)
