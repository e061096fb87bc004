"""What kfrob communicates per step under data parallelism, and what it costs: 1, 2 and 3
gloo ranks on this machine, measured in one run.

Each rank trains the MLP 784-512-256-10 (DistributedDataParallel, batch 64 per rank, one
thread per rank) with kfrob at factor/inverse frequencies 1/10, in both inverse placements
and with symmetric statistics sent whole or as upper triangles; SGD under the same DDP is the
baseline. Reported per step: kfrob's payload bytes by purpose (factor all-reduce, inverse
broadcasts, preconditioned-gradient broadcasts), DDP's own gradient all-reduce for scale, and
the median step time as a ratio to the 1-rank kfrob step and to SGD with the same ranks.

With ``--device cuda`` each rank trains on its own GPU (rank r on ``cuda:r``) over NCCL, and
the device is synchronised before each clock read; a world size needs as many GPUs.

    python scripts/bench_distributed.py            # results/distributed.md
    python scripts/bench_distributed.py --steps 20 --world-sizes 1,2   # quicker look
    python scripts/bench_distributed.py --device cuda --world-sizes 1,2   # two GPUs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from report import (
    add_device_argument,
    device_count,
    device_name,
    process_group_backend,
    provenance,
    rank_device,
    sync,
    use_device,
    write_report,
)
from torch.nn.parallel import DistributedDataParallel

from kfrob import FrobPreconditionedSGD
from kfrob.job.workloads import mlp

SETTINGS = {
    "sgd": {},
    "kfrob": {"inverse_placement": "replicated"},
    "kfrob-triangles": {"inverse_placement": "replicated", "pack_triangles": True},
    "kfrob-owner": {"inverse_placement": "owner"},
}


def rank_main(
    rank: int, world: int, port: int, out: str, steps: int, warmup: int, device_spec: str
) -> None:
    torch.set_num_threads(1)
    device = rank_device(device_spec, rank)
    use_device(device)
    dist.init_process_group(
        process_group_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=world, timeout=timedelta(seconds=120),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(rank)
    x = torch.rand(steps + warmup, 64, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (steps + warmup, 64), generator=gen).to(device)
    device_ids = None if device.index is None else [device.index]
    results: dict[str, Any] = {}
    for name, options in SETTINGS.items():
        torch.manual_seed(0)
        inner = mlp().to(device)
        model = DistributedDataParallel(inner, device_ids=device_ids) if world > 1 else inner
        options = dict(options)
        pack = options.pop("pack_triangles", False)
        if name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = FrobPreconditionedSGD(
                    model, lr=0.01, inverse_update_freq=10, step_rule="preconditioned_sgd",
                    **options,
                )  # fmt: skip
            if opt.preconditioner.communicator is not None:
                opt.preconditioner.communicator.pack_triangles = pack
        times = []
        for step in range(steps + warmup):
            if step == warmup and isinstance(opt, FrobPreconditionedSGD):
                communicator = opt.preconditioner.communicator
                if communicator is not None:  # count the measured steps only
                    communicator.traffic.bytes.clear()
            dist.barrier()  # start every step together
            sync(device)
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x[step]), y[step]).backward()
            opt.step()
            sync(device)
            if step >= warmup:
                times.append(time.perf_counter() - start)
        traffic: dict[str, float] = {}
        if isinstance(opt, FrobPreconditionedSGD) and opt.preconditioner.communicator:
            traffic = {
                k: v / steps for k, v in opt.preconditioner.communicator.traffic.bytes.items()
            }
        results[name] = {"median": statistics.median(times), "traffic": traffic}
        if isinstance(opt, FrobPreconditionedSGD):
            opt.close()
    results["grad_bytes"] = sum(p.numel() * p.element_size() for p in inner.parameters())
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def measure(world: int, steps: int, warmup: int, port: int, device: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(world, port, out, steps, warmup, device), nprocs=world, join=True)
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-sizes", default="1,2,3")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--out", default="results")
    add_device_argument(parser)
    args = parser.parse_args()
    worlds = [int(w) for w in args.world_sizes.split(",")]
    available = device_count(args.device)
    if available is not None and max(worlds) > available:
        parser.error(
            f"--device {args.device} runs one rank per device: world size {max(worlds)} needs "
            f"{max(worlds)}, this machine has {available}"
        )

    runs = {}
    for i, world in enumerate(worlds):
        runs[world] = measure(world, args.steps, args.warmup, args.port + i, str(args.device))
        print(f"{world} rank(s) measured", flush=True)

    base = runs[min(runs)][0]["kfrob"]["median"]
    if available is None:  # ranks on the CPU
        transport = "gloo on loopback, one thread per rank"
        caveat = (
            " This machine has 2 cores, so 3 ranks oversubscribe it: read the 3-rank times "
            "as an upper bound."
        )
    else:
        transport = (
            f"{process_group_backend(args.device)}, one device per rank "
            f"(rank 0: {device_name(rank_device(args.device, 0))}), one thread per rank"
        )
        caveat = ""
    lines = [
        "# kfrob under data parallelism: bytes sent and step time per rank",
        "",
        f"{provenance(args.device)} MLP 784-512-256-10 under DistributedDataParallel, batch "
        f"64 per rank, {transport}, kfrob at factor/inverse frequencies "
        f"1/10; medians of {args.steps} steps after {args.warmup} warm-up steps (rank 0). "
        "Bytes are the payload one rank puts into collectives per step, averaged over the "
        f"steps (inverses: one refresh per 10 steps).{caveat}",
        "",
        "| ranks | setting | factor all-reduce (KiB/step) | inverse broadcasts (KiB/step) "
        "| gradient broadcasts (KiB/step) | DDP gradients (KiB/step) | step (ms) "
        "| step / 1-rank kfrob | step / SGD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for world, ranks in runs.items():
        rank0 = ranks[0]
        sgd = rank0["sgd"]["median"]
        for name in SETTINGS:
            if name == "sgd" or (world == 1 and name != "kfrob"):
                continue
            row = rank0[name]
            kib = {k: v / 1024 for k, v in row["traffic"].items()}
            kib["factors"] = kib.get("factors", 0) + kib.get("factors (early)", 0)
            ddp = rank0["grad_bytes"] / 1024 if world > 1 else 0.0
            lines.append(
                f"| {world} | {name} | {kib.get('factors', 0):.0f} | {kib.get('inverses', 0):.0f}"
                f" | {kib.get('gradients', 0):.0f} | {ddp:.0f} | {row['median'] * 1e3:.1f} | "
                f"{row['median'] / base:.2f} | {row['median'] / sgd:.2f} |"
            )
    write_report(args.out, "distributed.md", lines)
    summary = {str(w): [{k: v for k, v in r.items()} for r in ranks] for w, ranks in runs.items()}
    (Path(args.out) / "distributed.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
