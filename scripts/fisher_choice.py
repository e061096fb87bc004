"""Which Fisher should be kfrob's default? Time to a target test accuracy on Fashion-MNIST.

Trains the MLP 784-512-256-10 (ReLU), batch 128, with kfrob's empirical Fisher, kfrob's
Monte Carlo Fisher (both with the default damping, KL clip and frequencies, no momentum:
momentum 0.9 on top of the KL clip diverged here) and AdamW (the baseline, measured in the
same run), each with a learning-rate grid of the same size and several seeds, and reports
steps and seconds
(training only, evaluation excluded) to reach the target, as ratios to AdamW's best.

    python scripts/fisher_choice.py            # needs dataset-fashion-mnist or $KFROB_DATA
    python scripts/fisher_choice.py --seeds 1 --max-seconds 30   # quicker look

Results go to results/fisher_choice.json and results/fisher_choice.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import provenance, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.job.workloads import mlp

OptimizerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]

CANDIDATES: dict[str, tuple[OptimizerFactory, tuple[float, ...]]] = {
    "kfrob-empirical": (
        lambda m, lr: FrobPreconditionedSGD(m, lr=lr, fisher="empirical"),
        (0.1, 0.3),
    ),
    "kfrob-mc": (
        lambda m, lr: FrobPreconditionedSGD(m, lr=lr, fisher="mc", loss="cross_entropy"),
        (0.1, 0.3),
    ),
    "adamw": (lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr), (1e-3, 3e-3)),
}


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(2000), y.split(2000), strict=True)
    )
    model.train()
    return correct / len(y)


def time_to_target(
    factory: OptimizerFactory,
    lr: float,
    seed: int,
    data: tuple[Tensor, ...],
    args: argparse.Namespace,
) -> dict[str, float | None]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = mlp()
    opt = factory(model, lr)
    order = torch.Generator().manual_seed(seed)
    trained = 0.0
    step = 0
    while step < args.max_steps and trained < args.max_seconds:
        for idx in torch.randperm(len(x_train), generator=order).split(args.batch_size):
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            trained += time.perf_counter() - start
            step += 1
            if step % args.eval_every == 0 and accuracy(model, x_test, y_test) >= args.target:
                return {"steps": step, "seconds": trained}
            if step >= args.max_steps or trained >= args.max_seconds:
                break
    return {"steps": None, "seconds": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=float, default=0.88)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--max-steps", type=int, default=4000)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    x_train, y_train = load_fashion_mnist("train", args.data_dir)
    x_test, y_test = load_fashion_mnist("test", args.data_dir)
    data = (x_train, y_train, x_test, y_test)

    runs: dict[str, dict[str, list[dict[str, float | None]]]] = {}
    for name, (factory, grid) in CANDIDATES.items():
        runs[name] = {}
        for lr in grid:
            results = [time_to_target(factory, lr, seed, data, args) for seed in range(args.seeds)]
            runs[name][str(lr)] = results
            print(
                f"{name:16s} lr={lr:<6g} "
                + "  ".join(
                    f"steps={r['steps']} s={r['seconds'] and round(r['seconds'], 1)}"
                    for r in results
                ),
                flush=True,
            )

    def best(name: str, key: str) -> float | None:
        """Best over the grid of the median over seeds (None if a seed missed the target)."""
        medians = []
        for results in runs[name].values():
            values = [r[key] for r in results]
            if all(v is not None for v in values):
                medians.append(statistics.median(values))  # type: ignore[type-var]
        return min(medians) if medians else None

    summary = {
        name: {"steps": best(name, "steps"), "seconds": best(name, "seconds")}
        for name in CANDIDATES
    }
    base = summary["adamw"]
    lines = [
        f"# Fisher choice: time to {args.target:.0%} test accuracy, Fashion-MNIST MLP",
        "",
        f"{provenance()} Best learning rate of a 2-point grid, median over {args.seeds} "
        "seeds; seconds are training time only.",
        "",
        "| optimizer | steps | seconds | steps / AdamW | seconds / AdamW |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary.items():

        def ratio(key: str, row: dict = row) -> str:
            if row[key] is None or base[key] is None:
                return "n/a"
            return f"{row[key] / base[key]:.2f}"

        seconds = "missed" if row["seconds"] is None else f"{row['seconds']:.1f}"
        lines.append(
            f"| {name} | {row['steps'] or 'missed'} | {seconds} | "
            f"{ratio('steps')} | {ratio('seconds')} |"
        )
    write_report(args.out, "fisher_choice.md", lines)
    (Path(args.out) / "fisher_choice.json").write_text(
        json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=2)
    )


if __name__ == "__main__":
    main()
