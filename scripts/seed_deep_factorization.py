"""Seed 001: the trace-of-Hessian penalty in deep matrix factorization acts like Schatten-1.

A rank-1 10×10 matrix ``X*`` (``‖X*‖_F = sqrt(10)``) is sensed by ``m = 50`` Gaussian
measurements ``y_i = ⟨A_i, X*⟩`` (half of the 100 unknowns). A depth-3 linear network
``X = W_3 W_2 W_1`` (each 10×10, initialised ``N(0, 1/10)``, the standard scale) is trained by
full-batch gradient descent on ``L = (1/2m) Σ_i (⟨A_i, X⟩ − y_i)²``:

* ``none``: ``L`` alone;
* ``hessian``: ``L + λ_t·tr(∇²L)``, the Hutchinson penalty of :mod:`kfrob.penalties`
  (one Rademacher probe per step, third-order autograd);
* ``kronecker``: ``L + λ_t·Σ_l ‖W_{<l}‖²_F ‖W_{>l}‖²_F``, the exact Kronecker-factored Fisher
  trace of the chain with identity input covariance (``linear_chain_fisher_trace``), which is the
  expectation of the Gauss–Newton trace over Gaussian measurements.

``λ_t`` starts at ``λ ∈ {1e-3, 1e-2}`` and halves every 400 steps, and every run stops at
the same training loss ``L ≤ 1e-5`` (where ``∇²L`` is essentially the Gauss–Newton matrix),
so the runs are compared at the same fit. Reported: the end-to-end Schatten-1 norm, the
recovery error ``‖X − X*‖_F / ‖X*‖_F`` and the Hessian trace (Hutchinson, 200 probes). Three
seeds (measurement sets and initialisations). About 40 s on 2 CPU cores:

    python scripts/seed_deep_factorization.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from seed_common import RESULTS, markdown_table, write_results
from torch import Tensor, nn

from kfrob.diagnostics import hessian_trace
from kfrob.penalties import hessian_trace_penalty, linear_chain_fisher_trace

D, RANK, DEPTH, M = 10, 1, 3, 50
TARGET_LOSS = 1e-5
CONFIGS = (
    ("none", 0.0),
    ("hessian", 1e-3),
    ("kronecker", 1e-3),
    ("hessian", 1e-2),
    ("kronecker", 1e-2),
)


class Sensing(nn.Module):
    """The linear chain ``X = W_L ⋯ W_1``, read through measurements: ``A ↦ ⟨A_i, X⟩``."""

    def __init__(self, scale: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.layers = nn.ParameterList(
            nn.Parameter(scale * torch.randn(D, D, generator=gen) / D**0.5) for _ in range(DEPTH)
        )

    def end_to_end(self) -> Tensor:
        x = self.layers[0]
        for w in self.layers[1:]:
            x = w @ x
        return x

    def forward(self, a: Tensor) -> Tensor:
        return (a * self.end_to_end()).sum((-2, -1))


def sensing_loss(out: Tensor, target: Tensor) -> Tensor:
    return 0.5 * (out - target).square().mean()


def problem(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(D, RANK, generator=gen) @ torch.randn(RANK, D, generator=gen)
    x = x * (D**0.5 / x.norm())
    a = torch.randn(M, D, D, generator=gen)
    return x, a, (a * x).sum((-2, -1))


def train(kind: str, lam: float, seed: int, max_steps: int, lr: float = 0.01) -> dict:
    x_star, a, y = problem(seed)
    model = Sensing(1.0, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    step = 0
    for step in range(max_steps):
        opt.zero_grad()
        loss = data = sensing_loss(model(a), y)
        if data.item() <= TARGET_LOSS:
            break
        lam_t = lam * 0.5 ** (step // 400)
        if kind == "hessian":
            gen = torch.Generator().manual_seed(step)
            loss = loss + lam_t * hessian_trace_penalty(model, sensing_loss, (a, y), 1, gen)
        elif kind == "kronecker":
            loss = loss + lam_t * linear_chain_fisher_trace(list(model.layers))
        loss.backward()
        opt.step()
    x = model.end_to_end().detach()
    gen = torch.Generator().manual_seed(0)
    return {
        "kind": kind,
        "lambda": lam,
        "seed": seed,
        "steps": step,
        "train_loss": float(sensing_loss(model(a), y)),
        "schatten1": float(torch.linalg.svdvals(x).sum()),
        "error": float((x - x_star).norm() / x_star.norm()),
        "hessian_trace": float(hessian_trace(model, sensing_loss, (a, y), 200, gen)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=8000)
    parser.add_argument("--quick", action="store_true", help="one seed, 1500 steps at most")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, max_steps = (1, 1500) if args.quick else (args.seeds, args.max_steps)
    runs = []
    for seed in range(seeds):
        for kind, lam in CONFIGS:
            runs.append(train(kind, lam, seed, max_steps))
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in runs[-1].items()})

    s1_star = float(torch.linalg.svdvals(problem(0)[0]).sum())
    keys = ("steps", "train_loss", "schatten1", "error", "hessian_trace")
    rows = []
    for kind, lam in CONFIGS:
        mine = [r for r in runs if r["kind"] == kind and r["lambda"] == lam]
        means = [statistics.fmean(r[k] for r in mine) for k in keys]
        rows.append([kind, lam, *means])
    header = ["penalty", "λ (start)", "steps", "train loss", "‖X‖_S1", "recovery error", "tr ∇²L"]
    per_seed = markdown_table(
        ["penalty", "λ", "seed", *keys],
        [[r["kind"], r["lambda"], r["seed"], *(r[k] for k in keys)] for r in runs],
    )
    body = (
        f"Rank-{RANK} {D}×{D} target (‖X*‖_S1 = {s1_star:.3f}), {M} Gaussian measurements, "
        f"depth {DEPTH}, gradient descent (lr 0.01) until the training loss is ≤ {TARGET_LOSS:g} "
        f"(or {max_steps} steps). Means over {seeds} seed(s):\n\n"
        + markdown_table(header, rows)
        + f"\n\n![Schatten-1 and recovery error]({'seed_deep_factorization.png'})\n\n"
        "Per seed:\n\n" + per_seed
    )
    md = write_results(
        "seed_deep_factorization",
        "Seed 001: flatness penalty in deep matrix factorization",
        body,
        {"runs": runs, "schatten1_target": s1_star},
        args.out,
    )
    plot(runs, args.out / "seed_deep_factorization.png")
    print(f"wrote {md}")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (kind, lam), marker in zip(CONFIGS, "osv^D", strict=True):
        mine = [r for r in runs if r["kind"] == kind and r["lambda"] == lam]
        label = kind if kind == "none" else f"{kind}, λ={lam:g}"
        ax.scatter([r["schatten1"] for r in mine], [r["error"] for r in mine], marker=marker,
                   label=label)  # fmt: skip
    ax.set_xlabel("Schatten-1 norm of W₃W₂W₁ at train loss ≤ 1e-5")
    ax.set_ylabel("relative recovery error")
    ax.legend(title="penalty")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
