"""One cheap test of whether a set of tensors holds only finite values, and the choices it
drives (a selection, a gated descent)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["all_finite", "descend_gated", "select"]


def all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool tensor (no host
    sync; sparse tensors are checked on their values).

    Each tensor is reduced to the sum of its absolute values (in at least float32), which is
    non-finite whenever an element is NaN or ±Inf: one ``torch._foreach_norm`` kernel per
    dtype and device instead of an elementwise test and a reduction per tensor. A sum that
    overflows counts as non-finite too, which only happens for values that are garbage
    anyway (a float32 sum beyond 3.4e38).
    """
    kinds: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        values = t.coalesce().values() if t.is_sparse else t
        kinds.setdefault((values.dtype, values.device), []).append(values)
    if not kinds:
        return torch.ones((), dtype=torch.bool)
    flags = []
    for (dtype, _), values in kinds.items():
        sums = torch._foreach_norm(values, 1, dtype=torch.promote_types(dtype, torch.float32))
        flags.append(torch.stack(sums).isfinite().all())
    first = flags[0].device
    return torch.stack([flag.to(first) for flag in flags]).all()


def select(condition: Tensor, new: Tensor, old: Tensor | float) -> Tensor:
    """``new`` where the 0-dim bool ``condition`` holds, else ``old`` (a tensor or a scalar):
    a ``torch.where`` without host sync, except for sparse tensors (sparse embeddings), which
    need one read."""
    if new.is_sparse:
        if bool(condition):
            return new
        return old if isinstance(old, Tensor) else torch.zeros_like(new)
    return torch.where(condition, new, old)


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
