"""Running estimates of one Kronecker factor; the same class serves ``A`` and ``G``.

Between two optimizer steps the hooks add raw sums ``S = Σ_rows r rᵀ`` (in the factor's dtype:
float32, or float64 for a float64 layer) of factor
rows ``r``, together with the number of rows and of samples they came from. At the step the
window's statistic is

    A = S / rows                      (domain side: the mean of ``a aᵀ`` over rows)
    G = c² S / samples                (co-domain side, ``c = samples`` for a mean-reduced loss,
                                       ``c = 1`` for a sum-reduced one)

i.e. ``G`` is the mean over samples of ``g gᵀ`` with ``g = c · dL/dy`` the gradient of each
sample's own loss term (summed over locations for a convolution). A module called ``r``
times in one forward pass (shared weights, recurrent use) adds ``r`` batches of rows per
sample: its calls are treated like locations, so ``samples`` is divided by ``r``. Several
backward passes before one step (gradient accumulation, each micro-batch loss divided by
their number) are one window: their sums and counts add up. The statistic then enters an
exponential moving average ``F ← decay·F + (1 − decay)·stat``; the first accepted statistic
sets ``F``. With the decay warm-up, the ``k``-th accepted statistic enters with weight
``max(1/k, 1 − decay)`` instead, i.e. ``F`` is the plain mean of the statistics so far until
``1 − 1/k`` reaches ``decay`` (the decay ``min(1 − 1/k, decay)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RunningFactor"]


class RunningFactor:
    """Exponential moving average of a second-moment matrix, fed window by window.

    Args:
        blocks, size: the factor is ``(blocks, size, size)`` (or ``(blocks, size)`` when
            ``diagonal``: only the diagonal is accumulated and stored).
        per_sample_scale: False for ``A`` (normalise by rows); True for ``G`` (the rows are
            loss gradients; normalise as the module docstring says).
        device: where the factor lives (the layer's parameters' device).
        dtype: the factor's dtype (float32 by default; float64 for float64 layers).
    """

    def __init__(
        self,
        blocks: int,
        size: int,
        *,
        diagonal: bool = False,
        per_sample_scale: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (blocks, size) if diagonal else (blocks, size, size)
        self.diagonal = diagonal
        self.per_sample_scale = per_sample_scale
        self.value = torch.zeros(shape, device=device, dtype=dtype)
        self.folds = torch.zeros((), dtype=torch.long, device=device)  # accepted windows
        self._sum = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = 0
        self.samples = 0
        self.calls = 0

    @property
    def initialized(self) -> Tensor:
        """Whether a statistic has been accepted yet (a bool tensor; no host sync)."""
        return self.folds > 0

    @property
    def pending(self) -> bool:
        """Whether statistics were added since the last :meth:`fold` or :meth:`discard`."""
        return self.rows > 0

    def add(self, rows: Tensor, samples: int) -> None:
        """Add factor rows ``(blocks, n, size)`` from ``samples`` samples (no host sync)."""
        if self.diagonal:
            self._sum.add_(rows.square().sum(1))
        else:
            self._sum.baddbmm_(rows.mT, rows)
        self.rows += rows.shape[1]
        self.samples += samples
        self.calls += 1

    def statistic(self, reduction: str = "mean", calls_per_forward: int = 1) -> Tensor:
        """The window's statistic (see the module docstring); ``reduction`` is the loss's,
        ``calls_per_forward`` how often the module ran in each forward pass."""
        if not self.per_sample_scale:
            return self._sum / self.rows
        samples = self.samples / calls_per_forward
        if reduction == "mean":
            return self._sum * samples
        return self._sum / samples

    def fold(self, statistic: Tensor, decay: float, accept: Tensor, warmup: bool = False) -> None:
        """Move the average towards ``statistic`` where ``accept`` (a bool tensor) holds;
        ``warmup`` turns on the decay warm-up of the module docstring.

        Rejected windows leave ``value`` untouched; nothing here reads a value to the host.
        """
        # the weight of the new statistic: 1 for the first, 1 - decay after (or, warming
        # up, max(1/k, 1 - decay) for the k-th), 0 if rejected
        if warmup:
            weight = (1.0 / (self.folds + 1)).clamp(min=1.0 - decay) * accept
        else:
            weight = torch.where(self.initialized, 1.0 - decay, 1.0) * accept
        weight = weight.to(self.value.dtype)
        # a rejected (possibly non-finite) statistic is replaced before it meets the weight
        self.value = torch.lerp(self.value, torch.where(accept, statistic, self.value), weight)
        self.folds = self.folds + accept.long()
        self.discard()

    def discard(self) -> None:
        """Forget the statistics added since the last fold."""
        self._sum.zero_()
        self.rows = 0
        self.samples = 0
        self.calls = 0

    def state_dict(self) -> dict[str, Tensor]:
        return {"value": self.value, "folds": self.folds}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.value = state["value"].to(self.value)
        # states saved before ``folds`` existed carry only whether the factor was initialised
        folds = state["folds"] if "folds" in state else state["initialized"].long()
        self.folds = folds.to(self.folds)
        self.discard()
