"""The smallest training loop with FrobPreconditionedSGD, next to SGD and AdamW.

A small MLP learns a synthetic 4-class problem whose input features span two orders of
magnitude in scale: the ill-conditioning that K-FAC's input covariance ``A`` undoes. kfrob
(its default rule: Adam in the Kronecker eigenbasis), SGD with momentum and AdamW see the
same initialisation and the same batches; the script prints the training loss as it falls.
Runs in a few seconds on a CPU:

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfrob import FrobPreconditionedSGD


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1.5, 0.5, 20)
    x = torch.randn(n, 20, generator=gen) * scales
    y = (x / scales @ torch.randn(20, 4, generator=gen)).argmax(1)
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 4))


def train(name: str, model: nn.Module, opt: torch.optim.Optimizer, steps: int = 200) -> float:
    x, y = make_data()
    order = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (128,), generator=order)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % 40 == 0:
            with torch.no_grad():
                full = F.cross_entropy(model(x), y).item()
            print(f"{name:>6}  step {step:4d}  training loss {full:.4f}")
    return full


def main() -> None:
    model = make_model()
    # kfrob and AdamW at the same learning rate, the best of 3e-3, 1e-2, 3e-2, 0.1 for each
    kfac = train("kfrob", model, FrobPreconditionedSGD(model, lr=3e-2, loss="cross_entropy"))
    model = make_model()
    sgd = train("sgd", model, torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9))
    model = make_model()
    adamw = train("adamw", model, torch.optim.AdamW(model.parameters(), lr=3e-2))
    print(
        f"final training loss: kfrob {kfac:.4f}, SGD {sgd:.4f}, AdamW {adamw:.4f} "
        f"(kfrob / SGD {kfac / sgd:.2f}, kfrob / AdamW {kfac / adamw:.2f})"
    )


if __name__ == "__main__":
    main()
