"""One cheap test of whether a set of tensors holds only finite values, and the choice it
drives."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["all_finite", "select"]


def all_finite(tensors: Iterable[Tensor]) -> Tensor:
    """Whether every element of every tensor is finite, as a 0-dim bool tensor (no host
    sync; sparse tensors are checked on their values).

    Each tensor is reduced to its sum (in at least float32), which is non-finite whenever an
    element is NaN or ±Inf: one reduction per tensor instead of an elementwise test and a
    second reduction. A sum that overflows counts as non-finite too, which only happens for
    values that are garbage anyway (a float32 sum beyond 3.4e38).
    """
    flags = []
    for t in tensors:
        values = t.coalesce().values() if t.is_sparse else t
        total = values.sum(dtype=torch.promote_types(values.dtype, torch.float32))
        flags.append(torch.isfinite(total))
    if not flags:
        return torch.ones((), dtype=torch.bool)
    return torch.stack(flags).all()


def select(condition: Tensor, new: Tensor, old: Tensor | float) -> Tensor:
    """``new`` where the 0-dim bool ``condition`` holds, else ``old`` (a tensor or a scalar):
    a ``torch.where`` without host sync, except for sparse tensors (sparse embeddings), which
    need one read."""
    if new.is_sparse:
        if bool(condition):
            return new
        return old if isinstance(old, Tensor) else torch.zeros_like(new)
    return torch.where(condition, new, old)
