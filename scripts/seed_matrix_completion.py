"""Seed 003: matrix completion with no penalty, the nuclear norm and nuclear/Frobenius.

A rank-2 40×40 matrix ``M`` (``‖M‖_F = 40``, entries of order 1) is observed on a random
fraction of its entries. A full matrix ``X`` (the weight of a bias-free ``nn.Linear`` applied
to the identity) starts at ``0.01·N(0, 1)`` and is trained with Adam on

    mean over observed (i, j) of (X_ij − M_ij)²  +  λ · penalty(X)

for ``penalty`` in {none, nuclear ``Σσ``, nuclear/Frobenius ``Σσ / sqrt(Σσ²)``}, each with
the best ``λ`` of a 4-point grid (chosen on the recovery error itself, an oracle choice, the
same for every penalty). The recovery error is ``‖X − M‖_F / ‖M‖_F``. Then kfrob's
``FrobPreconditionedSGD`` on the same problem with the nuclear/Frobenius penalty, over a small
grid of learning rates and damping. About a minute on 2 CPU cores:

    python scripts/seed_matrix_completion.py [--quick]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from seed_common import RESULTS, markdown_table, write_results
from torch import nn

from kfrob import FrobPreconditionedSGD, KfrobWarning
from kfrob.penalties import nuclear_frobenius_penalty, nuclear_penalty

N, RANK = 40, 2
GRIDS = {
    "none": [0.0],
    "nuclear": [1e-4, 3e-4, 1e-3, 3e-3],
    "nuclear/frobenius": [3e-3, 1e-2, 3e-2, 1e-1],
}
PENALTIES = {
    "none": None,
    "nuclear": nuclear_penalty,
    "nuclear/frobenius": nuclear_frobenius_penalty,
}


def problem(fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(N, RANK, generator=gen) @ torch.randn(RANK, N, generator=gen)
    mask = torch.rand(N, N, generator=gen) < fraction
    return m * (N / m.norm()), mask


def complete(
    m: torch.Tensor, mask: torch.Tensor, penalty: str, lam: float, steps: int, optimizer: dict
) -> float:
    """Train from the fixed small initialisation; return the relative recovery error."""
    model = nn.Linear(N, N, bias=False)
    with torch.no_grad():
        model.weight.copy_(0.01 * torch.randn(N, N, generator=torch.Generator().manual_seed(1)))
    kind = optimizer.pop("type", "adam")
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), **optimizer)
    else:
        opt = FrobPreconditionedSGD(model, **{"step_rule": "preconditioned_sgd", **optimizer})
    eye, fn = torch.eye(N), PENALTIES[penalty]
    for _ in range(steps):
        opt.zero_grad()
        x = model(eye)  # = Wᵀ: the completed matrix
        loss = (x - m)[mask].square().mean()
        if fn is not None:
            loss = loss + lam * fn(x)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((model(eye) - m).norm() / m.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fractions", default="0.1,0.15,0.2,0.25,0.3,0.4")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true", help="two fractions, 400 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", KfrobWarning)
    fractions = [float(f) for f in args.fractions.split(",")]
    steps = args.steps
    if args.quick:
        fractions, steps = [0.2, 0.3], 400

    best: dict[str, dict[float, tuple[float, float]]] = {k: {} for k in GRIDS}
    for fraction in fractions:
        m, mask = problem(fraction, seed=0)
        for penalty, grid in GRIDS.items():
            errors = {lam: complete(m, mask, penalty, lam, steps, {"lr": 0.02}) for lam in grid}
            lam = min(errors, key=errors.__getitem__)
            best[penalty][fraction] = (errors[lam], lam)
        row = {p: round(best[p][fraction][0], 3) for p in GRIDS}
        print(f"observed {fraction:.2f}: {row}", flush=True)

    kfrob_grid = [{"lr": lr, "damping": d} for lr in (0.3, 1.0) for d in (1e-2, 1e-1)]
    kfrob_fractions = [f for f in fractions if f in (0.2, 0.3)] or fractions[-1:]
    kfrob_rows = []
    for fraction in kfrob_fractions:
        m, mask = problem(fraction, seed=0)
        lam = best["nuclear/frobenius"][fraction][1]
        for hp in kfrob_grid:
            opt = {"type": "kfrob", "kl_clip": None, **hp}
            error = complete(m, mask, "nuclear/frobenius", lam, steps, opt)
            kfrob_rows.append([fraction, lam, hp["lr"], hp["damping"], error])
            print(f"kfrob observed {fraction:.2f} {hp}: {error:.3f}", flush=True)

    header = [
        "observed fraction",
        "none",
        "nuclear (best λ)",
        "nuclear/Frobenius (best λ)",
        "ratio",
    ]
    rows = []
    for f in fractions:
        nuc, nf = best["nuclear"][f], best["nuclear/frobenius"][f]
        rows.append(
            [f, best["none"][f][0], f"{nuc[0]:.3f} ({nuc[1]:g})", f"{nf[0]:.3f} ({nf[1]:g})",
             f"{nuc[0] / nf[0]:.1f}×"]
        )  # fmt: skip
    kfrob_table = markdown_table(
        ["observed fraction", "λ (nuc/fro)", "lr", "damping", "kfrob error"], kfrob_rows
    )
    adam_nf_text = ", ".join(
        f"{best['nuclear/frobenius'][f][0]:.3f} at {f}" for f in kfrob_fractions
    )
    body = (
        f"Rank-{RANK} {N}×{N} matrix, {steps} Adam steps (lr 0.02), relative recovery error "
        "‖X − M‖_F / ‖M‖_F with the best λ of each grid (in brackets), one problem per "
        "fraction:\n\n" + markdown_table(header, rows) + "\n\n![recovery error against the "
        "observed fraction](seed_matrix_completion.png)\n\n"
        "kfrob (FrobPreconditionedSGD, empirical Fisher, no KL clip) on the same problem with the "
        f"nuclear/Frobenius penalty at Adam's best λ (Adam's errors: {adam_nf_text}):\n\n"
        + kfrob_table
    )
    data = {
        "steps": steps,
        "best": {p: {str(f): v for f, v in d.items()} for p, d in best.items()},
        "kfrob": kfrob_rows,
    }
    md = write_results(
        "seed_matrix_completion", "Seed 003: matrix completion", body, data, args.out
    )
    plot(best, fractions, args.out / "seed_matrix_completion.png")
    print(f"wrote {md}")


def plot(best: dict, fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for penalty in GRIDS:
        ax.plot(fractions, [best[penalty][f][0] for f in fractions], "o-", label=penalty)
    ax.set_xlabel("observed fraction")
    ax.set_ylabel("relative recovery error")
    ax.set_yscale("log")
    ax.set_title(f"rank-{RANK} {N}×{N} completion, Adam, best λ")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
