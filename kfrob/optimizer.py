"""``FrobPreconditionedSGD``: SGD in a Frobenius-type norm, with K-FAC as the default norm."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join
from torch.optim import Optimizer

from kfrob.adaptation import LevenbergMarquardt
from kfrob.distributed import unwrap
from kfrob.join import ShadowStepping
from kfrob.options import PreconditionerOptions, check_group, require, with_flat_keywords
from kfrob.preconditioner import KroneckerPreconditioner
from kfrob.rules import RULES, StepRule, rule_named

__all__ = ["DEFAULT_RULE", "FrobPreconditionedSGD"]

#: the step rule a plain ``FrobPreconditionedSGD(model, lr)`` takes
DEFAULT_RULE = "eigenbasis_adam"


class FrobPreconditionedSGD(Optimizer, ShadowStepping):
    """Steepest descent in Kronecker-factored Frobenius-type norms, with Adam's step sizes.

    Every layer of a registered kind (``docs/api.md#layer-kinds``; weight and bias together
    as ``V = [W, b]``, ``(out, in + 1)``) keeps running Kronecker factors from its
    ``curvature_source`` (:mod:`kfrob.sources`): by default ``A``, the covariance of its
    inputs, and ``G``, the Fisher factor of its per-sample output gradients; ``A ⊗ G``
    measures a step, ``‖Δ‖² = tr(A Δᵀ G Δ)``. What a step does with them is the
    ``step_rule`` (:mod:`kfrob.rules`): ``"eigenbasis_adam"`` (default; Adam in each layer's
    Kronecker eigenbasis, ``lr`` Adam's and ``momentum`` its ``β₁``),
    ``"preconditioned_sgd"`` (the KL-clipped ``(A ⊗ G + λI)^{-p} g`` under SGD's momentum)
    or ``"adam_grafted"``; modules without curvature get the rule's plain update (AdamW, or
    SGD). The curvature work is done by a :class:`kfrob.KroneckerPreconditioner`
    (:attr:`preconditioner`), the step by the rule (:attr:`rule`).

    Args:
        model: the model to train (not its parameters): hooks go on its registered layers.
        params: parameter groups as for any ``torch.optim`` optimizer (per-group ``lr``,
            ``momentum``, ``nesterov``, ``weight_decay``, ``damping``, ``betas``, ``eps``),
            or ``None`` (default) for one group of all the model's parameters. A layer's
            ``damping`` and KL-clip learning rate are those of its weight's group.
        lr: learning rate (``>= 0``; required; ``FrobPreconditionedSGD(model, 0.1)`` works).
        momentum: in ``[0, 1)``: as the rule reads it (SGD's momentum, or Adam's ``β₁``).
        nesterov: Nesterov momentum (``"preconditioned_sgd"`` with ``momentum > 0``).
        weight_decay: ``>= 0``; added to the gradient, or decoupled (AdamW) by the Adam rules.
        step_rule: a registered rule's name; each has defaults of its own for the flat
            keywords (the signature shows the default rule's).
        betas, eps: Adam's moment decays (each in ``[0, 1)``, default ``(0.9, 0.95)``) and
            ``ε > 0`` (the Adam rules).
        options: a :class:`~kfrob.options.PreconditionerOptions`; or leave it out and pass
            its flat keywords (this signature; ``docs/api.md``, :mod:`kfrob.options`).
        grad_scaler: the ``torch.amp.GradScaler`` the backward pass runs under.
        generator: random generator for the MC Fisher (its state travels in the
            ``state_dict``).

    With ``adaptive_damping=True`` every ``damping_adaptation_interval``-th step measures
    ``ρ = (L(θ+Δ) − L(θ)) / M(Δ)`` by calling the closure once more after the update and
    moves every group's ``damping`` (:mod:`kfrob.adaptation`); :meth:`step` then needs a
    closure. Under data parallelism every rank calls :meth:`step` (and :meth:`diagnostics`)
    together, or runs inside ``torch.distributed.algorithms.join.Join([ddp_model, opt])``
    for uneven inputs (``inverse_placement="replicated"``, no ``adaptive_damping``).
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
        step_rule: str = DEFAULT_RULE,
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
        rule = rule_named(step_rule)
        if options is None:
            options = PreconditionerOptions.from_flat(**{**rule.defaults, **flat})
        elif flat:
            raise TypeError(f"pass options or flat keywords, not both (got {sorted(flat)})")
        sgd_momentum, betas = rule.moments(momentum, betas)
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
        rule.check(options, nesterov)
        self.step_rule = step_rule
        #: the step rule (:mod:`kfrob.rules`): what a step does with the curvature
        self.rule: StepRule = rule(self)
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
        adaptation = options.adaptation
        self._adaptation = None if adaptation is None else LevenbergMarquardt(adaptation)
        self.last_reduction_ratio: float | None = None  # ρ of the last adaptation
        ShadowStepping.__init__(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As in ``torch.optim``; the group's options are validated (a ``momentum`` is read as
        the rule reads it: ``betas[0]`` under the Adam rules) and its parameters must belong
        to the model."""
        param_group = self.rule.group(param_group, self.defaults)
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
        rule = self.rule
        directions = self.directions(decay=not rule.decoupled_weight_decay)
        finite = pre.update(directions, self.layer_damping())
        rule.directions(directions, finite, self.state)
        rule.update(directions, finite)
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
        """Per-layer diagnostics of the step the current gradients give under the step rule
        (:meth:`StepRule.step_plan`; see :func:`kfrob.diagnostics.step_diagnostics`), with
        neither the optimizer's state nor the factors changed; call it after
        ``backward()``."""
        from kfrob.diagnostics import step_diagnostics

        pre = self.preconditioner
        plan = self.rule.step_plan(self.directions(not self.rule.decoupled_weight_decay))
        return step_diagnostics(pre, plan, {**pre.damping, **self.layer_damping()})

    # --- persistence and lifetime --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the preconditioner's (factors, inverses, step counter, the
        MC Fisher's ``generator`` state) and the last reduction ratio."""
        state = super().state_dict()
        state["kfrob"] = {
            "engine": self.preconditioner.state_dict(),
            "rule": self.rule.state_dict(),
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
        self.rule.load_state_dict(extra.get("rule", {}))
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
            text += f"\nPlain {self.rule.plain_update} (no curvature) for: {', '.join(plain)}"
        labels = {"domain": "A", "codomain": "G"}
        for name, sides in self.preconditioner.structures().items():
            parts = [f"{labels[s]} {c.structure} ({c.reason})" for s, c in sides.items()]
            if parts:
                text += f"\n{name}: {'; '.join(parts)}"
        return text


with_flat_keywords(
    FrobPreconditionedSGD.__init__, required=("lr",), defaults=RULES[DEFAULT_RULE].defaults
)
