"""The K-FAC direction with Adam's step length per layer: ``step_rule="adam_grafted"``.

Every parameter keeps Adam's moments (:mod:`kfrob.rules.adam`). A layer's step takes its
direction from the curvature and its length from Adam: with ``M̂`` the layer's
bias-corrected first moment as a ``(k, out, in)`` matrix ``[W, b]`` and ``N`` its Adam
direction ``M̂ / (√V̂ + ε)`` as the same matrix,

    D = P_G M̂ P_A                     (the preconditioned first moment: (A ⊗ G + λI)⁻¹ M̂)
    Δ = D · ‖N‖_F / ‖D‖_F             (grafted: Adam's length, K-FAC's direction)

and the parameters move by ``−lr · Δ`` (with decoupled weight decay ``−lr · wd · W``, as
in AdamW). This is the grafting of Distributed Shampoo (Shi et al., 2023) with K-FAC's
preconditioner in place of Shampoo's: the factors may be damped, structured or stale, and
their overall scale (which the KL clip would otherwise have to set) does not matter; the
learning rate means what it means for Adam. Parameters without Kronecker factors take
Adam's own direction ``N`` (a layer without an inverse yet grafts its plain ``M̂``).

Defaults: no KL clip, factors every 5 steps and inverses every 20, the empirical Fisher
(measured in ``docs/performance.md#step-rules``). State per parameter, in
``optimizer.state[p]``: ``"step"``, ``"exp_avg"``, ``"exp_avg_sq"``, parameter-shaped (as
:class:`torch.optim.Adam`'s).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfrob.rules.adam import AdamRule, graft_, plain_adam
from kfrob.rules.base import register_rule

__all__ = ["AdamGrafted"]


@register_rule
class AdamGrafted(AdamRule):
    """Each layer's preconditioned first moment at the length of its Adam step."""

    name = "adam_grafted"
    defaults: Mapping[str, Any] = {
        "kl_clip": None,
        "factor_update_freq": 5,
        "inverse_update_freq": 20,
        "fisher": "empirical",
    }

    @torch.no_grad()
    def directions(
        self, directions: dict[Tensor, Tensor], finite: Tensor,
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:  # fmt: skip
        """Adam's moments for every parameter; each layer's ``M̂`` preconditioned by the
        engine (through its placement) and grafted onto the layer's Adam direction."""
        pre = self.host.preconditioner
        means, adam = plain_adam(self.host.param_groups, state, directions, finite)
        preconditioned = dict(means)
        pre.precondition_(preconditioned, 1.0)
        directions.update(adam)
        for layer in pre.active_layers():
            params = [p for p in layer.math.parameters if p in preconditioned]
            if not params or not layer.math.covers(preconditioned):
                continue
            moved = [preconditioned[p] for p in params]
            graft_(moved, [adam[p] for p in params])
            for p, d in zip(params, moved, strict=True):
                directions[p] = d.to(p.dtype)
