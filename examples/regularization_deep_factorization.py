"""A flatness (trace-of-Hessian) penalty on a deep linear network lowers the end-to-end
Schatten-1 norm.

A depth-3 network ``X = W₃W₂W₁`` (10×10 layers) is fitted by gradient descent to 50 Gaussian
measurements of a rank-1 matrix, once plainly and once with ``λ·tr(∇²L)`` added (Hutchinson's
estimate with its graph kept, ``kfrob.penalties.hessian_trace_penalty``; λ halves every 400
steps). Both stop at the target training loss or after ``--max-steps``. About 10 s on 2 CPU cores:

    python examples/regularization_deep_factorization.py [--max-steps 8000]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

from kfrob.penalties import hessian_trace_penalty


class Chain(nn.Module):
    """Three 10×10 matrices; ``forward`` reads ``⟨A_i, W₃W₂W₁⟩`` for each measurement."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.ws = nn.ParameterList(nn.Parameter(torch.randn(10, 10, generator=gen) / 10**0.5)
                                   for _ in range(3))  # fmt: skip

    def matrix(self) -> Tensor:
        return self.ws[2] @ self.ws[1] @ self.ws[0]

    def forward(self, a: Tensor) -> Tensor:
        return (a * self.matrix()).sum((-2, -1))


def loss_fn(out: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (out - target).square().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=8000)
    parser.add_argument("--target-loss", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead

    gen = torch.Generator().manual_seed(100)
    x_star = torch.randn(10, 1, generator=gen) @ torch.randn(1, 10, generator=gen)
    x_star = x_star * (10**0.5 / x_star.norm())
    a = torch.randn(50, 10, 10, generator=gen)
    y = (a * x_star).sum((-2, -1))
    print(f"target: Schatten-1 norm {float(torch.linalg.svdvals(x_star).sum()):.3f}")
    for lam in (0.0, 1e-2):
        model = Chain()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for step in range(args.max_steps):
            opt.zero_grad()
            data = loss_fn(model(a), y)
            if data.item() <= args.target_loss:
                break
            loss = data
            if lam:
                probes = torch.Generator().manual_seed(step)
                flatness = hessian_trace_penalty(model, loss_fn, (a, y), 1, probes)
                loss = loss + lam * 0.5 ** (step // 400) * flatness
            loss.backward()
            opt.step()
        x = model.matrix().detach()
        s1 = float(torch.linalg.svdvals(x).sum())
        error = float((x - x_star).norm() / x_star.norm())
        print(f"λ={lam:g}: {step} steps, train loss {data.item():.1e}, Schatten-1 {s1:.3f}, "
              f"recovery error {error:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
