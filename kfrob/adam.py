"""Adam's moment recursion and its normalised direction, for many tensors at once, shared by
the Adam-based step rules (:mod:`kfrob.eigenbasis_adam`, :mod:`kfrob.adam_grafted`).

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

__all__ = [
    "adam_step_all",
    "advance_all",
    "blend_",
    "descend_gated",
    "graft_scale",
    "normalised_all",
    "plain_adam",
]

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


def descend_gated(params: list[Tensor], steps: list[Tensor], finite: Tensor, lr: float) -> None:
    """``p −= lr · d`` for each parameter and its finite direction, ``p`` unchanged when the
    0-dim ``finite`` is False, with no host sync; the directions are overwritten."""
    gates: dict[tuple[torch.dtype, torch.device], Tensor] = {}
    for d in steps:
        gates.setdefault((d.dtype, d.device), finite.to(d.device, d.dtype) * -lr)
    if len(gates) == 1:
        torch._foreach_mul_(steps, next(iter(gates.values())))
    else:
        for d in steps:
            d.mul_(gates[d.dtype, d.device])
    torch._foreach_add_(params, steps)


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
