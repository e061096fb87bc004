"""The engine: Kronecker-factored preconditioning of any optimizer's gradients.

:class:`KroneckerPreconditioner` owns the hooks, the running factors, the inverses, the
refresh schedule and the KL clip, and turns gradients into preconditioned directions. Use it
under any ``torch.optim`` optimizer, between ``backward()`` and ``opt.step()``:

    pre = KroneckerPreconditioner(model, loss="cross_entropy")
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(lr=opt.param_groups[0]["lr"])   # p.grad ← the K-FAC direction
        opt.step()

:class:`kfrob.FrobPreconditionedSGD` is this engine with SGD's momentum and learning rate.
It composes one object per concern, chosen once from the options (:mod:`kfrob.options`):
the layer registry (:mod:`kfrob.layers`), hooks (:mod:`kfrob.capture`), inverse method
(:mod:`kfrob.inverses`), placement (:mod:`kfrob.placement`) and schedule
(:mod:`kfrob.schedule`). Its step plan (:meth:`KroneckerPreconditioner.plan`) is public
for diagnostics and damping adaptation; persistence is in :mod:`kfrob.persistence`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kfrob.alerts import warn
from kfrob.capture import CurvatureCapture, weak_callable
from kfrob.distributed import Communicator, check_not_sharded, default_communicator, unwrap
from kfrob.factors import RunningFactor
from kfrob.finite import all_finite, select
from kfrob.inverses import InverseMethod, method_for
from kfrob.norms import frobenius_inner
from kfrob.options import PreconditionerOptions, require
from kfrob.persistence import EngineState
from kfrob.placement import Placement, RemoteInverse, make_placement
from kfrob.schedule import RefreshSchedule
from kfrob.sources import CurvatureSource, source_for
from kfrob.structure import StructureChoice
from kfrob.tracking import TrackedLayer, eigenvalues_of, factor_matrices, track_layers

__all__ = ["KroneckerPreconditioner", "LayerStep", "StepPlan"]

_FROM_OPTIONS: Any = object()


@dataclass
class LayerStep:
    """One layer's part of a step: its direction matrix ``(blocks, out, in)`` (gradient plus
    weight decay), the preconditioned matrix before the KL clip (in the layer's
    ``factor_dtype``: float32, or float64 for a float64 layer), its learning rate, and the
    update a step rule takes instead of ``lr · ν · preconditioned`` (``None``: that one)."""

    layer: TrackedLayer
    matrix: Tensor
    preconditioned: Tensor
    lr: float
    taken: Tensor | None = None


@dataclass
class StepPlan:
    """Every layer's step and the KL clip factor ``ν`` that scales all of them."""

    layers: list[LayerStep]
    kl_clip_factor: Tensor | float


class KroneckerPreconditioner(EngineState):
    """Kronecker factors of ``model``'s registered layers, their inverses, and the step plan.

    Args:
        model: the model (possibly wrapped in ``DistributedDataParallel`` or
            ``torch.compile``); hooks go on its registered layers.
        options: a :class:`~kfrob.options.PreconditionerOptions`, or leave it out and pass
            the flat keywords of :class:`kfrob.FrobPreconditionedSGD` (``damping``,
            ``kl_clip``, ``loss``, ``damping_method``, …) instead.
        grad_scaler: the ``torch.amp.GradScaler`` whose scale the backward pass runs under
            (removed from ``G``).
        generator: random generator for the MC Fisher's labels.
        inverse_method: an :class:`~kfrob.inverses.InverseMethod` to use instead of the one
            the options name (e.g. an instrumented one).
        communicator: data-parallel collectives (:mod:`kfrob.distributed`), or ``None`` for
            one process; by default built from ``options.parallel.process_group``.
    """

    def __init__(
        self,
        model: nn.Module,
        options: PreconditionerOptions | None = None,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        generator: torch.Generator | None = None,
        inverse_method: InverseMethod | None = None,
        communicator: Communicator | None = _FROM_OPTIONS,
        **flat: Any,
    ) -> None:
        if options is None:
            options = PreconditionerOptions.from_flat(**flat)
        elif flat:
            raise TypeError(f"pass options or flat keywords, not both (got {sorted(flat)})")
        wrapper, model = model, unwrap(model)
        check_not_sharded(model)
        if communicator is _FROM_OPTIONS:
            communicator = default_communicator(options.parallel.process_group)
        method = inverse_method or method_for(options)
        conflict = method.parallel_conflict
        ok = communicator is None or conflict is None
        require("eigenvalue_correction", True, ok, str(conflict))
        self.options, self.method = options, method
        self.grad_scaler, self.generator = grad_scaler, generator
        #: where the factors come from (:mod:`kfrob.sources`)
        self.source: CurvatureSource = source_for(options.curvature)
        source = self.source
        self.layers, self.unsupported = track_layers(
            model, options.curvature, method, source.per_step
        )
        self.capture = CurvatureCapture(
            model, self.layers.values(), source.sampled_loss, generator, source.hooks_record
        )
        costs = {name: layer.refresh_cost for name, layer in self.layers.items()}
        placement = options.parallel.inverse_placement
        self.placement: Placement = make_placement(communicator, placement, costs)
        self.placement.check_same_layers(
            {name: layer.math.describe() for name, layer in self.layers.items()}
        )
        self.schedule = RefreshSchedule(options.schedule, costs)
        self.parameters = list(model.parameters())
        self.inverses: dict[str, Any] = {}
        self.disabled: dict[str, str] = {}
        self.damping = dict.fromkeys(self.layers, float(options.damping))
        device = self.parameters[0].device if self.parameters else None
        self.skipped_windows = torch.zeros((), dtype=torch.long)
        self.nonfinite_steps = torch.zeros((), dtype=torch.long, device=device)
        self.steps = 0
        self.refreshes = 0  # refreshes that decomposed something, in this process
        self._warned_nonfinite = False
        self._inverses_after_load = False
        self._early_hook = None
        #: send statistics after the DDP forward, while backward runs (off under ``Join``)
        self.sends_early = True
        if wrapper is not model and communicator is not None:
            self._early_hook = wrapper.register_forward_hook(weak_callable(self._send_early))

    @property
    def communicator(self) -> Communicator | None:
        return self.placement.communicator

    # --- inspection ----------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}``: the running factors, bias coordinate last, ``(in, in)``
        and ``(out, out)`` (``(groups, ·, ·)`` for grouped convolutions); diagonal sides as
        diagonal matrices, identity sides as identities."""
        return {name: factor_matrices(layer) for name, layer in self.layers.items()}

    def eigenvalues(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {"A": ..., "G": ...}}`` behind each inverse this rank holds
        (:func:`kfrob.tracking.eigenvalues_of`)."""
        return eigenvalues_of(self.layers, self.inverses)

    def active_layers(self) -> Iterator[TrackedLayer]:
        """Layers that are preconditioned (not fallen back to plain SGD)."""
        return (layer for name, layer in self.layers.items() if name not in self.disabled)

    def structures(self) -> dict[str, dict[str, StructureChoice]]:
        """``{layer: {"domain"/"codomain": choice}}``: the structure a refresh gives each full
        side (dense, low-rank, block-diagonal: :mod:`kfrob.structure`), and why."""
        return {layer.name: self.method.structures(layer) for layer in self.active_layers()}

    def owners(self) -> dict[str, int]:
        """The rank that decomposes each layer (data parallelism only)."""
        return self.placement.owners()

    def refresh_slots(self, count: int) -> dict[str, int]:
        """Staggered refreshes: which of ``count`` steps refreshes each layer."""
        return self.schedule.refresh_slots(count)

    # --- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float | Mapping[Tensor, float] = 1.0) -> Tensor:
        """Replace every gradient by its preconditioned, KL-clipped direction, in place, and
        advance the schedules. ``lr`` is the KL clip's learning rate (one number, or one per
        parameter): the optimizer's, or ``lr / (1 − μ)`` under momentum ``μ``. A window with
        non-finite gradients or statistics leaves the gradients as they were. Returns whether
        the window was accepted (a bool tensor)."""
        directions = {p: p.grad for p in self.parameters if p.grad is not None}
        finite = self.update(directions)
        self.precondition_(directions, lr)
        for p, d in directions.items():
            p.grad.copy_(select(finite, d, p.grad))  # type: ignore[union-attr]
        self.advance()
        return finite

    def update(
        self, directions: Mapping[Tensor, Tensor], damping: Mapping[str, float] | None = None
    ) -> Tensor:
        """Fold this window's statistics and refresh the due inverses (with ``damping``, per
        layer, where given); returns whether the step may proceed (finite directions and an
        accepted window), as a bool tensor."""
        if damping is not None:
            self.damping.update(damping)
        finite = all_finite(directions.values())
        if self._inverses_after_load:  # from the loaded factors, on every rank alike
            self._inverses_after_load = False
            self._refresh(set())
        if self.capture.active:
            self.source.feed(self.active_layers(), directions)
            # a window with non-finite statistics is skipped whole: no step either
            finite = self.update_factors(finite)
        due = self.schedule.due(self.steps)
        if due is None or due or (self.capture.active and self.missing_inverses()):
            self._refresh(due)
        self.nonfinite_steps += (~finite).long().to(self.nonfinite_steps.device)
        return finite

    def plan(
        self, directions: Mapping[Tensor, Tensor], lr: float | Mapping[Tensor, float] = 1.0
    ) -> StepPlan:
        """Each active layer's direction matrix, its preconditioned version and the KL clip
        factor ``ν = min(1, sqrt(κ / Σ lr² ⟨g, Δ⟩))`` (1.0 without clipping). A layer without
        an inverse (yet) takes a plain step, inside the KL budget."""
        layers, matrices, complete, kappa = [], {}, {}, self.options.kl_clip
        for layer in self.active_layers():
            matrix = layer.math.gradient_matrix(directions)
            if matrix is None:
                continue
            layers.append(layer)
            matrices[layer.name] = matrix
            if layer.math.covers(directions):
                complete[layer.name] = matrix
        preconditioned = self.placement.precondition(complete, self._apply_inverse)
        steps, kl_terms = [], []
        for layer in layers:
            matrix = matrices[layer.name].to(layer.math.factor_dtype)
            direction = preconditioned.get(layer.name)
            if direction is None:
                direction = matrix
            weight = layer.math.weight
            rate = float(lr if not isinstance(lr, Mapping) else lr.get(weight, 0.0))
            if kappa is not None:  # in float32 at least: a float16 pairing would overflow
                pairing = frobenius_inner(matrix, direction, check=False)
                kl_terms.append(rate**2 * pairing.sum())
            steps.append(LayerStep(layer, matrix, direction, rate))
        nu: Tensor | float = 1.0
        if kappa is not None and kl_terms:
            nu = torch.sqrt(kappa / torch.stack(kl_terms).sum()).clamp(max=1.0)
        return StepPlan(steps, nu)

    def precondition_(
        self, directions: dict[Tensor, Tensor], lr: float | Mapping[Tensor, float] = 1.0
    ) -> StepPlan:
        """Replace each layer's entries of ``directions`` by its preconditioned, KL-clipped
        direction (other entries stay); returns the plan."""
        plan = self.plan(directions, lr)
        for step in plan.layers:
            for p, value in step.layer.math.split(
                step.preconditioned * plan.kl_clip_factor
            ).items():
                if p in directions:
                    directions[p] = value.to(p.dtype)
        return plan

    def precondition(self, name: str, matrix: Tensor) -> Tensor | None:
        """The layer's preconditioned gradient matrix (in its factors' dtype), or ``None``
        if it has no inverse (yet, or on this rank)."""
        inverse = self.inverses.get(name)
        if inverse is None or isinstance(inverse, RemoteInverse) or name in self.disabled:
            return None
        return inverse.apply(matrix.to(self.layers[name].math.factor_dtype))

    def _apply_inverse(self, name: str, matrix: Tensor) -> Tensor:
        preconditioned = self.precondition(name, matrix)
        if preconditioned is None:
            return matrix.to(self.layers[name].math.factor_dtype)
        return preconditioned

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """Which samples the loss counts in the next forward pass (see :mod:`kfrob.capture`)."""
        self.capture.set_loss_mask(mask)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record no curvature inside (an extra forward pass: a penalty, a re-evaluation)."""
        active, self.capture.active = self.capture.active, False
        try:
            yield
        finally:
            self.capture.active = active

    def advance(self) -> None:
        """End the step: the next window records if the schedule says so."""
        self.steps += 1
        self.capture.active = self.schedule.records(self.steps)

    # --- factors -------------------------------------------------------------------------
    def update_factors(self, accept: Tensor | None = None) -> Tensor:
        """Fold the statistics recorded since the last call into the running factors.

        A window is accepted for all layers or for none: if any statistic is non-finite every
        layer keeps its previous factors; ``accept`` (a bool tensor) can veto it too. The
        loss scale of ``grad_scaler`` is removed from ``G``. Returns whether the window was
        accepted (a bool tensor; no host sync)."""
        sided = [(f, f is layer.codomain) for layer in self.layers.values() for f in layer.factors]
        factors, stats, present, accept = self.placement.statistics(sided, self._statistic, accept)
        if not factors:
            return torch.ones((), dtype=torch.bool) if accept is None else accept
        corrections = [
            (layer, layer.correction)
            for layer in self.layers.values()
            if layer.correction is not None and layer.correction.pending
        ]
        corrected = [self._statistic(c, True) for _, c in corrections]
        finite = all_finite(stats + corrected)
        accept = finite if accept is None else finite & accept.to(finite.device)
        curvature = self.options.curvature
        decay, warmup = curvature.factor_decay, curvature.factor_decay_warmup
        for i, (factor, stat) in enumerate(zip(factors, stats, strict=True)):
            factor.fold(stat, decay, accept if present is None else accept & present[i], warmup)
        for (layer, correction), stat in zip(corrections, corrected, strict=True):
            correction.fold(stat, decay, accept, warmup)
            self.method.after_fold(layer, self.inverses.get(layer.name))
        self.capture.new_window()
        self.skipped_windows = self.skipped_windows.to(accept.device) + (~accept).long()
        if self.options.parallel.verify_factors:
            self.placement.verify(
                {
                    name: sum(f.average.sum() for f in layer.factors)
                    for name, layer in self.layers.items()
                }  # type: ignore[misc]
            )
        return accept

    def _statistic(self, factor: RunningFactor, is_codomain: bool) -> Tensor:
        repeats = self.capture.calls_per_forward(factor)
        return self.source.statistic(factor, is_codomain, repeats, self._loss_scale())

    def _loss_scale(self) -> Tensor | None:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # the scale as a tensor: no host sync

    def _send_early(self, ddp: nn.Module, args: Any, output: Any) -> None:
        """After a forward of the ``DistributedDataParallel`` wrapper, send the statistics
        complete by then (``A``; ``G`` too for the MC Fisher) while backward runs. Forwards
        of the wrapper run in lockstep on every rank; inside ``no_sync()`` the window goes
        on."""
        recording = self.capture.active and ddp.training and torch.is_grad_enabled()
        if not (recording and self.sends_early and ddp.require_backward_grad_sync):
            return
        complete = self.source.complete_after_forward
        sided = [
            (f, f is layer.codomain)
            for layer in self.layers.values()
            for f in layer.factors
            if complete(f is layer.codomain)
        ]
        self.placement.send_early(sided, self._statistic)

    # --- inverses ------------------------------------------------------------------------
    def missing_inverses(self) -> bool:
        """Whether some active, trainable layer that has run forward has no inverse yet
        (always ``False`` under data parallelism, where refreshes follow the schedule only)."""
        if not self.placement.refreshes_missing_early:
            return False
        return any(
            layer.forward_calls > 0 and layer.name not in self.inverses and layer.math.trainable
            for layer in self.active_layers()
        )

    def update_inverses(
        self,
        damping: Mapping[str, float] | None = None,
        layers: Collection[str] | None = None,
        *,
        only_missing: bool = False,
    ) -> int:
        """Recompute active layers' damped inverses from their current factors.

        ``damping`` maps layer names to ``λ`` (default: :attr:`damping`). ``layers``
        restricts the refresh to the named layers and those without an inverse (an empty
        set, or ``only_missing=True``: only the missing ones); ``None`` refreshes all. A layer
        whose hooks never fired although its weight has a gradient falls back to a plain update
        with a warning; a decomposition that fails keeps the layer's last good inverse
        (warned). Returns how many layers were due."""
        lam = {**self.damping, **(damping or {})}
        if only_missing:
            layers = set()
        fired = self.placement.fired_anywhere(
            {name: layer.forward_calls > 0 for name, layer in self.layers.items()}
        )
        due: list[TrackedLayer] = []
        for name, layer in self.layers.items():
            math = layer.math
            if name in self.disabled or (
                layers is not None and name not in layers and name in self.inverses
            ):
                continue
            if not math.trainable:  # frozen: nothing to precondition, nothing to refresh
                continue
            bias = math.bias_changed and "its bias was frozen or unfrozen after kfrob was created"
            if layer.failure or bias:
                self._disable(name, layer.failure or str(bias))
                continue
            if not all(bool(f.initialized) for f in layer.factors):
                if not fired[name] and math.weight.grad is not None:
                    self._disable(name, "its forward hooks never fired (called functionally?)")
                continue
            due.append(layer)
        results = self.placement.inverses(due, self.method, lam, self.inverses)
        for name, inverse in results.items():
            if inverse is None:
                if name not in self.inverses:
                    self._disable(name, "its factors could not be decomposed")
                else:
                    warn(f"kfrob: decomposition failed for {name}; keeping its last inverse")
                continue
            self.inverses[name] = inverse
            self.method.adopt(self.layers[name], inverse, lam[name])
        return len(results)

    def _refresh(self, layers: Iterable[str] | None) -> None:
        if self.update_inverses(layers=None if layers is None else set(layers)):
            self.refreshes += 1
        if not self._warned_nonfinite and int(self.nonfinite_steps) > 0:
            self._warned_nonfinite = True
            warn(
                "kfrob: skipped a step with non-finite gradients or factor statistics; "
                "parameters, momentum and factors were left unchanged (warned once)"
            )

    def _disable(self, name: str, reason: str) -> None:
        self.disabled[name] = reason
        self.inverses.pop(name, None)
        warn(f"kfrob: {name} falls back to a plain update (no curvature): {reason}")

    # --- lifetime ------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Remove every hook from the model (idempotent)."""
        self.capture.remove()
        if self._early_hook is not None:
            self._early_hook.remove()
            self._early_hook = None
        self.placement.drop_early()
