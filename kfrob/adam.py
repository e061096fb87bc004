"""Adam's moment recursion and its normalised direction, shared by the Adam-based step rules
(:mod:`kfrob.eigenbasis_adam`, :mod:`kfrob.adam_grafted`).

With gradient ``g`` (and ``r``, the entries whose second moment is kept: ``g`` itself, or
``g`` rotated into an eigenbasis):

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) r²,   t ← t + 1
    direction = (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

Nothing changes (``t``, ``m``, ``v``) on a step whose gradients are not finite; no host
sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfrob.finite import select

__all__ = ["adam_step_all", "advance_moments", "normalised"]


def _initialise(state: dict[str, Any], gradient: Tensor, kept: Tensor) -> None:
    """A fresh state's zero step count and moments (nothing if it has them)."""
    if "exp_avg" not in state:
        state["step"] = torch.zeros((), device=gradient.device, dtype=gradient.dtype)
        state["exp_avg"] = torch.zeros_like(gradient)
        state["exp_avg_sq"] = torch.zeros_like(kept)


def advance_moments(
    state: dict[str, Any], gradient: Tensor, kept: Tensor, finite: Tensor, beta1: float,
    beta2: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Advance ``state``'s ``"step"``, ``"exp_avg"`` (of ``gradient``) and ``"exp_avg_sq"``
    (of ``kept``) by one step (nothing changes when the 0-dim bool ``finite`` is False);
    returns ``(exp_avg, exp_avg_sq, step)``."""
    _initialise(state, gradient, kept)
    step = select(finite, state["step"] + 1, state["step"])
    m = select(finite, torch.lerp(state["exp_avg"], gradient, 1 - beta1), state["exp_avg"])
    v_new = state["exp_avg_sq"] * beta2 + (1 - beta2) * kept.square()
    v = select(finite, v_new, state["exp_avg_sq"])
    state["step"], state["exp_avg"], state["exp_avg_sq"] = step, m, v
    return m, v, step


def normalised(
    m: Tensor, v: Tensor, step: Tensor, beta1: float, beta2: float, eps: float
) -> Tensor:
    """Adam's bias-corrected ``m̂ / (√v̂ + ε)`` (``step >= 1``; at step 0 a zero direction)."""
    counted = step.clamp(min=1)
    return (m / (1 - beta1**counted)) / ((v / (1 - beta2**counted)).sqrt() + eps)


def adam_step_all(
    states: list[dict[str, Any]], gradients: list[Tensor], finite: Tensor, beta1: float,
    beta2: float, eps: float,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """:func:`advance_moments` (with ``kept = gradient``) for many parameters at once, with
    one ``torch._foreach`` kernel per operation instead of one per parameter; returns their
    ``(m̂, m̂ / (√v̂ + ε))``. The moments are updated in place, as
    ``m += f (1 − β₁)(g − m)``, ``v += f (1 − β₂)(g² − v)``, ``t += f`` with the gate ``f``
    (1 when ``finite``, else 0, and the gradients zeroed), so a non-finite step leaves them
    bit for bit. The gradients must share one device."""
    for state, gradient in zip(states, gradients, strict=True):
        _initialise(state, gradient, gradient)
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    gate = finite.to(gradients[0].dtype)
    safe = [torch.where(finite, g, 0.0) for g in gradients]
    change = torch._foreach_sub(safe, m)
    torch._foreach_mul_(change, gate * (1 - beta1))
    torch._foreach_add_(m, change)
    change = torch._foreach_mul(safe, safe)
    torch._foreach_sub_(change, v)
    torch._foreach_mul_(change, gate * (1 - beta2))
    torch._foreach_add_(v, change)
    torch._foreach_add_(steps, gate)
    counted = torch._foreach_clamp_min(steps, 1.0)
    means = torch._foreach_div(m, _corrections(beta1, counted))
    scales = torch._foreach_sqrt(torch._foreach_div(v, _corrections(beta2, counted)))
    torch._foreach_add_(scales, eps)
    return means, torch._foreach_div(means, scales)


def _corrections(beta: float, steps: list[Tensor]) -> list[Tensor]:
    """``1 − βᵗ`` for each step count."""
    powers = torch._foreach_pow(beta, steps)
    torch._foreach_neg_(powers)
    torch._foreach_add_(powers, 1.0)
    return powers
