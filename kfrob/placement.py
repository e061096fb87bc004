"""Placement: where the preconditioner's work runs and how its results travel.

The engine (:class:`kfrob.KroneckerPreconditioner`) asks a :class:`Placement` for the same
four things whether it runs in one process or many, and never asks which:

* the window's **statistics** to fold (:meth:`Placement.statistics`): a single process folds
  what it recorded; with several ranks they are the weighted averages over ranks
  (:meth:`Communicator.average_`), part of them possibly sent early, while backward runs
  (:meth:`Placement.send_early`);
* the **inverses** of the due layers (:meth:`Placement.inverses`): computed locally, or each
  on its owner (:func:`~kfrob.distributed.assign_owners`) and then shared — the inverses
  themselves (:class:`Replicated`) or only whether each succeeded (:class:`Owner`, whose
  inverses stay on their owners);
* the **preconditioned matrices** (:meth:`Placement.precondition`): computed where the
  inverses are (with :class:`Owner`, broadcast from each owner every step);
* **agreement** on what every rank must decide alike: which layers ever ran
  (:meth:`Placement.fired_anywhere`) and scalars to average (:meth:`Placement.average`).

Every wait on a collective happens inside the method that started it, except the early send,
which :meth:`Placement.statistics` (or :meth:`Placement.drop_early`) waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kfrob.alerts import warn
from kfrob.distributed import Communicator, PendingAverage, assign_owners
from kfrob.factors import RunningFactor
from kfrob.inverses import Inverse, InverseMethod, inverse_from_state
from kfrob.tracking import TrackedLayer

__all__ = ["Local", "Owner", "Placement", "RemoteInverse", "Replicated", "make_placement"]

#: a factor's window statistic, given the factor and whether it is a co-domain ``G``
Statistic = Callable[[RunningFactor, bool], Tensor]
Apply = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class RemoteInverse:
    """A layer's inverse held by another rank (:class:`Owner` placement)."""

    owner: int


class Placement:
    """The interface, and everything a single process needs."""

    communicator: Communicator | None = None
    #: whether a layer first seen between refreshes gets its inverse at once (a collective
    #: decision under data parallelism, so only a single process does)
    refreshes_missing_early = True

    def statistics(
        self, factors: Sequence[tuple[RunningFactor, bool]], statistic: Statistic,
        accept: Tensor | None,
    ) -> tuple[list[RunningFactor], list[Tensor], list[Tensor] | None, Tensor | None]:  # fmt: skip
        """The factors to fold, their statistics, for each whether any rank recorded it
        (``None``: all of them) and the accept vote (``accept``, agreed over ranks)."""
        pending = [(f, codomain) for f, codomain in factors if f.pending]
        return [f for f, _ in pending], [statistic(f, c) for f, c in pending], None, accept

    def send_early(
        self, factors: Sequence[tuple[RunningFactor, bool]], statistic: Statistic
    ) -> None:
        """Start averaging statistics that are already complete (nothing to do here)."""

    def drop_early(self) -> None:
        """Wait for and forget an early send."""

    def inverses(
        self, due: Sequence[TrackedLayer], method: InverseMethod, damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | RemoteInverse | None]:  # fmt: skip
        return dict(method.compute(due, damping, held))

    def precondition(self, matrices: dict[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        """``apply(name, matrix)`` for every layer, wherever its inverse is."""
        return {name: apply(name, matrix) for name, matrix in matrices.items()}

    def fired_anywhere(self, local: dict[str, bool]) -> dict[str, bool]:
        return local

    def check_same_layers(self, layout: dict[str, Any]) -> None:
        """Refuse, on every rank, ranks whose layer tables differ (``layout``: this rank's
        ``{layer name: description}``); nothing to compare in one process."""

    def verify(self, checksums: dict[str, Tensor]) -> None:
        """Raise, on every rank, if ranks hold different factors (``checksums``: one 0-dim
        tensor per layer); nothing to compare in one process."""

    def average(self, values: Tensor) -> Tensor:
        """The mean of ``values`` over ranks (in place)."""
        return values

    def loaded_inverse(self, name: str, state: dict[str, Any], device: torch.device) -> Any:
        """A loaded inverse as this rank holds it."""
        return inverse_from_state(state, device)

    def owners(self) -> dict[str, int]:
        """The rank that decomposes each layer."""
        raise ValueError("owners exist only under data parallelism")


Local = Placement


class Replicated(Placement):
    """Every rank keeps every inverse; each layer is decomposed on its owner only."""

    refreshes_missing_early = False

    def __init__(self, communicator: Communicator, costs: dict[str, float]) -> None:
        self.communicator = communicator
        self._costs = costs
        self._owners: dict[str, int] | None = None
        # an early send: its pending average, its factors and their (rows, samples) then
        self._early: tuple[PendingAverage, list[tuple[RunningFactor, bool]], list] | None = None
        self.warned_late_rows = False

    def owners(self) -> dict[str, int]:
        """A greedy balance of the estimated decomposition cost
        (:func:`~kfrob.distributed.assign_owners`)."""
        if self._owners is None:
            self._owners = assign_owners(self._costs, self.communicator.world_size)
        return self._owners

    # --- statistics ----------------------------------------------------------------------
    def send_early(
        self, factors: Sequence[tuple[RunningFactor, bool]], statistic: Statistic
    ) -> None:
        self.drop_early()  # superseded: the new send covers the whole window so far
        factors = list(factors)
        if not factors:
            return
        stats, weights = _local_statistics(factors, statistic)
        vote = torch.ones((), dtype=torch.bool, device=stats[0].device)
        pending = self.communicator.start_average(stats, weights, vote, "factors (early)")
        self._early = (pending, factors, [(f.rows, f.samples) for f, _ in factors])

    def drop_early(self) -> None:
        if self._early is not None:
            self._early[0].wait()
            self._early = None

    def statistics(
        self, factors: Sequence[tuple[RunningFactor, bool]], statistic: Statistic,
        accept: Tensor | None,
    ) -> tuple[list[RunningFactor], list[Tensor], list[Tensor] | None, Tensor | None]:  # fmt: skip
        """Every factor's statistic averaged over ranks (weighted by the rows behind an
        ``A``, the samples behind a ``G``). What :meth:`send_early` sent is used whenever
        there is one (the same on every rank); the rest goes now, with the accept vote."""
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
            if late and not self.warned_late_rows:
                self.warned_late_rows = True
                warn(
                    "kfrob: layers recorded statistics after the window's last "
                    "DistributedDataParallel forward (a call of the inner model or of a "
                    "layer outside it); those rows were left out of the averaged factors "
                    "(warned once)"
                )
        rest = [(f, codomain) for f, codomain in factors if id(f) not in sent]
        stats, weights = _local_statistics(rest, statistic)
        vote = torch.ones((), dtype=torch.bool) if accept is None else accept
        totals, accepted = self.communicator.average_(stats, weights, vote)
        for (factor, _), stat, total in zip(rest, stats, totals, strict=True):
            sent[id(factor)] = (stat, total)
        averaged = [sent[id(f)] for f, _ in factors]
        return (
            [f for f, _ in factors],
            [s for s, _ in averaged],
            [t > 0 for _, t in averaged],
            accepted,
        )

    # --- inverses and agreement ----------------------------------------------------------
    def inverses(
        self, due: Sequence[TrackedLayer], method: InverseMethod, damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | RemoteInverse | None]:  # fmt: skip
        """Decompose this rank's due layers, then share the inverses (the damped matrices,
        or eigenbases and eigenvalues whose cheap scaling is recomputed on arrival)."""
        mine = self._decompose_mine(due, method, damping, held)
        states = {
            name: None if inv is None else method.shared_state(inv) for name, inv in mine.items()
        }
        devices = {layer.name: layer.math.device for layer in due}
        return {
            name: None if state is None else method.assemble(state, damping[name], devices[name])
            for name, state in self.communicator.share_states(states, self.owners()).items()
        }

    def _decompose_mine(
        self, due: Sequence[TrackedLayer], method: InverseMethod, damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | None]:  # fmt: skip
        owners, rank = self.owners(), self.communicator.rank
        return method.compute([layer for layer in due if owners[layer.name] == rank], damping, held)

    def fired_anywhere(self, local: dict[str, bool]) -> dict[str, bool]:
        """Whether each layer's hooks fired on any rank (one small gather of flags), so that
        every rank disables the same layers."""
        gathered = self.communicator.gather_objects(local)
        return {name: any(flags[name] for flags in gathered) for name in local}

    def check_same_layers(self, layout: dict[str, Any]) -> None:
        """One small gather of every rank's layer table; every rank raises the same
        ``ValueError``, naming the first layer that differs, so none waits for the others."""
        tables = self.communicator.gather_objects(layout)
        for rank, table in enumerate(tables):
            if table == tables[0]:
                continue
            for name in sorted(set(table) | set(tables[0])):
                mine, theirs = tables[0].get(name), table.get(name)
                if mine != theirs:
                    raise ValueError(
                        f"ranks disagree on the model at layer {name!r}: rank 0 has "
                        f"{mine or 'no such layer'}, rank {rank} has {theirs or 'no such layer'}"
                    )

    def verify(self, checksums: dict[str, Tensor]) -> None:
        """One all-gather of the checksums (a host read: a debugging aid); every rank raises
        the same ``RuntimeError`` naming the first layer whose factors differ."""
        names = sorted(checksums)
        if not names:
            return
        mine = torch.stack([checksums[name].double() for name in names])
        gathered = self.communicator.gather_objects(mine.cpu())
        for rank, theirs in enumerate(gathered[1:], start=1):
            for name, a, b in zip(names, gathered[0].tolist(), theirs.tolist(), strict=True):
                if a != b:
                    raise RuntimeError(
                        f"kfrob: the factors of layer {name!r} differ between ranks 0 and "
                        f"{rank} (checksums {a!r} and {b!r}): the ranks have desynchronised"
                    )

    def average(self, values: Tensor) -> Tensor:
        vote = torch.ones((), dtype=torch.bool, device=values.device)
        self.communicator.start_average([values], [1.0], vote, "damping").finish()
        return values


class Owner(Replicated):
    """A layer's inverse stays on its owner, which preconditions that layer and broadcasts
    the result every step: less memory, more traffic."""

    def inverses(
        self, due: Sequence[TrackedLayer], method: InverseMethod, damping: Mapping[str, float],
        held: Mapping[str, Any],
    ) -> dict[str, Inverse | RemoteInverse | None]:  # fmt: skip
        """Decompose this rank's due layers and share only whether each succeeded."""
        mine = self._decompose_mine(due, method, damping, held)
        flags = {name: None if inverse is None else {} for name, inverse in mine.items()}
        owners = self.owners()
        return {
            name: None if ok is None else mine.get(name, RemoteInverse(owners[name]))
            for name, ok in self.communicator.share_states(flags, owners).items()
        }

    def precondition(self, matrices: dict[str, Tensor], apply: Apply) -> dict[str, Tensor]:
        """Each owner preconditions its layers and broadcasts the results; every rank must
        call this together."""
        owners, rank = self.owners(), self.communicator.rank
        mine = {name: apply(name, m) for name, m in matrices.items() if owners[name] == rank}
        shapes = {name: matrix.shape for name, matrix in matrices.items()}
        device = next(iter(matrices.values())).device if matrices else torch.device("cpu")
        dtype = next(iter(matrices.values())).dtype if matrices else torch.float32
        dtype = torch.promote_types(dtype, torch.float32)  # what apply returns
        return self.communicator.share_tensors(mine, shapes, owners, dtype, device)

    def loaded_inverse(self, name: str, state: dict[str, Any], device: torch.device) -> Any:
        """Only the owner keeps a loaded inverse."""
        owner = self.owners()[name]
        if owner == self.communicator.rank:
            return inverse_from_state(state, device)
        return RemoteInverse(owner)


def make_placement(
    communicator: Communicator | None, inverse_placement: str, costs: dict[str, float]
) -> Placement:
    """The placement for a communicator (``None``: one process) and the option."""
    if communicator is None:
        return Local()
    match inverse_placement:
        case "owner":
            return Owner(communicator, costs)
        case _:
            return Replicated(communicator, costs)


def _local_statistics(
    factors: Sequence[tuple[RunningFactor, bool]], statistic: Statistic
) -> tuple[list[Tensor], list[float]]:
    """This rank's statistics (zeros where it recorded nothing) and their weights: the rows
    behind an ``A``, the samples behind a ``G``."""
    stats = [statistic(f, codomain) if f.pending else f.zero_statistic() for f, codomain in factors]
    weights = [
        float(f.samples if codomain else f.rows) if f.pending else 0.0 for f, codomain in factors
    ]
    return stats, weights
