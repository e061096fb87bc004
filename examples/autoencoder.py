"""The deep autoencoder workload in a plain PyTorch loop, with kfrob's diagnostics.

784-1000-500-250-30 and the mirrored decoder (ReLU) learn to reconstruct Fashion-MNIST
images (the subset shipped with kfrob) under the loss ``½‖f(x) − x‖²`` per image.
``loss="mse"`` makes kfrob sample its Fisher from the matching unit-variance Gaussian. Every
20 steps the script prints what ``opt.diagnostics()`` reports about the step: its length in
the factor metric, the KL clip factor, the curvature's trace. About two minutes on 2 CPU
cores:

    python examples/autoencoder.py [--epochs 2]
"""

from __future__ import annotations

import argparse

import torch

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.job.workloads import autoencoder, reconstruction_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, help="train on the first N images only")
    args = parser.parse_args()
    x = load_fashion_mnist("train", embedded=True)[0][: args.subset]

    torch.manual_seed(0)
    model = autoencoder()
    opt = FrobPreconditionedSGD(model, lr=1e-3, loss="mse")
    step = 0
    for epoch in range(1, args.epochs + 1):
        for batch in torch.randperm(len(x)).split(128):
            opt.zero_grad()
            loss = reconstruction_loss(model(x[batch]), x[batch])
            loss.backward()
            if step % 20 == 1:  # from the second step on, the factors exist
                d = opt.diagnostics()  # of the step the current gradients give
                metric = sum(v**2 for k, v in d.items() if k.endswith("/update_norm_metric"))
                print(
                    f"step {step:4d}  loss {loss.item():7.3f}  step length in the factor "
                    f"metric {metric**0.5:.2e}  KL clip factor {d['kl_clip_factor']:.3f}  "
                    f"tr(A⊗G) {d['fisher_trace']:.3g}"
                )
            opt.step()
            step += 1
        with torch.no_grad():
            error = reconstruction_loss(model(x), x).item()
        print(f"epoch {epoch}: training reconstruction loss {error:.3f}")


if __name__ == "__main__":
    main()
