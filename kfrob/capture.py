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

A loss mask (:meth:`CurvatureCapture.set_loss_mask`, e.g. ``targets != ignore_index``) says
which samples of the next forward pass the loss counts: a bool tensor over the leading
dimensions of the model's output, e.g. ``(batch, sequence)`` for a language model's tokens.
Every layer whose samples those dimensions index (see
:meth:`kfrob.layers.LayerMath.sample_dims`) then adds the rows and counts the samples of the
kept positions only, and the MC Fisher samples labels for the kept positions only: a
masked-out position adds no rows and counts as no sample. A layer whose samples are the
mask's trailing dimensions, broadcast over the others (a position embedding called on
``arange(sequence)``), keeps the positions that some sample keeps. A layer whose rows mix
positions (``weight_sharing="reduce"`` over a sequence) keeps every position, with a
warning. Selecting the kept positions costs one host sync per recorded forward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kfrob.alerts import warn
from kfrob.factors import RunningFactor
from kfrob.fisher import SampledLoss, sampled_cross_entropy
from kfrob.tracking import Selection, TrackedLayer

__all__ = ["CurvatureCapture"]


class CurvatureCapture:
    """Registers the hooks on ``layers`` (and on ``model`` for the MC Fisher)."""

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[TrackedLayer],
        sampled_loss: SampledLoss | None = None,
        generator: torch.Generator | None = None,
        records: bool = True,
    ) -> None:
        self.active = True
        #: whether the hooks feed the factors (else they only count the layers' calls)
        self.records = records
        self.layers = list(layers)
        self._sampled_loss = sampled_loss
        self._generator = generator
        self._warned_output = False
        self.model_calls = 0
        self._mask: Tensor | None = None  # the loss mask of the next forward pass
        self._kept: dict[int, Selection] = {}  # its selections, by broadcast dimensions
        self._unmasked: set[str] = set()  # layers warned that the mask does not apply
        # Hooks hold the capture weakly: the model never keeps its optimizer alive.
        self._handles: list[RemovableHandle] = [
            layer.module.register_forward_hook(
                partial(weak_callable(self._on_forward), layer), with_kwargs=True
            )
            for layer in self.layers
        ]
        self._handles.append(model.register_forward_pre_hook(weak_callable(self._on_model_call)))
        self._handles.append(model.register_forward_hook(weak_callable(self._on_model_output)))

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """Count only the samples where ``mask`` (bool, over the leading dimensions of the
        model's output) is True in the factors of the next forward pass of the model
        (``None``: all of them). The mask is used by that one pass and then dropped."""
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() == 0:
                raise TypeError(
                    "the loss mask must be a bool tensor over the model output's leading "
                    f"dimensions (e.g. targets != ignore_index), got {_describe(mask)}"
                )
            mask = mask.detach()
        self._mask, self._kept = mask, {}

    def _selection(self, mask: Tensor, broadcast: int, device: torch.device) -> Selection:
        if broadcast not in self._kept:
            self._kept[broadcast] = _kept_samples(mask, broadcast, device)
        return self._kept[broadcast]

    def _keep(self, layer: TrackedLayer, tensors: list[Tensor]) -> Selection | None:
        """The kept samples of this call of ``layer`` on (input, output) ``tensors``, or
        ``None`` without a mask or where it does not select the layer's samples (warned once
        per layer)."""
        mask = self._mask
        if mask is None:
            return None
        for broadcast in range(mask.dim()):
            dims = mask.dim() - broadcast
            # broadcast over the mask's leading dimensions only for a layer with fewer
            # sample dimensions than the mask
            if all(
                t.shape[:dims] == mask.shape[broadcast:]
                and _fits(layer.math.sample_dims(t), dims, exactly=broadcast > 0)
                for t in tensors
            ):
                return self._selection(mask, broadcast, tensors[0].device)
        if layer.name not in self._unmasked:
            self._unmasked.add(layer.name)
            warn(
                f"kfrob: the loss mask of shape {tuple(mask.shape)} does not select the samples "
                f"of {layer.name or 'a layer'} (input {tuple(tensors[0].shape)}; under "
                "weight_sharing='reduce' a row is a whole sequence), so its factors count every "
                "position (warned once)"
            )
        return None

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
        if not (self.records and self._recording(module)) or not layer.math.trainable:
            return
        if layer.failure:
            return
        x = (args[0] if args else next(iter(kwargs.values()))).detach()
        if isinstance(output, Tensor):
            layer.failure = layer.math.check_call(x, output)
            if layer.failure:
                return
        kept = self._keep(layer, [x, output] if isinstance(output, Tensor) else [x])
        x = _select(x, kept)
        projected = None  # this call's input rows for the eigenvalue correction
        if layer.domain is not None:
            samples = layer.math.num_samples(x)
            correcting = layer.correction is not None and layer.correction.ready
            if correcting:  # the rows themselves: the correction pairs them with G's
                rows = layer.math.input_rows(x)
                layer.domain.add(rows, samples)
                projected = layer.correction.project_inputs(rows)  # type: ignore[union-attr]
            else:
                layer.domain.add_inputs(layer.math, x, samples)
        if layer.codomain is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        if self._sampled_loss is not None:
            layer.outputs.append((output, projected, kept))
        else:
            output.register_hook(partial(self._on_output_grad, layer, projected, kept))

    @staticmethod
    def _on_output_grad(
        layer: TrackedLayer, projected: Tensor | None, kept: Selection | None, grad: Tensor
    ) -> None:
        assert layer.codomain is not None
        grad = _select(grad, kept)
        rows, samples = layer.math.output_rows(grad), layer.math.num_samples(grad)
        layer.codomain.add(rows, samples)
        if projected is not None and layer.correction is not None:
            layer.correction.add_pair(projected, rows, samples)

    def _on_model_output(self, module: nn.Module, args: Any, output: Any) -> None:
        recorded = [(layer, kept) for layer in self.layers for kept in layer.outputs]
        for layer in self.layers:
            layer.outputs = []
        mask, selections = self._mask, self._kept
        self.set_loss_mask(None)  # a mask serves one forward pass
        if mask is not None and isinstance(output, Tensor):
            _check_mask(mask, output)
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
        sampled = None  # the model's outputs that draw labels: the kept ones
        if mask is not None:
            sampled = selections.get(0) or _kept_samples(mask, 0, output.device)
        loss = self._sampled_loss(_select(output, sampled), self._generator)
        grads = torch.autograd.grad(
            loss, [out for _, (out, _, _) in recorded], retain_graph=True, allow_unused=True
        )
        for (layer, (_, projected, kept)), grad in zip(recorded, grads, strict=True):
            if grad is not None:
                self._on_output_grad(layer, projected, kept, grad)

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


def _fits(sample_dims: int, mask_dims: int, exactly: bool) -> bool:
    return sample_dims == mask_dims if exactly else sample_dims >= mask_dims


def _kept_samples(mask: Tensor, broadcast: int, device: torch.device) -> Selection:
    """The samples ``mask`` keeps, over its dimensions after the first ``broadcast`` (a
    sample there is kept where any of the broadcast ones is)."""
    if broadcast:
        mask = mask.flatten(0, broadcast - 1).any(0)
    indices = mask.reshape(-1).nonzero().squeeze(1)  # the one host sync
    return mask.dim(), indices.to(device)


def _select(t: Tensor, kept: Selection | None) -> Tensor:
    """``t`` at the kept samples: ``(len(indices), *t.shape[dims:])``; all of ``t`` without
    a selection."""
    if kept is None:
        return t
    dims, indices = kept
    return t.flatten(0, dims - 1).index_select(0, indices)


def _check_mask(mask: Tensor, output: Tensor) -> None:
    """Refuse a loss mask that does not cover the model output's leading dimensions."""
    if mask.dim() >= output.dim() or output.shape[: mask.dim()] != mask.shape:
        raise ValueError(
            f"the loss mask has shape {tuple(mask.shape)} but the model's output has shape "
            f"{tuple(output.shape)}: the mask must match the output's leading dimensions (its "
            "samples, e.g. (batch, sequence) for (batch, sequence, classes) logits)"
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_classes_last(output: Tensor, recorded: list[tuple[TrackedLayer, Any]]) -> None:
    """Refuse a model output whose classes are not its last dimension: the MC Fisher draws
    each sample's label from ``softmax`` over the last dimension."""
    for layer, (kept, _, _) in recorded:
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
