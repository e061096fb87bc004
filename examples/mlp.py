"""The MLP workload in a plain PyTorch loop: kfrob with a cosine learning-rate schedule.

784-512-256-10 (ReLU) on the Fashion-MNIST subset shipped with kfrob (or the full set with
``--full``), cross-entropy, batch 128. Naming the loss gives kfrob its Monte Carlo Fisher;
any ``torch.optim.lr_scheduler`` drives kfrob's learning rate as it drives SGD's. About a
minute on 2 CPU cores:

    python examples/mlp.py [--full] [--epochs 5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_any_fashion_mnist, load_fashion_mnist
from kfrob.job.workloads import mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="the full set, if installed")
    parser.add_argument("--subset", type=int, help="train on the first N images only")
    args = parser.parse_args()

    if args.full:
        (x, y, source), (x_test, y_test, _) = (load_any_fashion_mnist(s) for s in ("train", "test"))
    else:
        (x, y), (x_test, y_test) = (load_fashion_mnist(s, embedded=True) for s in ("train", "test"))
        source = "embedded subset"
    x, y = x[: args.subset], y[: args.subset]
    print(f"data: {source}, {len(x)} training / {len(x_test)} test images")

    torch.manual_seed(0)
    model = mlp()
    opt = FrobPreconditionedSGD(model, lr=3e-3, loss="cross_entropy")
    steps_per_epoch = -(-len(x) // 128)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    for epoch in range(1, args.epochs + 1):
        for batch in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
            schedule.step()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}, lr {schedule.get_last_lr()[0]:.4f}")


if __name__ == "__main__":
    main()
