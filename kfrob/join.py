"""Uneven inputs under ``torch.distributed.algorithms.join.Join``: a rank out of data
shadows the collectives of kfrob's step (the factor average and the refreshes) while the
others train, so nobody waits forever."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable, JoinHook

__all__ = ["ShadowStepping"]


class ShadowStepping(Joinable):
    """The ``Joinable`` side of :class:`kfrob.FrobPreconditionedSGD` (which supplies
    ``preconditioner``, ``options``, ``adaptive_damping`` and ``layer_damping``)."""

    preconditioner: Any
    options: Any
    adaptive_damping: bool
    layer_damping: Callable[[], dict[str, float]]

    @property
    def _join_config(self) -> Any:  # set by Join on entry and exit (the Joinable protocol)
        return self.__dict__.get("_join_settings")

    @_join_config.setter
    def _join_config(self, config: Any) -> None:
        self.__dict__["_join_settings"] = config
        if "preconditioner" in self.__dict__:  # joined ranks shadow collectives only at step
            self.preconditioner.sends_early = not config.enable

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook by which a rank out of data shadows kfrob's collectives."""
        if self.options.parallel.inverse_placement != "replicated" or self.adaptive_damping:
            raise ValueError(
                "Join needs inverse_placement='replicated' and adaptive_damping=False: a "
                "joined rank cannot shadow the owners' broadcasts of preconditioned "
                "gradients or the damping rule's closure"
            )
        return _ShadowStep(self)

    @property
    def join_device(self) -> torch.device:
        return self.preconditioner.parameters[0].device

    @property
    def join_process_group(self) -> Any:
        communicator = self.preconditioner.communicator
        group = None if communicator is None else communicator.group
        return dist.group.WORLD if group is None else group  # the same object DDP names

    def _shadow_step(self) -> None:
        """What a joined rank does while the others step: take part in the factor average
        (recording nothing) and the refreshes, and count the step."""
        pre = self.preconditioner
        pre.update({}, self.layer_damping())
        pre.advance()


class _ShadowStep(JoinHook):
    """Runs :meth:`ShadowStepping._shadow_step` on a joined rank each iteration."""

    def __init__(self, optimizer: ShadowStepping) -> None:
        self.optimizer = optimizer

    def main_hook(self) -> None:
        self.optimizer._shadow_step()
