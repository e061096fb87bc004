"""When factors are updated and inverses refreshed."""

from __future__ import annotations

from kfrob.distributed import assign_owners
from kfrob.options import ScheduleOptions

__all__ = ["RefreshSchedule"]


class RefreshSchedule:
    """Factor updates every ``factor_update_freq`` steps; inverse refreshes every
    ``inverse_update_freq`` steps, all layers together or, staggered, each layer on its own
    step of the cycle (greedy on the estimated decomposition ``costs``, the same rule as the
    owner assignment, so each step decomposes about the same amount and every rank agrees).

    Args:
        options: the frequencies and whether refreshes are staggered.
        costs: each layer's estimated decomposition cost.
    """

    def __init__(self, options: ScheduleOptions, costs: dict[str, float]) -> None:
        self.options = options
        self._costs = costs
        self._slots: dict[int, dict[str, int]] = {}

    def records(self, step: int) -> bool:
        """Whether the hooks record during the window that ends at ``step``."""
        return step % self.options.factor_update_freq == 0

    def due(self, step: int) -> frozenset[str] | None:
        """The layers refreshed at ``step`` besides those still without an inverse:
        ``None`` for all of them, else a set (empty on steps between refreshes)."""
        period = self.options.inverse_update_freq
        if self.options.stagger_refreshes:
            slot = step % period
            return frozenset(n for n, s in self.refresh_slots(period).items() if s == slot)
        return None if step % period == 0 else frozenset()

    def refresh_slots(self, count: int) -> dict[str, int]:
        """Which of ``count`` consecutive steps refreshes each layer."""
        if count not in self._slots:
            self._slots[count] = assign_owners(self._costs, count)
        return self._slots[count]
