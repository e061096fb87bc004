r"""The KL-clipped K-FAC step under SGD's momentum: ``step_rule="preconditioned_sgd"``.

Each layer's direction is the Riesz representative of its gradient in the damped metric,

.. math::
    \mathrm{vec}(\Delta) = (A \otimes G + \lambda I)^{-p}\,\mathrm{vec}(\nabla_V L
    + \mathrm{wd}\cdot V),

all directions scaled by one factor (the KL clip ``κ``)

.. math:: \nu = \min\Bigl(1, \sqrt{\kappa / \textstyle\sum_\ell r_\ell^2
    \langle g_\ell, \Delta_\ell\rangle}\Bigr), \quad r_\ell = \mathrm{lr}_\ell / (1 - \mu_\ell)

(``r`` is the step a steady direction takes under momentum ``μ``), after which momentum,
Nesterov and the learning rate act exactly as in :class:`torch.optim.SGD`; modules without
curvature get plain SGD. The weight decay enters the gradient (coupled), and the options'
defaults are the engine's (:class:`kfrob.options.PreconditionerOptions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfrob.options import PreconditionerOptions, require
from kfrob.preconditioner import StepPlan
from kfrob.rules.base import StepRule, register_rule

__all__ = ["PreconditionedSGD"]


@register_rule
class PreconditionedSGD(StepRule):
    """``Δ = ν (A ⊗ G + λI)^{-p} (g + wd · p)`` under SGD's momentum (module docstring)."""

    name = "preconditioned_sgd"

    @classmethod
    def check(cls, options: PreconditionerOptions, nesterov: bool) -> None:
        super().check(options, nesterov)
        source = options.curvature.source
        require(
            "kl_clip", options.kl_clip, options.kl_clip is None or source == "activations",
            "None with curvature_source='gradients' (the KL clip measures the step in the "
            "Fisher's metric, which gradient factors are not)",
        )  # fmt: skip

    @torch.no_grad()
    def directions(
        self, directions: dict[Tensor, Tensor], finite: Tensor,
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:  # fmt: skip
        self.host.preconditioner.precondition_(directions, self.host.learning_rates())

    def step_plan(self, directions: dict[Tensor, Tensor]) -> StepPlan:
        """The engine's plan: each layer's update ``lr · ν · R(g)`` before momentum."""
        return self.host.preconditioner.plan(directions, self.host.learning_rates())
