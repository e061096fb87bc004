"""Eigenvalue correction (EKFAC, George et al. 2018): per-sample second moments in the
Kronecker eigenbasis.

K-FAC with exact damping scales a gradient matrix ``V`` ``(k, out, in)`` in the eigenbases
``Q_A``, ``Q_G`` of its factors by ``(e_G e_Aᵀ + λ)^{-p}``. EKFAC keeps the bases of the last
eigendecomposition and replaces ``e_G e_Aᵀ`` by the second moment of per-sample gradients in
them,

    S = mean over samples n of (Q_Gᵀ U_n Q_A)²          (elementwise square, (k, out, in))

where ``U_n = Σ_l g_{n,l} a_{n,l}ᵀ`` is sample ``n``'s gradient matrix of its own loss term,
summed over the locations ``l`` of a convolution (one location for ``nn.Linear``), with
``a`` the layer's domain rows and ``g = c · dL/dy`` normalised exactly like the rows of
``G`` (:mod:`kfrob.factors`): a window's raw sum ``R = Σ_n (Q_Gᵀ U_n^{raw} Q_A)²`` becomes
``S = c² R / samples`` (``c = samples`` for a mean-reduced loss, 1 for a sum), a module
called ``r`` times per forward counts its calls like locations of *different* samples (each
call's per-sample gradient is squared on its own and ``samples`` is divided by ``r``, the
same cross-call approximation ``G`` makes), and a loss scale is removed as from ``G``.

Computationally, with projected rows ``ã = Q_Aᵀ a`` and ``g̃ = Q_Gᵀ g`` (held as row vectors,
``rows @ Q``), ``Q_Gᵀ U_n Q_A = g̃_nᵀ ã_n`` for the ``(locations, ·)`` row blocks of sample
``n``: a batched ``(k·samples, out, L) @ (k·samples, L, in)`` product, squared and summed over
samples (a transient of ``k · samples · out · in`` elements). For one location per sample
(``nn.Linear``) ``U_n`` has rank one and ``Σ_n (g̃_n ã_nᵀ)² = (g̃²)ᵀ ã²``: one matmul.

``S`` is a running average like the factors (:class:`~kfrob.factors.RunningFactor`, whose
statistic, fold, NaN rules and state it reuses). At each eigendecomposition refresh it
restarts from K-FAC's ``e_G e_Aᵀ`` in the new bases, so that right after a refresh the step
is K-FAC's, and it inherits ``G``'s count of folded windows, so that the decay (and its
warm-up) continue the factors' schedule. The preconditioner's scaling is ``(S + λ)^{-p}``,
recomputed on device whenever ``S`` changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfrob.factors import RunningFactor
from kfrob.kronecker import EigenInverse

__all__ = ["EigenbasisMoment"]


class EigenbasisMoment(RunningFactor):
    """The running ``S`` of one layer, ``(blocks, out, in)``, with the bases it lives in.

    Nothing is recorded until :meth:`restart` has given it bases (the layer's first
    eigendecomposition); ``damping`` and ``exponent`` are the ``λ`` and ``p`` of that
    refresh, used by :meth:`scaling` until the next one.
    """

    def __init__(
        self, blocks: int, out_features: int, in_features: int, device: torch.device | None,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__(blocks, out_features, per_sample_scale=True, device=device, dtype=dtype)
        self.average = torch.zeros(blocks, out_features, in_features, device=device, dtype=dtype)
        self._sum = torch.zeros_like(self.average)
        self.codomain_basis: Tensor | None = None
        self.domain_basis: Tensor | None = None
        self.damping = 0.0
        self.exponent = 1.0

    @property
    def ready(self) -> bool:
        """Whether bases exist, i.e. whether windows are recorded."""
        return self.domain_basis is not None and self.codomain_basis is not None

    def project_inputs(self, rows: Tensor) -> Tensor:
        """Domain rows ``(k, rows, in)`` in the domain eigenbasis (``a ↦ Q_Aᵀ a``)."""
        assert self.domain_basis is not None
        return rows @ self.domain_basis

    def add(self, rows: Tensor, samples: int) -> None:
        raise TypeError("EigenbasisMoment takes paired rows: use add_pair")

    def add_pair(self, projected_inputs: Tensor, output_rows: Tensor, samples: int) -> None:
        """Add ``Σ_n (Q_Gᵀ U_n Q_A)²`` for one forward call: ``projected_inputs``
        ``(k, samples·L, in)`` from :meth:`project_inputs`, ``output_rows``
        ``(k, samples·L, out)`` the raw co-domain rows of the same call (no host sync)."""
        assert self.codomain_basis is not None
        blocks, rows, size_in = projected_inputs.shape
        g = output_rows @ self.codomain_basis
        locations = max(rows // samples, 1)  # one row per sample or sequence (reduce)
        if locations == 1:  # rank-one U_n: Σ_n (g̃_n ã_nᵀ)² = (g̃²)ᵀ ã²
            self._sum.baddbmm_(g.square().mT, projected_inputs.square())
        else:
            size_out = g.shape[-1]
            g = g.reshape(blocks * samples, locations, size_out)
            a = projected_inputs.reshape(blocks * samples, locations, size_in)
            u = g.mT @ a  # (k·samples, out, in): each sample's projected gradient matrix
            self._sum.add_(u.square().reshape(blocks, samples, size_out, size_in).sum(1))
        self.rows += rows
        self.samples += samples
        self.calls += 1

    def restart(
        self, inverse: EigenInverse, folds: Tensor, damping: float, exponent: float
    ) -> None:
        """Take the bases of a new eigendecomposition and restart ``S`` from its
        ``e_G e_Aᵀ``; ``folds`` is ``G``'s count of accepted windows."""
        codomain, domain = inverse.codomain, inverse.domain
        self.codomain_basis, self.domain_basis = codomain.basis, domain.basis
        self.average = codomain.eigenvalues[..., :, None] * domain.eigenvalues[..., None, :]
        self.folds = folds.clone()
        self.discard()  # a window recorded in other bases would not fit these
        self.damping = damping
        self.exponent = exponent

    def scaling(self) -> Tensor:
        """The elementwise scaling ``(S + λ)^{-p}`` applied in the eigenbases."""
        return (self.value + self.damping).pow(-self.exponent)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            **super().state_dict(),
            "damping": torch.tensor(self.damping, dtype=torch.float64),
            "exponent": torch.tensor(self.exponent, dtype=torch.float64),
        }

    def load_state_dict(
        self, state: dict[str, Tensor], inverse: EigenInverse | None = None
    ) -> None:
        """Load ``S`` and take its bases from the layer's loaded ``inverse``."""
        super().load_state_dict(state)
        self.damping = float(state["damping"])
        self.exponent = float(state["exponent"])
        if inverse is None:
            self.codomain_basis = self.domain_basis = None
        else:
            self.codomain_basis, self.domain_basis = inverse.codomain.basis, inverse.domain.basis
