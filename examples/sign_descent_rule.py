"""A step rule in one file: sign descent in the K-FAC metric's coordinates.

``Δ = sign((A ⊗ G + λI)⁻¹ g)``: steepest descent, under the max-norm, of the preconditioned
gradient. ``docs/architecture.md#adding-a-step-rule`` walks through it, and
``tests/test_rules.py`` trains with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kfrob.rules import StepRule, register_rule


class SignDescent(StepRule):
    """``Δ = sign(P g)`` with ``P`` the damped K-FAC inverse; SGD's learning rate."""

    name = "sign_descent"
    defaults: Mapping[str, Any] = {"kl_clip": None}  # the sign sets the length
    sources = ("activations",)  # K-FAC's factors only

    def directions(
        self, directions: dict[Tensor, Tensor], finite: Tensor,
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:  # fmt: skip
        self.host.preconditioner.precondition_(directions, 1.0)
        for p, d in directions.items():
            directions[p] = d.sign()


register_rule(SignDescent)
