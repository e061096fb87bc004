"""What a step rule is: :class:`StepRule`, the base of every rule, and the registry of rules
by name.

A step rule turns the gradients of one step into the update :class:`kfrob.FrobPreconditionedSGD`
takes. The optimizer does the same four things for every rule, and the rule decides each:

1. ``directions = grad (+ wd · param)`` — the weight decay enters the gradient unless the rule
   decouples it (:attr:`StepRule.decoupled_weight_decay`, as AdamW);
2. the engine folds the window's statistics and refreshes the due inverses;
3. :meth:`StepRule.directions` replaces each direction by the rule's ``Δ``, in place;
4. :meth:`StepRule.update` moves the parameters, ``p ← p − lr · Δ`` (SGD's momentum and
   AdamW's decoupled decay where the groups ask for them), nothing at all on a step whose
   gradients are not finite.

A rule also owns its defaults for the flat keywords (:attr:`StepRule.defaults`), its
validation (:meth:`StepRule.check`), what a group's ``momentum`` means, its part of the
``state_dict``, and the plan that the diagnostics report (:meth:`StepRule.step_plan`).
A new rule is a subclass in a file of its own and one :func:`register_rule` call.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from kfrob.finite import all_finite, descend_gated, select
from kfrob.options import SOURCES, PreconditionerOptions, require

if TYPE_CHECKING:
    from kfrob.preconditioner import KroneckerPreconditioner, StepPlan

__all__ = [
    "BETAS",
    "RULES",
    "RuleHost",
    "StepRule",
    "check_momentum",
    "register_rule",
    "rule_named",
]

#: Adam's moment decays ``(β₁, β₂)`` where none are given
BETAS = (0.9, 0.95)


class RuleHost(Protocol):
    """What a rule sees of its optimizer."""

    param_groups: list[dict[str, Any]]
    state: Mapping[Tensor, dict[str, Any]]
    preconditioner: KroneckerPreconditioner

    def learning_rates(self) -> dict[Tensor, float]: ...


class StepRule:
    """The base of every step rule (see the module docstring).

    Subclasses set :attr:`name` and implement :meth:`directions`; the rest has defaults:
    the weight decay added to the gradient (as ``torch.optim.SGD``), every curvature
    source, SGD's meaning of ``momentum``, no state of the rule's own, and the engine's plan
    for the diagnostics."""

    #: the ``step_rule`` that names the rule
    name: ClassVar[str]
    #: what the rule changes in the defaults of the flat keywords (explicit ones win)
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: whether the weight decay is AdamW's ``−lr · wd · p`` rather than added to the gradient
    decoupled_weight_decay: ClassVar[bool] = False
    #: the curvature sources (``curvature_source``) the rule can take
    sources: ClassVar[tuple[str, ...]] = SOURCES
    #: what a module without curvature gets (for warnings and ``repr``)
    plain_update: ClassVar[str] = "SGD"

    def __init__(self, host: RuleHost) -> None:
        self._host = weakref.ref(host)  # the optimizer holds its rule: no reference cycle

    @property
    def host(self) -> RuleHost:
        """The optimizer the rule steps."""
        host = self._host()
        assert host is not None, "the rule outlived its optimizer"
        return host

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def check(cls, options: PreconditionerOptions, nesterov: bool) -> None:
        """Refuse options the rule cannot run with (``ValueError`` naming the option)."""
        source = options.curvature.source
        require(
            "curvature_source", source, source in cls.sources,
            f"one of {cls.sources} with step_rule={cls.name!r}",
        )  # fmt: skip

    @classmethod
    def moments(
        cls, momentum: float | None, betas: tuple[float, float] | None
    ) -> tuple[float, tuple[float, float]]:
        """A group's SGD ``momentum`` and Adam ``betas`` from what the user gave: here
        ``momentum`` is SGD's (default 0) and ``betas`` default to ``(0.9, 0.95)``."""
        check_momentum(momentum)
        return (0.0 if momentum is None else momentum), tuple(betas or BETAS)  # type: ignore[return-value]

    @classmethod
    def group(cls, group: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        """A parameter group added later, with its ``momentum`` read as the rule reads it."""
        return group

    # --- the step --------------------------------------------------------------------------
    def directions(
        self, directions: dict[Tensor, Tensor], finite: Tensor,
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:  # fmt: skip
        """Replace each entry of ``directions`` by the rule's ``Δ`` (``p`` moves by
        ``−lr · Δ``). ``finite`` (a bool tensor) says whether the step may proceed: the rule
        leaves ``state`` (the per-parameter state to read and advance) as it was when not,
        with no host sync."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, directions: dict[Tensor, Tensor], finite: Tensor) -> None:
        """``p ← p − lr · Δ`` per group, after SGD's momentum (``torch.optim.SGD``'s buffer
        and Nesterov) where a group has one, with AdamW's ``p ← p (1 − lr · wd)`` first when
        the rule decouples the decay; nothing changes (parameters or momentum) unless
        ``finite``. Directions of fresh tensors with no momentum are overwritten."""
        decoupled = self.decoupled_weight_decay
        for group in self.host.param_groups:
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
        momentum, state = group["momentum"], self.host.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = select(finite, d, 0.0).detach().clone()
        else:
            buf = select(finite, buf * momentum + d, buf)
        state["momentum_buffer"] = buf
        return d.add(buf, alpha=momentum) if group["nesterov"] else buf

    # --- what the diagnostics report -------------------------------------------------------
    @torch.no_grad()
    def preview(self, directions: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """The ``Δ`` that :meth:`directions` would give, computed on copies: neither the
        optimizer's state nor the rule's changes."""
        state = {p: _cloned(self.host.state.get(p, {})) for p in directions}
        out = dict(directions)
        self.fork().directions(out, all_finite(out.values()), state)
        return out

    def fork(self) -> StepRule:
        """A copy whose :meth:`directions` leaves this rule's own state untouched."""
        return copy.copy(self)

    def step_plan(self, directions: dict[Tensor, Tensor]) -> StepPlan:
        """The engine's plan of ``directions`` (the damped metric's dual norms) with each
        layer's ``taken`` set to the update this rule would take, ``lr · Δ``."""
        host = self.host
        plan = host.preconditioner.plan(directions, host.learning_rates())
        taken = self.preview(directions)
        for step in plan.layers:
            math = step.layer.math
            if math.covers(taken):
                matrix = math.gradient_matrix(taken)
                step.taken = step.lr * matrix.to(step.preconditioned.dtype)  # type: ignore[union-attr]
        plan.kl_clip_factor = 1.0
        return plan

    # --- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The rule's own state beyond the per-parameter one (none by default)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; called after the optimizer and the engine loaded
        theirs (derived state is rebuilt here)."""


def check_momentum(momentum: float | None) -> None:
    """Refuse a ``momentum`` outside ``[0, 1)`` (``None``: not given)."""
    if momentum is not None:
        valid = isinstance(momentum, int | float) and not isinstance(momentum, bool)
        require("momentum", momentum, valid and 0 <= momentum < 1, "a number in [0, 1)")


def _cloned(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


#: the step rules by name, in the order they were registered
RULES: dict[str, type[StepRule]] = {}


def register_rule(rule: type[StepRule]) -> type[StepRule]:
    """Make ``rule`` available as ``step_rule=rule.name`` (usable as a class decorator)."""
    RULES[rule.name] = rule
    return rule


def rule_named(name: str) -> type[StepRule]:
    """The registered rule called ``name``; ``ValueError`` naming ``step_rule`` and the
    allowed values for any other."""
    require("step_rule", name, name in RULES, f"one of {', '.join(RULES)}")
    return RULES[name]
