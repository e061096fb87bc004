"""The Kronecker-factored preconditioner: tracked layers, their factors and damped inverses.

For every supported layer it keeps a domain factor ``A`` and a co-domain factor ``G`` (or
neither for an identity side), refreshes their damped inverses on request, and maps a
layer's gradient matrix ``V`` (``(blocks, out, in)``, bias last) to its Riesz
representative in the chosen Frobenius-type metric, ``(A ⊗ G + λI)^{-p} vec(V)``.
It holds no optimizer bookkeeping (learning rates, momentum, step control): see
:class:`kfrob.FrobPreconditionedSGD`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kfrob.capture import CurvatureCapture, TrackedLayer, weak_callable
from kfrob.correction import EigenbasisMoment
from kfrob.distributed import Communicator, PendingAverage, assign_owners
from kfrob.factors import RunningFactor
from kfrob.finite import all_finite
from kfrob.fisher import SAMPLED_LOSSES
from kfrob.kronecker import (
    EigenInverse,
    InverseFactors,
    Side,
    decompose,
    decompose_all,
    eigen_scaling,
    factored_inverses,
    factored_powers,
)
from kfrob.layers import layer_math, unsupported_reason

__all__ = [
    "CODOMAINS",
    "DAMPING_METHODS",
    "DOMAINS",
    "EIGENBASIS_REFRESHES",
    "FISHERS",
    "INVERSE_PLACEMENTS",
    "LOSS_REDUCTIONS",
    "KroneckerPreconditioner",
    "RemoteInverse",
    "correction_conflict",
]

DOMAINS = ("covariance", "diagonal", "identity")
CODOMAINS = ("fisher", "diagonal", "identity")
DAMPING_METHODS = ("exact", "factored")
EIGENBASIS_REFRESHES = ("eigh", "subspace")
FISHERS = ("empirical", "mc")
LOSS_REDUCTIONS = ("mean", "sum")
INVERSE_PLACEMENTS = ("replicated", "owner")


@dataclass(frozen=True)
class RemoteInverse:
    """A layer's inverse held by another rank (``inverse_placement="owner"``)."""

    owner: int


Inverse = EigenInverse | InverseFactors | RemoteInverse


class KroneckerPreconditioner:
    """Kronecker factors of ``model``'s ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers.

    Args:
        model: the model; hooks go on its supported submodules.
        domain: ``"covariance"`` (``A``), ``"diagonal"`` (``diag A``) or ``"identity"``.
        codomain: ``"fisher"`` (``G``), ``"diagonal"`` (``diag G``) or ``"identity"``.
        exponent: ``p`` in ``(A ⊗ G + λI)^{-p}``: 1 for K-FAC, ½ for an inverse root.
        damping_method: ``"exact"`` (eigenbases, damps the Kronecker product) or
            ``"factored"`` (π-damping of each factor; Cholesky inverses when ``p = 1``).
        eigenbasis_refresh: how eigenbasis inverses (exact damping) are refreshed:
            ``"eigh"`` (a full eigendecomposition) or ``"subspace"`` (one step of subspace
            iteration from the previous basis, :func:`~kfrob.kronecker.subspace_step`; the
            first refresh of a layer is a full decomposition).
        weight_sharing: how a convolution's locations enter its factors: ``"expand"`` (as
            extra rows) or ``"reduce"`` (averaged/summed per sample); see
            :mod:`kfrob.layers`.
        fisher: ``"empirical"`` (gradients of the training loss) or ``"mc"`` (gradients of a
            loss with labels drawn from the model; needs ``loss``).
        loss: the training loss kind for ``fisher="mc"``: ``"cross_entropy"`` or ``"mse"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over samples.
        generator: random generator for the MC Fisher's labels.
        communicator: data-parallel collectives (:mod:`kfrob.distributed`), or ``None``
            for a single process. With one, the window statistics are averaged over ranks
            before they are folded, and each layer's decompositions run on one rank only.
        inverse_placement: with a communicator, ``"replicated"`` (every rank receives and
            keeps every layer's inverse and preconditions all layers itself; traffic only at
            refreshes) or ``"owner"`` (a layer's inverse stays on its owner, which
            preconditions that layer and broadcasts the result every step; less memory,
            more traffic).
        eigenvalue_correction: EKFAC (:mod:`kfrob.correction`): scale by ``(S + λ)^{-p}``
            with ``S`` the running second moment of per-sample gradients in the eigenbases
            of the last refresh, instead of ``(e_G e_Aᵀ + λ)^{-p}``. Needs
            ``damping_method="exact"``, ``domain="covariance"`` and ``codomain="fisher"``,
            and no communicator (``S`` is not averaged over ranks); ``ValueError``
            otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        domain: str = "covariance",
        codomain: str = "fisher",
        exponent: float = 1.0,
        damping_method: str = "factored",
        eigenbasis_refresh: str = "eigh",
        weight_sharing: str = "expand",
        fisher: str = "empirical",
        loss: str | None = None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
        communicator: Communicator | None = None,
        inverse_placement: str = "replicated",
        eigenvalue_correction: bool = False,
    ) -> None:
        if eigenvalue_correction:
            conflict = correction_conflict(damping_method, domain, codomain, communicator)
            if conflict is not None:
                raise ValueError(f"invalid eigenvalue_correction=True: expected {conflict}")
        self.eigenvalue_correction = eigenvalue_correction
        self.communicator = communicator
        self.inverse_placement = inverse_placement
        self._owners: dict[str, int] | None = None
        self._slots: dict[int, dict[str, int]] = {}
        self.domain = domain
        self.codomain = codomain
        self.exponent = exponent
        self.damping_method = damping_method
        self.eigenbasis_refresh = eigenbasis_refresh
        self.weight_sharing = weight_sharing
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.layers: dict[str, TrackedLayer] = {}
        self.unsupported: dict[str, str] = {}
        self.disabled: dict[str, str] = {}
        self.inverses: dict[str, Inverse] = {}
        self.skipped_windows = torch.zeros((), dtype=torch.long)
        self._collect_layers(model)
        sampled_loss = SAMPLED_LOSSES[loss] if fisher == "mc" and loss is not None else None
        self.capture = CurvatureCapture(model, self.layers.values(), sampled_loss, generator)
        # an early send of the statistics complete after the window's last DDP forward:
        # its pending average, its factors and their (rows, samples) when sent
        self._early: tuple[PendingAverage, list[tuple[RunningFactor, bool]], list] | None = None
        self._early_hooks: list[RemovableHandle] = []
        self._warned_late_rows = False

    # --- set-up --------------------------------------------------------------------------
    def _collect_layers(self, model: nn.Module) -> None:
        owners: dict[int, list[str]] = {}
        modules = list(model.named_modules())
        for name, module in modules:
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        for name, module in modules:
            if not list(module.parameters(recurse=False)):
                continue
            math = layer_math(module, self.weight_sharing)
            shared = sorted(
                {other for p in module.parameters(recurse=False) for other in owners[id(p)]}
                - {name}
            )
            label = name or type(module).__name__
            if math is None:
                self.unsupported[label] = str(unsupported_reason(module))
            elif shared:
                tied = ", ".join(other or type(model).__name__ for other in shared)
                self.unsupported[label] = f"its parameters are tied to {tied}"
            else:
                device = module.weight.device  # type: ignore[union-attr]
                self.layers[name] = TrackedLayer(
                    name,
                    module,
                    math,
                    self._factor(self.domain, math.blocks, math.in_features, False, device),
                    self._factor(self.codomain, math.blocks, math.out_features, True, device),
                    EigenbasisMoment(math.blocks, math.out_features, math.in_features, device)
                    if self.eigenvalue_correction
                    else None,
                )
        if self.unsupported:
            listing = "; ".join(f"{n} ({why})" for n, why in self.unsupported.items())
            warnings.warn(
                f"kfrob: these modules' parameters get plain SGD updates: {listing}",
                stacklevel=4,
            )

    @staticmethod
    def _factor(
        kind: str, blocks: int, size: int, codomain: bool, device: torch.device
    ) -> RunningFactor | None:
        if kind == "identity":
            return None
        return RunningFactor(
            blocks, size, diagonal=kind == "diagonal", per_sample_scale=codomain, device=device
        )

    # --- inspection ----------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}``: current running factors, bias coordinate last.

        Matrices are ``(in, in)`` and ``(out, out)``, or ``(groups, ·, ·)`` for grouped
        convolutions; diagonal sides are returned as diagonal matrices and identity sides as
        identities.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self.layers.items():
            math = layer.math
            pair = tuple(
                _as_matrix(factor, math.blocks, size, layer.module.weight.device)  # type: ignore[union-attr]
                for factor, size in (
                    (layer.domain, math.in_features),
                    (layer.codomain, math.out_features),
                )
            )
            a, g = (m.squeeze(0) if math.blocks == 1 else m for m in pair)
            out[name] = (a, g)
        return out

    def eigenvalues(self) -> dict[str, dict[str, Tensor]]:
        """``{layer name: {"A": eigenvalues, "G": eigenvalues}}`` of the factors behind each
        current inverse, ascending, ``(blocks, n)``; identity sides are left out.

        Eigenbasis inverses store them; for factored inverses held as matrices they are
        computed here from the current factors with ``torch.linalg.eigvalsh`` in float64
        (a layer whose factors it cannot decompose is left out).
        """
        out: dict[str, dict[str, Tensor]] = {}
        for name, inverse in self.inverses.items():
            layer = self.layers[name]
            if isinstance(inverse, RemoteInverse):
                continue
            if isinstance(inverse, EigenInverse):
                sides = {"A": inverse.domain, "G": inverse.codomain}
                out[name] = {k: s.eigenvalues for k, s in sides.items() if s.estimated}
            else:
                factors = {"A": layer.domain, "G": layer.codomain}
                try:  # in float64: float32 eigvalsh fails on some ill-conditioned factors
                    out[name] = {
                        k: torch.linalg.eigvalsh(f.value.double()).to(f.value.dtype).clamp(min=0)
                        for k, f in factors.items()
                        if f is not None
                    }
                except torch.linalg.LinAlgError:
                    continue
        return out

    def active_layers(self) -> Iterator[TrackedLayer]:
        """Layers that are preconditioned (not fallen back to plain SGD)."""
        return (layer for name, layer in self.layers.items() if name not in self.disabled)

    # --- factors -------------------------------------------------------------------------
    def update_factors(
        self,
        decay: float,
        grad_scale: Tensor | None = None,
        accept: Tensor | None = None,
        warmup: bool = False,
    ) -> Tensor:
        """Fold the statistics recorded since the last call into the running factors.

        A window is accepted for all layers or for none: if any statistic is non-finite
        (a NaN/Inf batch, or a loss-scale overflow) every layer keeps its previous factors.
        ``grad_scale`` is the loss scale the backward pass ran under; it is removed from
        ``G``. ``accept`` (a bool tensor) can veto the window, e.g. for non-finite gradients.
        ``warmup`` turns on the decay warm-up (:class:`~kfrob.factors.RunningFactor`).
        Returns whether the window was accepted (a bool tensor; no host sync).
        """
        factors = self._factors_with_side()
        # a single process folds what it recorded; ranks must agree on one list of factors
        if self.communicator is None:
            factors = [(f, codomain) for f, codomain in factors if f.pending]
        if not factors:
            return torch.ones((), dtype=torch.bool) if accept is None else accept
        present: list[Tensor] | None = None
        if self.communicator is None:
            stats = [self._statistic(f, codomain, grad_scale) for f, codomain in factors]
        else:  # the statistics of the global batch
            stats, present, accept = self._averaged(factors, grad_scale, accept)
        # the eigenvalue correction's S (single process only), normalised like G
        corrections = [
            (layer.name, layer.correction)
            for layer in self.layers.values()
            if layer.correction is not None and layer.correction.pending
        ]
        corrected = [self._statistic(c, True, grad_scale) for _, c in corrections]
        finite = all_finite(stats + corrected)
        accept = finite if accept is None else finite & accept.to(finite.device)
        for i, ((factor, _), stat) in enumerate(zip(factors, stats, strict=True)):
            factor.fold(stat, decay, accept if present is None else accept & present[i], warmup)
        for (name, correction), stat in zip(corrections, corrected, strict=True):
            correction.fold(stat, decay, accept, warmup)
            inverse = self.inverses.get(name)
            if isinstance(inverse, EigenInverse):  # the step follows S (on device)
                inverse.scaling = correction.scaling()
        self.capture.new_window()
        self.skipped_windows = self.skipped_windows.to(accept.device) + (~accept).long()
        return accept

    def _factors_with_side(self) -> list[tuple[RunningFactor, bool]]:
        """Every running factor, in a fixed order, with whether it is a co-domain ``G``."""
        return [(f, f is layer.codomain) for layer in self.layers.values() for f in layer.factors]

    def send_early_after(self, ddp: nn.Module) -> None:
        """Start averaging the window's statistics that are complete after the forward
        pass (``A``, and ``G`` for the MC Fisher) as soon as a forward of the
        ``DistributedDataParallel`` wrapper ``ddp`` ends the window, so that they travel
        while backward runs. Forwards of the wrapper run in lockstep on every rank, so the
        ranks send alike; calls of the inner model or its layers never send."""
        hook = ddp.register_forward_hook(weak_callable(self._send_early))
        self._early_hooks.append(hook)

    def _send_early(self, ddp: nn.Module, args: Any, output: Any) -> None:
        communicator = self.communicator
        recording = self.capture.active and ddp.training and torch.is_grad_enabled()
        # DDP's flag is False inside no_sync(): the window goes on
        if communicator is None or not recording or not ddp.require_backward_grad_sync:
            return
        self._drop_early()  # superseded: the new send covers the whole window so far
        # the empirical G waits for the backward pass
        factors = [(f, g) for f, g in self._factors_with_side() if not g or self.fisher == "mc"]
        if factors:
            stats, weights = self._local_statistics(factors, None)
            vote = torch.ones((), dtype=torch.bool, device=stats[0].device)
            pending = communicator.start_average(stats, weights, vote, "factors (early)")
            counts = [(f.rows, f.samples) for f, _ in factors]
            self._early = (pending, factors, counts)

    def _drop_early(self) -> None:
        if self._early is not None:
            self._early[0].wait()
            self._early = None

    def _averaged(
        self,
        factors: list[tuple[RunningFactor, bool]],
        grad_scale: Tensor | None,
        accept: Tensor | None,
    ) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Every factor's statistic averaged over ranks, whether any rank recorded it, and
        whether every rank accepts the window. What :meth:`_send_early` sent is used
        whenever there is one (the same on every rank); the rest goes now, with the accept
        vote."""
        sent: dict[int, tuple[Tensor, Tensor]] = {}
        if self._early is not None:
            pending, sent_factors, counts = self._early
            self._early = None
            totals, _ = pending.finish()
            for (factor, _), stat, total in zip(
                sent_factors, pending.statistics, totals, strict=True
            ):
                sent[id(factor)] = (stat, total)
            late = [(f.rows, f.samples) for f, _ in sent_factors] != counts
            if late and not self._warned_late_rows:
                self._warned_late_rows = True
                warnings.warn(
                    "kfrob: layers recorded statistics after the window's last "
                    "DistributedDataParallel forward (a call of the inner model or of a "
                    "layer outside it); those rows were left out of the averaged factors "
                    "(warned once)",
                    stacklevel=4,
                )
        rest = [(f, codomain) for f, codomain in factors if id(f) not in sent]
        stats, weights = self._local_statistics(rest, grad_scale)
        vote = torch.ones((), dtype=torch.bool) if accept is None else accept
        totals, accepted = self.communicator.average_(stats, weights, vote)  # type: ignore[union-attr]
        for (factor, _), stat, total in zip(rest, stats, totals, strict=True):
            sent[id(factor)] = (stat, total)
        averaged = [sent[id(f)] for f, _ in factors]
        return [s for s, _ in averaged], [t > 0 for _, t in averaged], accepted

    def _local_statistics(
        self, factors: list[tuple[RunningFactor, bool]], grad_scale: Tensor | None
    ) -> tuple[list[Tensor], list[float]]:
        """This rank's statistics (zeros where it recorded nothing) and their weights: the
        rows behind an ``A``, the samples behind a ``G``."""
        stats = [
            self._statistic(f, codomain, grad_scale)
            if f.pending
            else torch.zeros_like(f.value, dtype=torch.float32)
            for f, codomain in factors
        ]
        weights = [
            float(f.samples if codomain else f.rows) if f.pending else 0.0
            for f, codomain in factors
        ]
        return stats, weights

    def _statistic(
        self, factor: RunningFactor, is_codomain: bool, grad_scale: Tensor | None
    ) -> Tensor:
        repeats = self.capture.calls_per_forward(factor)
        # the MC Fisher's sampled loss is a per-sample sum (see kfrob.fisher)
        reduction = "sum" if is_codomain and self.fisher == "mc" else self.loss_reduction
        stat = factor.statistic(reduction, repeats)
        # the MC Fisher differentiates its own, unscaled loss: only the empirical G
        # carries the loss scale of the training backward
        if is_codomain and grad_scale is not None and self.fisher == "empirical":
            stat = stat / grad_scale.to(stat).square()
        return stat

    # --- inverses ------------------------------------------------------------------------
    def missing_inverses(self) -> bool:
        """Whether some active, trainable layer that has run forward has no inverse yet.

        Always ``False`` with a communicator: ``forward_calls`` is local to a rank, and an
        early refresh is a collective that every rank must agree on, so under data
        parallelism inverses are refreshed on the schedule only (a layer first seen between
        refreshes takes plain, KL-clipped steps until the next one)."""
        if self.communicator is not None:
            return False
        return any(
            layer.forward_calls > 0
            and layer.name not in self.inverses
            and layer.module.weight.requires_grad  # type: ignore[union-attr]
            for layer in self.active_layers()
        )

    def update_inverses(
        self,
        damping: dict[str, float],
        layers: Collection[str] | None = None,
        *,
        only_missing: bool = False,
    ) -> int:
        """Recompute each active layer's damped inverse from its current factors.

        ``damping`` maps layer names to ``λ``. A layer whose hooks never fired although its
        weight has a gradient falls back to plain SGD with a warning. A decomposition that
        fails even in float64 keeps the layer's last good inverse (warned once per layer).
        ``layers`` restricts the refresh to the named layers and those that have no inverse
        yet (an empty set: only the missing ones); ``None`` refreshes all, and
        ``only_missing=True`` is the same as ``layers=set()``. With a
        communicator each layer is decomposed on its owner only (:meth:`owners`) and the
        results are shared as ``inverse_placement`` says. Returns how many layers were
        due (decomposed, or tried).
        """
        if only_missing:
            layers = set()
        fired = self._fired_anywhere()
        due: list[TrackedLayer] = []
        for name, layer in self.layers.items():
            if name in self.disabled or (
                layers is not None and name not in layers and name in self.inverses
            ):
                continue
            weight, bias = layer.module.weight, layer.module.bias  # type: ignore[union-attr]
            if not weight.requires_grad:  # frozen: nothing to precondition, nothing to refresh
                continue
            if layer.math.has_bias != (bias is not None and bias.requires_grad):
                self._disable(name, "its bias was frozen or unfrozen after kfrob was created")
                continue
            if not all(bool(f.initialized) for f in layer.factors):
                if not fired[name] and weight.grad is not None:
                    self._disable(name, "its forward hooks never fired (called functionally?)")
                continue
            due.append(layer)
        if self.communicator is None:
            results = self._inverses(due, damping)
        else:
            results = self._owned_inverses(due, damping, self.communicator)
        for name, inverse in results.items():
            if inverse is None:
                if name not in self.inverses:
                    self._disable(name, "its factors could not be decomposed")
                else:
                    warnings.warn(
                        f"kfrob: decomposition failed for {name}; keeping its last inverse",
                        stacklevel=3,
                    )
                continue
            self.inverses[name] = inverse
            correction = self.layers[name].correction
            if correction is not None and isinstance(inverse, EigenInverse):
                codomain = self.layers[name].codomain
                assert codomain is not None
                correction.restart(inverse, codomain.folds, damping[name], self.exponent)
        return len(results)

    def _fired_anywhere(self) -> dict[str, bool]:
        """Whether each layer's hooks have fired, on any rank (one small gather of flags
        per refresh with a communicator, so that every rank disables the same layers)."""
        local = {name: layer.forward_calls > 0 for name, layer in self.layers.items()}
        if self.communicator is None:
            return local
        gathered = self.communicator.gather_objects(local)
        return {name: any(flags[name] for flags in gathered) for name in local}

    def owners(self) -> dict[str, int]:
        """The rank that decomposes each layer: a greedy balance of the estimated cost
        ``Σ_sides blocks · n³`` (see :func:`kfrob.distributed.assign_owners`)."""
        assert self.communicator is not None
        if self._owners is None:
            self._owners = assign_owners(self._refresh_costs(), self.communicator.world_size)
        return self._owners

    def refresh_slots(self, count: int) -> dict[str, int]:
        """For staggered refreshes: which of ``count`` consecutive steps refreshes each
        layer, balancing the estimated cost ``Σ_sides blocks · n³`` over the steps with the
        same greedy rule as :meth:`owners`. Deterministic, so every rank agrees."""
        if count not in self._slots:
            self._slots[count] = assign_owners(self._refresh_costs(), count)
        return self._slots[count]

    def _refresh_costs(self) -> dict[str, float]:
        """Each layer's estimated decomposition cost, ``Σ_sides blocks · n³`` (``n²`` for a
        diagonal side)."""
        return {
            name: float(
                sum(
                    f.value.shape[0] * f.value.shape[-1] ** (2 if f.diagonal else 3)
                    for f in layer.factors
                )
            )
            for name, layer in self.layers.items()
        }

    def _owned_inverses(
        self, due: list[TrackedLayer], damping: dict[str, float], communicator: Communicator
    ) -> dict[str, Inverse | None]:
        """Decompose this rank's due layers, then share: the inverses themselves
        (``"replicated"``) or only whether each succeeded (``"owner"``)."""
        owners = self.owners()
        mine = self._inverses(
            [layer for layer in due if owners[layer.name] == communicator.rank], damping
        )
        if self.inverse_placement == "owner":
            flags = {name: None if inverse is None else {} for name, inverse in mine.items()}
            shared = communicator.share_states(flags, owners)
            return {
                name: None if ok is None else mine.get(name, RemoteInverse(owners[name]))
                for name, ok in shared.items()
            }
        # the damped inverse matrices travel, or (eigenbasis inverses) the eigenbases and
        # eigenvalues, whose cheap scaling is recomputed on arrival
        states = {
            name: None if inv is None else _without_scaling(inv.state_dict())
            for name, inv in mine.items()
        }
        return {
            name: None if state is None else self._assemble(name, state, damping[name])
            for name, state in communicator.share_states(states, owners).items()
        }

    def _assemble(self, name: str, state: dict[str, Any], damping: float) -> Inverse:
        """An inverse from shared state; an eigen inverse gets its scaling computed here,
        exactly as its owner computed it."""
        if state["kind"] != "eigen":
            return _inverse_from_state(state, self._device_of(name))
        inverse = EigenInverse.from_state_dict(
            {**state, "scaling": torch.empty(0)}, self._device_of(name)
        )
        inverse.scaling = eigen_scaling(
            inverse.codomain, inverse.domain, damping, self.exponent, self.damping_method
        )
        return inverse

    def _device_of(self, name: str) -> torch.device:
        return self.layers[name].module.weight.device  # type: ignore[union-attr]

    def _inverses(
        self, layers: list[TrackedLayer], damping: dict[str, float]
    ) -> dict[str, Inverse | None]:
        """Each layer's damped inverse from its current factors (``None`` where a
        decomposition failed). Full factors are eigendecomposed together, one batched
        ``eigh`` per size (:func:`~kfrob.kronecker.decompose_all`); factored damping with
        ``p = 1`` uses Cholesky inverses instead, and for other ``p`` turns the
        eigendecompositions into the two damped matrix powers, so that either way a step
        costs two matrix products per layer instead of four."""
        factored = self.damping_method == "factored"
        full = [  # in the order _side takes them: co-domain first
            (layer.name, side, f.value)
            for layer in layers
            if not self._by_cholesky(layer)
            for side, f in (("codomain", layer.codomain), ("domain", layer.domain))
            if f is not None and not f.diagonal
        ]
        previous = [self._previous_basis(name, side, value) for name, side, value in full]
        decomposed = iter(decompose_all([value for *_, value in full], previous))
        out: dict[str, Inverse | None] = {}
        for layer in layers:
            lam = damping[layer.name]
            codomain, domain = layer.codomain, layer.domain
            if self._by_cholesky(layer):
                out[layer.name] = factored_inverses(
                    None if codomain is None else codomain.value,
                    None if domain is None else domain.value,
                    lam,
                )
                continue
            sides = [
                self._side(factor, size, decomposed, layer)
                for factor, size in (
                    (codomain, layer.math.out_features),
                    (domain, layer.math.in_features),
                )
            ]
            if sides[0] is None or sides[1] is None:
                out[layer.name] = None
            elif factored and all(s.basis is not None or not s.estimated for s in sides):
                out[layer.name] = factored_powers(sides[0], sides[1], lam, self.exponent)
            else:
                scaling = eigen_scaling(sides[0], sides[1], lam, self.exponent, self.damping_method)
                out[layer.name] = EigenInverse(sides[0], sides[1], scaling)
        return out

    def _previous_basis(self, name: str, side: str, factor: Tensor) -> Tensor | None:
        """With ``eigenbasis_refresh="subspace"``, the eigenbasis of the layer's current
        inverse on that side (the start of a subspace step), if it has one of the factor's
        shape; else ``None`` (a full decomposition)."""
        inverse = self.inverses.get(name)
        if self.eigenbasis_refresh != "subspace" or not isinstance(inverse, EigenInverse):
            return None
        basis = getattr(inverse, side).basis
        return basis if basis is not None and basis.shape == factor.shape else None

    def _by_cholesky(self, layer: TrackedLayer) -> bool:
        """Whether the layer's inverse is computed by Cholesky: factored damping with
        ``p = 1`` and no diagonal side."""
        return (
            self.damping_method == "factored"
            and self.exponent == 1.0
            and not any(f.diagonal for f in layer.factors)
        )

    @staticmethod
    def _side(
        factor: RunningFactor | None,
        size: int,
        decomposed: Iterator[Side | None],
        layer: TrackedLayer,
    ) -> Side | None:
        """One side of a layer: an identity, a diagonal, or the next full decomposition."""
        if factor is None:
            ones = torch.ones(layer.math.blocks, size, device=layer.module.weight.device)  # type: ignore[union-attr]
            return Side(None, ones, estimated=False)
        if factor.diagonal:
            return decompose(factor.value, diagonal=True)
        return next(decomposed)

    def _disable(self, name: str, reason: str) -> None:
        self.disabled[name] = reason
        self.inverses.pop(name, None)
        warnings.warn(f"kfrob: {name} falls back to plain SGD: {reason}", stacklevel=4)

    # --- preconditioning -----------------------------------------------------------------
    def precondition(self, name: str, matrix: Tensor) -> Tensor | None:
        """The layer's preconditioned gradient matrix in float32, or ``None`` if it has no
        inverse (yet, or on this rank)."""
        inverse = self.inverses.get(name)
        if inverse is None or isinstance(inverse, RemoteInverse) or name in self.disabled:
            return None
        return inverse.apply(matrix.to(torch.float32))

    def precondition_layers(self, matrices: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every layer's preconditioned gradient matrix (float32); a layer without an
        inverse yet gets its matrix unchanged (a plain gradient step). With
        ``inverse_placement="owner"`` each owner preconditions its layers and broadcasts
        the results, so every rank must call this together."""
        communicator = self.communicator
        if communicator is None or self.inverse_placement == "replicated":
            return {
                name: _or_plain(self.precondition(name, matrix), matrix)
                for name, matrix in matrices.items()
            }
        owners = self.owners()
        mine = {
            name: _or_plain(self.precondition(name, matrix), matrix)
            for name, matrix in matrices.items()
            if owners[name] == communicator.rank
        }
        shapes = {name: matrix.shape for name, matrix in matrices.items()}
        device = next(iter(matrices.values())).device if matrices else torch.device("cpu")
        return communicator.share_tensors(mine, shapes, owners, torch.float32, device)

    # --- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {
                name: {
                    "domain": layer.domain.state_dict() if layer.domain else None,
                    "codomain": layer.codomain.state_dict() if layer.codomain else None,
                    "inverse": _held(self.inverses.get(name)),
                    # only with the option on: states without it stay as they were
                    **({"correction": layer.correction.state_dict()} if layer.correction else {}),
                }
                for name, layer in self.layers.items()
            },
            "disabled": dict(self.disabled),
            "skipped_windows": self.skipped_windows,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the layer if ``state`` does not fit this model."""
        saved = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise ValueError("kfrob state has no 'layers' entry")
        missing = sorted(set(self.layers) - set(saved))
        extra = sorted(set(saved) - set(self.layers))
        if missing or extra:
            raise ValueError(
                f"kfrob state does not match the model: missing layers {missing}, "
                f"unexpected layers {extra}"
            )
        for name, layer in self.layers.items():
            for side in ("domain", "codomain"):
                factor: RunningFactor | None = getattr(layer, side)
                entry = saved[name].get(side)
                if (factor is None) != (entry is None):
                    raise ValueError(f"kfrob state for layer {name!r}: {side} factor mismatch")
                if factor is not None and entry["value"].shape != factor.value.shape:
                    raise ValueError(
                        f"kfrob state for layer {name!r}: {side} factor of shape "
                        f"{tuple(entry['value'].shape)}, expected {tuple(factor.value.shape)}"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load factors and inverses onto each layer's device; nothing changes on error.
        Statistics recorded since the last step are dropped, as is any early send of them."""
        self.check_state_dict(state)
        self._drop_early()
        self.capture.new_window()
        saved = state["layers"]
        for name, layer in self.layers.items():
            for factor, entry in zip(layer.factors, _present(saved[name]), strict=True):
                factor.load_state_dict(entry)
            inverse = saved[name]["inverse"]
            if inverse is None:
                self.inverses.pop(name, None)
            elif self.communicator is not None and self.inverse_placement == "owner":
                owner = self.owners()[name]  # only the owner keeps it
                self.inverses[name] = (
                    _inverse_from_state(inverse, self._device_of(name))
                    if owner == self.communicator.rank
                    else RemoteInverse(owner)
                )
            else:
                self.inverses[name] = _inverse_from_state(inverse, self._device_of(name))
            if layer.correction is not None:
                self._load_correction(layer.correction, saved[name], self.inverses.get(name))
        self.disabled = dict(state.get("disabled", {}))
        self.skipped_windows = state["skipped_windows"].clone()

    @staticmethod
    def _load_correction(
        correction: EigenbasisMoment, entry: dict[str, Any], inverse: Inverse | None
    ) -> None:
        """Restore ``S`` and its bases (those of the loaded inverse). A state saved
        without the correction leaves it unset: the loaded inverse's scaling is used and
        ``S`` starts at the next refresh."""
        held = inverse if isinstance(inverse, EigenInverse) else None
        if entry.get("correction") is None or held is None:
            correction.codomain_basis = correction.domain_basis = None
            correction.discard()
            return
        correction.load_state_dict(entry["correction"], held)

    def remove_hooks(self) -> None:
        self.capture.remove()
        for hook in self._early_hooks:
            hook.remove()
        self._early_hooks.clear()
        self._drop_early()


def correction_conflict(
    damping_method: str, domain: str, codomain: str, communicator: Communicator | None = None
) -> str | None:
    """Why ``eigenvalue_correction=True`` cannot be combined with these options (the
    expected setting, for a ``ValueError``), or ``None`` if it can."""
    if damping_method != "exact":
        return "False unless damping_method='exact' (EKFAC needs the eigenbases)"
    if domain != "covariance" or codomain != "fisher":
        return "False unless domain='covariance' and codomain='fisher' (both eigenbases)"
    if communicator is not None:
        return "False under data parallelism (S is not averaged over ranks)"
    return None


def _inverse_from_state(state: dict[str, Any], device: torch.device) -> Inverse:
    kind = EigenInverse if state["kind"] == "eigen" else InverseFactors
    return kind.from_state_dict(state, device)


def _without_scaling(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in state.items() if key != "scaling"}


def _held(inverse: Inverse | None) -> dict[str, Any] | None:
    """The state of an inverse this rank holds (``None`` if absent or remote)."""
    if inverse is None or isinstance(inverse, RemoteInverse):
        return None
    return inverse.state_dict()


def _or_plain(preconditioned: Tensor | None, matrix: Tensor) -> Tensor:
    return matrix.float() if preconditioned is None else preconditioned


def _present(entry: dict[str, Any]) -> list[dict[str, Tensor]]:
    """The saved factor states of a layer in ``TrackedLayer.factors`` order."""
    return [entry[side] for side in ("domain", "codomain") if entry[side] is not None]


def _as_matrix(
    factor: RunningFactor | None, blocks: int, size: int, device: torch.device
) -> Tensor:
    if factor is None:
        return torch.eye(size, device=device).expand(blocks, size, size)
    if factor.diagonal:
        return torch.diag_embed(factor.value)
    return factor.value
