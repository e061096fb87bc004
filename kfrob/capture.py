"""Hook machinery: feed the running factors from the forward and backward passes.

A forward hook on each preconditioned layer adds the domain rows ``a`` of its input at once
(no input tensor is kept) and, for the empirical Fisher, puts a hook on the layer's output
tensor that adds the co-domain rows ``g`` when autograd reaches it. With the eigenvalue
correction (:mod:`kfrob.correction`) a layer that has eigenbases also keeps its input rows,
projected onto the domain eigenbasis, until the output gradient of the *same* call arrives,
and adds the pair to its ``S``. Nothing is recorded
unless :attr:`CurvatureCapture.active` is set (the optimizer sets it on factor-update steps),
the layer is in training mode and gradients are enabled.

For the Monte Carlo Fisher (``fisher="mc"``) the layers' outputs are kept until the model's
forward pass ends; a forward hook on the model then draws labels from the model's predictive
distribution and adds the rows ``g`` of ``torch.autograd.grad`` of the sampled loss with
respect to those outputs (``retain_graph=True``), leaving ``.grad`` and the training backward
untouched; each kept output travels with its call's projected input rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kfrob.alerts import warn
from kfrob.correction import EigenbasisMoment
from kfrob.factors import RunningFactor
from kfrob.fisher import sampled_cross_entropy
from kfrob.layers import LayerMath

__all__ = ["CurvatureCapture", "TrackedLayer"]


@dataclass(eq=False)
class TrackedLayer:
    """A preconditioned layer: its math, its two running factors (``None`` for a side whose
    metric is the identity), its eigenvalue correction (``None`` when off), and what its
    hooks have seen: for the MC Fisher, each output of this forward pass with its call's
    projected input rows (``None`` unless the correction records)."""

    name: str
    module: nn.Module
    math: LayerMath
    domain: RunningFactor | None
    codomain: RunningFactor | None
    correction: EigenbasisMoment | None = None
    forward_calls: int = 0
    outputs: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)
    #: why the hooks could not record a call (the layer then falls back to plain SGD)
    failure: str | None = None

    @property
    def factors(self) -> tuple[RunningFactor, ...]:
        """The estimated factors, domain first."""
        return tuple(f for f in (self.domain, self.codomain) if f is not None)

    @property
    def sides(self) -> tuple[RunningFactor | None, RunningFactor | None]:
        """``(codomain, domain)``, ``None`` for an identity side."""
        return self.codomain, self.domain

    def checksum(self) -> Tensor:
        """A cheap fingerprint of the factors (their summed entries), for comparing ranks."""
        return sum((f.average.sum(dtype=torch.float64) for f in self.factors), torch.zeros(()))

    @property
    def refresh_cost(self) -> float:
        """The estimated cost of decomposing the factors, ``Σ_sides blocks · n³`` (``n²``
        for a diagonal side)."""
        return float(
            sum(
                f.average.shape[0] * f.average.shape[-1] ** (2 if f.diagonal else 3)
                for f in self.factors
            )
        )


SampledLoss = Callable[[Tensor, torch.Generator | None], Tensor]


class CurvatureCapture:
    """Registers the hooks on ``layers`` (and on ``model`` for the MC Fisher)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[TrackedLayer],
        sampled_loss: SampledLoss | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.active = True
        self.layers = list(layers)
        self._sampled_loss = sampled_loss
        self._generator = generator
        self._warned_output = False
        self.model_calls = 0
        # Hooks hold the capture weakly: the model never keeps its optimizer alive.
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(
                partial(weak_callable(self._on_forward), layer), with_kwargs=True
            )
            for layer in self.layers
        ]
        self._handles.append(model.register_forward_pre_hook(weak_callable(self._on_model_call)))
        if sampled_loss is not None:
            self._handles.append(model.register_forward_hook(weak_callable(self._on_model_output)))

    def _recording(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _on_model_call(self, module: nn.Module, args: Any) -> None:
        if self._recording(module):
            self.model_calls += 1

    def calls_per_forward(self, factor: RunningFactor) -> int:
        """How often the factor's module ran per forward pass of the model in this window."""
        if self.model_calls == 0:  # the model's own forward was not used: no repeats known
            return 1
        return max(1, factor.calls // self.model_calls)

    def _on_forward(
        self, layer: TrackedLayer, module: nn.Module, args: Any, kwargs: Any, output: Any
    ) -> None:
        layer.forward_calls += 1
        if not self._recording(module) or not layer.math.trainable or layer.failure:
            return
        x = (args[0] if args else next(iter(kwargs.values()))).detach()
        if isinstance(output, Tensor):
            layer.failure = layer.math.check_call(x, output)
            if layer.failure:
                return
        projected = None  # this call's input rows for the eigenvalue correction
        if layer.domain is not None:
            samples = layer.math.num_samples(x)
            correcting = layer.correction is not None and layer.correction.ready
            if layer.domain.diagonal and not correcting:  # no rows needed: their squares
                layer.domain.add_square_sums(*layer.math.input_square_sums(x), samples)
            else:
                rows = layer.math.input_rows(x)
                layer.domain.add(rows, samples)
                if correcting:
                    projected = layer.correction.project_inputs(rows)  # type: ignore[union-attr]
        if layer.codomain is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if self._sampled_loss is not None:
            layer.outputs.append((output, projected))
        else:
            output.register_hook(partial(self._on_output_grad, layer, projected))

    @staticmethod
    def _on_output_grad(layer: TrackedLayer, projected: Tensor | None, grad: Tensor) -> None:
        assert layer.codomain is not None
        rows, samples = layer.math.output_rows(grad), layer.math.num_samples(grad)
        layer.codomain.add(rows, samples)
        if projected is not None and layer.correction is not None:
            layer.correction.add_pair(projected, rows, samples)

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        recorded = [(layer, pair) for layer in self.layers for pair in layer.outputs]
        for layer in self.layers:
            layer.outputs = []
        if not recorded or self._sampled_loss is None:
            return
        if not isinstance(output, Tensor):
            if not self._warned_output:
                self._warned_output = True
                warn(
                    "kfrob: fisher='mc' needs the model to return one tensor of predictions; "
                    f"got {type(output).__name__}, so G is not updated (warned once)"
                )
            return
        if output.dim() > 2 and self._sampled_loss is sampled_cross_entropy:
            _check_classes_last(output, recorded)
        loss = self._sampled_loss(output, self._generator)
        grads = torch.autograd.grad(
            loss, [out for _, (out, _) in recorded], retain_graph=True, allow_unused=True
        )
        for (layer, (_, projected)), grad in zip(recorded, grads, strict=True):
            if grad is not None:
                self._on_output_grad(layer, projected, grad)

    def new_window(self) -> None:
        """Start counting the model's forward passes afresh (after a fold or discard)."""
        self.model_calls = 0

    def remove(self) -> None:
        """Remove every hook; the model is left exactly as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            layer.outputs = []


def _check_classes_last(output: Tensor, recorded: list[tuple[TrackedLayer, Any]]) -> None:
    """Refuse a model output whose classes are not its last dimension: the MC Fisher draws
    each sample's label from ``softmax`` over the last dimension."""
    for layer, (kept, _) in recorded:
        if kept is output and layer.math.output_feature_dim != -1:
            raise ValueError(
                f"loss='cross_entropy' with fisher='mc': the model returns the "
                f"{tuple(output.shape)} output of {layer.name or 'the model'}, whose classes "
                f"are dimension {layer.math.output_feature_dim}, but the MC Fisher samples "
                "classes from the last dimension; return the logits with the classes last "
                "(e.g. logits.movedim(1, -1), and move them back for F.cross_entropy) or use "
                "fisher='empirical'"
            )


def weak_callable(method: Callable[..., Any]) -> Callable[..., Any]:
    """A hook that calls the bound ``method`` while its object lives, else does nothing.

    The method is looked up by name on each call, so a patched class attribute (a profiler
    or a test wrapping it) takes effect for hooks registered before the patch. Under
    ``torch.compile`` the hook runs eagerly (a graph break), never traced: it keeps Python
    state (counters, lists of outputs, the MC Fisher's own backward pass) that a traced
    graph would not replay."""
    ref = weakref.ref(method.__self__)  # type: ignore[attr-defined]
    name = method.__name__

    @torch.compiler.disable
    def hook(*args: Any) -> Any:
        owner = ref()
        return None if owner is None else getattr(owner, name)(*args)

    return hook
