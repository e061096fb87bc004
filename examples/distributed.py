"""Data-parallel training with kfrob: DistributedDataParallel plus FrobPreconditionedSGD.

Launch one process per GPU (or several on a CPU) with ``torchrun``; each rank trains the MLP
784-512-256-10 on its shard of the Fashion-MNIST subset shipped with kfrob. Nothing in the
loop is kfrob-specific: the optimizer finds the process group, averages its factor
statistics over the ranks and shares the eigendecompositions among them, so every rank
holds the same factors and takes the same step.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py            # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 --rdzv_id=kfrob examples/distributed.py     # two nodes

With a fixed ``--node_rank`` (static rendezvous) the global ranks, and so the shards and
every step, are those of one node with all the processes: tests/test_distributed_launch.py
runs two "nodes" on one machine against a single-node run.

Uses NCCL on GPUs and gloo on CPUs. ``--inverse-placement owner`` keeps each layer's
inverse on one rank only (less memory, more traffic; see docs/distributed.md): every rank
rotates its own gradients under the default rule, so owner placement takes
``step_rule="adam_grafted"``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.job.workloads import mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--inverse-placement", default="replicated")
    parser.add_argument("--save", default=None, help="rank 0 saves the trained weights here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)

    (x, y), (x_test, y_test) = (load_fashion_mnist(s, embedded=True) for s in ("train", "test"))
    n = len(x) // world * world  # equal shards: every rank takes the same number of steps
    x, y = x[:n][rank::world].to(device), y[:n][rank::world].to(device)
    torch.manual_seed(0)  # the same initial model on every rank
    model = DistributedDataParallel(mlp().to(device))
    opt = FrobPreconditionedSGD(
        model, lr=3e-3, loss="cross_entropy", inverse_placement=args.inverse_placement,
        step_rule="adam_grafted" if args.inverse_placement == "owner" else "eigenbasis_adam",
        generator=torch.Generator(device or "cpu").manual_seed(rank),  # a sampler per rank
    )  # fmt: skip

    step = 0
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for batch in order.split(args.batch_size):
            if step == args.max_steps:
                break
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            step += 1
        if rank == 0:
            with torch.no_grad():
                logits = model.module(x_test.to(device))
                accuracy = (logits.argmax(1).cpu() == y_test).float().mean().item()
            print(f"epoch {epoch}: test accuracy {accuracy:.4f} ({step} steps on {world} ranks)")
    if rank == 0 and args.save:
        torch.save({k: v.cpu() for k, v in model.module.state_dict().items()}, args.save)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
