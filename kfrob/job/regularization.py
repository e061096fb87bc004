"""The training job's ``regularization`` section: which penalty of :mod:`kfrob.penalties` is
added to the loss, with which weight, on which layers and how often.

``kind`` is one of :data:`kfrob.job.config.REGULARIZERS`; ``weight`` multiplies the
penalty; ``layers`` restricts the matrix penalties to named layers (default: all the
model's registered layers); ``p`` is Schatten's exponent; ``every`` applies the penalty on
every ``every``-th step only (for the expensive ones: ``geometric_complexity`` costs
``2·n_samples`` extra backward passes, ``hessian_trace`` a third-order pass per probe);
``n_samples`` is the number of random probes of those two. ``metric_frobenius`` measures
``[W, b]`` in kfrob's running ``A``, ``G`` metric, so it needs kfrob optimizers only.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import Tensor, nn

from kfrob.job.config import RegularizationConfig
from kfrob.penalties import (
    geometric_complexity_penalty,
    hessian_trace_penalty,
    matrix_penalty,
)

__all__ = ["penalty"]

MATRIX_KINDS = ("nuclear", "schatten", "nuclear_frobenius", "frobenius", "metric_frobenius")


def penalty(
    config: RegularizationConfig,
    step: int,
    model: nn.Module,
    optimizer: object,
    loss_fn: object,
    x: Tensor,
    y: Tensor,
) -> Tensor | None:
    """The penalty to add at ``step`` (already multiplied by ``weight``), or ``None`` when
    the section is off or this step is skipped. ``loss_fn(output)`` is the batch's loss."""
    if config.kind == "none" or config.weight == 0 or step % config.every:
        return None
    pre = getattr(optimizer, "preconditioner", None)
    with pre.paused() if pre is not None else nullcontext():  # its passes record no curvature
        return config.weight * _value(config, model, optimizer, loss_fn, x, y)


def _value(
    config: RegularizationConfig, model: nn.Module, optimizer: object, loss_fn: object,
    x: Tensor, y: Tensor,
) -> Tensor:  # fmt: skip
    if config.kind in MATRIX_KINDS:
        factors = optimizer if config.kind == "metric_frobenius" else None
        value = matrix_penalty(
            model, config.kind, layers=config.layers, p=config.p, factors=factors
        )
    elif config.kind == "geometric_complexity":
        value = geometric_complexity_penalty(model, x, config.n_samples)
    else:
        value = hessian_trace_penalty(
            model,
            lambda out, _: loss_fn(out),
            (x, y),
            config.n_samples,  # type: ignore[operator]
        )
    return value
