"""Run a function on several gloo ranks, each a process spawned on loopback, within a time
limit; and the tiny data-parallel training run the distributed tests compare."""

from __future__ import annotations

import contextlib
import socket
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kfrob import FrobPreconditionedSGD
from tests.reference import CountingMethod

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
STEPS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int,
    world_size: int,
    port: int,
    out: str,
    worker: Callable[..., Any],
    args: tuple,
    kwargs: dict[str, Any],
    threads: int = 1,
) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        result = worker(rank, world_size, *args, **kwargs)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        (Path(out) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    world_size: int,
    worker: Callable[..., Any],
    out: Path,
    *args: Any,
    timeout: float = 120.0,
    threads: int = 1,
    **kwargs: Any,
) -> list[Any]:
    """``worker(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned gloo ranks of
    ``threads`` intra-op threads each; returns their results (what each returned), failing
    with the rank's traceback or on timeout."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    context = mp.get_context("spawn")
    processes = [
        context.Process(
            target=_entry,
            args=(rank, world_size, port, str(out), worker, args, kwargs, threads),
        )
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    errors = [(out / f"rank{r}.error") for r in range(world_size)]
    messages = [e.read_text() for e in errors if e.exists()]
    assert not messages, "\n".join(messages)
    assert not alive, f"ranks timed out after {timeout} s"
    # a rank that wrote its result has finished kfrob's work; its exit status after that
    # (process-group teardown) is torch's business, not the test's
    missing = [r for r in range(world_size) if not (out / f"rank{r}.pt").exists()]
    assert not missing, (
        f"ranks {missing} wrote no result; exit codes {[p.exitcode for p in processes]}"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


# --- the training run ------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), nn.Tanh(), nn.Linear(5, 4),
    )  # fmt: skip


def batches(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batches ``(steps, GLOBAL_BATCH, 2, 4, 4)`` and their labels."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, GLOBAL_BATCH, 2, 4, 4, generator=gen)
    y = torch.randint(0, 4, (steps, GLOBAL_BATCH), generator=gen)
    return x, y


def make_optimizer(model: nn.Module, **options: Any) -> FrobPreconditionedSGD:
    settings = {
        "lr": 0.1,
        "momentum": 0.5,
        "fisher": "empirical",
        "inverse_update_freq": 2,
        "damping": 1e-2,
        **options,
    }
    return FrobPreconditionedSGD(model, **{"step_rule": "preconditioned_sgd", **settings})


def train(
    rank: int,
    world_size: int,
    options: dict[str, Any] | None = None,
    *,
    first_step: int = 0,
    last_step: int = STEPS,
    checkpoint: dict[str, Any] | None = None,
    nan_at: tuple[int, int] | None = None,
    pack_triangles: bool = False,
    ddp: bool = True,
    accumulate: int = 1,
    subgroup: bool = False,
    extra_forward_on: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Steps ``first_step .. last_step - 1`` on this rank's slice of the global batches
    (the whole batch on one rank), from ``checkpoint`` if given. ``nan_at=(rank, step)``
    poisons that rank's input at that step; ``accumulate`` splits each rank's batch into
    micro-batches, all but the last under ``DDP.no_sync()``; ``subgroup`` passes an explicit
    process group (a new group of all ranks). Returns parameters, factors, the optimizer's
    state, the last step's diagnostics and how often this rank decomposed each layer."""
    inner = make_model().to(dtype)
    model: nn.Module = inner
    if ddp and dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(inner)
    group = {"process_group": dist.new_group(list(range(world_size)))} if subgroup else {}
    opt = make_optimizer(model, **(options or {}), **group)
    if checkpoint is not None:
        inner.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
    pre = opt.preconditioner
    if pre.communicator is not None:
        pre.communicator.pack_triangles = pack_triangles
    counting = CountingMethod(pre.method)
    pre.method = counting  # type: ignore[assignment]
    x_all, y_all = batches()
    x_all = x_all.to(dtype)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(first_step, last_step):
        x, y = x_all[step, rows].clone(), y_all[step, rows]
        if nan_at == (rank, step):
            x[0, 0, 0, 0] = float("nan")
        opt.zero_grad()
        for i, (xs, ys) in enumerate(zip(x.chunk(accumulate), y.chunk(accumulate), strict=True)):
            last = i == accumulate - 1
            window = (
                model.no_sync()
                if isinstance(model, nn.parallel.DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with window:
                (F.cross_entropy(model(xs), ys) / accumulate).backward()
        if rank == extra_forward_on:  # a recording call of the inner model on one rank
            inner(x)
        diagnostics = opt.diagnostics() if step == last_step - 1 else {}
        opt.step()
    return {
        "diagnostics": diagnostics,
        "params": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "factors": pre.factors(),
        "state": {"model": inner.state_dict(), "optimizer": opt.state_dict()},
        "counts": Counter(name for names, _ in counting.calls for name in names),
        "owners": pre.owners() if pre.communicator is not None else {},
        "skipped": int(pre.skipped_windows),
        "traffic": dict(pre.communicator.traffic.bytes) if pre.communicator else {},
        "calls": dict(pre.communicator.traffic.calls) if pre.communicator else {},
        "warned_late_rows": getattr(pre.placement, "warned_late_rows", False),
    }


class TwoHeads(nn.Module):
    """A trunk and two heads; the second head runs only when asked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.a, self.b = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, use_b: bool = False) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        return self.a(h) + (self.b(h) if use_b else 0.0)


def train_rank_dependent(rank: int, world_size: int, nan_grad_at: int | None = None) -> dict:
    """Ranks that run different layers (head ``b`` only on rank 0, at step 1) or see
    different gradients (without DDP, a NaN gradient on rank 1 at ``nan_grad_at``): the
    ranks must still take the same collectives and hold the same factors."""
    inner = TwoHeads()
    model: nn.Module = inner
    if nan_grad_at is None:
        model = nn.parallel.DistributedDataParallel(inner, find_unused_parameters=True)
    opt = make_optimizer(model, momentum=0.0, inverse_update_freq=3)
    gen = torch.Generator().manual_seed(rank)
    for step in range(6):
        x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x, use_b=step == 1 and rank == 0), y).backward()
        if nan_grad_at == step and rank == 1:
            inner.a.weight.grad[0, 0] = float("nan")
        opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "factors": opt.preconditioner.factors(),
        "disabled": dict(opt.preconditioner.disabled),
        "skipped": int(opt.preconditioner.skipped_windows),
    }


def refuse_fsdp(rank: int, world_size: int) -> str:
    """Try kfrob on an FSDP-sharded model; returns the error message."""
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(make_model())
    try:
        make_optimizer(model)
    except ValueError as err:
        return str(err)
    return "no error"


# --- uneven batches ----------------------------------------------------------------------------

# rows per rank at each step (each sums to GLOBAL_BATCH): uneven, and an empty last batch
UNEVEN = [(3, 9), (9, 3), (6, 6), (1, 11), (12, 0), (5, 7), (2, 10), (0, 12)]


def _rank_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean loss of this rank's rows; an empty batch has loss 0 (and zero gradients)."""
    out = model(x)
    return F.cross_entropy(out, y) if len(y) else out.sum() * 0.0


def train_uneven(
    rank: int, world_size: int, options: dict[str, Any] | None = None,
    sizes: list[tuple[int, ...]] = UNEVEN,
) -> dict[str, Any]:  # fmt: skip
    """Each step, this rank takes its ``sizes[step][rank]`` rows of the global batch."""
    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner)
    opt = make_optimizer(model, **(options or {}))
    x_all, y_all = batches()
    for step, counts in enumerate(sizes):
        start = sum(counts[:rank])
        rows = slice(start, start + counts[rank])
        opt.zero_grad()
        _rank_loss(model, x_all[step, rows], y_all[step, rows]).backward()
        opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "factors": opt.preconditioner.factors(),
    }


def reference_uneven(
    options: dict[str, Any] | None = None, sizes: list[tuple[int, ...]] = UNEVEN
) -> dict[str, Any]:
    """One process with the factors of the concatenated batch (recorded from its mean loss)
    and DDP's gradient for these per-rank batches: the mean over ranks of each rank's mean
    loss gradient (an empty rank adds zero)."""
    model = make_model()
    opt = make_optimizer(model, **(options or {}))
    capture = opt.preconditioner.capture
    x_all, y_all = batches()
    for step, counts in enumerate(sizes):
        opt.zero_grad()
        rows = slice(0, sum(counts))  # the concatenated batch of this step
        F.cross_entropy(model(x_all[step, rows]), y_all[step, rows]).backward()  # records A, G
        opt.zero_grad()
        capture.active, recording = False, capture.active
        start = 0
        for count in counts:
            rows = slice(start, start + count)
            (_rank_loss(model, x_all[step, rows], y_all[step, rows]) / len(counts)).backward()
            start += count
        capture.active = recording
        opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "factors": opt.preconditioner.factors(),
    }


def weighted_average(rank: int, world_size: int) -> list[torch.Tensor]:
    """``Communicator.average_`` of rank-dependent statistics with rank-dependent weights."""
    from kfrob.distributed import Communicator

    communicator = Communicator()
    stats = [torch.full((2, 3), float(rank + 1)), torch.full((4,), 10.0 * (rank + 1))]
    weights = [float(rank + 1), 0.0 if rank == 1 else 5.0]
    totals, accepted = communicator.average_(stats, weights, torch.ones((), dtype=torch.bool))
    return [*stats, torch.stack(totals), accepted]


def refuse_mismatch(rank: int, world_size: int, change: str) -> str:
    """Rank 1 builds a model that differs (``"shape"`` or ``"extra"`` layer); returns the
    error each rank raised at construction."""
    torch.manual_seed(0)
    width = 6 if rank == 1 and change == "shape" else 5
    layers = [nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)]
    if rank == 1 and change == "extra":
        layers.append(nn.Linear(3, 3))
    try:
        make_optimizer(nn.Sequential(*layers))
    except ValueError as err:
        return str(err)
    return "no error"


def repeat_train(
    rank: int, world_size: int, options: dict[str, Any], extra: dict[str, Any], repeats: int
) -> list[dict[str, torch.Tensor]]:
    """:func:`train` ``repeats`` times in one process group; each run's parameters."""
    return [train(rank, world_size, options, **extra)["params"] for _ in range(repeats)]


# rank 0 has 8 batches of 6 rows, rank 1 runs out after 6 and joins
JOIN_STEPS = (8, 6)
JOIN_SIZES = [(6, 6)] * 6 + [(6, 0)] * 2


def train_join(rank: int, world_size: int, options: dict[str, Any] | None = None) -> dict:
    """Uneven inputs under ``Join([ddp, optimizer])``: rank 1 joins two steps early."""
    from torch.distributed.algorithms.join import Join

    inner = make_model()
    model = nn.parallel.DistributedDataParallel(inner)
    opt = make_optimizer(model, **(options or {}))
    x_all, y_all = batches()
    rows = slice(6 * rank, 6 * rank + 6)
    with Join([model, opt]):
        for step in range(JOIN_STEPS[rank]):
            opt.zero_grad()
            F.cross_entropy(model(x_all[step, rows]), y_all[step, rows]).backward()
            opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in inner.state_dict().items()},
        "factors": opt.preconditioner.factors(),
        "steps": opt.steps,
    }


def desynchronise(rank: int, world_size: int) -> str:
    """With ``verify_factors``, rank 1's factors of layer ``"3"`` are changed after a step;
    the next step must raise on every rank, naming the layer."""
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = make_optimizer(model, verify_factors=True)
    x_all, y_all = batches()
    rows = slice(6 * rank, 6 * rank + 6)
    try:
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x_all[step, rows]), y_all[step, rows]).backward()
            opt.step()
            if step == 1 and rank == 1:
                opt.preconditioner.layers["3"].domain.value.add_(1e-3)  # type: ignore[union-attr]
    except RuntimeError as err:
        return f"step {step}: {err}"
    return "no error"
