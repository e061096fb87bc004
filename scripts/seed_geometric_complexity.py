"""Seed 002: how training choices move geometric complexity on the Fashion-MNIST MLP.

The MLP 784-512-256-10 (``kfrob.job.workloads.mlp``) is trained from one initialisation on the
same batches (5,000 images of the embedded subset, batch 128, 2 epochs) with

* SGD at learning rates 0.02, 0.1 (the reference) and 0.3;
* SGD 0.1 with weight decay 5e-4 and 5e-3;
* SGD 0.1 with the flatness penalty ``λ·tr(∇²L)`` (Hutchinson, one probe, every 4th step);
* SGD 0.1 with the geometric-complexity penalty itself (one probe, every step), as a control;
* kfrob (``FrobPreconditionedSGD``, lr 0.1, MC Fisher).

After training: the geometric complexity ``GC = mean_b ‖∂f(x_b)/∂x_b‖²_F`` of the logits on
1,000 test images (:func:`kfrob.diagnostics.geometric_complexity`, 8 probes), the test
accuracy on the 2,000 test images and the final training loss. About a minute on 2 CPU cores:

    python scripts/seed_geometric_complexity.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from seed_common import RESULTS, markdown_table, write_results

from kfrob import FrobPreconditionedSGD, KfrobWarning
from kfrob.data import load_fashion_mnist
from kfrob.diagnostics import geometric_complexity
from kfrob.job.workloads import mlp
from kfrob.penalties import geometric_complexity_penalty, hessian_trace_penalty

RUNS: dict[str, dict] = {
    "sgd lr 0.02": {"lr": 0.02},
    "sgd lr 0.1": {"lr": 0.1},
    "sgd lr 0.3": {"lr": 0.3},
    "sgd + wd 5e-4": {"lr": 0.1, "weight_decay": 5e-4},
    "sgd + wd 5e-3": {"lr": 0.1, "weight_decay": 5e-3},
    "sgd + flatness 1e-2": {"lr": 0.1, "flatness": 1e-2},
    "sgd + GC penalty 0.1": {"lr": 0.1, "gc": 0.1},
    "kfrob lr 0.1": {"lr": 0.1, "kfrob": True},
}


def train(label: str, spec: dict, data: tuple, epochs: int, subset: int) -> dict:
    (x, y), (x_test, y_test) = data
    x, y = x[:subset], y[:subset]
    torch.manual_seed(0)
    model = mlp()
    if spec.get("kfrob"):
        opt = FrobPreconditionedSGD(
            model, lr=spec["lr"], loss="cross_entropy", step_rule="preconditioned_sgd"
        )
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=spec["lr"], weight_decay=spec.get("weight_decay", 0.0)
        )
    order = torch.Generator().manual_seed(0)
    probes = torch.Generator().manual_seed(1)
    step, start, loss = 0, time.perf_counter(), torch.zeros(())
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(128):
            xb, yb = x[batch], y[batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            total = loss
            if spec.get("flatness") and step % 4 == 0:
                flat = hessian_trace_penalty(model, F.cross_entropy, (xb, yb), 1, probes)
                total = total + spec["flatness"] * flat
            if spec.get("gc"):
                total = total + spec["gc"] * geometric_complexity_penalty(model, xb, 1, probes)
            total.backward()
            opt.step()
            step += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        train_loss = float(F.cross_entropy(model(x), y))
    gc = float(geometric_complexity(model, x_test[:1000], 8, torch.Generator().manual_seed(2)))
    return {"run": label, "gc": gc, "test_accuracy": accuracy, "train_loss": train_loss,
            "steps": step, "seconds": seconds}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--subset", type=int, default=5000, help="training images used")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 2,000 images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore", KfrobWarning)
    epochs, subset = (1, 2000) if args.quick else (args.epochs, args.subset)
    data = tuple(load_fashion_mnist(s, embedded=True) for s in ("train", "test"))
    results = []
    for label, spec in RUNS.items():
        results.append(train(label, spec, data, epochs, subset))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in results[-1].items()})
    keys = ["gc", "test_accuracy", "train_loss", "seconds"]
    table = markdown_table(
        ["run", "geometric complexity", "test accuracy", "train loss", "train time (s)"],
        [[r["run"], *(r[k] for k in keys)] for r in results],
    )
    body = (
        f"MLP 784-512-256-10 on {subset} embedded training images, {epochs} epoch(s) of batch "
        "128, one initialisation and one data order for all runs; geometric complexity of the "
        "logits on 1,000 test images, accuracy on 2,000:\n\n"
        + table
        + "\n\n![geometric complexity against test accuracy](seed_geometric_complexity.png)\n"
    )
    md = write_results(
        "seed_geometric_complexity",
        "Seed 002: geometric complexity on the Fashion-MNIST MLP",
        body,
        {"epochs": epochs, "subset": subset, "runs": results},
        args.out,
    )
    plot(results, args.out / "seed_geometric_complexity.png")
    print(f"wrote {md}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["gc"], r["test_accuracy"])
        ax.annotate(r["run"], (r["gc"], r["test_accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("geometric complexity (test inputs)")
    ax.set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
