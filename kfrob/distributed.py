"""Communication for data-parallel training with ``torch.distributed`` (any backend).

kfrob's math never changes under data parallelism; this module only moves tensors between
ranks. It does three things, each with few, large collectives:

* **Average factor statistics** (:meth:`Communicator.average_`): every rank's window
  statistics, weighted by the rows (``A``) or samples (``G``) they came from, are summed in
  flat buckets with ``all_reduce`` (started asynchronously, bucket after bucket) and divided
  by the summed weights, so every rank folds the statistic of the global batch. Symmetric
  matrices can travel as their upper triangles (``pack_triangles``).
* **Assign inverse work** (:func:`assign_owners`): each layer's decompositions go to one
  rank, greedily by estimated cost (largest first, to the least-loaded rank), the same
  assignment on every rank.
* **Share results** from their owners (:meth:`Communicator.share_states`,
  :meth:`Communicator.share_tensors`): one ``broadcast`` per owning rank of a flat buffer
  (per dtype); the shapes come from a small ``all_gather_object`` of metadata, or are known
  to every rank.

Nothing here reads a tensor value to the host. The optimizer builds a :class:`Communicator`
when a process group is initialised (see :class:`kfrob.FrobPreconditionedSGD`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Communicator",
    "assign_owners",
    "check_not_sharded",
    "default_communicator",
    "unwrap",
]

BUCKET_ELEMENTS = 1 << 22  # 16 MiB of float32 per all-reduce bucket


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` and/or ``torch.compile`` (or ``model``
    itself): kfrob's hooks and layer names belong to it, so checkpoints load with or without
    the wrappers."""
    if dist.is_available():
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model = model.module
    compiled = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return compiled if isinstance(compiled, nn.Module) else model


def check_not_sharded(model: nn.Module) -> None:
    """Refuse FSDP and other sharded (``DTensor``) parameters: a layer's factors need the
    whole layer, which no rank holds there. Raises ``ValueError``."""
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    for name, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel | FSDPModule):
            raise ValueError(
                f"kfrob does not support FSDP (module {name or type(module).__name__!r} is "
                "sharded): use DistributedDataParallel, or precondition before sharding"
            )
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            raise ValueError(
                f"kfrob does not support sharded (DTensor) parameters ({name!r}); "
                "use DistributedDataParallel"
            )


def assign_owners(costs: dict[str, float], world_size: int) -> dict[str, int]:
    """Greedy balanced assignment of layers to ``world_size`` bins (ranks, or the steps
    of a staggered refresh cycle): layers by decreasing cost (ties by name), each to the
    bin with the least total so far (ties to the lowest). Deterministic."""
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for name, cost in sorted(costs.items(), key=lambda item: (-item[1], item[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += cost
    return owners


@dataclass
class Traffic:
    """Payload bytes this rank put into collectives, by purpose (for benchmarks)."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, purpose: str, tensor: Tensor) -> None:
        self.bytes[purpose] += tensor.numel() * tensor.element_size()
        self.calls[purpose] += 1


class Communicator:
    """kfrob's collectives on one process group.

    Args:
        group: the process group (``None``: the default group).
        pack_triangles: send symmetric ``(k, n, n)`` statistics as their upper triangles
            (about half the bytes, at the cost of a gather and a scatter).
        bucket_elements: the largest flat buffer of one all-reduce.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        pack_triangles: bool = False,
        bucket_elements: int = BUCKET_ELEMENTS,
    ) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.pack_triangles = pack_triangles
        self.bucket_elements = bucket_elements
        self.traffic = Traffic()

    def _global(self, rank: int) -> int:
        """A group rank as a global rank (collectives name their source globally)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    # --- factor statistics ---------------------------------------------------------------
    def average_(
        self, statistics: list[Tensor], weights: list[float], accept: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        """Replace each statistic by its weighted mean over ranks, in place. Returns the
        summed weights (0-dim tensors) and whether every rank accepted the window (``accept``
        is this rank's vote, a bool tensor; it travels in the same buffer). A statistic with
        weight 0 on a rank does not count there (its value is ignored)."""
        return self.start_average(statistics, weights, accept).finish()

    def start_average(
        self,
        statistics: list[Tensor],
        weights: list[float],
        accept: Tensor,
        purpose: str = "factors",
    ) -> PendingAverage:
        """Launch :meth:`average_` asynchronously; ``finish()`` the result to wait for it.
        ``purpose`` labels the bytes in :attr:`traffic`."""
        device = accept.device if not statistics else statistics[0].device
        pieces = []
        for statistic, weight in zip(statistics, weights, strict=True):
            packed = self._pack(statistic) if weight else torch.zeros_like(self._pack(statistic))
            pieces.append((packed * weight).reshape(-1))
        pieces.append(torch.tensor(weights, dtype=torch.float32, device=device))
        pieces.append((~accept).float().reshape(1).to(device))
        flat, works = self._start_all_reduce(pieces, purpose)
        return PendingAverage(self, statistics, flat, works)

    def _pack(self, statistic: Tensor) -> Tensor:
        if not self.pack_triangles or statistic.dim() != 3:
            return statistic
        rows, cols = torch.triu_indices(*statistic.shape[-2:], device=statistic.device)
        return statistic[:, rows, cols]

    def _packed_size(self, statistic: Tensor) -> int:
        if not self.pack_triangles or statistic.dim() != 3:
            return statistic.numel()
        n = statistic.shape[-1]
        return statistic.shape[0] * n * (n + 1) // 2

    def _unpack(self, flat: Tensor, like: Tensor) -> Tensor:
        if not self.pack_triangles or like.dim() != 3:
            return flat.view_as(like)
        rows, cols = torch.triu_indices(*like.shape[-2:], device=like.device)
        full = torch.empty_like(like)
        values = flat.view(like.shape[0], -1)
        full[:, rows, cols] = values
        full[:, cols, rows] = values
        return full

    def _start_all_reduce(self, pieces: list[Tensor], purpose: str) -> tuple[Tensor, list]:
        """Start summing the concatenation of ``pieces`` over ranks, in buckets launched
        back to back; returns the buffer and the works to wait for."""
        # float32, or float64 where a statistic is (float64 layers keep float64 curvature)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in pieces) else torch.float32
        flat = torch.cat([p.to(dtype) for p in pieces])
        works = []
        for bucket in flat.split(self.bucket_elements):
            self.traffic.add(purpose, bucket)
            works.append(dist.all_reduce(bucket, group=self.group, async_op=True))
        return flat, works

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small, picklable), in rank order."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    # --- results from their owners -------------------------------------------------------
    def share_states(
        self, owned: dict[str, dict[str, Any] | None], owners: dict[str, int]
    ) -> dict[str, dict[str, Any] | None]:
        """Every owner's per-layer states (dicts of tensors and plain values, or ``None`` for
        a failed computation), on every rank. ``owned`` holds this rank's layers."""
        local = {name: _describe(state) for name, state in owned.items()}
        gathered = self.gather_objects(local)
        metadata = {name: meta for part in gathered for name, meta in (part or {}).items()}
        tensors = {
            name: [state[key] for key, _ in _tensor_entries(metadata[name])]
            for name, state in owned.items()
            if state is not None
        }
        shapes = {
            name: [(tuple(shape), dtype) for _, (shape, dtype) in _tensor_entries(meta)]
            for name, meta in metadata.items()
            if meta is not None
        }
        received = self._broadcast(tensors, shapes, owners, "inverses")
        return {
            name: None if meta is None else _rebuild(meta, received.get(name, []))
            for name, meta in metadata.items()
        }

    def share_tensors(
        self, owned: dict[str, Tensor], shapes: dict[str, torch.Size], owners: dict[str, int],
        dtype: torch.dtype, device: torch.device,
    ) -> dict[str, Tensor]:  # fmt: skip
        """One tensor per layer from its owner, on every rank; ``shapes`` (known to every
        rank) gives each layer's shape."""
        layouts = {name: [(tuple(shape), dtype)] for name, shape in shapes.items()}
        received = self._broadcast(
            {name: [t] for name, t in owned.items()}, layouts, owners, "gradients", device
        )
        return {name: tensors[0] for name, tensors in received.items()}

    def _broadcast(
        self,
        tensors: dict[str, list[Tensor]],
        layouts: dict[str, list[tuple[tuple[int, ...], torch.dtype]]],
        owners: dict[str, int],
        purpose: str,
        device: torch.device | None = None,
    ) -> dict[str, list[Tensor]]:
        """One flat buffer per (owner, dtype), broadcast from the owner; returns every
        layer's tensors (this rank's own are returned as they are)."""
        if device is None:
            device = next((t.device for ts in tensors.values() for t in ts), None)
        if device is None:
            device = _group_device(self.group)
        plan: dict[tuple[int, torch.dtype], list[tuple[str, int, tuple[int, ...]]]] = {}
        for name in sorted(layouts):
            for index, (shape, dtype) in enumerate(layouts[name]):
                plan.setdefault((owners[name], dtype), []).append((name, index, shape))
        out: dict[str, list[Tensor]] = {
            name: [torch.empty(0)] * len(layout) for name, layout in layouts.items()
        }
        works = []
        buffers = []
        order = sorted(plan.items(), key=lambda item: (item[0][0], str(item[0][1])))
        for (owner, dtype), entries in order:
            sizes = [_numel(shape) for _, _, shape in entries]
            if owner == self.rank:
                flat = torch.cat([tensors[n][i].reshape(-1).to(dtype) for n, i, _ in entries])
                self.traffic.add(purpose, flat)
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            works.append(dist.broadcast(flat, self._global(owner), group=self.group, async_op=True))
            buffers.append((owner, entries, sizes, flat))
        for work in works:
            work.wait()
        for owner, entries, sizes, flat in buffers:
            for (name, index, shape), piece in zip(entries, flat.split(sizes), strict=True):
                # a fresh tensor, like the owner's own: BLAS kernels may round differently
                # for data at another alignment, and ranks must compute bit-identically
                mine = owner == self.rank
                out[name][index] = tensors[name][index] if mine else piece.view(shape).clone()
        return out


class PendingAverage:
    """A weighted average of statistics on its way (see :meth:`Communicator.average_`)."""

    def __init__(
        self, communicator: Communicator, statistics: list[Tensor], flat: Tensor, works: list
    ) -> None:
        self.communicator, self.statistics = communicator, statistics
        self.flat, self.works = flat, works

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []

    def finish(self) -> tuple[list[Tensor], Tensor]:
        """Wait, write the averages into the statistics; the summed weights and whether
        every rank accepted the window."""
        self.wait()
        flat, statistics, communicator = self.flat, self.statistics, self.communicator
        totals = flat[flat.numel() - len(statistics) - 1 : -1]
        offset = 0
        for i, statistic in enumerate(statistics):
            size = communicator._packed_size(statistic)
            summed = flat[offset : offset + size] / totals[i].clamp(min=1e-30)
            statistic.copy_(communicator._unpack(summed, statistic))
            offset += size
        return list(totals.unbind()), flat[-1] == 0


def default_communicator(
    process_group: dist.ProcessGroup | None = None, *, pack_triangles: bool = False
) -> Communicator | None:
    """A :class:`Communicator` when a process group of more than one rank is initialised
    (``process_group`` or the default group), else ``None`` (single-process behaviour)."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return None
    if dist.get_world_size(process_group) == 1:
        return None
    return Communicator(process_group, pack_triangles=pack_triangles)


# --- states as metadata + tensors --------------------------------------------------------------


def _describe(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """A state's layout: tensors become ``("tensor", shape, dtype)``; other values stay."""
    if state is None:
        return None
    return {
        key: ("tensor", tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value
        for key, value in state.items()
    }


def _tensor_entries(meta: dict[str, Any] | None) -> list[tuple[str, tuple[Any, Any]]]:
    if meta is None:
        return []
    return [
        (key, (value[1], value[2]))
        for key, value in sorted(meta.items())
        if isinstance(value, tuple) and value and value[0] == "tensor"
    ]


def _rebuild(meta: dict[str, Any], tensors: list[Tensor]) -> dict[str, Any]:
    state = dict(meta)
    for (key, _), tensor in zip(_tensor_entries(meta), tensors, strict=True):
        state[key] = tensor
    return state


def _numel(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a rank's buffers live for this group's backend: its GPU for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
