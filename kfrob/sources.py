"""Curvature sources: where a layer's running factors come from.

One source is chosen at construction (:func:`source_for`, ``curvature_source=...``) and
feeds every layer:

* :class:`Activations` (``"activations"``, the default): K-FAC's. The hooks
  (:mod:`kfrob.capture`) feed the domain factor ``A`` from each layer's inputs and the
  co-domain factor ``G`` from its per-sample output gradients: those of the training backward
  (the empirical Fisher) or of a backward of labels sampled from the model (the Monte Carlo
  Fisher, :mod:`kfrob.fisher`).
* :class:`Gradients` (``"gradients"``): Shampoo's. At every factor-update step the layer's
  direction matrix ``V`` ``(k, out, in)`` (its gradient ``[∇W, ∇b]``, with the weight decay
  where the step rule adds it to the gradient) feeds the domain factor ``R = E[Vᵀ V]``
  ``(in, in)`` and the co-domain factor ``L = E[V Vᵀ]`` ``(out, out)``; a window's statistic
  is the mean of ``Vᵀ V`` (``V Vᵀ``) over its steps, so the running factors are the
  exponential averages of Shampoo's statistics. No hook records anything, and no Fisher is
  sampled. With ``exponent=0.25`` the K-FAC step ``(R ⊗ L + λI)^{-1/4}`` is Shampoo's
  ``L^{-1/4} V R^{-1/4}`` (factored damping), and the eigenbasis rule becomes SOAP.

Both feed the same :class:`~kfrob.factors.RunningFactor` averages, and so go through the
same structures, inverses, placement and refresh schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor

from kfrob.factors import RunningFactor
from kfrob.fisher import SAMPLED_LOSSES, SampledLoss
from kfrob.options import CurvatureOptions
from kfrob.tracking import TrackedLayer

__all__ = ["Activations", "CurvatureSource", "Gradients", "source_for"]


class CurvatureSource:
    """The base: what feeds the factors, and how a window's sums become its statistic."""

    #: whether the hooks record factor rows in the forward and backward passes
    hooks_record: bool = True
    #: whether a window's statistic is the mean over its steps (not over rows or samples)
    per_step: bool = False
    #: the loss whose labels the hooks sample for ``G`` (``None``: no sampled backward)
    sampled_loss: SampledLoss | None = None

    def __init__(self, curvature: CurvatureOptions) -> None:
        """A source for the curvature options (what the base needs of them: nothing)."""

    def statistic(
        self, factor: RunningFactor, is_codomain: bool, calls_per_forward: int,
        loss_scale: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """The window's statistic of ``factor``; ``calls_per_forward`` is how often its
        module ran in each forward pass, ``loss_scale`` the ``GradScaler``'s scale (``None``:
        none) the training backward ran under."""
        return factor.statistic()

    def complete_after_forward(self, is_codomain: bool) -> bool:
        """Whether a factor's statistic is complete once the model's forward pass ends (so
        that it may be sent to the other ranks while backward runs)."""
        return False

    def feed(self, layers: Iterable[TrackedLayer], directions: Mapping[Tensor, Tensor]) -> None:
        """Add this step's statistics that do not come from hooks (none here)."""


class Activations(CurvatureSource):
    """K-FAC's ``A`` and ``G`` from the hooks (module docstring)."""

    def __init__(self, curvature: CurvatureOptions) -> None:
        self.reduction = curvature.loss_reduction
        self.monte_carlo = curvature.monte_carlo
        loss = curvature.loss
        self.sampled_loss = SAMPLED_LOSSES[loss] if self.monte_carlo and loss else None

    def statistic(
        self, factor: RunningFactor, is_codomain: bool, calls_per_forward: int,
        loss_scale: Tensor | None,
    ) -> Tensor:  # fmt: skip
        """The MC Fisher's sampled loss is a per-sample sum (:mod:`kfrob.fisher`); only the
        empirical ``G`` carries the loss scale of the training backward."""
        reduction = "sum" if is_codomain and self.monte_carlo else self.reduction
        stat = factor.statistic(reduction, calls_per_forward)
        if is_codomain and loss_scale is not None and not self.monte_carlo:
            stat = stat / loss_scale.to(stat).square()
        return stat

    def complete_after_forward(self, is_codomain: bool) -> bool:
        """``A`` always; ``G`` under the MC Fisher (sampled at the end of the forward)."""
        return not is_codomain or self.monte_carlo


class Gradients(CurvatureSource):
    """Shampoo's ``R = E[Vᵀ V]`` and ``L = E[V Vᵀ]`` from the gradient matrices (module
    docstring)."""

    hooks_record = False
    per_step = True

    def feed(self, layers: Iterable[TrackedLayer], directions: Mapping[Tensor, Tensor]) -> None:
        """Add ``Vᵀ V`` to each layer's domain factor and ``V Vᵀ`` to its co-domain factor
        (a factor adds ``rowsᵀ rows``: the domain takes ``V``'s rows, the co-domain its
        columns), one step's worth."""
        for layer in layers:
            math = layer.math
            if not math.trainable or not math.covers(directions):
                continue
            matrix = math.gradient_matrix(directions).to(math.factor_dtype)  # type: ignore[union-attr]
            if layer.domain is not None:
                layer.domain.add(matrix, 1)
            if layer.codomain is not None:
                layer.codomain.add(matrix.mT, 1)


#: the sources by the name ``curvature_source`` gives them
SOURCES: dict[str, type[CurvatureSource]] = {"activations": Activations, "gradients": Gradients}


def source_for(curvature: CurvatureOptions) -> CurvatureSource:
    """The source the options name."""
    return SOURCES[curvature.source](curvature)  # type: ignore[call-arg]
