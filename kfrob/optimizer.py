"""``FrobPreconditionedSGD``: SGD in a Frobenius-type norm, with K-FAC as the default norm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join
from torch.optim import Optimizer

from kfrob.adam import descend_gated
from kfrob.adam_grafted import ADAM_GRAFTED_DEFAULTS, grafted_directions
from kfrob.adaptation import LevenbergMarquardt
from kfrob.distributed import unwrap
from kfrob.eigenbasis_adam import (
    EIGENBASIS_ADAM_DEFAULTS,
    Rotations,
    adam_directions,
    held_bases,
)
from kfrob.finite import select
from kfrob.join import ShadowStepping
from kfrob.kronecker import EigenInverse, InverseFactors
from kfrob.options import (
    PreconditionerOptions,
    check_group,
    check_step_rule,
    first_moment,
    require,
    with_flat_keywords,
)
from kfrob.preconditioner import KroneckerPreconditioner

__all__ = ["STEP_RULES", "FrobPreconditionedSGD"]

#: what a step does with the curvature (the preconditioned gradient ``(A ⊗ G + λI)⁻¹ g``
#: under SGD's momentum and the KL clip; Adam in the Kronecker eigenbasis; the
#: preconditioned first moment at Adam's per-layer length), with each rule's own defaults
#: for the flat keywords (explicit keywords override them)
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "preconditioned_sgd": {},
    "eigenbasis_adam": EIGENBASIS_ADAM_DEFAULTS,
    "adam_grafted": ADAM_GRAFTED_DEFAULTS,
}
STEP_RULES = tuple(RULE_DEFAULTS)


class FrobPreconditionedSGD(Optimizer, ShadowStepping):
    r"""Steepest descent in Kronecker-factored Frobenius-type norms, with Adam's step sizes.

    Every layer of a registered kind (``nn.Linear``, convolutions, embeddings, norms:
    ``docs/api.md#layer-kinds``; weight ``W`` and bias ``b`` together as ``V = [W, b]`` of
    shape ``(out, in + 1)``) keeps running Kronecker factors: ``A``, the covariance of its
    (bias-augmented) inputs, and ``G``, the Fisher factor of its per-sample output gradients
    (:mod:`kfrob.factors`); ``A ⊗ G`` is the norm that measures a step,
    ``‖Δ‖² = tr(A Δᵀ G Δ)``. What a step does with them is the ``step_rule``:

    * ``"eigenbasis_adam"`` (default): Adam in each layer's Kronecker eigenbasis,
      ``Δ = Q_G [m̂' / (√v̂' + ε)] Q_Aᵀ`` with the moments of ``Q_Gᵀ ∇V Q_A``
      (:mod:`kfrob.eigenbasis_adam`); a layer whose wide side the cost model makes
      low-rank takes its K-FAC direction ``(A ⊗ G + λI)⁻¹ m̂`` at the length of its Adam
      step instead. ``lr`` is Adam's; ``momentum``, if given, is ``β₁``.
    * ``"preconditioned_sgd"``: the Riesz representative of the gradient,

      .. math::
          \mathrm{vec}(\Delta) = (A \otimes G + \lambda I)^{-p}\,\mathrm{vec}(\nabla_V L
          + \mathrm{wd}\cdot V),

      all directions scaled by one factor

      .. math:: \nu = \min\Bigl(1, \sqrt{\kappa / \textstyle\sum_\ell r_\ell^2
          \langle g_\ell, \Delta_\ell\rangle}\Bigr), \quad
          r_\ell = \mathrm{lr}_\ell / (1 - \mu_\ell)

      (the KL clip ``κ``; ``r`` is the step a steady direction takes under momentum
      ``μ``), after which momentum, Nesterov and the learning rate act exactly as in
      :class:`torch.optim.SGD`; other modules get plain SGD.
    * ``"adam_grafted"``: every layer's preconditioned first moment at the length of its
      Adam step (:mod:`kfrob.adam_grafted`).

    The Adam rules use ``betas`` and ``eps``, decouple the weight decay (as AdamW) and give
    the modules without factors AdamW. The curvature work is done by a
    :class:`kfrob.KroneckerPreconditioner` (:attr:`preconditioner`); this class adds the
    step rule's bookkeeping and the damping rule.

    Args:
        model: the model to train (not its parameters): hooks go on its registered layers.
        params: parameter groups as for any ``torch.optim`` optimizer (an iterable of dicts
            with ``"params"`` and per-group ``lr``, ``momentum``, ``nesterov``,
            ``weight_decay``, ``damping``), or ``None`` (default) for one group of all the
            model's parameters. A layer's ``damping`` and KL-clip learning rate are those of
            its weight's group.
        lr: learning rate (``>= 0``; required; ``FrobPreconditionedSGD(model, 0.1)`` also
            works).
        momentum: in ``[0, 1)``: SGD's momentum factor (default 0) under
            ``"preconditioned_sgd"``, Adam's ``β₁`` under the Adam rules (default
            ``betas[0]``).
        nesterov: Nesterov momentum (``"preconditioned_sgd"`` with ``momentum > 0``).
        weight_decay: L2 penalty added to the gradient before preconditioning (``>= 0``;
            decoupled, as in AdamW, under the Adam rules).
        step_rule: ``"eigenbasis_adam"`` (default), ``"preconditioned_sgd"`` or
            ``"adam_grafted"``; each has defaults of its own for the flat keywords
            (``RULE_DEFAULTS``).
        betas, eps: Adam's moment decays (each in ``[0, 1)``, default ``(0.9, 0.95)``)
            and ``ε > 0``, per group (the Adam rules only).
        options: a :class:`~kfrob.options.PreconditionerOptions`; or leave it out and pass
            its flat keywords (listed in this signature, documented in ``docs/api.md`` and
            :mod:`kfrob.options`): ``damping=1e-3`` (``λ > 0``, the groups' default),
            ``kl_clip=1e-3``, ``factor_decay``, ``factor_update_freq``,
            ``inverse_update_freq``, ``domain``, ``codomain``, ``exponent``,
            ``damping_method``, ``eigenbasis_refresh``, ``eigenvalue_correction``,
            ``weight_sharing``, ``fisher``, ``loss``, ``loss_reduction``,
            ``stagger_refreshes``, ``factor_decay_warmup``, ``process_group``,
            ``inverse_placement``, ``adaptive_damping`` and its ``damping_adaptation_*``,
            ``min_damping``, ``max_damping``.
        grad_scaler: the ``torch.amp.GradScaler`` the backward pass runs under.
        generator: random generator for the MC Fisher (its state travels in the
            ``state_dict``).

    With ``adaptive_damping=True`` every ``damping_adaptation_interval``-th step measures
    ``ρ = (L(θ+Δ) − L(θ)) / M(Δ)`` on its batch by calling the closure once more after the
    update, and moves every group's ``damping`` (:mod:`kfrob.adaptation`); :meth:`step` then
    needs a closure. Under data parallelism every rank must call :meth:`step` (and
    :meth:`diagnostics`) together, or run inside
    ``torch.distributed.algorithms.join.Join([ddp_model, optimizer])`` for uneven inputs: a
    rank out of data then shadows kfrob's collectives (its factors and inverses stay those of
    the others; DDP syncs the final weights). Join needs ``inverse_placement="replicated"``
    and no ``adaptive_damping``.
    """

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        lr: float | None = None,
        momentum: float | None = None,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        step_rule: str = "eigenbasis_adam",
        betas: tuple[float, float] | None = None,
        eps: float = 1e-8,
        options: PreconditionerOptions | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        generator: torch.Generator | None = None,
        **flat: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module (kfrob hooks its layers), got "
                f"{type(model).__name__}: pass the model itself, and parameter groups as the "
                "second argument, e.g. FrobPreconditionedSGD(model, [{'params': decay}, "
                "{'params': no_decay, 'weight_decay': 0.0}], lr=0.1)"
            )
        if isinstance(params, int | float) and not isinstance(params, bool) and lr is None:
            params, lr = None, params  # FrobPreconditionedSGD(model, 0.1), as in kfrob 0.1
        if lr is None:
            raise TypeError("FrobPreconditionedSGD needs a learning rate: lr=...")
        everything = list(unwrap(model).parameters())
        if not everything:
            raise ValueError("model has no parameters to optimize")
        if any(p.is_meta for p in everything):
            raise ValueError(
                "model has parameters on the meta device: materialise it (e.g. "
                "model.to_empty(device=...) and initialise) before creating the optimizer"
            )
        require("step_rule", step_rule, step_rule in STEP_RULES, f"one of {', '.join(STEP_RULES)}")
        if options is None:
            options = PreconditionerOptions.from_flat(**{**RULE_DEFAULTS[step_rule], **flat})
        elif flat:
            raise TypeError(f"pass options or flat keywords, not both (got {sorted(flat)})")
        sgd_momentum, betas = first_moment(step_rule, momentum, betas)
        defaults = {
            "lr": lr,
            "momentum": sgd_momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "damping": options.damping,
            "betas": betas,
            "eps": eps,
        }
        check_group(defaults)
        check_step_rule(step_rule, options, nesterov)
        self.step_rule = step_rule
        self._model_parameters = {id(p) for p in everything}
        super().__init__(everything if params is None else params, defaults)
        require(
            "adaptive_damping", True, options.adaptation is None or grad_scaler is None,
            "False with a grad_scaler (GradScaler.step refuses closures, and scaled "
            "gradients would skew the reduction ratio)",
        )  # fmt: skip
        self.preconditioner = KroneckerPreconditioner(
            model, options, grad_scaler=grad_scaler, generator=generator
        )
        rule = options.adaptation
        self._adaptation = None if rule is None else LevenbergMarquardt(rule)
        self._rotations = Rotations()  # what eigenbasis_adam keeps between steps (derived)
        self.last_reduction_ratio: float | None = None  # ρ of the last adaptation
        ShadowStepping.__init__(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As in ``torch.optim``; the group's options are validated (a ``momentum`` is
        ``betas[0]`` under the Adam rules) and its parameters must belong to the model."""
        if "momentum" in param_group and self.step_rule != "preconditioned_sgd":
            momentum = param_group["momentum"]  # β₁ under the Adam rules
            betas = param_group.get("betas", (momentum, self.defaults["betas"][1]))
            _, betas = first_moment(self.step_rule, momentum, betas)
            param_group = {**param_group, "momentum": 0.0, "betas": betas}
        check_group(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        foreign = [p for p in params if id(p) not in self._model_parameters]
        if foreign:
            raise ValueError(
                f"invalid params: {len(foreign)} tensor(s) of a parameter group are not "
                "parameters of the model kfrob was given"
            )
        super().add_param_group({**param_group, "params": params})

    # --- compatibility -------------------------------------------------------------------
    @property
    def options(self) -> PreconditionerOptions:
        """The preconditioner's options (what the flat keywords built)."""
        return self.preconditioner.options

    @property
    def steps(self) -> int:
        """Steps taken (the preconditioner's counter)."""
        return self.preconditioner.steps

    @property
    def refreshes(self) -> int:
        return self.preconditioner.refreshes

    @property
    def generator(self) -> torch.Generator | None:
        return self.preconditioner.generator

    @property
    def adaptive_damping(self) -> bool:
        return self._adaptation is not None

    # --- the update ----------------------------------------------------------------------
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
        Join.notify_join_context(self)
        pre = self.preconditioner
        measured = adaptation is not None and adaptation.due(pre.steps)
        before = adaptation.snapshot(self.param_groups) if measured else None  # type: ignore[union-attr]
        adam = self.step_rule != "preconditioned_sgd"  # AdamW's decoupled weight decay
        directions = self.directions(decay=not adam)
        finite = pre.update(directions, self.layer_damping())
        if self.step_rule == "eigenbasis_adam":
            adam_directions(
                self.param_groups, self.state, directions, self._bases(), finite,
                self._rotations,
            )  # fmt: skip
        elif adam:
            grafted_directions(self.param_groups, self.state, directions, pre, finite)
        else:
            pre.precondition_(directions, self.learning_rates())
        self._apply(directions, finite, decoupled=adam)
        if before is not None:
            self.last_reduction_ratio = adaptation.adapt(  # type: ignore[union-attr]
                pre,
                self.param_groups,
                closure,
                loss,
                before,  # type: ignore[arg-type]
            )
        pre.advance()
        return loss

    @torch.no_grad()
    def precondition_grads(self, lrs: dict[Tensor, float] | None = None) -> None:
        """Replace every gradient by the direction :meth:`step` would take (before momentum
        and the learning rate) and advance the schedules, without touching parameters.
        ``lrs`` gives each parameter's learning rate for the KL clip (default: the
        groups'). The engine itself, :meth:`KroneckerPreconditioner.step`, does the same
        without an optimizer."""
        pre = self.preconditioner
        pre.damping.update(self.layer_damping())
        pre.step(self.learning_rates() if lrs is None else lrs)

    def set_loss_mask(self, mask: Tensor | None) -> None:
        """Count only the samples where the bool ``mask`` (over the model output's leading
        dimensions, e.g. ``targets != ignore_index``) holds in the curvature of the next
        forward pass (:mod:`kfrob.capture`)."""
        self.preconditioner.set_loss_mask(mask)

    def directions(self, decay: bool = True) -> dict[Tensor, Tensor]:
        """``grad + weight_decay · param`` (``grad`` without ``decay``) for every parameter
        with a gradient."""
        directions: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if decay and group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])
                directions[p] = d
        return directions

    def learning_rates(self) -> dict[Tensor, float]:
        """Each parameter's learning rate as the KL clip sees it: its group's
        ``lr / (1 − momentum)``, the distance a steady direction moves per step once momentum
        has built up (so that momentum cannot multiply the clipped step by ``1/(1 − μ)``)."""
        return {
            p: float(group["lr"]) / (1.0 - group["momentum"])
            for group in self.param_groups
            for p in group["params"]
        }

    def layer_damping(self) -> dict[str, float]:
        """Each preconditioned layer's ``λ``: its weight's group's ``damping``."""
        damping = {
            p: float(group["damping"]) for group in self.param_groups for p in group["params"]
        }
        return {
            name: damping[layer.math.weight]
            for name, layer in self.preconditioner.layers.items()
            if layer.math.weight in damping
        }

    def diagnostics(self) -> dict[str, float]:
        """Per-layer diagnostics of the step the current gradients give (see
        :func:`kfrob.diagnostics.step_diagnostics`); call it after ``backward()``."""
        from kfrob.diagnostics import step_diagnostics

        pre = self.preconditioner
        plan = pre.plan(self.directions(), self.learning_rates())
        return step_diagnostics(pre, plan, {**pre.damping, **self.layer_damping()})

    def _bases(self) -> dict[Tensor, tuple[Any, EigenInverse | InverseFactors | None]]:
        """Each active layer's weight, with its math and its inverse (if refreshed): its
        eigenbases, or structured inverse factors."""
        pre = self.preconditioner
        bases = {}
        for layer in pre.active_layers():
            inverse = pre.inverses.get(layer.name)
            local = inverse if isinstance(inverse, EigenInverse | InverseFactors) else None
            bases[layer.math.weight] = (layer.math, local)
        return bases

    def _apply(
        self, directions: dict[Tensor, Tensor], finite: Tensor, decoupled: bool = False
    ) -> None:
        """Momentum and the parameter update, as in ``torch.optim.SGD`` (with ``decoupled``,
        the weight decay ``−lr · wd · p`` of AdamW besides); nothing changes (parameters or
        momentum) when ``finite`` is False. The Adam rules' directions (``decoupled``) are
        this step's own tensors and finite even on a skipped step (from the kept moments),
        so they are scaled by ``−lr`` or 0 in place instead of selected afresh."""
        for group in self.param_groups:
            momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
            params = [p for p in group["params"] if p in directions]
            if not params:
                continue
            steps = [directions[p] for p in params]
            if decoupled and decay != 0:
                shrink = select(finite, params[0].new_tensor(1 - lr * decay), 1.0)
                torch._foreach_mul_(params, shrink)
            if decoupled and momentum == 0:
                descend_gated(params, steps, finite, lr)
                continue
            if momentum != 0:
                pairs = zip(params, steps, strict=True)
                steps = [self._momentum(p, d, finite, group) for p, d in pairs]
            safe = [select(finite, d, 0.0) for d in steps]
            if any(d.is_sparse for d in safe):
                for p, d in zip(params, safe, strict=True):
                    p.add_(d, alpha=-lr)
            else:
                torch._foreach_add_(params, safe, alpha=-lr)

    def _momentum(self, p: Tensor, d: Tensor, finite: Tensor, group: dict[str, Any]) -> Tensor:
        """SGD's momentum step for ``p`` (its buffer advanced unless ``finite`` is False)."""
        momentum, state = group["momentum"], self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = select(finite, d, 0.0).detach().clone()
        else:
            buf = select(finite, buf * momentum + d, buf)
        state["momentum_buffer"] = buf
        return d.add(buf, alpha=momentum) if group["nesterov"] else buf

    # --- persistence and lifetime --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the preconditioner's (factors, inverses, step counter, the
        MC Fisher's ``generator`` state) and the last reduction ratio."""
        state = super().state_dict()
        state["kfrob"] = {
            "engine": self.preconditioner.state_dict(),
            "last_reduction_ratio": self.last_reduction_ratio,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this or an earlier kfrob version; nothing changes on error."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("kfrob", None)
        if extra is None:
            raise ValueError("state_dict has no 'kfrob' entry: not a FrobPreconditionedSGD state")
        engine = extra.get("engine", extra)  # kfrob 0.1 kept the engine's entries here
        self.preconditioner.check_state_dict(engine)
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(engine)
        self._rotations = held_bases(self._bases(), self.state)
        self.last_reduction_ratio = extra.get("last_reduction_ratio")

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
            kind = "SGD" if self.step_rule == "preconditioned_sgd" else "AdamW"
            text += f"\nPlain {kind} (no curvature) for: {', '.join(plain)}"
        labels = {"domain": "A", "codomain": "G"}
        for name, sides in self.preconditioner.structures().items():
            parts = [f"{labels[s]} {c.structure} ({c.reason})" for s, c in sides.items()]
            if parts:
                text += f"\n{name}: {'; '.join(parts)}"
        return text


with_flat_keywords(FrobPreconditionedSGD.__init__, required=("lr",))
