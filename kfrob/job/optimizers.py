"""The optimizers the training job can run, and how each is built for a model.

A config names its optimizers by label; the label is the optimizer's name (``kfrob``,
``sgd``, ``adam``, ``adamw``) unless its arguments say ``type: <name>``, so one config can
hold variants, e.g. ``kfrob-exact: {type: kfrob, lr: 0.003, damping_method: exact}``.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from kfrob.job.workloads import Workload
from kfrob.optimizer import FrobPreconditionedSGD

__all__ = ["OPTIMIZERS", "build_optimizer", "check_arguments", "optimizer_type"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "kfrob": FrobPreconditionedSGD,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# set by the job itself, never by a config
_RESERVED = {"params", "model", "generator", "grad_scaler"}


def optimizer_type(label: str, arguments: dict[str, Any]) -> str:
    """The optimizer a config entry names: ``arguments["type"]``, else the label itself."""
    return str(arguments.get("type", label))


def check_arguments(name: str, arguments: dict[str, Any]) -> list[str]:
    """Problems with config entry ``name``: an unknown optimizer, keys its constructor does
    not take (with the closest one that it does) and required ones that are missing."""
    kind = optimizer_type(name, arguments)
    if kind not in OPTIMIZERS:
        return [f"optimizers.{name}: unknown optimizer {kind!r}; choose from {sorted(OPTIMIZERS)}"]
    arguments = {k: v for k, v in arguments.items() if k != "type"}
    parameters = inspect.signature(OPTIMIZERS[kind]).parameters
    known = [key for key in parameters if key not in _RESERVED]
    problems = []
    for key in arguments:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"optimizers.{name}: unknown argument {key!r}{hint}")
    for key, parameter in parameters.items():
        if key in _RESERVED or parameter.default is not inspect.Parameter.empty:
            continue
        if key not in arguments:
            problems.append(f"optimizers.{name}: missing required argument {key!r}")
    if kind == "kfrob" and arguments.get("adaptive_damping"):
        problems.append(
            f"optimizers.{name}: adaptive_damping is not available in the training job: it "
            "needs step(closure) to evaluate the loss again after the update, and the job "
            "steps without one (use FrobPreconditionedSGD in your own loop)"
        )
    return problems


def build_optimizer(
    name: str, arguments: dict[str, Any], model: nn.Module, workload: Workload, seed: int
) -> torch.optim.Optimizer:
    """The optimizer of config entry ``name`` for ``model``. kfrob gets the workload's loss
    (so it samples the Monte Carlo Fisher) unless the arguments say otherwise, and a
    generator seeded from ``seed`` whose state travels in its ``state_dict``. A value out of
    range raises ``ValueError`` naming ``optimizers.<name>``."""
    kind = optimizer_type(name, arguments)
    arguments = {k: v for k, v in arguments.items() if k != "type"}
    try:
        if kind == "kfrob":
            device = next(model.parameters()).device
            generator = torch.Generator(device).manual_seed(seed + 1)
            arguments = {"loss": workload.kfrob_loss, **arguments}
            return FrobPreconditionedSGD(model, generator=generator, **arguments)
        return OPTIMIZERS[kind](model.parameters(), **arguments)
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizers.{name}: {err}") from None
