"""The CNN workload in a plain PyTorch loop, checkpointed and resumed.

Two 5×5 conv layers (32, 64 channels) with max-pooling, then 3136-128-10, on the
Fashion-MNIST subset shipped with kfrob, with kfrob's defaults (factors every 10th step,
eigenbases every 40th, Adam in the Kronecker eigenbasis). After the
first epoch the script saves model and optimizer (factors, inverses, step counter, sampler
state included) with ``state_dict()``, rebuilds both from the file, and trains on: a resumed
run takes exactly the steps of an uninterrupted one. About two minutes on 2 CPU cores:

    python examples/cnn.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.job.workloads import cnn


def make(state: dict | None = None) -> tuple[torch.nn.Module, FrobPreconditionedSGD]:
    torch.manual_seed(0)
    model = cnn()
    generator = torch.Generator().manual_seed(1)  # the MC Fisher's sampler, checkpointed too
    opt = FrobPreconditionedSGD(model, lr=3e-3, loss="cross_entropy", generator=generator)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, help="train on the first N images only")
    args = parser.parse_args()
    (x, y), (x_test, y_test) = (load_fashion_mnist(s, embedded=True) for s in ("train", "test"))
    x, y = x[: args.subset], y[: args.subset]
    order = torch.Generator().manual_seed(0)
    model, opt = make()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "cnn.pt"
        for epoch in range(1, args.epochs + 1):
            for batch in torch.randperm(len(x), generator=order).split(128):
                opt.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                opt.step()
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch}: test accuracy {accuracy:.4f} ({opt.steps} steps)")
            if epoch == 1:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint)
                opt.close()  # remove the old optimizer's hooks before building the new one
                model, opt = make(torch.load(checkpoint, weights_only=True))
                print(f"saved and resumed from {checkpoint.name} at step {opt.steps}")


if __name__ == "__main__":
    main()
