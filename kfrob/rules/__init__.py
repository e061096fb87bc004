"""Step rules: what :class:`kfrob.FrobPreconditionedSGD` does with the curvature.

One rule a file, each a :class:`StepRule` registered by name (``step_rule=...``):

* ``"eigenbasis_adam"`` (the default, :mod:`kfrob.rules.eigenbasis_adam`): Adam in each
  layer's Kronecker eigenbasis;
* ``"preconditioned_sgd"`` (:mod:`kfrob.rules.preconditioned_sgd`): the KL-clipped K-FAC
  step under SGD's momentum;
* ``"adam_grafted"`` (:mod:`kfrob.rules.adam_grafted`): each layer's preconditioned first
  moment at the length of its Adam step.

A new rule subclasses :class:`StepRule` and calls :func:`register_rule` (see
``docs/architecture.md#adding-a-step-rule``).
"""

from kfrob.rules import adam_grafted, eigenbasis_adam, preconditioned_sgd
from kfrob.rules.base import RULES, RuleHost, StepRule, register_rule, rule_named

__all__ = [
    "RULES",
    "RuleHost",
    "StepRule",
    "adam_grafted",
    "eigenbasis_adam",
    "preconditioned_sgd",
    "register_rule",
    "rule_named",
]
