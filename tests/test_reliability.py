"""Real architectures, odd usage and faults: precondition correctly or fall back loudly."""

from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import grad, vmap

import kfrob.kronecker
from kfrob import FrobPreconditionedSGD
from tests.reference import codomain_factor, dense_solve, domain_factor_linear


def quiet(model: nn.Module, **kwargs: object) -> FrobPreconditionedSGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrobPreconditionedSGD(model, **{"step_rule": "preconditioned_sgd", **kwargs})  # type: ignore[arg-type]


def fit(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]
) -> float:
    loss = torch.zeros(())
    for x, y in batches:
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
    return float(loss.detach())


# --- architectures -----------------------------------------------------------------------
class SharedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_module_called_twice_covers_both_calls() -> None:
    """Calls are treated like locations: ``A`` averages the rows of both calls and ``G`` sums
    both calls' per-sample output gradients, averaged over samples."""
    torch.manual_seed(0)
    model = SharedTwice()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    opt = FrobPreconditionedSGD(model, lr=0.0, step_rule="preconditioned_sgd")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.close()
    a, g = opt.preconditioner.factors()["shared"]

    w, b = model.shared.weight.detach(), model.shared.bias.detach()
    x1 = x
    x2 = torch.tanh(x1 @ w.T + b)

    def own_loss(e1: Tensor, e2: Tensor, x_n: Tensor, y_n: Tensor) -> Tensor:
        h = torch.tanh(x_n @ w.T + b + e1)
        out = model.head(torch.tanh(h @ w.T + b + e2))
        return F.cross_entropy(out[None], y_n[None], reduction="sum")

    zeros = torch.zeros(6, 4)
    g1, g2 = vmap(grad(own_loss, argnums=(0, 1)))(zeros, zeros, x, y)
    want_g = codomain_factor(g1) + codomain_factor(g2)
    want_a = domain_factor_linear(torch.cat([x1, x2]), bias=True)
    torch.testing.assert_close(a.double(), want_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), want_g[0], rtol=1e-4, atol=1e-7)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(self.embed(tokens))))


def test_tied_embedding_head_trains_with_one_curvature() -> None:
    torch.manual_seed(0)
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = FrobPreconditionedSGD(model, lr=0.1, step_rule="preconditioned_sgd")
    assert set(opt.preconditioner.layers) == {"body", "head"}
    tokens = torch.randint(0, 11, (4, 5))
    before = fit(model, opt, [(tokens, tokens)])
    after = fit(model, opt, [(tokens, tokens)] * 20)
    assert after < before


def test_transformer_encoder_with_attention_trains() -> None:
    """``MultiheadAttention`` projects functionally: its parameters and its ``out_proj``'s
    get SGD with a warning; the FFN Linears (3-D inputs) and the LayerNorms are
    preconditioned."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=8, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0
    )
    model = nn.Sequential(
        nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False), nn.Linear(8, 3)
    )
    with pytest.warns(UserWarning, match="self_attn.out_proj .its nn.MultiheadAttention"):
        opt = FrobPreconditionedSGD(model, lr=0.05, step_rule="preconditioned_sgd")
    x = torch.randn(4, 5, 8)
    y = torch.randint(0, 3, (4, 5))
    first = fit(model, opt, [(x, y)])
    last = fit(model, opt, [(x, y)] * 15)
    assert last < first
    assert {"0.layers.0.self_attn", "0.layers.0.self_attn.out_proj"} == set(
        opt.preconditioner.unsupported
    )
    blocks = {f"0.layers.0.{n}" for n in ("linear1", "linear2", "norm1", "norm2")}
    assert blocks | {"1"} == set(opt.preconditioner.inverses)


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pointwise = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.pointwise(F.relu(self.bn(self.depthwise(x))))
        return self.head(h.mean((2, 3)))


def test_resnet_block_with_depthwise_conv_and_batchnorm() -> None:
    torch.manual_seed(0)
    model = ResBlock()
    opt = quiet(model, lr=0.05)
    data = [(torch.randn(8, 4, 6, 6), torch.randint(0, 3, (8,)))] * 12
    first = fit(model, opt, data[:1])
    assert fit(model, opt, data) < first
    a, g = opt.preconditioner.factors()["depthwise"]
    assert a.shape == (4, 9, 9) and g.shape == (4, 1, 1)
    a, g = opt.preconditioner.factors()["bn"]
    assert a.shape == (4, 2, 2) and g.shape == (4, 1, 1)


def test_channels_last_gives_the_same_factors() -> None:
    torch.manual_seed(0)
    model = ResBlock()
    twin = ResBlock().to(memory_format=torch.channels_last)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 4, 6, 6), torch.randint(0, 3, (8,))
    factors = []
    for net, inputs in ((model, x), (twin, x.to(memory_format=torch.channels_last))):
        opt = quiet(net, lr=0.0)
        fit(net, opt, [(inputs, y)])
        factors.append(opt.preconditioner.factors())
    for name, (a, g) in factors[0].items():
        torch.testing.assert_close(factors[1][name][0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(factors[1][name][1], g, rtol=1e-5, atol=1e-7)


def test_compiled_model_trains_like_eager() -> None:
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(4)
    ]
    params = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = FrobPreconditionedSGD(
            model, lr=0.1, inverse_update_freq=2, step_rule="preconditioned_sgd"
        )
        fit(torch.compile(model) if compiled else model, opt, data)
        params.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# --- frozen, unused and half-precision parameters ---------------------------------------
def test_frozen_unused_and_midway_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(5, 5), "b": nn.Linear(5, 3), "unused": nn.Linear(5, 3)})
    model["a"].bias.requires_grad_(False)
    opt = quiet(model, lr=0.1, inverse_update_freq=2)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    frozen_bias = model["a"].bias.detach().clone()
    unused = model["unused"].weight.detach().clone()

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model["b"](torch.tanh(model["a"](x))), y).backward()
        opt.step()

    for _ in range(3):
        step()
    model["a"].weight.requires_grad_(False)  # freeze the whole layer midway
    frozen_weight = model["a"].weight.detach().clone()
    for _ in range(3):
        step()
    assert torch.equal(model["a"].bias, frozen_bias)
    assert torch.equal(model["a"].weight, frozen_weight)
    assert torch.equal(model["unused"].weight, unused)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_float16_model_keeps_float32_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).half()
    opt = quiet(model, lr=0.05)
    fit(model, opt, [(torch.randn(8, 6).half(), torch.randint(0, 3, (8,)))] * 3)
    for a, g in opt.preconditioner.factors().values():
        assert a.dtype == torch.float32 and torch.isfinite(g).all()
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())


def test_meta_device_model_is_refused_clearly() -> None:
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="meta device"):
        FrobPreconditionedSGD(model, lr=0.1, step_rule="preconditioned_sgd")


# --- faults -------------------------------------------------------------------------------
def test_failed_decomposition_keeps_last_good_inverse(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = quiet(model, lr=0.1, inverse_update_freq=1, damping_method="exact")
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))] * 4
    fit(model, opt, data[:1])
    good = {k: v.scaling.clone() for k, v in opt.preconditioner.inverses.items()}

    def broken(matrix: Tensor) -> tuple[Tensor, Tensor]:
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(kfrob.kronecker.torch.linalg, "eigh", broken)
    with pytest.warns(UserWarning, match="keeping its last inverse"):
        fit(model, opt, data[1:])
    for name, inverse in opt.preconditioner.inverses.items():
        assert torch.equal(inverse.scaling, good[name])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grad_scaler_skipped_step_leaves_factors_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = quiet(model, lr=0.1, grad_scaler=scaler)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def scaled_step(loss_factor: float) -> None:
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y) * loss_factor).backward()
        scaler.step(opt)
        scaler.update()

    scaled_step(1.0)
    factors = {k: (a.clone(), g.clone()) for k, (a, g) in opt.preconditioner.factors().items()}
    scaled_step(float("inf"))  # overflow: the scaler skips opt.step()
    scaled_step(1.0)  # this window also holds the overflowed statistics: rejected whole
    for name, (a, g) in opt.preconditioner.factors().items():
        assert torch.equal(a, factors[name][0]) and torch.equal(g, factors[name][1])
    scaled_step(1.0)  # clean again: G moves (the parameters have changed), all finite
    _, g = opt.preconditioner.factors()["2"]
    assert torch.isfinite(g).all() and not torch.equal(g, factors["2"][1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- checkpoints and lifetime -------------------------------------------------------------
def test_load_state_dict_names_the_mismatched_layer_and_changes_nothing() -> None:
    source = quiet(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), lr=0.1)
    target_model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    target = quiet(target_model, lr=0.1)
    before = {k: (a.clone(), g.clone()) for k, (a, g) in target.preconditioner.factors().items()}
    with pytest.raises(ValueError, match="layer '0'"):
        target.load_state_dict(source.state_dict())
    for name, (a, g) in target.preconditioner.factors().items():
        assert torch.equal(a, before[name][0]) and torch.equal(g, before[name][1])
    with pytest.raises(ValueError, match="no 'kfrob' entry"):
        target.load_state_dict(torch.optim.SGD(target_model.parameters(), lr=0.1).state_dict())


def test_state_saved_in_float64_loads_onto_float32_factors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = quiet(model, lr=0.1)
    fit(model, opt, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])
    state = opt.state_dict()
    layer_state = state["kfrob"]["engine"]["layers"]["0"]["domain"]
    layer_state["value"] = layer_state["value"].double()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = quiet(model, lr=0.1)
    other.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
    assert other.preconditioner.factors()["0"][0].dtype == torch.float32


def test_truncated_checkpoint_is_reported_not_half_loaded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = nn.Linear(3, 2)
    opt = quiet(model, lr=0.1)
    fit(model, opt, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])
    path = tmp_path / "ckpt.pt"
    torch.save(opt.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    fresh = quiet(model, lr=0.1)
    before = fresh.preconditioner.factors()[""][0].clone()
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(torch.load(path, weights_only=True))
    assert torch.equal(fresh.preconditioner.factors()[""][0], before)


def test_model_and_optimizer_are_freed_without_the_cycle_collector() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = quiet(model, lr=0.1)
    fit(model, opt, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])
    model_ref, opt_ref = weakref.ref(model), weakref.ref(opt)
    gc.disable()
    try:
        del model, opt
        assert model_ref() is None and opt_ref() is None
    finally:
        gc.enable()


def test_closing_restores_the_model_exactly() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    hooks = {
        name: (dict(m._forward_hooks), dict(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }
    opt = quiet(model, lr=0.1)
    fit(model, opt, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])
    opt.close()
    opt.close()  # idempotent
    for name, m in model.named_modules():
        assert (dict(m._forward_hooks), dict(m._forward_pre_hooks)) == hooks[name]


# --- fuzzed hyperparameters ---------------------------------------------------------------
VALID = {
    "lr": st.floats(0, 1),
    "momentum": st.floats(0, 0.99),
    "weight_decay": st.floats(0, 0.1),
    "damping": st.floats(1e-6, 10),
    "factor_decay": st.floats(0, 0.99),
    "factor_update_freq": st.integers(1, 4),
    "inverse_update_freq": st.integers(1, 6),
    "kl_clip": st.none() | st.floats(1e-6, 1),
    "domain": st.sampled_from(["covariance", "diagonal", "identity"]),
    "codomain": st.sampled_from(["fisher", "diagonal", "identity"]),
    "exponent": st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    "damping_method": st.sampled_from(["exact", "factored"]),
    "fisher": st.sampled_from([None, "empirical", "mc"]),
}


@settings(max_examples=25, deadline=None)
@given(st.fixed_dictionaries(VALID))
def test_every_valid_combination_trains_with_finite_parameters(options: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3))
    loss = "cross_entropy" if options["fisher"] == "mc" else None
    opt = quiet(model, **options, loss=loss)
    fit(model, opt, [(torch.randn(6, 2, 6), torch.randint(0, 3, (6,)))] * 4)
    assert all(torch.isfinite(p).all() for p in model.parameters())


INVALID = st.sampled_from(
    [
        ("lr", -0.5),
        ("lr", float("inf")),
        ("lr", "0.1"),
        ("momentum", -0.1),
        ("momentum", 1.5),
        ("weight_decay", -1.0),
        ("damping", -1e-3),
        ("damping", float("nan")),
        ("factor_decay", 1.0),
        ("factor_update_freq", 0),
        ("factor_update_freq", 1.0),
        ("inverse_update_freq", -3),
        ("inverse_update_freq", True),
        ("kl_clip", -1.0),
        ("domain", "fisher"),
        ("codomain", None),
        ("exponent", -1.0),
        ("damping_method", None),
        ("fisher", "exact"),
        ("loss", "hinge"),
        ("loss_reduction", "max"),
        ("nesterov", 1),
    ]
)


@settings(max_examples=40, deadline=None)
@given(INVALID, st.fixed_dictionaries({"lr": st.floats(0, 1), "damping": st.floats(1e-4, 1)}))
def test_every_invalid_argument_is_named(bad: tuple[str, object], base: dict) -> None:
    name, value = bad
    with pytest.raises(ValueError, match=rf"invalid {name}="):
        FrobPreconditionedSGD(
            nn.Linear(2, 2), **{"step_rule": "preconditioned_sgd", **base, name: value}
        )  # type: ignore[arg-type]


def test_decomposition_retries_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.eigh
    seen = []

    def float32_fails(matrix: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated float32 failure")
        return real(matrix)

    monkeypatch.setattr(kfrob.kronecker.torch.linalg, "eigh", float32_fails)
    factor = torch.diag(torch.tensor([2.0, 1.0, 0.5])).unsqueeze(0)
    side = kfrob.kronecker.decompose(factor)
    assert side is not None and seen == [torch.float32, torch.float64]
    assert side.eigenvalues.dtype == torch.float32
    torch.testing.assert_close(
        side.eigenvalues[0], torch.tensor([0.5, 1.0, 2.0]), rtol=1e-5, atol=0
    )
    bad = torch.full((1, 2, 2), float("inf"))
    assert kfrob.kronecker.decompose(bad) is None  # both attempts fail: caller keeps its last


# --- regressions from review ---------------------------------------------------------------
def test_float16_kl_clip_does_not_zero_the_step() -> None:
    """⟨g, Δ⟩ is summed in float32: in float16 it overflowed to inf and ν became 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4)).half()
    opt = quiet(model, lr=0.1, loss_reduction="sum")
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(512, 10).half(), torch.randint(0, 4, (512,))
    F.cross_entropy(model(x).float(), y, reduction="sum").backward()
    opt.step()
    moved = [float((p - q).abs().max()) for p, q in zip(model.parameters(), before, strict=True)]
    assert all(m > 0 for m in moved) and all(torch.isfinite(p).all() for p in model.parameters())


def test_frozen_bias_preconditions_the_weight_alone() -> None:
    """With the bias frozen, the weight's step uses ``A`` without the bias row and column."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    damping = 0.1
    opt = FrobPreconditionedSGD(
        layer,
        lr=1.0,
        damping=damping,
        kl_clip=None,
        damping_method="exact",
        step_rule="preconditioned_sgd",
    )
    x = torch.randn(64, 3) + 2.0  # a large mean makes the bias column matter
    weight = layer.weight.detach().clone()
    (layer(x) - 1.0).square().sum(1).mean().backward()
    grad = layer.weight.grad.clone()
    opt.step()
    a, g = opt.preconditioner.factors()[""]
    assert a.shape == (3, 3)
    torch.testing.assert_close(
        a.double(), domain_factor_linear(x, bias=False), rtol=1e-5, atol=1e-6
    )
    want = dense_solve(a, g, grad, damping)
    torch.testing.assert_close((weight - layer.weight).double(), want, rtol=1e-4, atol=1e-6)


def test_resume_with_an_mc_generator_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(6)
    ]

    def make() -> tuple[nn.Module, FrobPreconditionedSGD]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        return model, FrobPreconditionedSGD(
            model,
            lr=0.1,
            loss="cross_entropy",
            generator=torch.Generator().manual_seed(5),
            step_rule="preconditioned_sgd",
        )

    straight, opt = make()
    fit(straight, opt, data)
    first, opt1 = make()
    fit(first, opt1, data[:3])
    state = copy.deepcopy((first.state_dict(), opt1.state_dict()))
    resumed, opt2 = make()
    resumed.load_state_dict(state[0])
    opt2.load_state_dict(state[1])
    fit(resumed, opt2, data[3:])
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_sparse_embedding_gradients_step_like_sgd() -> None:
    results = []
    for make_opt in (
        lambda m: quiet(
            m, lr=0.1, momentum=0.9, domain="identity", codomain="identity", kl_clip=None
        ),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
        tokens = torch.randint(0, 10, (5, 3))
        opt = make_opt(model)
        fit(model, opt, [(tokens, torch.randint(0, 3, (5,)))] * 3)
        results.append([p.detach() for p in model.parameters()])
        if isinstance(opt, FrobPreconditionedSGD):  # sparse gradients stay sparse: plain SGD
            assert "sparse=True" in opt.preconditioner.unsupported["0"]
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_keyword_argument_calls_are_recorded() -> None:
    layer = nn.Linear(3, 2)
    opt = FrobPreconditionedSGD(layer, lr=0.1, step_rule="preconditioned_sgd")
    x = torch.randn(4, 3)
    layer(input=x).square().sum().backward()
    opt.step()
    a, _ = opt.preconditioner.factors()[""]
    torch.testing.assert_close(a.double(), domain_factor_linear(x, bias=True), rtol=1e-5, atol=1e-6)


def test_non_finite_statistics_with_finite_gradients_skip_the_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = quiet(model, lr=0.1)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    fit(model, opt, [(x, y)])
    before = [p.detach().clone() for p in model.parameters()]
    huge = x.clone()
    huge[0] *= 1e20  # a aᵀ overflows float32; tanh keeps every gradient finite
    fit(model, opt, [(huge, y)])
    assert int(opt.preconditioner.skipped_windows) == 1
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_submodules_called_directly_with_accumulation() -> None:
    """Without the model's own forward there is no repeat count: calls are micro-batches."""
    torch.manual_seed(0)
    enc, dec = nn.Linear(4, 6), nn.Linear(6, 3)
    model = nn.ModuleDict({"enc": enc, "dec": dec})
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    traces = []
    for k in (1, 4):
        opt = FrobPreconditionedSGD(model, lr=0.0, step_rule="preconditioned_sgd")
        for part, target in zip(x.chunk(k), y.chunk(k), strict=True):
            (F.cross_entropy(dec(torch.tanh(enc(part))), target) / k).backward()
        opt.step()
        opt.close()
        model.zero_grad()
        traces.append(float(torch.trace(opt.preconditioner.factors()["dec"][1])))
    assert traces[1] == pytest.approx(traces[0], rel=1e-5)


def test_a_frozen_layer_does_not_force_a_refresh_every_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = FrobPreconditionedSGD(
        model, lr=0.1, inverse_update_freq=10, step_rule="preconditioned_sgd"
    )
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.refreshes == 1  # the scheduled one at step 0, nothing in between
    assert not opt.preconditioner.missing_inverses()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("give", ["compiled", "original"])
def test_compiled_model_trains_exactly_like_the_eager_one(fisher: str, give: str) -> None:
    """``torch.compile`` (the aot_eager backend: no C++ toolchain needed) must not change
    what the hooks record: the MC Fisher's backward pass and the counters run eagerly.
    The optimizer may be given the compiled module or the original one."""
    x, y = torch.randn(4, 8, 1, 6, 6), torch.randint(0, 5, (4, 8))
    runs = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5))
        run = torch.compile(model, backend="aot_eager") if mode == "compiled" else model
        opt = FrobPreconditionedSGD(
            run if give == "compiled" else model,
            lr=0.1,
            fisher=fisher,
            loss="cross_entropy",
            generator=torch.Generator().manual_seed(1),
            step_rule="preconditioned_sgd",
        )
        for i in range(4):
            opt.zero_grad()
            F.cross_entropy(run(x[i]), y[i]).backward()
            opt.step()
        assert sorted(opt.preconditioner.layers) == ["0", "3"]
        runs[mode] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(runs["eager"], runs["compiled"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_all_finite_flags_every_kind_of_non_finite_value() -> None:
    from kfrob.finite import all_finite

    ok = [torch.randn(3, 4), torch.zeros(2, dtype=torch.float64)]
    assert bool(all_finite(ok)) and bool(all_finite([]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(5)
        t[3] = bad
        assert not bool(all_finite([*ok, t]))
        sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, bad], (4,))
        assert not bool(all_finite([sparse]))
    # float16 values whose float16 sum would overflow are still finite
    assert bool(all_finite([torch.full((100, 100), 60000.0, dtype=torch.float16)]))


def test_an_empty_batch_records_nothing_and_breaks_nothing() -> None:
    """A step on zero rows (a rank's empty last batch) leaves the factors as they were and
    takes a finite (zero-gradient) step, for convolutions and linear layers alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 4))
    opt = FrobPreconditionedSGD(
        model, lr=0.1, inverse_update_freq=1, step_rule="preconditioned_sgd"
    )
    data = [(torch.randn(n, 2, 4, 4), torch.randint(0, 4, (n,))) for n in (6, 0, 6)]
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        out = model(x)
        (F.cross_entropy(out, y) if len(y) else out.sum() * 0.0).backward()
        if i == 1:
            before = {
                k: tuple(t.clone() for t in v) for k, v in opt.preconditioner.factors().items()
            }
        opt.step()
        if i == 1:
            for name, (a, g) in opt.preconditioner.factors().items():
                assert torch.equal(a, before[name][0]) and torch.equal(g, before[name][1])
    assert int(opt.preconditioner.skipped_windows) == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
