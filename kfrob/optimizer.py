"""``FrobPreconditionedSGD``: SGD in a Frobenius-type norm, with K-FAC as the default norm."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from kfrob.adaptation import LevenbergMarquardt
from kfrob.capture import TrackedLayer
from kfrob.distributed import check_not_sharded, default_communicator, unwrap
from kfrob.finite import all_finite
from kfrob.fisher import SAMPLED_LOSSES
from kfrob.layers import WEIGHT_SHARING
from kfrob.norms import frobenius_inner
from kfrob.preconditioner import (
    CODOMAINS,
    DAMPING_METHODS,
    DOMAINS,
    EIGENBASIS_REFRESHES,
    FISHERS,
    INVERSE_PLACEMENTS,
    LOSS_REDUCTIONS,
    KroneckerPreconditioner,
    correction_conflict,
)

__all__ = ["FrobPreconditionedSGD", "LayerStep"]


@dataclass
class LayerStep:
    """One layer's part of a step: its direction matrix ``(blocks, out, in)`` (gradient plus
    weight decay), the preconditioned matrix before the KL clip (float32), and its
    learning rate."""

    layer: TrackedLayer
    matrix: Tensor
    preconditioned: Tensor
    lr: float


class FrobPreconditionedSGD(Optimizer):
    r"""Stochastic gradient descent preconditioned by Kronecker-factored curvature.

    For every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layer (weight ``W`` and bias
    ``b`` together as ``V = [W, b]`` of shape ``(out, in + 1)``) the update direction is
    the Riesz representative of the gradient in a Frobenius-type norm,

    .. math::
        \mathrm{vec}(\Delta) = (A \otimes G + \lambda I)^{-p}\,\mathrm{vec}(\nabla_V L
        + \mathrm{wd}\cdot V),

    where ``A`` is the running covariance of the layer's (bias-augmented) inputs and ``G``
    the running Fisher factor of per-sample output gradients (see :mod:`kfrob.factors`).
    ``A ⊗ G`` is also the norm that measures a step: ``‖Δ‖² = tr(A Δᵀ G Δ)``. All
    preconditioned directions are then scaled by one factor

    .. math:: \nu = \min\Bigl(1, \sqrt{\kappa / \textstyle\sum_\ell \mathrm{lr}_\ell^2
        \langle g_\ell, \Delta_\ell\rangle}\Bigr)

    (the KL clip ``κ``), after which momentum, Nesterov and the learning rate act exactly as
    in :class:`torch.optim.SGD`. Parameters of other modules get plain SGD updates.

    Factors are updated every ``factor_update_freq`` steps (the hooks record nothing on the
    other steps) and inverted every ``inverse_update_freq`` steps; all of it runs on the
    parameters' device without host synchronisation except at inverse refreshes
    (and one read per sparse gradient, e.g. from ``nn.Embedding(sparse=True)``).

    Args:
        model: the model to train; hooks are registered on its supported layers, and all its
            parameters form the single parameter group.
        lr: learning rate (``>= 0``).
        momentum: momentum factor in ``[0, 1)``.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 penalty added to the gradient before preconditioning (``>= 0``).
        damping: ``λ > 0`` added to the curvature (per group, read at inverse refreshes).
        factor_decay: EMA decay of the factors in ``[0, 1)``; 0 keeps only the last batch.
        factor_decay_warmup: use the decay ``min(1 − 1/k, factor_decay)`` for the ``k``-th
            factor update (a plain mean of the first statistics); off by default (see
            ``results/levers.md`` for what it did to the time to target).
        factor_update_freq: steps between factor updates (``>= 1``).
        inverse_update_freq: steps between inverse refreshes (``>= 1``).
        stagger_refreshes: refresh each layer every ``inverse_update_freq`` steps as usual,
            but not all on the same step: the layers are spread over the steps of the cycle
            so that each step decomposes about the same amount (greedy on ``blocks · n³``).
            Same amortised decomposition cost, smaller refresh spikes (with several ranks,
            one small gather and one share of inverses on every step that has due layers
            instead of once per cycle); off by default (see
            ``results/refresh.md`` and ``results/levers.md``).
        kl_clip: ``κ > 0`` bounding ``lr² ν² Σ ⟨g, Δ⟩``, or ``None`` for no clipping.
        domain: domain inner product: ``"covariance"`` (``A``), ``"diagonal"`` or
            ``"identity"``.
        codomain: co-domain inner product: ``"fisher"`` (``G``), ``"diagonal"`` or
            ``"identity"``. Identity on both sides with ``kl_clip=None`` is plain SGD.
        exponent: ``p > 0``: 1 for K-FAC, ½ for an inverse square root.
        damping_method: ``"factored"`` (default: π-damping of each factor, held as the two
            damped inverses, by Cholesky when ``p = 1``; two matrix products per layer and
            step) or ``"exact"`` (eigendecompositions; damps ``A ⊗ G`` exactly; four
            products per step).
        eigenbasis_refresh: with ``damping_method="exact"``, ``"eigh"`` (default: a full
            eigendecomposition at every refresh) or ``"subspace"`` (one step of subspace
            iteration from the previous eigenbasis: two matrix products and a QR
            factorisation; see ``results/levers.md``).
        weight_sharing: how a convolution's output locations enter its factors:
            ``"expand"`` (default: each location is a row of ``A`` and a term of ``G``) or
            ``"reduce"`` (per sample, the mean input patch and the summed output gradient:
            K-FAC-reduce, ``locations`` times cheaper to accumulate; see
            :mod:`kfrob.layers` and ``results/levers.md``).
        fisher: ``"empirical"`` (training-loss gradients) or ``"mc"`` (labels drawn from
            the model; needs ``loss``). ``None`` (default) means ``"mc"`` when ``loss`` is
            given and ``"empirical"`` otherwise: the MC Fisher reached the target accuracy
            in fewer steps and seconds with exact damping and ties with factored damping
            (``results/fisher_choice.md``), but only the empirical one needs nothing to be
            known about the loss.
        loss: ``"cross_entropy"`` or ``"mse"``: the training loss (for the MC Fisher).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over samples; with
            gradient accumulation, each micro-batch loss is divided by their number.
        grad_scaler: the ``torch.amp.GradScaler`` whose loss scale the backward pass runs
            under, so that it is removed from ``G``.
        generator: random generator for the MC Fisher.
        process_group: the data-parallel group (``torch.distributed``, any backend). By
            default the default group when one is initialised with more than one rank,
            else none (single-process behaviour). The model may be wrapped in
            ``DistributedDataParallel``; FSDP / sharded parameters are refused.
        inverse_placement: with more than one rank, ``"replicated"`` (default: every rank
            keeps every layer's eigenbases and preconditions all layers; traffic only at
            refreshes) or ``"owner"`` (a layer's inverse stays on the rank that decomposed
            it, which preconditions that layer and broadcasts the result every step: less
            memory, more traffic). See ``docs/distributed.md``.
        eigenvalue_correction: EKFAC (George et al. 2018; :mod:`kfrob.correction`): keep
            the eigenbases of the last refresh but scale by ``(S + λ)^{-p}``, ``S`` the
            running second moment of per-sample gradients in those bases (updated on
            factor-update steps, restarted from ``e_G e_Aᵀ`` at each refresh). Off by
            default; needs ``damping_method="exact"``, ``domain="covariance"``,
            ``codomain="fisher"`` and a single process.
        adaptive_damping: adapt every group's ``damping`` by the Levenberg–Marquardt rule
            (K-FAC §6.5, :mod:`kfrob.adaptation`): every ``damping_adaptation_interval``-th
            step measures ``ρ = (L(θ+Δ) − L(θ)) / M(Δ)`` on its batch, calling the closure
            once more after the update, and divides ``λ`` by ``ω`` when ``ρ < ¼`` (or the
            measurement failed), multiplies it by ``ω`` when ``ρ > ¾``, and clamps it to
            ``[min_damping, max_damping]``; the new ``λ`` acts from the next inverse
            refresh. Off by default. :meth:`step` then needs a closure that runs forward
            and backward and returns the loss, mean-reduced (``loss_reduction="mean"``);
            :meth:`precondition_grads` does not adapt. The last ``ρ`` is
            :attr:`last_reduction_ratio`.
        damping_adaptation_interval: ``T >= 1``, steps between adaptations.
        damping_adaptation_factor: ``ω`` in ``(0, 1)``.
        min_damping, max_damping: bounds ``0 < min_damping <= max_damping`` of the adapted
            damping (the initial ``damping`` must lie within them).

    Under data parallelism every rank must call :meth:`step` (and :meth:`diagnostics`)
    together: factor statistics are averaged over ranks before they are folded, and each
    layer's decompositions run on one rank only, so all ranks hold identical factors and
    inverses and take identical steps.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_freq: int = 1,
        inverse_update_freq: int = 10,
        kl_clip: float | None = 1e-3,
        *,
        domain: str = "covariance",
        codomain: str = "fisher",
        exponent: float = 1.0,
        damping_method: str = "factored",
        eigenbasis_refresh: str = "eigh",
        weight_sharing: str = "expand",
        factor_decay_warmup: bool = False,
        stagger_refreshes: bool = False,
        fisher: str | None = None,
        loss: str | None = None,
        loss_reduction: str = "mean",
        grad_scaler: torch.amp.GradScaler | None = None,
        generator: torch.Generator | None = None,
        process_group: Any = None,
        inverse_placement: str = "replicated",
        eigenvalue_correction: bool = False,
        adaptive_damping: bool = False,
        damping_adaptation_interval: int = 5,
        damping_adaptation_factor: float = (19 / 20) ** 5,
        min_damping: float = 1e-8,
        max_damping: float = 1e3,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        wrapper, model = model, unwrap(model)
        check_not_sharded(model)
        params = list(model.parameters())
        if not params:
            raise ValueError("model has no parameters to optimize")
        if any(p.is_meta for p in params):
            raise ValueError(
                "model has parameters on the meta device: materialise it (e.g. "
                "model.to_empty(device=...) and initialise) before creating the optimizer"
            )
        _check_hyperparameters(locals())
        if fisher is None:
            fisher = "mc" if loss is not None else "empirical"
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "damping": damping,
        }
        super().__init__(params, defaults)
        self.factor_decay = factor_decay
        self.factor_decay_warmup = factor_decay_warmup
        self.factor_update_freq = factor_update_freq
        self.inverse_update_freq = inverse_update_freq
        self.stagger_refreshes = stagger_refreshes
        self.kl_clip = kl_clip
        self.grad_scaler = grad_scaler
        self.preconditioner = KroneckerPreconditioner(
            model,
            domain=domain,
            codomain=codomain,
            exponent=exponent,
            damping_method=damping_method,
            eigenbasis_refresh=eigenbasis_refresh,
            weight_sharing=weight_sharing,
            fisher=fisher,
            loss=loss,
            loss_reduction=loss_reduction,
            generator=generator,
            communicator=default_communicator(process_group),
            inverse_placement=inverse_placement,
            eigenvalue_correction=eigenvalue_correction,
        )
        if wrapper is not model and self.preconditioner.communicator is not None:
            self.preconditioner.send_early_after(wrapper)
        self.generator = generator
        self.steps = 0
        self.refreshes = 0  # refreshes that decomposed something, in this process (for loggers)
        self._nonfinite_steps = torch.zeros((), dtype=torch.long, device=params[0].device)
        self._warned_nonfinite = False
        self._inverses_after_load = False
        self.adaptive_damping = adaptive_damping
        self._adaptation = (
            LevenbergMarquardt(
                damping_adaptation_interval, damping_adaptation_factor, min_damping, max_damping
            )
            if adaptive_damping
            else None
        )
        self.last_reduction_ratio: float | None = None  # ρ of the last adaptation

    # --- the update --------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update; ``closure`` (forward and backward) is called first if given (and, with
        ``adaptive_damping``, once more after the update on adaptation steps)."""
        adaptation = self._adaptation
        if closure is None and adaptation is not None:
            raise ValueError(
                "adaptive_damping=True needs step(closure): a closure that runs forward and "
                "backward on the batch and returns the loss"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measured = adaptation is not None and adaptation.due(self.steps)
        before = adaptation.snapshot(self) if measured else None  # type: ignore[union-attr]
        directions = self._directions()
        finite = self._refresh(directions)
        self._precondition(directions)
        self._apply(directions, finite)
        if before is not None:
            self.last_reduction_ratio = adaptation.adapt(self, closure, loss, before)  # type: ignore[union-attr, arg-type]
        self._advance()
        return loss

    @torch.no_grad()
    def precondition_grads(self, lrs: dict[Tensor, float] | None = None) -> None:
        """Replace every gradient by the direction :meth:`step` would take, in place, and
        advance the schedules, without touching parameters: for driving another optimizer
        (see :mod:`kfrob.lightning`). ``lrs`` gives the learning rate of each parameter for
        the KL clip (default: this optimizer's groups). Weight decay and momentum stay with
        the other optimizer; a non-finite window leaves the gradients as they were."""
        directions = {
            p: p.grad for group in self.param_groups for p in group["params"] if p.grad is not None
        }
        finite = self._refresh(directions)
        self._precondition(directions, lrs)
        for p, d in directions.items():
            p.grad.copy_(_select(finite, d, p.grad))  # type: ignore[union-attr]
        self._advance()

    def _refresh(self, directions: dict[Tensor, Tensor]) -> Tensor:
        """Fold this window's statistics and refresh inverses when due; returns whether the
        step may proceed (finite gradients and an accepted window), as a bool tensor."""
        finite = all_finite(directions.values())
        pre = self.preconditioner
        if self._inverses_after_load:  # from the loaded factors, on every rank alike
            self._inverses_after_load = False
            self._refresh_inverses(set())
        if pre.capture.active:
            # a window with non-finite statistics is skipped whole: no step either
            finite = pre.update_factors(
                self.factor_decay, self._loss_scale(), finite, self.factor_decay_warmup
            )
        period = self.inverse_update_freq
        if self.stagger_refreshes:
            slot = self.steps % period
            due = {name for name, s in pre.refresh_slots(period).items() if s == slot}
            if due or (pre.capture.active and pre.missing_inverses()):
                self._refresh_inverses(due)
        elif self.steps % period == 0:
            self._refresh_inverses()
        elif pre.capture.active and pre.missing_inverses():
            self._refresh_inverses(set())
        return finite

    def _advance(self) -> None:
        self.steps += 1
        self.preconditioner.capture.active = self.steps % self.factor_update_freq == 0

    def _directions(self) -> dict[Tensor, Tensor]:
        """``grad + weight_decay · param`` for every parameter with a gradient."""
        directions: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                directions[p] = d
        return directions

    def _preconditioned(
        self, directions: dict[Tensor, Tensor], lrs: dict[Tensor, float] | None = None
    ) -> tuple[list[LayerStep], Tensor | float]:
        """Each layer's direction matrix and its preconditioned version, and the KL clip
        factor ``ν`` that scales all of them (1.0 without clipping). ``lrs`` overrides the
        groups' learning rates."""
        group_of = self._group_of()
        layers, matrices, to_precondition = [], {}, {}
        for layer in self.preconditioner.active_layers():
            weight, bias = layer.module.weight, layer.module.bias  # type: ignore[union-attr]
            if weight not in directions:
                continue
            matrix = layer.math.to_matrix(directions[weight], directions.get(bias))
            layers.append(layer)
            matrices[layer.name] = matrix
            if not layer.math.has_bias or bias in directions:
                to_precondition[layer.name] = matrix
        # a layer without curvature (yet) takes a plain step, inside the KL budget
        preconditioned = self.preconditioner.precondition_layers(to_precondition)
        steps: list[LayerStep] = []
        kl_terms = []
        for layer in layers:
            weight = layer.module.weight  # type: ignore[union-attr]
            matrix = matrices[layer.name]
            direction = preconditioned.get(layer.name)
            if direction is None:
                direction = matrix.float()
            lr = float(group_of[weight]["lr"] if lrs is None else lrs.get(weight, 0.0))
            # in float32: a float16 pairing overflows and would zero the step via the clip
            pairing = frobenius_inner(matrix.float(), direction, check=False)
            kl_terms.append(lr**2 * pairing.sum())
            steps.append(LayerStep(layer, matrix, direction, lr))
        nu: Tensor | float = 1.0
        if self.kl_clip is not None and kl_terms:
            nu = torch.sqrt(self.kl_clip / torch.stack(kl_terms).sum()).clamp(max=1.0)
        return steps, nu

    def _precondition(
        self, directions: dict[Tensor, Tensor], lrs: dict[Tensor, float] | None = None
    ) -> None:
        """Replace each layer's direction by its preconditioned, KL-clipped version."""
        steps, nu = self._preconditioned(directions, lrs)
        for step in steps:
            weight, bias = step.layer.module.weight, step.layer.module.bias  # type: ignore[union-attr]
            new_weight, new_bias = step.layer.math.from_matrix(step.preconditioned * nu)
            directions[weight] = new_weight.to(weight.dtype)
            if bias is not None and bias in directions and new_bias is not None:
                directions[bias] = new_bias.to(bias.dtype)

    def diagnostics(self) -> dict[str, float]:
        """Per-layer diagnostics of the step the current gradients give (see
        :func:`kfrob.diagnostics.step_diagnostics`); call it after ``backward()``."""
        from kfrob.diagnostics import step_diagnostics

        return step_diagnostics(self)

    def _apply(self, directions: dict[Tensor, Tensor], finite: Tensor) -> None:
        """Momentum and the parameter update, as in ``torch.optim.SGD``; nothing changes
        (parameters or momentum) when ``finite`` is False."""
        self._nonfinite_steps += (~finite).long()
        for group in self.param_groups:
            momentum, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                d = directions.get(p)
                if d is None:
                    continue
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = _select(finite, d, 0.0).detach().clone()
                    else:
                        buf = _select(finite, buf * momentum + d, buf)
                    state["momentum_buffer"] = buf
                    d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(_select(finite, d, 0.0), alpha=-lr)

    def _refresh_inverses(self, layers: set[str] | None = None) -> None:
        """Refresh the named layers' inverses and any missing ones (``None``: all)."""
        group_of = self._group_of()
        damping = {
            name: float(group_of[layer.module.weight]["damping"])  # type: ignore[index]
            for name, layer in self.preconditioner.layers.items()
        }
        if self.preconditioner.update_inverses(damping, layers):
            self.refreshes += 1
        if not self._warned_nonfinite and int(self._nonfinite_steps) > 0:
            self._warned_nonfinite = True
            warnings.warn(
                "kfrob: skipped a step with non-finite gradients or factor statistics; "
                "parameters, momentum and factors were left unchanged (warned once)",
                stacklevel=3,
            )

    def _loss_scale(self) -> Tensor | None:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()  # the scale as a tensor: no host sync

    def _group_of(self) -> dict[Tensor, dict[str, Any]]:
        return {p: group for group in self.param_groups for p in group["params"]}

    # --- persistence and lifetime -------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus kfrob's: factors, inverses, step counter and the state of
        the MC Fisher's ``generator`` (if one was given)."""
        state = super().state_dict()
        state["kfrob"] = {
            "steps": self.steps,
            "generator": None if self.generator is None else self.generator.get_state(),
            "nonfinite_steps": self._nonfinite_steps,
            "preconditioner": self.preconditioner.state_dict(),
            "last_reduction_ratio": self.last_reduction_ratio,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfrob", None)
        if extra is None:
            raise ValueError("state_dict has no 'kfrob' entry: not a FrobPreconditionedSGD state")
        self.preconditioner.check_state_dict(extra["preconditioner"])
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(extra["preconditioner"])
        self.steps = int(extra["steps"])
        if self.generator is not None and extra.get("generator") is not None:
            self.generator.set_state(extra["generator"])
        self._nonfinite_steps = extra["nonfinite_steps"].to(self._nonfinite_steps.device)
        self.last_reduction_ratio = extra.get("last_reduction_ratio")
        self.preconditioner.capture.active = self.steps % self.factor_update_freq == 0
        # a state without some inverses (e.g. saved with inverse_placement="owner") gets
        # them at the next step, from the factors it carried
        self._inverses_after_load = any(
            entry["inverse"] is None for entry in extra["preconditioner"]["layers"].values()
        )

    def close(self) -> None:
        """Remove kfrob's hooks from the model (idempotent)."""
        self.preconditioner.remove_hooks()

    def __enter__(self) -> FrobPreconditionedSGD:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        text = super().__repr__()
        plain = sorted({*self.preconditioner.unsupported, *self.preconditioner.disabled})
        if plain:
            text += f"\nPlain SGD for: {', '.join(plain)}"
        return text


def _select(condition: Tensor, new: Tensor, old: Tensor | float) -> Tensor:
    """``new`` where the 0-dim bool ``condition`` holds, else ``old`` (a tensor or a scalar):
    a ``torch.where`` without host sync, except for sparse tensors (sparse embeddings), which
    need one read."""
    if new.is_sparse:
        if bool(condition):
            return new
        return old if isinstance(old, Tensor) else torch.zeros_like(new)
    return torch.where(condition, new, old)


def _check_hyperparameters(args: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first invalid argument and its allowed range."""

    def require(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ValueError(f"invalid {name}={args[name]!r}: expected {allowed}")

    def number(name: str) -> bool:
        value = args[name]
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )

    def positive_int(name: str) -> bool:
        value = args[name]
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    require("lr", number("lr") and args["lr"] >= 0, "a finite number >= 0")
    require("momentum", number("momentum") and 0 <= args["momentum"] < 1, "a number in [0, 1)")
    require("nesterov", isinstance(args["nesterov"], bool), "a bool")
    require("nesterov", not args["nesterov"] or args["momentum"] > 0, "momentum > 0 with it")
    require("weight_decay", number("weight_decay") and args["weight_decay"] >= 0, ">= 0")
    require("damping", number("damping") and args["damping"] > 0, "a finite number > 0")
    require("factor_decay", number("factor_decay") and 0 <= args["factor_decay"] < 1, "[0, 1)")
    require("factor_update_freq", positive_int("factor_update_freq"), "an integer >= 1")
    require("inverse_update_freq", positive_int("inverse_update_freq"), "an integer >= 1")
    require(
        "kl_clip",
        args["kl_clip"] is None or (number("kl_clip") and args["kl_clip"] > 0),
        "None or a finite number > 0",
    )

    def choice(name: str, options: tuple[str, ...]) -> None:
        require(name, args[name] in options, f"one of {options}")

    choice("domain", DOMAINS)
    choice("codomain", CODOMAINS)
    require("exponent", number("exponent") and args["exponent"] > 0, "a finite number > 0")
    choice("damping_method", DAMPING_METHODS)
    choice("eigenbasis_refresh", EIGENBASIS_REFRESHES)
    choice("weight_sharing", WEIGHT_SHARING)
    require(
        "eigenbasis_refresh",
        args["eigenbasis_refresh"] == "eigh" or args["damping_method"] == "exact",
        "'eigh' unless damping_method='exact' (only exact damping keeps eigenbases)",
    )
    require("factor_decay_warmup", isinstance(args["factor_decay_warmup"], bool), "a bool")
    require("stagger_refreshes", isinstance(args["stagger_refreshes"], bool), "a bool")
    fisher_ok = args["fisher"] is None or args["fisher"] in FISHERS
    require("fisher", fisher_ok, f"None or one of {FISHERS}")
    choice("loss_reduction", LOSS_REDUCTIONS)
    choice("inverse_placement", INVERSE_PLACEMENTS)
    require("eigenvalue_correction", isinstance(args["eigenvalue_correction"], bool), "a bool")
    if args["eigenvalue_correction"]:
        conflict = correction_conflict(args["damping_method"], args["domain"], args["codomain"])
        require("eigenvalue_correction", conflict is None, str(conflict))
    losses = tuple(SAMPLED_LOSSES)
    if args["fisher"] == "mc" or args["loss"] is not None:
        choice("loss", losses)
    require("adaptive_damping", isinstance(args["adaptive_damping"], bool), "a bool")
    require(
        "damping_adaptation_interval",
        positive_int("damping_adaptation_interval"),
        "an integer >= 1",
    )
    factor = args["damping_adaptation_factor"]
    require("damping_adaptation_factor", number("damping_adaptation_factor"), "a number in (0, 1)")
    require("damping_adaptation_factor", 0 < factor < 1, "a number in (0, 1)")
    require("min_damping", number("min_damping") and args["min_damping"] > 0, "a finite number > 0")
    require(
        "max_damping",
        number("max_damping") and args["max_damping"] >= args["min_damping"],
        f"a finite number >= min_damping={args['min_damping']!r}",
    )
    if args["adaptive_damping"]:
        require(
            "damping",
            args["min_damping"] <= args["damping"] <= args["max_damping"],
            "a number in [min_damping, max_damping] with adaptive_damping",
        )
        require(
            "adaptive_damping",
            args["grad_scaler"] is None,
            "False with a grad_scaler (GradScaler.step refuses closures, and scaled "
            "gradients would skew the reduction ratio)",
        )
        require(
            "loss_reduction",
            args["loss_reduction"] == "mean",
            "'mean' with adaptive_damping (A ⊗ G is the curvature of the mean loss)",
        )
