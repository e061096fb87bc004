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

from typing import Any

import torch
from torch import Tensor

from kfrob.options import InverseOptions
from kfrob.structure import nystrom, split_parts

__all__ = ["BlockDiagonalFactor", "RunningFactor", "SketchedFactor", "factor_for", "sketch_of"]


class RunningFactor:
    """Exponential moving average of a second-moment matrix, fed window by window.

    Args:
        blocks, size: the factor is ``(blocks, size, size)`` (or ``(blocks, size)`` when
            ``diagonal``: only the diagonal is accumulated and stored).
        per_sample_scale: False for ``A`` (normalise by rows); True for ``G`` (the rows are
            loss gradients; normalise as the module docstring says).
        per_step: the window's statistic is the mean of its adds instead (a factor fed once
            a step, from the gradient matrices: :mod:`kfrob.sources`).
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
        per_step: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (blocks, size) if diagonal else (blocks, size, size)
        self.diagonal = diagonal
        self.per_sample_scale = per_sample_scale
        self.per_step = per_step
        #: what the moving average runs over (the factor itself, for this class)
        self.average = torch.zeros(shape, device=device, dtype=dtype)
        self.folds = torch.zeros((), dtype=torch.long, device=device)  # accepted windows
        self._sum = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = 0
        self.samples = 0
        self.calls = 0
        #: rows of the last window that recorded any (what a step costs the layer; 0: none yet)
        self.rows_per_window = 0

    @property
    def value(self) -> Tensor:
        """The factor ``(blocks, size, size)`` (``(blocks, size)`` when diagonal)."""
        return self.average

    def trace(self) -> Tensor:
        """``tr F`` per block, ``(blocks, 1)``."""
        diagonal = self.average if self.diagonal else self.average.diagonal(dim1=-2, dim2=-1)
        return diagonal.sum(-1, keepdim=True)

    def zero_statistic(self) -> Tensor:
        """A statistic of zeros (what a rank that recorded nothing contributes)."""
        return torch.zeros_like(self._sum)

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
            self.add_square_sums(rows.square().sum(1), rows.shape[1], samples)
            return
        self._sum.baddbmm_(rows.mT, rows)
        self.rows += rows.shape[1]
        self.samples += samples
        self.calls += 1

    def add_inputs(self, math: Any, x: Tensor, samples: int) -> None:
        """Add the domain rows of a layer's input ``x`` (``math`` its
        :class:`~kfrob.layers.LayerMath`), in the cheapest form this factor keeps: only
        their squares for a diagonal one."""
        if self.diagonal:  # no rows needed: their squares (rows may be sparse, e.g. one-hot)
            self.add_square_sums(*math.input_square_sums(x), samples)
        else:
            self.add(math.input_rows(x), samples)

    def add_square_sums(self, sums: Tensor, rows: int, samples: int) -> None:
        """Add ``Σ_rows r²`` ``(blocks, size)`` of ``rows`` rows from ``samples`` samples to a
        diagonal factor (for layers whose rows are sparse, e.g. one-hot)."""
        self._sum.add_(sums)
        self.rows += rows
        self.samples += samples
        self.calls += 1

    def statistic(self, reduction: str = "mean", calls_per_forward: int = 1) -> Tensor:
        """The window's statistic (see the module docstring); ``reduction`` is the loss's,
        ``calls_per_forward`` how often the module ran in each forward pass."""
        if self.per_step:
            return self._sum / self.calls
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
        weight = weight.to(self.average.dtype)
        # a rejected (possibly non-finite) statistic is replaced before it meets the weight
        average = self.average
        self.average = torch.lerp(average, torch.where(accept, statistic, average), weight)
        self.folds = self.folds + accept.long()
        self.rows_per_window = self.rows or self.rows_per_window
        self.discard()

    def discard(self) -> None:
        """Forget the statistics added since the last fold."""
        self._sum.zero_()
        self.rows = 0
        self.samples = 0
        self.calls = 0

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "value": self.average,
            "folds": self.folds,
            "rows": torch.tensor(self.rows_per_window),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.average = state["value"].to(self.average)
        # states saved before ``folds`` existed carry only whether the factor was initialised
        folds = state["folds"] if "folds" in state else state["initialized"].long()
        self.folds = folds.to(self.folds)
        self.rows_per_window = int(state["rows"]) if "rows" in state else 0
        self.discard()


class BlockDiagonalFactor(RunningFactor):
    """A running factor ``F`` ``(blocks, size, size)`` of which only the diagonal blocks are
    kept: ``parts = ⌈size / max_block⌉`` blocks of width ``part = ⌈size / parts⌉`` (the last
    one padded with zero coordinates, which no gradient entry meets), held as
    ``(blocks · parts, part, part)``: ``size·part`` numbers instead of ``size²``.

    The hooks add each part's ``rᵀ r`` (``size·part`` flops a row instead of ``size²``); the
    window's statistic is scaled and averaged exactly as a dense one, so the parts stay the
    diagonal blocks of the dense factor. Its trace is the dense factor's.
    """

    def __init__(
        self,
        blocks: int,
        size: int,
        max_block: int,
        *,
        per_sample_scale: bool = False,
        per_step: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.part = -(-size // -(-size // max_block))  # balanced parts of at most max_block
        self.parts = -(-size // self.part)
        self.size, self.layer_blocks = size, blocks
        super().__init__(
            blocks * self.parts, self.part, per_sample_scale=per_sample_scale,
            per_step=per_step, device=device, dtype=dtype,
        )  # fmt: skip
        #: why the side is block-diagonal (shown by ``KroneckerPreconditioner.structures``)
        self.reason = f"requested: {self.parts} blocks of width {self.part}"

    def add(self, rows: Tensor, samples: int) -> None:
        """Add rows ``(blocks, n, size)``, split into parts ``(blocks · parts, n, part)``."""
        super().add(split_parts(rows.mT, self.part).mT, samples)

    def trace(self) -> Tensor:
        """``tr F`` per layer block, ``(blocks, 1)``."""
        return super().trace().reshape(self.layer_blocks, self.parts).sum(-1, keepdim=True)

    @property
    def value(self) -> Tensor:
        """The block-diagonal matrix ``(blocks, size, size)`` (for inspection; the
        preconditioner works on the parts)."""
        parts = self.average.reshape(self.layer_blocks, self.parts, self.part, self.part)
        dense = torch.stack([torch.block_diag(*layer_parts) for layer_parts in parts])
        return dense[:, : self.size, : self.size]


class SketchedFactor(RunningFactor):
    """A running factor ``F`` held as its sketch ``Y = F Q`` on an orthonormal basis ``Q``
    ``(blocks, size, rank)``, and its trace: ``size·rank`` numbers instead of ``size²``.

    The hooks add ``rᵀ (r Q)`` and ``‖r‖²`` per row ``r`` (``2·size·rank`` flops a row
    instead of ``size²``), and the window's statistic is scaled and averaged exactly as a
    dense one, so ``Y`` stays ``F Q`` for the ``F`` the dense average would hold since the
    last :meth:`restart`. A refresh turns ``(Q, Y)`` into ``F``'s Nyström approximation
    (:func:`kfrob.structure.nystrom`) and restarts from its leading eigenvectors ``U`` and
    eigenvalues ``e``: ``Q ← U``, ``Y ← U diag(e)``. The moving average runs over
    ``[Y; tr F]`` packed as ``(blocks, size + 1, rank)`` (the trace in the last row's first
    column).
    """

    def __init__(self, dense: RunningFactor, basis: Tensor, eigenvalues: Tensor) -> None:
        blocks, size, rank = basis.shape
        self.diagonal = False
        self.per_sample_scale = dense.per_sample_scale
        self.per_step = dense.per_step
        self.average = basis.new_zeros(blocks, size + 1, rank)
        self.average[:, -1, :1] = dense.trace()
        self.restart(basis, eigenvalues)
        self.folds = dense.folds.clone()
        self._sum = torch.zeros_like(self.average)
        self.rows, self.samples, self.calls = dense.rows, dense.samples, dense.calls
        self.rows_per_window = dense.rows_per_window
        #: why the side is low-rank (shown by ``KroneckerPreconditioner.structures``)
        self.reason = "held as a sketch"
        if dense.pending:  # a window in flight: its rows are sketched from here on
            self.discard()

    @property
    def basis(self) -> Tensor:
        return self._basis

    @property
    def sketch(self) -> Tensor:
        """``Y = F Q``, ``(blocks, size, rank)``."""
        return self.average[:, :-1]

    def trace(self) -> Tensor:
        return self.average[:, -1, :1]

    @property
    def value(self) -> Tensor:
        """``F``'s Nyström approximation with the rest of its trace spread evenly, as a
        dense matrix (for inspection; the preconditioner never forms it)."""
        side = nystrom(self.basis, self.sketch, self.trace(), self.basis.shape[-1])
        size = self.basis.shape[-2]
        if side is None:  # a non-finite sketch: shown as such
            return self.basis.new_full((self.basis.shape[0], size, size), torch.nan)
        return side.dense()

    def restart(self, basis: Tensor, eigenvalues: Tensor) -> None:
        """Sketch on ``basis`` from now on, with ``Y = basis · diag(eigenvalues)``."""
        self._basis = basis
        self.average[:, :-1] = basis * eigenvalues[..., None, :]

    def add_inputs(self, math: Any, x: Tensor, samples: int) -> None:
        """Add a layer input's rows as their products with the basis, formed by the layer
        (:meth:`~kfrob.layers.LayerMath.input_sketch`: no unfolded rows for a convolution)."""
        self.add_products(*math.input_sketch(x, self._basis), samples)

    def add(self, rows: Tensor, samples: int) -> None:
        self._sum[:, :-1].baddbmm_(rows.mT, rows @ self._basis)
        self.add_products(None, rows.square().sum((1, 2)), rows.shape[1], samples)

    def add_products(
        self, products: Tensor | None, squares: Tensor, rows: int, samples: int
    ) -> None:
        """Add ``Σ r (rQ)ᵀ`` ``(blocks, size, rank)`` (``None``: added already) and
        ``Σ ‖r‖²`` ``(blocks,)`` of ``rows`` rows from ``samples`` samples."""
        if products is not None:
            self._sum[:, :-1] += products
        self._sum[:, -1, 0] += squares
        self.rows += rows
        self.samples += samples
        self.calls += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {**super().state_dict(), "basis": self._basis}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._basis = state["basis"].to(self._basis)
        super().load_state_dict(state)


def factor_for(
    math: Any, side: str, metric: str, options: InverseOptions, per_step: bool = False
) -> RunningFactor | None:
    """The running factor of one side (``"domain"`` or ``"codomain"``) of a layer (``math``
    its :class:`~kfrob.layers.LayerMath`) whose metric on that side is ``metric``
    (``"identity"``: none; ``"diagonal"``; or the full one), in the structure ``options``
    ask for: diagonal (also for a layer whose domain is diagonal by nature, an embedding's),
    block-diagonal where a side asked to be is wider than one block, else dense. The one
    place a factor's structure is decided; :func:`sketch_of` makes a dense one low-rank."""
    if metric == "identity":
        return None
    codomain = side == "codomain"
    size = math.out_features if codomain else math.in_features
    diagonal = metric == "diagonal" or (math.diagonal_domain and not codomain)
    structure = getattr(options, f"{side}_structure")
    scale = {"per_sample_scale": codomain, "per_step": per_step}
    place = {"device": math.device, "dtype": math.factor_dtype}
    if not diagonal and structure == "block_diagonal" and size > options.max_block_size:
        return BlockDiagonalFactor(math.blocks, size, options.max_block_size, **scale, **place)
    return RunningFactor(math.blocks, size, diagonal=diagonal, **scale, **place)


def sketch_of(
    factor: RunningFactor, basis: Tensor, eigenvalues: Tensor, reason: str
) -> SketchedFactor:
    """``factor`` held as a sketch on ``basis`` from now on (a low-rank side), saying why."""
    sketch = SketchedFactor(factor, basis, eigenvalues)
    sketch.reason = reason
    return sketch
