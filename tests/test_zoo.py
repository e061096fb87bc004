"""A zoo of standard models under kfrob's defaults: timm's ResNet, EfficientNet (also the
``tf_`` variant, whose ``Conv2dSame`` pads inside ``forward``), ViT and ConvNeXt, and
transformers' BERT, GPT-2 and Llama from tiny configs. All are randomly initialised
(nothing is downloaded) and small enough for a CPU.

For each: ``FrobPreconditionedSGD(model, lr=1e-2, loss="cross_entropy")`` takes three
training steps without crashing, the loss stays finite, the parameters move, and at most
10 % of the parameters (by element count) are left to plain SGD.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD

MAX_SGD_FRACTION = 0.10
STEPS = 3


# --- the models --------------------------------------------------------------------------
class _Placeholder(type):
    """Any name of the torchvision stand-in: a class whose attributes are classes too."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and its submodules (but ``torchvision.models``, which timm
    imports optionally) as modules of placeholders."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "torchvision" and not fullname.startswith("torchvision."):
            return None
        if fullname.startswith("torchvision.models"):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # type: ignore[attr-defined]


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # e.g. a CUDA wheel next to a CPU torch: its operators do not load
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False
    return True


def _timm() -> types.ModuleType:
    """timm, imported with a stand-in for torchvision where no working torchvision is
    installed: importing timm imports torchvision (datasets, transforms and
    ``FrozenBatchNorm2d``), but building and running these models never uses it, and a
    torchvision wheel matching a CPU build of torch is not on PyPI. The stand-in leaves
    ``sys.modules`` again once timm is imported."""
    if "timm" in sys.modules or _torchvision_works():
        return pytest.importorskip("timm")
    finder = _StandInFinder()
    sys.meta_path.insert(0, finder)
    try:
        return pytest.importorskip("timm")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]


Batch = tuple[Tensor, Tensor]
Case = Callable[[], tuple[nn.Module, Batch, Callable[[nn.Module, Tensor], Tensor]]]


def _image_case(name: str, size: int, **kwargs: Any) -> Case:
    """A timm model on ``(4, 3, size, size)`` images, 10 classes."""

    def build() -> tuple[nn.Module, Batch, Callable[[nn.Module, Tensor], Tensor]]:
        timm = _timm()
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        batch = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
        return model, batch, lambda m, x: m(x)

    return build


VOCAB, TOKENS = 128, (2, 16)


def _language_case(kind: str) -> Case:
    """A transformers language model from a tiny config: 2 layers, hidden 32, vocabulary
    128, on ``(2, 16)`` token ids; the logits ``(B, T, V)``."""

    def build() -> tuple[nn.Module, Batch, Callable[[nn.Module, Tensor], Tensor]]:
        transformers = pytest.importorskip("transformers")
        common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        if kind == "bert":
            config = transformers.BertConfig(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32, **common,
            )  # fmt: skip
            model = transformers.BertForMaskedLM(config)
        elif kind == "gpt2":
            config = transformers.GPT2Config(
                n_embd=32, n_layer=2, n_head=2, n_positions=32, **common
            )
            model = transformers.GPT2LMHeadModel(config)
        else:
            config = transformers.LlamaConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                **common,
            )  # fmt: skip
            model = transformers.LlamaForCausalLM(config)
        tokens = torch.randint(0, VOCAB, TOKENS)
        labels = torch.randint(0, VOCAB, (TOKENS[0] * TOKENS[1],))
        return model, (tokens, labels), lambda m, x: m(input_ids=x).logits

    return build


def _efficientnet_case(variant: str, channel_multiplier: float) -> Case:
    """An EfficientNet-B0 (all 16 blocks) with ``channel_multiplier`` times its widths,
    built by the generator that ``timm.create_model(variant)`` calls with 1.0 (``tf_``:
    TensorFlow's batch-norm eps and "SAME" padding, as ``tf_efficientnet_b0`` sets), on
    ``(4, 3, 64, 64)`` images: at 32×32 its last stages are 1×1, and batch norm over 4
    values per channel gives output gradients of 1e7 whose factors are not worth testing.
    The full widths' 1280-wide factors cost half a minute of eigendecompositions on a CPU
    at the first refresh."""

    def build() -> tuple[nn.Module, Batch, Callable[[nn.Module, Tensor], Tensor]]:
        _timm()
        from timm.models import efficientnet

        tf = variant.startswith("tf_")
        kwargs = dict(bn_eps=efficientnet.BN_EPS_TF_DEFAULT, pad_type="same") if tf else {}
        model = efficientnet._gen_efficientnet(
            variant, channel_multiplier=channel_multiplier, depth_multiplier=1.0,
            pretrained=False, num_classes=10, **kwargs,
        )  # fmt: skip
        batch = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        return model, batch, lambda m, x: m(x)

    return build


CASES: dict[str, Case] = {
    # resnet18's layers with a quarter of the channels: the full widths' 4609-wide domain
    # factors cost a minute of eigendecompositions on a CPU (see the first refresh)
    "resnet18": _image_case("resnet18", 32, channels=(16, 32, 64, 128)),
    "efficientnet_b0": _efficientnet_case("efficientnet_b0", 0.25),
    "tf_efficientnet_b0": _efficientnet_case("tf_efficientnet_b0", 0.25),
    "vit_tiny": _image_case(
        "vit_tiny_patch16_224", 32, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2
    ),
    "convnext_atto": _image_case("convnext_atto", 32),
    "bert": _language_case("bert"),
    "gpt2": _language_case("gpt2"),
    "llama": _language_case("llama"),
}


# --- the checks --------------------------------------------------------------------------
class Trained(NamedTuple):
    model: nn.Module
    opt: FrobPreconditionedSGD
    before: dict[str, Tensor]  # the initial parameters
    losses: list[float]
    warnings: list[str]  # kfrob's


@functools.cache
def _train(name: str) -> Trained:
    """Three steps of the model (once per session: the tests share them)."""
    torch.manual_seed(0)
    model, (x, y), forward = CASES[name]()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = FrobPreconditionedSGD(model, lr=1e-2, loss="cross_entropy")
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            logits = forward(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    kfrob_warnings = [str(w.message) for w in caught if str(w.message).startswith("kfrob")]
    return Trained(model, opt, before, losses, kfrob_warnings)


def _sgd_share(model: nn.Module, opt: FrobPreconditionedSGD) -> tuple[float, dict[str, str]]:
    """The fraction of parameter elements kfrob does not precondition, and why, by module.
    A preconditioned layer's parameters count whatever other modules they are tied to."""
    pre = opt.preconditioner
    covered = {
        id(p)
        for name, layer in pre.layers.items()
        if name not in pre.disabled
        for p in layer.module.parameters(recurse=False)
    }
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    left = sum(p.numel() for p in params if id(p) not in covered)
    return left / total, {**pre.unsupported, **pre.disabled}


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model_trains_under_kfrob(name: str) -> None:
    """Finite losses, moving parameters, at most 10 % of them on plain SGD, each such module
    named in kfrob's warnings."""
    run = _train(name)
    assert all(torch.isfinite(torch.tensor(run.losses))), f"{name}: losses {run.losses}"
    # nearly all parameter elements move (ConvNeXt's layer scale starts at 1e-6 and keeps its
    # blocks' norm scales from moving by more than round-off in three steps)
    params = dict(run.model.named_parameters())
    still = [n for n, p in params.items() if torch.equal(p.detach(), run.before[n])]
    total = sum(p.numel() for p in params.values())
    assert sum(params[n].numel() for n in still) <= 0.01 * total, f"{name}: unchanged {still}"

    share, why = _sgd_share(run.model, run.opt)
    listing = "\n".join(f"  {module}: {reason}" for module, reason in why.items())
    assert share <= MAX_SGD_FRACTION, (
        f"{name}: {share:.1%} of the parameters get plain SGD:\n{listing}\n"
        f"kfrob's warnings: {run.warnings}"
    )
    for module in why:
        assert any(module in w for w in run.warnings), (module, run.warnings)


def test_tf_efficientnet_convolutions_are_preconditioned() -> None:
    """``Conv2dSame`` pads inside ``forward``: kfrob infers the padding, and every
    convolution of tf_efficientnet_b0 is preconditioned after training."""
    run = _train("tf_efficientnet_b0")
    pre = run.opt.preconditioner
    convs = {n: m for n, m in run.model.named_modules() if isinstance(m, nn.Conv2d)}
    assert any(type(m).__name__ == "Conv2dSame" for m in convs.values())
    missing = {n: pre.disabled.get(n, "not tracked") for n in convs if n not in pre.layers}
    missing |= {n: why for n, why in pre.disabled.items() if n in convs}
    assert not missing, missing
    assert all(n in pre.inverses for n in convs)
