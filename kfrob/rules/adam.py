"""What the Adam-based step rules share (:mod:`kfrob.rules.eigenbasis_adam`,
:mod:`kfrob.rules.adam_grafted`): :class:`AdamRule`, their common options, and Adam's moment
recursion, its normalised direction and the graft, for many tensors at once.

With gradient ``g`` (and ``r``, the entries whose second moment is kept: ``g`` itself, or
``g`` rotated into an eigenbasis):

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) r²,   t ← t + 1
    direction = (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)

Each operation is one ``torch._foreach`` kernel over all the tensors (not one per tensor),
in place wherever the result is not a new value: a step allocates only ``r²`` and ``m̂``,
and the direction is written into ``r²`` once ``v`` has taken it in (a fresh temporary as
large as a layer costs page faults on a CPU, more than the arithmetic). Nothing changes
(``t``, ``m``, ``v``) on a step whose gradients are not finite, with no host sync: the
moments move in place as ``m += f (1 − β₁)(g − m)`` (one ``lerp``) with the gate ``f`` (1
when finite, else 0) and the gradients zeroed first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kfrob.finite import select
from kfrob.options import PreconditionerOptions, require
from kfrob.rules.base import BETAS, StepRule, check_momentum

__all__ = [
    "AdamRule",
    "adam_step_all",
    "advance_all",
    "blend_",
    "graft_",
    "graft_scale",
    "normalised_all",
    "plain_adam",
]


class AdamRule(StepRule):
    """What the Adam-based rules share: a group's ``momentum`` is Adam's ``β₁``, the weight
    decay is AdamW's (decoupled), and the step needs no Nesterov momentum, no KL clip and no
    damping rule (Adam's second moment sets its length); modules without curvature get
    AdamW."""

    decoupled_weight_decay = True
    plain_update = "AdamW"

    @classmethod
    def check(cls, options: PreconditionerOptions, nesterov: bool) -> None:
        super().check(options, nesterov)
        rule = f"with step_rule={cls.name!r}"
        require("nesterov", nesterov, not nesterov, f"False {rule} (Adam's first moment is plain)")
        require(
            "kl_clip", options.kl_clip, options.kl_clip is None,
            f"None {rule} (Adam's second moment scales the step)",
        )  # fmt: skip
        require("adaptive_damping", True, options.adaptation is None, f"False {rule} (no damping)")

    @classmethod
    def moments(
        cls, momentum: float | None, betas: tuple[float, float] | None
    ) -> tuple[float, tuple[float, float]]:
        """A given ``momentum`` is the first moment's decay ``β₁`` (and SGD's momentum is 0),
        so ``momentum=0.9`` means what every SGD user means by it; ``betas`` default to
        ``(0.9, 0.95)``."""
        check_momentum(momentum)
        if momentum is None:
            return 0.0, tuple(betas or BETAS)  # type: ignore[return-value]
        if betas is not None:
            require(
                "momentum", momentum, momentum == betas[0],
                f"betas[0]={betas[0]} or left out (it is β₁ with step_rule={cls.name!r})",
            )  # fmt: skip
        return 0.0, (momentum, (betas or BETAS)[1])

    @classmethod
    def group(cls, group: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        if "momentum" not in group:
            return group
        momentum = group["momentum"]  # β₁
        _, betas = cls.moments(momentum, group.get("betas", (momentum, defaults["betas"][1])))
        return {**group, "momentum": 0.0, "betas": betas}


#: the smallest norm a direction is scaled from (a zero direction stays zero)
_TINY = 1e-30


def _initialise(state: dict[str, Any], gradient: Tensor, kept: Tensor) -> None:
    """A fresh state's zero step count and moments (nothing if it has them)."""
    if "exp_avg" not in state:
        state["step"] = torch.zeros((), device=gradient.device, dtype=gradient.dtype)
        state["exp_avg"] = torch.zeros_like(gradient)
        state["exp_avg_sq"] = torch.zeros_like(kept)


def blend_(averages: list[Tensor], values: list[Tensor], weight: Tensor) -> None:
    """``a += weight · (x − a)`` for each average ``a`` and value ``x``, in place, one
    ``lerp`` (``weight`` a 0-dim tensor: 0 leaves every average as it was)."""
    torch._foreach_lerp_(averages, values, [weight] * len(averages))


def advance_all(
    states: list[dict[str, Any]], gradients: list[Tensor], kept: list[Tensor], gate: Tensor,
    beta1: float, beta2: float,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:  # fmt: skip
    """Advance each state's ``"step"``, ``"exp_avg"`` (of its gradient) and
    ``"exp_avg_sq"`` (of its ``kept`` entries) in place by one step, gated by the 0-dim
    ``gate`` (1 or 0, in the gradients' dtype; with 0 the gradients must be finite, e.g.
    zeroed); returns the lists ``(exp_avg, exp_avg_sq, step, spare)``, ``spare`` tensors of
    ``exp_avg_sq``'s shapes that are free to overwrite (for :func:`normalised_all`)."""
    for state, gradient, entries in zip(states, gradients, kept, strict=True):
        _initialise(state, gradient, entries)
    m = [s["exp_avg"] for s in states]
    v = [s["exp_avg_sq"] for s in states]
    steps = [s["step"] for s in states]
    blend_(m, gradients, gate * (1 - beta1))
    squares = torch._foreach_mul(kept, kept)
    blend_(v, squares, gate * (1 - beta2))
    torch._foreach_add_(steps, [gate] * len(steps))  # a lone tensor would be read as a number
    return m, v, steps, squares


def normalised_all(
    means: list[Tensor], v: list[Tensor], steps: list[Tensor], beta1: float, beta2: float,
    eps: float, into: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """Adam's bias-corrected ``(m̂, m̂ / (√v̂ + ε))`` for each ``(m, v, t)`` (at step 0 a
    zero direction); the directions are written into ``into`` (tensors of ``v``'s shapes
    free to overwrite: :func:`advance_all`'s spare ones), which is returned."""
    counted = torch._foreach_clamp_min(steps, 1.0)
    unbiased = torch._foreach_div(means, _corrections(beta1, counted))
    directions = into
    torch._foreach_copy_(directions, v)
    torch._foreach_div_(directions, _corrections(beta2, counted))
    torch._foreach_sqrt_(directions)
    torch._foreach_add_(directions, eps)
    torch._foreach_reciprocal_(directions)
    torch._foreach_mul_(directions, unbiased)
    return unbiased, directions


def adam_step_all(
    states: list[dict[str, Any]], gradients: list[Tensor], finite: Tensor, beta1: float,
    beta2: float, eps: float,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """Adam's step for many parameters at once (the gradients on one device); returns their
    ``(m̂, m̂ / (√v̂ + ε))``; a non-finite step (``finite`` False) changes nothing."""
    safe = [select(finite, g, 0.0) for g in gradients]
    m, v, steps, spare = advance_all(states, safe, safe, finite.to(safe[0].dtype), beta1, beta2)
    return normalised_all(m, v, steps, beta1, beta2, eps, into=spare)


def plain_adam(
    groups: list[dict[str, Any]], state: Mapping[Tensor, dict[str, Any]],
    gradients: Mapping[Tensor, Tensor], finite: Tensor,
) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:  # fmt: skip
    """:func:`adam_step_all` for every parameter of ``gradients`` (sparse ones densified),
    with its parameter group's ``betas`` and ``eps``; returns ``(m̂, direction)`` per
    parameter."""
    means: dict[Tensor, Tensor] = {}
    directions: dict[Tensor, Tensor] = {}
    for group in groups:
        params = [p for p in group["params"] if p in gradients]
        dense = [g.to_dense() if g.is_sparse else g for g in (gradients[p] for p in params)]
        (beta1, beta2), eps = group["betas"], group["eps"]
        for device in {g.device for g in dense}:
            here = [i for i, g in enumerate(dense) if g.device == device]
            mean, normal = adam_step_all(
                [state[params[i]] for i in here], [dense[i] for i in here],
                finite.to(device), beta1, beta2, eps,
            )  # fmt: skip
            for i, m, n in zip(here, mean, normal, strict=True):
                means[params[i]], directions[params[i]] = m, n
    return means, directions


def graft_(directions: list[Tensor], adam: list[Tensor]) -> None:
    """``D ← D · ‖N‖_F / ‖D‖_F`` in place: the directions ``D`` (one layer's tensors, taken
    together) at the length of its Adam directions ``N`` (grafting: the curvature's
    direction, Adam's length). Every rule that grafts does it here."""
    scale = graft_scale(adam, directions)
    for d in directions:
        d.mul_(scale.to(d.dtype))


def graft_scale(adam: list[Tensor], directions: list[Tensor]) -> Tensor:
    """``‖N‖_F / ‖D‖_F`` (each over its list of tensors taken together, in at least
    float32): the factor that gives the directions ``D`` the length of the Adam directions
    ``N``; finite for a zero ``D``, which therefore stays zero."""
    return _norm(adam) / _norm(directions).clamp(min=_TINY)


def _norm(tensors: list[Tensor]) -> Tensor:
    norms = [t.norm(dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _corrections(beta: float, steps: list[Tensor]) -> list[Tensor]:
    """``1 − βᵗ`` for each step count."""
    powers = torch._foreach_pow(beta, steps)
    torch._foreach_neg_(powers)
    torch._foreach_add_(powers, 1.0)
    return powers
