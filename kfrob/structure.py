"""Factor structures: what one side of a layer's curvature costs, and a cheaper one.

A *dense* side ``M`` (``(k, n, n)``) costs ``2·n·n·m`` flops to apply to a ``(k, n, m)``
gradient matrix on every step and a decomposition of ``O(n³)`` per refresh. The
**low-rank-plus-identity** structure keeps the ``r`` leading eigenpairs ``(U, e)`` of ``M``
and one scaled identity for the rest of the spectrum:

    M̃ = U diag(e) Uᵀ + σ (I − U Uᵀ),        σ = (tr M − Σ e) / (n − r),

so ``tr M̃ = tr M`` and ``M̃ = M`` whenever ``rank M ≤ r``. Its damped power is again of that
form,

    (M̃ + d I)^{-p} = s (I + U diag(w) Uᵀ),   s = (σ + d)^{-p},   w = (e + d)^{-p} / s − 1,

and costs ``4·n·r·m`` flops to apply. The first refresh finds the leading eigenpairs of the
dense factor (:func:`leading_eigenpairs`: by randomized subspace iteration for a wide side,
``O(n²·r)``, else by ``eigh``). After it a low-rank side is not held as a matrix at all,
only as the sketch ``M U`` (:class:`kfrob.factors.SketchedFactor`), and each refresh is a
Nyström approximation from that sketch (:func:`nystrom`, ``O(n·r²)``) instead of an
eigendecomposition.

:func:`choose_structure` is the per-side cost model that picks dense or low-rank, and says
why. Everything here is pure math on tensors with a leading block dimension ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kfrob.finite import all_finite

__all__ = [
    "BlockDiagonalPower",
    "DiagonalPower",
    "LowRankPower",
    "LowRankSide",
    "SideOperator",
    "StructureChoice",
    "apply_left",
    "apply_right",
    "choose_structure",
    "leading_eigenpairs",
    "low_rank_power",
    "nystrom",
    "randomized_eigenpairs",
    "split_parts",
]

Structure = Literal["auto", "dense", "low_rank", "block_diagonal"]


@dataclass
class LowRankSide:
    """``U diag(e) Uᵀ + σ (I − U Uᵀ)``: ``basis`` ``(k, n, r)`` with orthonormal columns,
    ``eigenvalues`` ``(k, r)`` ascending, ``rest`` ``σ`` ``(k, 1)``."""

    basis: Tensor
    eigenvalues: Tensor
    rest: Tensor

    def dense(self) -> Tensor:
        """The approximation as a ``(k, n, n)`` matrix (for tests and inspection)."""
        n = self.basis.shape[-2]
        eye = torch.eye(n, dtype=self.basis.dtype, device=self.basis.device)
        spread = self.basis * (self.eigenvalues - self.rest)[..., None, :]
        return spread @ self.basis.mT + self.rest[..., None] * eye


@dataclass
class LowRankPower:
    """``s (I + U diag(w) Uᵀ)``: a damped power of a :class:`LowRankSide`; ``basis``
    ``(k, n, r)``, ``weights`` ``(k, r)``, ``scale`` ``(k, 1)``, and the side's
    ``eigenvalues`` ``(k, r)`` (the sketched factor restarts from them)."""

    basis: Tensor
    weights: Tensor
    scale: Tensor
    eigenvalues: Tensor

    def left(self, matrix: Tensor) -> Tensor:
        """``P V`` for ``V`` ``(k, n, m)`` (one fused ``V + U (w ⊙ UᵀV)``, then ``s``)."""
        inner = self.weights[..., None] * (self.basis.mT @ matrix)
        return torch.baddbmm(matrix, self.basis, inner).mul_(self.scale[..., None])

    def right(self, matrix: Tensor, in_place: bool = False) -> Tensor:
        """``V P`` for ``V`` ``(k, m, n)`` (with ``in_place``, written into ``V``)."""
        inner = (matrix @ self.basis) * self.weights[..., None, :]
        out = matrix if in_place else None
        return torch.baddbmm(matrix, inner, self.basis.mT, out=out).mul_(self.scale[..., None])

    def dense(self) -> Tensor:
        n = self.basis.shape[-2]
        eye = torch.eye(n, dtype=self.basis.dtype, device=self.basis.device)
        return self.scale[..., None] * (
            eye + (self.basis * self.weights[..., None, :]) @ self.basis.mT
        )

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}_{key}": getattr(self, key) for key in _LOW_RANK_KEYS}

    @classmethod
    def from_state(cls, state: dict[str, Any], prefix: str, device: torch.device) -> LowRankPower:
        return cls(*(state[f"{prefix}_{key}"].to(device) for key in _LOW_RANK_KEYS))


_LOW_RANK_KEYS = ("basis", "weights", "scale", "eigenvalues")


@dataclass
class DiagonalPower:
    """``diag(values)``, ``values`` ``(k, n)``: a damped power of a diagonal side."""

    values: Tensor

    def left(self, matrix: Tensor) -> Tensor:
        return self.values[..., :, None] * matrix

    def right(self, matrix: Tensor, in_place: bool = False) -> Tensor:
        """``V P`` for ``V`` ``(k, m, n)`` (with ``in_place``, written into ``V``)."""
        return (
            matrix.mul_(self.values[..., None, :])
            if in_place
            else matrix * self.values[..., None, :]
        )

    def dense(self) -> Tensor:
        return torch.diag_embed(self.values)

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}_diagonal": self.values}

    @classmethod
    def from_state(cls, state: dict[str, Any], prefix: str, device: torch.device) -> DiagonalPower:
        return cls(state[f"{prefix}_diagonal"].to(device))


def split_parts(matrix: Tensor, part: int) -> Tensor:
    """The rows of ``matrix`` ``(k, size, m)`` in parts of ``part``: ``(k · ⌈size / part⌉,
    part, m)``, the last part zero-padded."""
    k, size, m = matrix.shape
    count = -(-size // part)
    padded = torch.nn.functional.pad(matrix, (0, 0, 0, count * part - size))
    return padded.reshape(k * count, part, m)


@dataclass
class BlockDiagonalPower:
    """``blockdiag(P_1, …, P_parts)``: a damped power of a block-diagonal side, ``parts``
    ``(k · parts, part, part)`` for a side of width ``size`` (the last part padded: the
    padding's rows and columns never meet the gradient's entries). Applying it costs
    ``2·n·part·m`` flops instead of ``2·n²·m``."""

    parts: Tensor
    size: int

    @property
    def count(self) -> int:
        """Parts per block of the layer: ``⌈size / part⌉``."""
        return -(-self.size // self.parts.shape[-1])

    def left(self, matrix: Tensor) -> Tensor:
        """``P V`` for ``V`` ``(k, n, m)``."""
        k = matrix.shape[0]
        product = (self.parts @ split_parts(matrix, self.parts.shape[-1])).reshape(
            k, -1, matrix.shape[-1]
        )
        return product[:, : self.size].contiguous()  # as dense products are: same rounding

    def right(self, matrix: Tensor, in_place: bool = False) -> Tensor:
        """``V P`` for ``V`` ``(k, m, n)`` (``P`` is symmetric: ``(P Vᵀ)ᵀ``; always a new
        tensor, ``in_place`` or not)."""
        return self.left(matrix.mT).mT.contiguous()

    def dense(self) -> Tensor:
        part = self.parts.shape[-1]
        per_block = self.parts.reshape(-1, self.count, part, part)
        blocks = [torch.block_diag(*p) for p in per_block]
        return torch.stack(blocks)[:, : self.size, : self.size]

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}_parts": self.parts, f"{prefix}_size": torch.tensor(self.size)}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], prefix: str, device: torch.device
    ) -> BlockDiagonalPower:
        return cls(state[f"{prefix}_parts"].to(device), int(state[f"{prefix}_size"]))


#: one side of a factored inverse: a dense matrix ``(k, n, n)``, a structured operator, or
#: ``None`` for the identity
SideOperator = Tensor | LowRankPower | DiagonalPower | BlockDiagonalPower | None


def apply_left(side: SideOperator, matrix: Tensor) -> Tensor:
    """``P V`` for a side operator ``P`` (the co-domain side)."""
    if side is None:
        return matrix
    if isinstance(side, Tensor):
        return side @ matrix
    return side.left(matrix)


def apply_right(matrix: Tensor, side: SideOperator, in_place: bool = False) -> Tensor:
    """``V P`` for a side operator ``P`` (the domain side); with ``in_place`` a structured
    side may write it into ``V`` (which the caller owns)."""
    if side is None:
        return matrix
    if isinstance(side, Tensor):
        return matrix @ side
    return side.right(matrix, in_place)


#: the randomized range finder's extra columns and power iterations (Halko, Martinsson and
#: Tropp 2011), and the narrowest side it serves (``docs/performance.md#refresh-cost``)
OVERSAMPLING = 16
POWER_ITERATIONS = 4
RANDOMIZED_MIN_WIDTH = 512


def leading_eigenpairs(factor: Tensor, rank: int) -> LowRankSide | None:
    """The ``rank`` leading eigenpairs of a symmetric PSD ``factor`` ``(k, n, n)`` and the
    trace-keeping ``σ`` of the rest (``rank < n``).

    A side at least :data:`RANDOMIZED_MIN_WIDTH` wide and four times the sketch width gets
    :func:`randomized_eigenpairs`; otherwise (or if that fails) ``torch.linalg.eigh``,
    retried once in float64 with a jitter of ``1e-6·mean(diag)``, as for dense sides.
    Returns ``None`` if every attempt fails or gives non-finite values."""
    trace = torch.diagonal(factor, dim1=-2, dim2=-1).sum(-1, keepdim=True)
    n = factor.shape[-1]
    if n >= RANDOMIZED_MIN_WIDTH and 4 * (rank + OVERSAMPLING) <= n:
        side = randomized_eigenpairs(factor, rank, trace)
        if side is not None:
            return side
    for matrix in (factor, None):
        if matrix is None:  # the retry
            eye = torch.eye(n, dtype=torch.float64, device=factor.device)
            jitter = 1e-6 * trace.double() / n + 1e-12
            matrix = factor.double() + jitter[..., None] * eye
        try:
            values, vectors = torch.linalg.eigh(matrix)
        except RuntimeError:  # torch.linalg.LinAlgError is one
            continue
        values, vectors = values.to(factor.dtype), vectors.to(factor.dtype)
        side = _side(vectors[..., -rank:], values[..., -rank:], trace, n)
        if side is not None:
            return side
    return None


def randomized_eigenpairs(factor: Tensor, rank: int, trace: Tensor) -> LowRankSide | None:
    """The ``rank`` leading eigenpairs of a symmetric PSD ``factor`` ``(k, n, n)`` by
    randomized subspace iteration: ``Q`` an orthonormal basis of ``F^{q+1} Ω`` for a
    Gaussian ``Ω`` ``(k, n, rank + OVERSAMPLING)`` (re-orthonormalised after each product),
    then the Nyström approximation from the sketch ``F Q`` (:func:`nystrom`). Exact when
    ``rank F ≤ rank + OVERSAMPLING``; otherwise each iteration sharpens the leading
    subspace by the eigenvalue ratios. ``Ω`` comes from a fixed seed, so every rank of a
    data-parallel job finds the same pairs for the same factor. Costs ``O(q·n²·r)``;
    ``None`` on failure or non-finite values."""
    n, width = factor.shape[-1], min(rank + OVERSAMPLING, factor.shape[-1])
    generator = torch.Generator(device=factor.device).manual_seed(0)
    omega = torch.randn(
        factor.shape[0], n, width, generator=generator, device=factor.device,
        dtype=factor.dtype,
    )  # fmt: skip
    try:
        basis = torch.linalg.qr(factor @ omega).Q
        for _ in range(POWER_ITERATIONS):
            basis = torch.linalg.qr(factor @ basis).Q
    except RuntimeError:
        return None
    return nystrom(basis, factor @ basis, trace, rank)


def nystrom(basis: Tensor, sketch: Tensor, trace: Tensor, rank: int) -> LowRankSide | None:
    """The Nyström approximation ``F̂ = Y (QᵀY)⁺ Yᵀ`` of a symmetric PSD ``F`` from its
    sketch ``Y = F Q`` ``(k, n, r)`` on an orthonormal ``basis`` ``Q``, as a
    :class:`LowRankSide` whose ``σ`` keeps ``trace`` ``(k, 1)``.

    With ``QᵀY = V diag(m) Vᵀ`` and ``B = Y V diag(m)^{-1/2}`` (``m`` above a relative
    round-off floor; the rest dropped), ``F̂ = B Bᵀ``, whose eigenpairs are the left singular
    vectors and squared singular values of ``B``. ``F̂ = F`` whenever ``rank F ≤ r`` and
    ``QᵀFQ`` has ``F``'s rank. Costs ``O(n·r²)``. Returns ``None`` if anything is
    non-finite."""
    try:
        core = basis.mT @ sketch
        m, v = torch.linalg.eigh((core + core.mT) / 2)
        floor = m[..., -1:].clamp(min=0) * (m.shape[-1] * torch.finfo(m.dtype).eps) + 1e-30
        inverse_root = torch.where(m > floor, m.clamp(min=floor.min()).rsqrt(), 0.0)
        u, singular, _ = torch.linalg.svd(
            (sketch @ v) * inverse_root[..., None, :], full_matrices=False
        )
    except RuntimeError:
        return None
    return _side(u.flip(-1), singular.square().flip(-1), trace, basis.shape[-2], rank)


def _side(
    basis: Tensor, eigenvalues: Tensor, trace: Tensor, n: int, rank: int | None = None
) -> LowRankSide | None:
    """The leading ``rank`` of ascending eigenpairs and ``σ`` keeping ``trace``, or ``None``
    if non-finite."""
    if rank is not None:
        basis, eigenvalues = basis[..., -rank:], eigenvalues[..., -rank:]
    if not bool(all_finite([basis, eigenvalues, trace])):
        return None
    eigenvalues = eigenvalues.clamp(min=0)
    rest = ((trace - eigenvalues.sum(-1, keepdim=True)) / (n - basis.shape[-1])).clamp(min=0)
    return LowRankSide(basis.contiguous(), eigenvalues, rest)


def low_rank_power(side: LowRankSide, shift: Tensor, exponent: float) -> LowRankPower:
    """``(M̃ + d I)^{-p}`` of a :class:`LowRankSide` with per-block shift ``d`` ``(k, 1)``."""
    scale = (side.rest + shift).pow(-exponent)
    weights = (side.eigenvalues + shift).pow(-exponent) / scale - 1.0
    return LowRankPower(side.basis, weights, scale, side.eigenvalues)


@dataclass(frozen=True)
class StructureChoice:
    """What one side of a layer got, and why."""

    structure: Literal["dense", "low_rank", "block_diagonal"]
    reason: str


def choose_structure(
    requested: Structure,
    size: int,
    other: int,
    rows: int,
    rank: int,
    budget: float,
    inverse_update_freq: int,
    factor_update_freq: int = 1,
) -> StructureChoice:
    """The structure of a side of width ``size`` whose gradient matrix has ``other`` columns
    (or rows) besides, for a layer that saw ``rows`` factor rows per step.

    A ``rank`` not below the width makes the side dense (the exact limit of low-rank). An
    explicit request is kept otherwise. ``"auto"`` weighs the per-step cost of a dense side
    (its statistics, ``2·rows·size²`` flops every ``factor_update_freq`` steps, its
    application, ``2·size²·other``, and a decomposition of ``~size³`` every
    ``inverse_update_freq`` steps) against ``budget`` times the layer's own forward and
    backward pass (``6·rows·size·other`` flops): dense within the budget, low-rank above it
    — unless ``rank`` is at least half the width (then low-rank saves nothing) or no rows
    were seen yet (then dense, until the next refresh knows the batch)."""
    if rank >= size:
        return StructureChoice("dense", f"rank {rank} ≥ width {size}: dense is exact")
    if requested != "auto":
        return StructureChoice(requested, "requested")
    if 2 * rank >= size:
        return StructureChoice("dense", f"rank {rank} is at least half of width {size}")
    if rows <= 0:
        return StructureChoice("dense", "no rows seen yet")
    statistics = 2 * rows * size * size / factor_update_freq
    dense = statistics + 2 * size * size * other + size**3 / inverse_update_freq
    layer = 6 * rows * size * other
    ratio = dense / layer
    if ratio <= budget:
        return StructureChoice("dense", f"dense costs {ratio:.2f}× the layer's pass ≤ {budget:g}")
    return StructureChoice(
        "low_rank", f"dense would cost {ratio:.2f}× the layer's pass > {budget:g}"
    )
