"""The optimizers the training job can run, by name, and how each is built for a model."""

from __future__ import annotations

import difflib
import inspect
from typing import Any

import torch
from torch import nn

from kfrob.job.workloads import Workload
from kfrob.optimizer import FrobPreconditionedSGD

__all__ = ["OPTIMIZERS", "build_optimizer", "check_arguments"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "kfrob": FrobPreconditionedSGD,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# set by the job itself, never by a config
_RESERVED = {"params", "model", "generator", "grad_scaler"}


def check_arguments(name: str, arguments: dict[str, Any]) -> list[str]:
    """Problems with ``arguments`` for optimizer ``name``: keys its constructor does not
    take (with the closest one that it does) and required ones that are missing."""
    parameters = inspect.signature(OPTIMIZERS[name]).parameters
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
    return problems


def build_optimizer(
    name: str, arguments: dict[str, Any], model: nn.Module, workload: Workload, seed: int
) -> torch.optim.Optimizer:
    """Optimizer ``name`` for ``model``. kfrob gets the workload's loss (so it samples the
    Monte Carlo Fisher) unless the arguments say otherwise, and a generator seeded from
    ``seed`` whose state travels in its ``state_dict``. A value out of range raises
    ``ValueError`` naming ``optimizers.<name>``."""
    try:
        if name == "kfrob":
            device = next(model.parameters()).device
            generator = torch.Generator(device).manual_seed(seed + 1)
            arguments = {"loss": workload.kfrob_loss, **arguments}
            return FrobPreconditionedSGD(model, generator=generator, **arguments)
        return OPTIMIZERS[name](model.parameters(), **arguments)
    except (ValueError, TypeError) as err:
        raise ValueError(f"optimizers.{name}: {err}") from None
