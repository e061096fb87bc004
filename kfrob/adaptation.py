r"""Adaptive damping: the optimizer's side of the Levenberg–Marquardt rule
(the math is in :mod:`kfrob.damping`).

Every ``interval``-th step (the ``interval``-th, ``2·interval``-th, … call of
:meth:`~kfrob.FrobPreconditionedSGD.step`, which must get a closure) is measured on its own
batch:

* ``θ`` is copied before the update; ``Δ = θ_after − θ`` is the change the step made (the
  learning rate, momentum, the KL clip, a skipped step: everything included);
* the objective is ``h(θ) = L(θ) + Σ_p ½ wd_p ‖θ_p‖²``: the closure's loss ``L`` plus the
  weight decay the optimizer adds to the gradient. ``L(θ)`` is the loss the closure returned
  before the update; ``L(θ + Δ)`` comes from calling the closure once more after it, with
  the curvature capture switched off (nothing is recorded into the factors, no MC labels
  are drawn) and every ``p.grad`` restored afterwards, value and tensor, to what the step
  used. The weight-decay part of ``h(θ+Δ) − h(θ)`` is exact: ``Σ wd (⟨θ, Δ⟩ + ½‖Δ‖²)``;
* the model :func:`~kfrob.damping.quadratic_model` takes ``∇h = grad + wd·θ``; each
  preconditioned layer is one piece with its current running factors ``(A, G)`` (as
  :meth:`~kfrob.KroneckerPreconditioner.factors` gives them: identities and diagonals for
  the other inner products; zeros before the first statistic) and the damping
  ``λ + wd`` of its group (the quadratic ``½ wd ‖Δ‖²`` of the decay is exact, as in K-FAC);
  every other parameter (untracked modules, layers fallen back to plain SGD) is a piece
  without curvature. ``A ⊗ G`` approximates the curvature of the *mean* loss over the
  samples, so the option needs ``loss_reduction="mean"``.

Then every group's ``damping`` moves by :func:`~kfrob.damping.adapted_damping`; the
preconditioner reads it at its next inverse refresh. With a communicator the two losses,
the decay term and ``M`` are averaged over ranks (one all-reduce of four numbers), so every
rank takes the same decision: the mean of the ranks' mean losses is the loss of the global
batch when the ranks' batches are equal, and ``M`` is the same on every rank under
``DistributedDataParallel``. The decision reads those four numbers to the host: one sync
every ``interval`` steps. The measurement costs one forward and backward pass and one copy
of the parameters and of the gradients, every ``interval`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kfrob.damping import ModelPiece, adapted_damping, quadratic_model, reduction_ratio

if TYPE_CHECKING:
    from kfrob.options import DampingAdaptation
    from kfrob.preconditioner import KroneckerPreconditioner

Groups = list[dict[str, Any]]

__all__ = ["LevenbergMarquardt"]


class LevenbergMarquardt:
    """The rule's schedule and bounds (:class:`~kfrob.options.DampingAdaptation`):
    ``interval`` steps between adaptations, the factor ``ω``, and ``[low, high]`` for ``λ``."""

    def __init__(self, rule: DampingAdaptation) -> None:
        self.interval = rule.interval
        self.factor = rule.factor
        self.low = rule.min_damping
        self.high = rule.max_damping

    def due(self, steps: int) -> bool:
        """Whether the step after ``steps`` earlier ones is measured."""
        return (steps + 1) % self.interval == 0

    @staticmethod
    def snapshot(groups: Groups) -> dict[Tensor, Tensor]:
        """Copies of the parameters the step can move (those with a gradient)."""
        return {
            p: p.detach().clone() for group in groups for p in group["params"] if p.grad is not None
        }

    def adapt(
        self,
        preconditioner: KroneckerPreconditioner,
        groups: Groups,
        closure: Callable[[], Any],
        loss: Any,
        before: dict[Tensor, Tensor],
    ) -> float:
        """Measure the step just taken from ``before`` (whose loss the closure returned as
        ``loss``), move the ``damping`` of every parameter group, and return ``ρ``."""
        if loss is None:
            raise ValueError("adaptive_damping needs a closure that returns the loss")
        model = quadratic_model(_pieces(preconditioner, groups, before))
        decay = _decay_change(groups, before)
        after = _reevaluate(preconditioner, groups, closure)
        if after is None:
            raise ValueError("adaptive_damping needs a closure that returns the loss")
        values = torch.stack(
            [_scalar(loss, model.device), _scalar(after, model.device), decay.to(model), model]
        )
        preconditioner.placement.average(values)  # the same ρ on every rank
        loss_before, loss_after, decay_change, predicted = values.tolist()  # the one host read
        ratio = reduction_ratio(loss_after - loss_before + decay_change, predicted)
        for group in groups:
            group["damping"] = adapted_damping(
                float(group["damping"]), ratio, predicted, self.factor, self.low, self.high
            )
        return ratio


def _pieces(
    preconditioner: KroneckerPreconditioner, groups: Groups, before: dict[Tensor, Tensor]
) -> list[ModelPiece]:
    """The terms of ``M``: one per preconditioned layer, one per other moved parameter."""
    group_of = {p: group for group in groups for p in group["params"]}

    def gradient(p: Tensor | None) -> Tensor | None:
        if p is None or p not in before:
            return None
        grad = p.grad.to_dense() if p.grad.is_sparse else p.grad  # type: ignore[union-attr]
        decay = group_of[p]["weight_decay"]
        return grad.add(before[p], alpha=decay) if decay != 0 else grad

    def step(p: Tensor | None) -> Tensor | None:
        return None if p is None or p not in before else p.detach() - before[p]

    def damping(p: Tensor) -> float:
        return float(group_of[p]["damping"]) + float(group_of[p]["weight_decay"])

    factors = preconditioner.factors()
    pieces, covered = [], set()
    for layer in preconditioner.active_layers():
        math = layer.math
        if math.weight not in before:
            continue
        moved = [p for p in math.parameters if p in before]
        grads = math.gradient_matrix({p: gradient(p) for p in moved})
        steps = math.gradient_matrix({p: step(p) for p in moved})
        pieces.append(ModelPiece(grads, steps, damping(math.weight), factors[layer.name]))  # type: ignore[arg-type]
        covered.update(math.parameters)
    for p in before:
        if p not in covered:
            pieces.append(ModelPiece(gradient(p), step(p), damping(p)))  # type: ignore[arg-type]
    return pieces


def _decay_change(groups: Groups, before: dict[Tensor, Tensor]) -> Tensor:
    """``Σ_p ½ wd_p (‖θ_p + Δ_p‖² − ‖θ_p‖²) = Σ_p wd_p (⟨θ_p, Δ_p⟩ + ½‖Δ_p‖²)``."""
    terms = []
    for group in groups:
        decay = group["weight_decay"]
        for p in group["params"]:
            if decay == 0 or p not in before:
                continue
            delta = (p.detach() - before[p]).float()
            terms.append(decay * (before[p].float() * delta + 0.5 * delta.square()).sum())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _reevaluate(
    preconditioner: KroneckerPreconditioner, groups: Groups, closure: Callable[[], Any]
) -> Any:
    """The closure's loss at the current parameters, recording no curvature; every
    ``p.grad`` is afterwards the same tensor with the same values as before (the copy
    guards gradients that alias a buffer the closure's backward writes again, such as
    ``DistributedDataParallel``'s bucket views)."""
    params = [p for group in groups for p in group["params"]]
    grads = [p.grad for p in params]
    saved = [None if g is None or g.is_sparse else g.clone() for g in grads]
    for p in params:
        p.grad = None
    try:
        with torch.enable_grad(), preconditioner.paused():
            loss = closure()
    finally:
        for p, grad, copy in zip(params, grads, saved, strict=True):
            p.grad = grad
            if grad is not None and copy is not None:
                grad.copy_(copy)
    return loss


def _scalar(loss: Any, device: torch.device) -> Tensor:
    """A closure's loss as a detached 0-dim float32 tensor on ``device``."""
    value = loss.detach() if isinstance(loss, Tensor) else torch.tensor(float(loss))
    return value.reshape(()).to(device=device, dtype=torch.float32)
