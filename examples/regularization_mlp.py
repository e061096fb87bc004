"""Penalties in a training loop: kfrob on the Fashion-MNIST MLP with weight decay measured in
its own running metric, and the geometric complexity the model ends with.

``matrix_penalty(model, "metric_frobenius", factors=opt)`` is ``Σ_l tr(A_l V_lᵀ G_l V_l)``
with ``V_l = [W_l, b_l]`` and the optimizer's running factors ``A_l``, ``G_l`` (constants in
the backward pass): the squared length of the weights in the metric kfrob steps in. About 5 s
on 2 CPU cores on 4,000 images of the embedded subset:

    python examples/regularization_mlp.py [--subset N] [--epochs 2] [--weight 1e-3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.diagnostics import geometric_complexity
from kfrob.job.workloads import mlp
from kfrob.penalties import matrix_penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=4000, help="train on the first N images")
    parser.add_argument("--weight", type=float, default=1e-3, help="λ of the metric penalty")
    args = parser.parse_args()

    (x, y), (x_test, y_test) = (load_fashion_mnist(s, embedded=True) for s in ("train", "test"))
    x, y = x[: args.subset], y[: args.subset]
    torch.manual_seed(0)
    model = mlp()
    opt = FrobPreconditionedSGD(model, lr=3e-3, loss="cross_entropy")
    for epoch in range(1, args.epochs + 1):
        for step, batch in enumerate(torch.randperm(len(x)).split(128)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[batch]), y[batch])
            penalty = torch.zeros(())
            if step or epoch > 1:  # the factors exist from the first step on
                penalty = matrix_penalty(model, "metric_frobenius", factors=opt)
            (loss + args.weight * penalty).backward()
            opt.step()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        gc = geometric_complexity(model, x_test[:500], 4, torch.Generator().manual_seed(0))
        share = float(args.weight * penalty.detach() / (loss + args.weight * penalty).detach())
        print(f"epoch {epoch}: test accuracy {accuracy:.4f}, metric penalty {float(penalty):.4f} "
              f"({share:.1%} of the loss), geometric complexity {float(gc):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
