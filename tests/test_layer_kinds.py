"""The transformer layer kinds against brute force: embeddings, affine normalisation layers,
``nn.Linear`` on sequences (expand and reduce), transformers' ``Conv1D`` and tied weights.

Every kind is checked twice: its rows reproduce the layer's gradient (``Σ g aᵀ`` per block
equals the autograd gradient as a matrix), and its captured factors equal factors built from
an independent formula for the layer's normalised input and ``torch.func`` per-sample output
gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.layers import RowNormMath, layer_math
from tests.reference import codomain_factor, per_sample_output_grads
from tests.test_factors import captured_factors, ce_term


class Conv1D(nn.Module):
    """transformers' ``Conv1D`` (``y = x W + b`` with ``W`` stored ``(in, out)``), rebuilt
    under its qualified name so that the tests need no transformers install."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], self.nf
        )


Conv1D.__module__ = "transformers.pytorch_utils"
Conv1D.__qualname__ = "Conv1D"


class LlamaRMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm`` (its ``forward`` verbatim), under its qualified name."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


LlamaRMSNorm.__module__ = "transformers.models.llama.modeling_llama"


class LayerNorm2d(nn.LayerNorm):
    """timm's ``LayerNorm2d``: a layer norm over the channels of ``(B, C, H, W)``, under its
    qualified name."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


LayerNorm2d.__module__ = "timm.layers.norm"

# name: (module, input); the input's dim 1 is the channel dim for (B, C, *) norms
CASES: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "linear-sequence": lambda: (nn.Linear(5, 4), torch.randn(3, 4, 5)),
    "conv1d-transformers": lambda: (Conv1D(4, 5), torch.randn(3, 4, 5)),
    "embedding": lambda: (nn.Embedding(7, 4), torch.randint(0, 7, (3, 5))),
    "layernorm": lambda: (nn.LayerNorm(4), torch.randn(3, 5, 4) * 2 + 1),
    "layernorm-no-bias": lambda: (nn.LayerNorm(4, bias=False), torch.randn(3, 5, 4)),
    "layernorm-2d-shape": lambda: (nn.LayerNorm((2, 3)), torch.randn(4, 2, 3)),
    "rmsnorm": lambda: (nn.RMSNorm(4), torch.randn(3, 5, 4) + 0.5),
    "rmsnorm-llama": lambda: (LlamaRMSNorm(4, eps=1e-3), torch.randn(3, 5, 4) + 0.5),
    "layernorm2d-timm": lambda: (LayerNorm2d(4, eps=1e-3), torch.randn(3, 4, 2, 3) * 2 + 1),
    "batchnorm1d": lambda: (nn.BatchNorm1d(4), torch.randn(6, 4) * 3),
    "batchnorm1d-sequence": lambda: (nn.BatchNorm1d(3), torch.randn(4, 3, 5)),
    "batchnorm2d": lambda: (nn.BatchNorm2d(3), torch.randn(4, 3, 2, 3) + 1),
    "groupnorm": lambda: (nn.GroupNorm(2, 4), torch.randn(3, 4, 5)),
    "instancenorm2d": lambda: (nn.InstanceNorm2d(3, affine=True), torch.randn(2, 3, 3, 4)),
}


def _init(module: nn.Module) -> None:
    """Non-trivial scales and shifts (the defaults are ones and zeros)."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("name", list(CASES))
def test_rows_reproduce_the_gradient(name: str) -> None:
    """``Σ_rows g aᵀ`` per block is the gradient of a summed loss, as a ``(k, out, in)``
    matrix: the rows and the parameter layout agree with what the layer computes."""
    torch.manual_seed(0)
    module, x = CASES[name]()
    _init(module)
    y = module(x)
    loss = (y * torch.randn_like(y)).sum()
    params = list(module.parameters())
    *grads, dy = torch.autograd.grad(loss, [*params, y])
    math = layer_math(module)
    assert math is not None
    a, g = math.input_rows(x), math.output_rows(dy)
    want = math.gradient_matrix(dict(zip(params, grads, strict=True)))
    assert want is not None
    torch.testing.assert_close(g.mT @ a, want, rtol=1e-4, atol=1e-5)
    # and a matrix goes back to the parameters' shapes
    for p, back in math.split(want).items():
        torch.testing.assert_close(back, dict(zip(params, grads, strict=True))[p])


def normalized_reference(module: nn.Module, x: Tensor) -> Tensor:
    """``x̂`` from the textbook formulas (biased variances), in float64."""
    x = x.double()
    if isinstance(module, LayerNorm2d):
        mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)
    if isinstance(module, LlamaRMSNorm):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + module.variance_epsilon)
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(-len(module.normalized_shape), 0))
        mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)
    if isinstance(module, nn.RMSNorm):
        eps = torch.finfo(torch.float32).eps if module.eps is None else module.eps
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
    if isinstance(module, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        mean, var = grouped.mean(-1, keepdim=True), grouped.var(-1, unbiased=False, keepdim=True)
        return ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
    if isinstance(module, nn.InstanceNorm2d):
        flat = x.flatten(2)
        mean, var = flat.mean(-1, keepdim=True), flat.var(-1, unbiased=False, keepdim=True)
        return ((flat - mean) / torch.sqrt(var + module.eps)).reshape(x.shape)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    dims = [d for d in range(x.dim()) if d != 1]
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + module.eps)


NORMS = [n for n in CASES if "norm" in n]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", NORMS)
def test_norm_factors_match_brute_force(name: str, reduction: str) -> None:
    """Block ``k``: ``A_k = mean [x̂_k, 1][x̂_k, 1]ᵀ`` over rows, ``G_k = (1/N) Σ_n Σ_l g²``."""
    torch.manual_seed(1)
    module, x = CASES[name]()
    _init(module)
    rowwise = isinstance(layer_math(module), RowNormMath)
    per_token = rowwise and name != "layernorm-2d-shape"  # (B, T, d): a head per token
    if per_token:
        head = nn.Sequential(nn.Tanh(), nn.Linear(x.shape[-1], 3))
    else:
        head = nn.Sequential(nn.Tanh(), nn.Flatten(1), nn.Linear(x[0].numel(), 3))
    targets = torch.randint(0, 3, x.shape[:2] if per_token else x.shape[:1])
    a, g = captured_factors(nn.Sequential(module, head), x, targets, reduction)["0"]

    x_hat = normalized_reference(module, x)
    blocks = module.weight.numel()
    # (samples, blocks, 1) row-wise, (samples, blocks, locations) per channel
    x_hat = x_hat.reshape(-1, blocks, 1) if rowwise else x_hat.reshape(x.shape[0], blocks, -1)
    rows = x_hat.permute(1, 0, 2).reshape(blocks, -1, 1)
    if getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, torch.ones_like(rows)], -1)
    a_want = rows.mT @ rows / rows.shape[1]
    torch.testing.assert_close(a.double().reshape_as(a_want), a_want, rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        y = module(x)
    flat_y = y.reshape(-1, x.shape[-1]) if per_token else y
    flat_t = targets.reshape(-1)
    grads = per_sample_output_grads(head, ce_term, flat_y, flat_t)
    grads = grads.reshape(-1, blocks, 1) if rowwise else grads.reshape(x.shape[0], blocks, -1)
    g_want = codomain_factor(grads, groups=blocks)
    torch.testing.assert_close(g.double().reshape_as(g_want), g_want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_embedding_factors_match_brute_force(reduction: str) -> None:
    """``A`` is the diagonal of token frequencies (the mean of one-hot outer products) and
    ``G`` the mean over tokens of per-token output-gradient products."""
    torch.manual_seed(2)
    emb, tokens = nn.Embedding(7, 4), torch.randint(0, 5, (3, 6))  # tokens 5, 6 unseen
    head = nn.Sequential(nn.Tanh(), nn.Linear(4, 3))
    targets = torch.randint(0, 3, tokens.shape)
    a, g = captured_factors(nn.Sequential(emb, head), tokens, targets, reduction)["0"]
    one_hot = F.one_hot(tokens.reshape(-1), 7).double()
    torch.testing.assert_close(a.double(), one_hot.T @ one_hot / one_hot.shape[0])
    with torch.no_grad():
        y = emb(tokens).reshape(-1, 4)
    grads = per_sample_output_grads(head, ce_term, y, targets.reshape(-1))
    torch.testing.assert_close(g.double(), codomain_factor(grads)[0], rtol=1e-4, atol=1e-7)


def test_embedding_step_is_the_kronecker_solve_on_the_transposed_weight() -> None:
    """The embedding's update is ``-lr · (G ⊗ A + damping)⁻¹`` applied to ``∇Eᵀ``
    (factored damping), unseen tokens' rows untouched."""
    torch.manual_seed(3)
    emb = nn.Embedding(6, 3)
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(3, 2))
    opt = FrobPreconditionedSGD(
        model,
        lr=1.0,
        damping=0.1,
        loss="cross_entropy",
        kl_clip=None,
        step_rule="preconditioned_sgd",
    )
    tokens = torch.randint(0, 4, (4, 5))
    before = emb.weight.detach().clone()
    out = model(tokens)
    F.cross_entropy(out.reshape(-1, 2), torch.randint(0, 2, (20,))).backward()
    grad = emb.weight.grad.detach().clone()
    opt.step()
    a, g = opt.preconditioner.factors()["0"]
    a, g = a.double(), g.double()
    pi = torch.sqrt((a.trace() / 6) / (g.trace() / 3))
    a_d = a + pi * 0.1**0.5 * torch.eye(6, dtype=torch.float64)
    g_d = g + 0.1**0.5 / pi * torch.eye(3, dtype=torch.float64)
    want = torch.linalg.solve(g_d, grad.T.double()) @ torch.linalg.inv(a_d)
    step = (before - emb.weight.detach()).double()
    torch.testing.assert_close(step, want.T, rtol=1e-4, atol=1e-6)
    assert torch.equal(emb.weight[4:], before[4:])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_reduce_on_sequences(reduction: str) -> None:
    """``"reduce"`` on ``(B, T, d)``: one row per sequence, ``A = mean_n â âᵀ`` with the mean
    input ``â`` and ``G = (1/(B·T)) Σ_n ĝ ĝᵀ`` with the summed per-token gradient ``ĝ``, the
    Fisher of the token-averaged loss (``c = B·T`` tokens)."""
    torch.manual_seed(4)
    layer, head = nn.Linear(5, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 3))
    x, targets = torch.randn(3, 6, 5), torch.randint(0, 3, (3, 6))
    model = nn.Sequential(layer, head)
    a, g = captured_factors(model, x, targets, reduction, weight_sharing="reduce")["0"]
    mean_input = torch.cat([x.mean(1), torch.ones(3, 1)], 1).double()
    torch.testing.assert_close(a.double(), mean_input.T @ mean_input / 3, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y = layer(x).reshape(-1, 4)
    grads = per_sample_output_grads(head, ce_term, y, targets.reshape(-1))
    summed = grads.reshape(3, 6, 4).sum(1).double()
    torch.testing.assert_close(g.double(), summed.T @ summed / 18, rtol=1e-4, atol=1e-7)


def test_transposed_conv1d_steps_like_the_equivalent_linear() -> None:
    """transformers' ``Conv1D`` gets the factors and the update of the ``nn.Linear`` with
    the transposed weight."""
    torch.manual_seed(5)
    conv = Conv1D(3, 4)
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    x, targets = torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5))
    for model in (conv, linear):
        opt = FrobPreconditionedSGD(
            model, lr=0.5, loss="cross_entropy", generator=None, step_rule="preconditioned_sgd"
        )
        for _ in range(2):
            opt.zero_grad()
            torch.manual_seed(6)  # the same MC labels for both
            F.cross_entropy(model(x).reshape(-1, 3), targets.reshape(-1)).backward()
            opt.step()
    torch.testing.assert_close(conv.weight.T, linear.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.bias, linear.bias, rtol=1e-5, atol=1e-6)


class TiedLM(nn.Module):
    def __init__(self, tie_bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.norm(self.emb(tokens)))


def test_tied_embedding_is_preconditioned_by_the_head() -> None:
    """A head tied to the token embedding: one curvature (the head's, the last user) for
    the shared weight, no SGD fallback, and the update is the head's solve applied to the
    weight's whole gradient."""
    torch.manual_seed(7)
    model = TiedLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = FrobPreconditionedSGD(
            model, lr=1.0, loss="cross_entropy", kl_clip=None, step_rule="preconditioned_sgd"
        )
    assert set(opt.preconditioner.layers) == {"norm", "head"}
    assert not opt.preconditioner.unsupported
    tokens = torch.randint(0, 7, (3, 5))
    F.cross_entropy(model(tokens).reshape(-1, 7), tokens.roll(1, 1).reshape(-1)).backward()
    grad = model.emb.weight.grad.clone()
    before = model.emb.weight.detach().clone()
    opt.step()
    want = opt.preconditioner.precondition("head", grad.unsqueeze(0))[0]
    torch.testing.assert_close(before - model.emb.weight.detach(), want, rtol=1e-5, atol=1e-7)


def test_partly_tied_modules_get_sgd_with_a_warning() -> None:
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight  # the biases stay separate
    with pytest.warns(UserWarning, match="some of its parameters are tied"):
        opt = FrobPreconditionedSGD(
            nn.Sequential(first, second), lr=0.1, step_rule="preconditioned_sgd"
        )
    assert not opt.preconditioner.layers


class MaskedLMHead(nn.Module):
    """BERT's prediction head: the decoder's weight is the token embedding's and its bias is
    the head's own parameter (``decoder.bias = self.bias``)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.decoder = nn.Linear(emb.embedding_dim, emb.num_embeddings)
        self.decoder.weight = emb.weight
        self.bias = self.decoder.bias

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(h)


def test_head_holding_all_tied_parameters_carries_them() -> None:
    """A decoder that holds the embedding's weight and its parent's bias is preconditioned
    (once, for all three modules); nothing falls back to SGD."""
    torch.manual_seed(3)
    emb = nn.Embedding(7, 4)
    model = nn.Sequential(emb, nn.LayerNorm(4), MaskedLMHead(emb))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = FrobPreconditionedSGD(
            model, lr=1.0, loss="cross_entropy", kl_clip=None, step_rule="preconditioned_sgd"
        )
    assert set(opt.preconditioner.layers) == {"1", "2.decoder"}
    assert not opt.preconditioner.unsupported
    tokens = torch.randint(0, 7, (3, 5))
    F.cross_entropy(model(tokens).reshape(-1, 7), tokens.roll(1, 1).reshape(-1)).backward()
    grads = {p: p.grad.clone() for p in (emb.weight, model[2].bias)}
    before = {p: p.detach().clone() for p in grads}
    opt.step()
    math = opt.preconditioner.layers["2.decoder"].math
    want = math.split(opt.preconditioner.precondition("2.decoder", math.gradient_matrix(grads)))
    for p in grads:
        torch.testing.assert_close(before[p] - p.detach(), want[p], rtol=1e-5, atol=1e-7)


class ActNorm(nn.BatchNorm2d):
    """A batch norm followed by an activation inside ``forward`` (timm's ``BatchNormAct2d``):
    its output is not ``γ x̂ + β``."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


class LastAxisLayerNorm(nn.LayerNorm):
    """A layer norm over dim 1 of ``(B, C, T)`` (permuting inside ``forward``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.mT).mT


@pytest.mark.parametrize(
    ("module", "x"),
    [(ActNorm(3), torch.randn(4, 3, 2, 2)), (LastAxisLayerNorm(3), torch.randn(2, 3, 3))],
    ids=["norm-then-activation", "layernorm-over-dim-1"],
)
def test_norm_whose_output_kfrob_cannot_reproduce_falls_back_to_sgd(
    module: nn.Module, x: Tensor
) -> None:
    """A subclass of a supported norm whose output is not the scale and shift of the
    normalisation kfrob computes gets plain SGD with the reason, never wrong factors or a
    crash (even where the shapes happen to fit, as for the (2, 3, 3) input)."""
    model = nn.Sequential(module, nn.Flatten(1), nn.Linear(x[0].numel(), 2))
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    with pytest.warns(
        UserWarning, match=r"0 falls back to a plain update \(no curvature\): its output"
    ):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), torch.randint(0, 2, (x.shape[0],))).backward()
            opt.step()
    assert "0" in opt.preconditioner.disabled and "2" not in opt.preconditioner.disabled


class Conv2dSame(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding applied inside ``forward`` (as timm's
    ``Conv2dSame``); ``shift`` puts the odd padding pixel on the left instead, and
    ``pad_value`` pads with a constant other than zero."""

    def __init__(self, *args: object, shift: bool = False, pad_value: float = 0.0, **kw: object):
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.shift, self.pad_value = shift, pad_value

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for dim in (1, 0):
            size, stride = x.shape[-2 + dim], self.stride[dim]
            reach = self.dilation[dim] * (self.kernel_size[dim] - 1) + 1
            total = max((-(-size // stride) - 1) * stride + reach - size, 0)
            small, big = total // 2, total - total // 2
            pads += [big, small] if self.shift else [small, big]
        x = F.pad(x, pads, value=self.pad_value)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


@pytest.mark.parametrize("size", [(2, 2), (7, 6)])
def test_convolution_that_pads_in_forward(size: tuple[int, int]) -> None:
    """A ``Conv2dSame`` gets the factors of the plain convolution on the padded input,
    including inputs smaller than its kernel."""
    torch.manual_seed(8)
    conv = Conv2dSame(2, 3, 5, stride=2)
    x = torch.randn(4, 2, *size)
    out = conv(x)
    head = nn.Sequential(nn.Flatten(), nn.Linear(out[0].numel(), 3))
    targets = torch.randint(0, 3, (4,))
    a, g = captured_factors(nn.Sequential(conv, head), x, targets, "mean")["0"]

    pads = [(-(-n // 2) - 1) * 2 + 5 - n for n in size]  # TF's total padding per dim
    plain = nn.Conv2d(2, 3, 5, stride=2)
    padded = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
    a_want, g_want = captured_factors(nn.Sequential(plain, head), padded, targets, "mean")["0"]
    torch.testing.assert_close(a, a_want, rtol=1e-5, atol=1e-6)
    assert g.shape == g_want.shape


@pytest.mark.parametrize("kind", ["left", "pad-value"])
def test_padding_kfrob_cannot_infer_falls_back_to_sgd(kind: str) -> None:
    """Padding that the inferred one does not reproduce: a warning naming the layer and the
    reason, plain SGD for it, training goes on (no crash, no wrong factor)."""
    torch.manual_seed(9)
    options = {"shift": True} if kind == "left" else {"pad_value": 1.0}
    conv = Conv2dSame(2, 3, 4, stride=1, **options)  # even kernel: an odd total padding
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 5 * 5, 2))
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,))
    with pytest.warns(
        UserWarning, match=r"0 falls back to a plain update \(no curvature\): its output size"
    ):
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    before = conv.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = conv.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(conv.weight.detach(), before - 0.1 * grad)


def test_multihead_attention_falls_back_to_sgd_with_the_reason() -> None:
    """``nn.MultiheadAttention`` projects functionally: its ``in_proj`` and its ``out_proj``
    (an ``nn.Linear`` whose hooks would never fire) get plain SGD, named upfront."""
    block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match="self_attn.out_proj .its nn.MultiheadAttention uses"):
        opt = FrobPreconditionedSGD(block, lr=0.1, loss="mse", step_rule="preconditioned_sgd")
    assert "self_attn" in opt.preconditioner.unsupported
    assert {"linear1", "linear2", "norm1", "norm2"} <= set(opt.preconditioner.layers)
    x = torch.randn(2, 3, 8)
    for _ in range(2):
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
    assert not opt.preconditioner.disabled


class ClassesLast(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).movedim(1, -1)


def test_mc_fisher_refuses_logits_with_classes_first() -> None:
    """A convolution's ``(B, C, H, W)`` logits have their classes at dimension 1; the MC
    Fisher samples over the last one, so it refuses them and names the fix."""
    torch.manual_seed(0)
    segmenter = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 3, 1))
    x, y = torch.randn(2, 2, 5, 5), torch.randint(0, 3, (2, 5, 5))
    opt = FrobPreconditionedSGD(
        segmenter, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd"
    )
    with pytest.raises(ValueError, match=r"classes are dimension 1.*movedim\(1, -1\)"):
        segmenter(x)
    opt.close()
    model = ClassesLast(segmenter)
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    opt.zero_grad()
    F.cross_entropy(model(x).movedim(-1, 1), y).backward()
    opt.step()
    assert set(opt.preconditioner.inverses) == {"net.0", "net.2"}
    opt.close()
    # the empirical Fisher takes the training loss's own gradients: any layout is fine
    with FrobPreconditionedSGD(
        segmenter, lr=0.1, fisher="empirical", step_rule="preconditioned_sgd"
    ) as opt:
        F.cross_entropy(segmenter(x), y).backward()
        opt.step()
