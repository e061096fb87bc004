"""Time to target on Fashion-MNIST: kfrob against SGD and AdamW, steps and seconds.

Each workload of the training job is trained until it reaches its target:

* ``mlp`` (784-512-256-10): 88 % test accuracy;
* ``cnn`` (two 5×5 convolutions, 128 hidden units): 90 % test accuracy;
* ``autoencoder`` (784-1000-500-250-30 and mirrored): a training reconstruction error
  ``½‖f(x) − x‖²`` (per image, mean over a fixed 10,000 training images) of at most
  ``--ae-target``.

``--accuracy-target`` replaces both accuracy targets (e.g. 0.85) and ``--eval-every`` the
steps between evaluations (by default 25 on the MLP, 100 on the CNN, 50 on the
autoencoder); a finer interval measures an early target more precisely.

Every optimizer gets a learning-rate grid of the same size. The grid is searched with the
first seed; the best learning rate (fewest seconds to target) then runs with every seed,
and the medians over seeds are reported with their ratios to the best AdamW and SGD runs.
Seconds are training time only (forward, backward, step); evaluations are excluded. Batch
128, data in a fixed random order per seed, all optimizers in the same process.

    python scripts/time_to_target.py                         # all workloads, 3 seeds
    python scripts/time_to_target.py --workloads mlp --seeds 1 --optimizers kfrob,adamw
    python scripts/time_to_target.py --workloads mlp --name fisher_choice \
        --optimizers kfrob,kfrob-empirical,adamw                   # which Fisher

Needs the full Fashion-MNIST (``dataset-fashion-mnist`` or ``--data-dir``). Results go to
``results/<name>.{md,json,png}`` (``--name``, default ``time_to_target``). ``--device cuda``
trains on the GPU (data, models and optimizers there; the device is synchronised before each
clock read, so the seconds count its work).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from report import add_device_argument, provenance, sync, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.data import load_fashion_mnist
from kfrob.job.training import BatchOrder, evaluate
from kfrob.job.workloads import WORKLOADS, Workload

Factory = Callable[[nn.Module, dict[str, float], Workload, int], torch.optim.Optimizer]
Grid = tuple[dict[str, float], ...]


def kfrob_factory(**options: Any) -> Factory:
    def build(
        model: nn.Module, hp: dict[str, float], workload: Workload, seed: int
    ) -> FrobPreconditionedSGD:
        generator = torch.Generator(next(model.parameters()).device).manual_seed(seed + 1)
        return FrobPreconditionedSGD(
            model, loss=workload.kfrob_loss, generator=generator, **options, **hp
        )

    return build


def sgd_rule(**options: Any) -> Factory:
    """kfrob with ``step_rule="preconditioned_sgd"`` (the KL-clipped K-FAC step)."""
    return kfrob_factory(step_rule="preconditioned_sgd", **options)


def lrs(*values: float) -> Grid:
    return tuple({"lr": v} for v in values)


# kfrob's step length is set by its KL clip κ (the learning rate only caps it: with the clip
# active every lr gives the same run), so its grid is over κ at a large lr
KL_GRID = tuple({"lr": 0.3, "kl_clip": k} for k in (1e-3, 3e-3, 1e-2))

# name: (factory, grid for classifiers, grid for the autoencoder); grids of one size
OPTIMIZERS: dict[str, tuple[Factory, Grid, Grid]] = {
    "kfrob": (kfrob_factory(), lrs(1e-3, 3e-3, 1e-2), lrs(3e-4, 1e-3, 3e-3)),
    "kfrob-sgd": (sgd_rule(), KL_GRID, KL_GRID),
    "kfrob-dense": (
        sgd_rule(domain_structure="dense", codomain_structure="dense"),
        KL_GRID,
        KL_GRID,
    ),
    "kfrob-exact": (sgd_rule(damping_method="exact"), KL_GRID, KL_GRID),
    "kfrob-ekfac": (
        sgd_rule(damping_method="exact", eigenvalue_correction=True),
        KL_GRID,
        KL_GRID,
    ),
    "kfrob-5/50": (sgd_rule(factor_update_freq=5, inverse_update_freq=50), KL_GRID, KL_GRID),
    "kfrob-warmup": (sgd_rule(factor_decay_warmup=True), KL_GRID, KL_GRID),
    "kfrob-empirical": (sgd_rule(fisher="empirical"), KL_GRID, KL_GRID),
    "kfrob-stagger": (sgd_rule(stagger_refreshes=True), KL_GRID, KL_GRID),
    "kfrob-reduce": (sgd_rule(weight_sharing="reduce"), KL_GRID, KL_GRID),
    "kfrob-reduce-5/50": (
        sgd_rule(weight_sharing="reduce", factor_update_freq=5, inverse_update_freq=50),
        KL_GRID,
        KL_GRID,
    ),
    "kfrob-subspace": (
        sgd_rule(damping_method="exact", eigenbasis_refresh="subspace"),
        KL_GRID,
        KL_GRID,
    ),
    "kfrob-lm": (sgd_rule(adaptive_damping=True), KL_GRID, KL_GRID),
    "kfrob-sgd-momentum": (sgd_rule(momentum=0.9), KL_GRID, KL_GRID),
    "kfrob-graft": (
        kfrob_factory(
            step_rule="adam_grafted", factor_update_freq=1, inverse_update_freq=10, fisher="mc"
        ),
        lrs(1e-3, 3e-3, 1e-2),
        lrs(3e-4, 1e-3, 3e-3),
    ),
    "kfrob-graft-5/20": (
        kfrob_factory(
            step_rule="adam_grafted",
            factor_update_freq=5,
            inverse_update_freq=20,
            fisher="empirical",
        ),
        lrs(1e-3, 3e-3, 1e-2),
        lrs(3e-4, 1e-3, 3e-3),
    ),
    "kfrob-mc": (kfrob_factory(fisher="mc"), lrs(1e-3, 3e-3, 1e-2), lrs(3e-4, 1e-3, 3e-3)),
    **{
        f"kfrob-{f}/{i}": (
            kfrob_factory(factor_update_freq=f, inverse_update_freq=i),
            lrs(1e-3, 3e-3, 1e-2),
            lrs(3e-4, 1e-3, 3e-3),
        )
        for f, i in ((1, 10), (5, 20), (10, 20), (10, 40))
    },
    **{
        f"kfrob-budget-{budget}": (
            kfrob_factory(dense_budget=budget),
            lrs(1e-3, 3e-3, 1e-2),
            lrs(3e-4, 1e-3, 3e-3),
        )
        for budget in (0.4, 0.5)
    },
    "sgd": (
        lambda m, hp, w, s: torch.optim.SGD(m.parameters(), momentum=0.9, **hp),
        lrs(0.01, 0.03, 0.1),
        lrs(0.001, 0.003, 0.01),
    ),
    "adamw": (
        lambda m, hp, w, s: torch.optim.AdamW(m.parameters(), **hp),
        lrs(3e-4, 1e-3, 3e-3),
        lrs(3e-4, 1e-3, 3e-3),
    ),
}


ABOUT = {  # what each variant is, for the report
    "kfrob": "`FrobPreconditionedSGD(model, lr, loss)` with its defaults (Adam in the "
    "Kronecker eigenbasis where a layer's sides are dense, Adam's length on the K-FAC "
    "direction where the cost model makes one low-rank; factors every 10 steps, inverses every "
    "40, the empirical Fisher)",
    "kfrob-sgd": "the KL-clipped K-FAC step (`step_rule='preconditioned_sgd'`: factored "
    "damping, MC Fisher, factors every step, inverses every 10, each side dense or low-rank by "
    "the cost model); the `kfrob-` variants below it change one setting of `kfrob-sgd`",
    "kfrob-dense": "every side dense (`domain_structure='dense', codomain_structure='dense'`)",
    "kfrob-exact": "exact damping (eigenbases, `damping_method='exact'`)",
    "kfrob-ekfac": "exact damping with the eigenvalue correction (EKFAC, "
    "`eigenvalue_correction=True`)",
    "kfrob-5/50": "factors every 5 steps, inverses every 50",
    "kfrob-warmup": "the factor-decay warm-up (`factor_decay_warmup=True`)",
    "kfrob-empirical": "the empirical Fisher",
    "kfrob-stagger": "staggered refreshes (`stagger_refreshes=True`)",
    "kfrob-reduce": "K-FAC-reduce for the convolutions (`weight_sharing='reduce'`)",
    "kfrob-reduce-5/50": "K-FAC-reduce, factors every 5 steps, inverses every 50",
    "kfrob-subspace": "exact damping, eigenbases refreshed by a subspace-iteration step "
    "(`eigenbasis_refresh='subspace'`)",
    "kfrob-lm": "Levenberg–Marquardt adaptive damping (`adaptive_damping=True`; its step "
    "takes a closure)",
    "kfrob-sgd-momentum": "SGD momentum 0.9 (`momentum=0.9`)",
    "kfrob-graft": "each layer's preconditioned first moment at the length of its Adam step "
    "(`step_rule='adam_grafted'`) with kfrob's default schedule and Fisher (factors every "
    "step, inverses every 10, the MC Fisher)",
    "kfrob-graft-5/20": "`kfrob-graft` with factors every 5 steps, inverses every 20 and "
    "the empirical Fisher (the rule's defaults)",
    "kfrob-1/10": "`kfrob` with factors every step and inverses every 10",
    "kfrob-5/20": "`kfrob` with factors every 5 steps and inverses every 20",
    "kfrob-10/20": "`kfrob` with factors every 10 steps and inverses every 20",
    "kfrob-10/40": "`kfrob` with factors every 10 steps and inverses every 40",
    "kfrob-mc": "`kfrob` with the MC Fisher",
    "kfrob-budget-0.4": "`kfrob` with a dense budget of 0.4 (`dense_budget=0.4`, the "
    "default's own: the CNN's conv2 input side, 0.43× its layer's pass by the cost model's "
    "count, is low-rank)",
    "kfrob-budget-0.5": "`kfrob` with the engine's dense budget of 0.5 (`dense_budget=0.5`: "
    "the CNN's conv2 input side is dense)",
    "sgd": "momentum 0.9",
    "adamw": "`torch.optim.AdamW` defaults besides the learning rate",
}


# what runs by default on each workload: kfrob's defaults and its KL-clipped K-FAC step
# (on the CNN with factors every 5 steps and inverses every 50: capturing A from unfolded
# patches every step costs ~4 SGD steps per step)
PLAN = {
    "mlp": ["kfrob", "kfrob-sgd", "sgd", "adamw"],
    "autoencoder": ["kfrob", "kfrob-sgd", "sgd", "adamw"],
    "cnn": ["kfrob", "kfrob-5/50", "sgd", "adamw"],
}


ACCURACY_TARGETS = {"mlp": 0.88, "cnn": 0.90}
EVAL_EVERY = {"mlp": 25, "cnn": 100, "autoencoder": 50}  # steps between evaluations


def accuracy_target(workload: str, args: Any) -> float:
    """The test accuracy a classifier trains to: ``--accuracy-target`` or its default."""
    return args.accuracy_target or ACCURACY_TARGETS[workload]


def label(hp: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in hp.items())


def run(
    name: str,
    hp: dict[str, float],
    seed: int,
    workload_name: str,
    data: dict[str, Tensor],
    args: Any,
) -> dict[str, Any]:
    """Train until the target (or the step/second budget, or a non-finite evaluation);
    steps and training seconds, ``None`` for a miss."""
    workload = WORKLOADS[workload_name]
    torch.manual_seed(seed)
    model = workload.build().to(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = OPTIMIZERS[name][0](model, hp, workload, seed)
    x, y = data["x_train"], data["y_train"]
    order = BatchOrder(len(x), args.batch_size, seed)
    trained = 0.0
    # adaptive damping evaluates the batch's loss again after some steps: through a closure
    needs_closure = isinstance(opt, FrobPreconditionedSGD) and opt.adaptive_damping
    for step in range(1, args.max_steps + 1):
        idx = order.indices(step - 1).to(args.device)
        sync(args.device)
        start = time.perf_counter()
        closure = batch_closure(opt, model, workload, x[idx], y[idx])
        if needs_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        sync(args.device)
        trained += time.perf_counter() - start
        if step % (args.eval_every or EVAL_EVERY[workload_name]) == 0:
            if workload.task == "classify":
                value = evaluate(model, workload, data["x_test"], data["y_test"])
                reached = (value["test_accuracy"] or 0.0) >= accuracy_target(workload_name, args)
            else:
                value = evaluate(model, workload, data["x_eval"], data["y_eval"])
                reached = value["test_loss"] <= args.ae_target
            if reached:
                return {"steps": step, "seconds": trained}
            if not math.isfinite(value["test_loss"]):
                break  # diverged
        if trained >= args.max_seconds:
            break
    return {"steps": None, "seconds": None}


def batch_closure(
    opt: torch.optim.Optimizer, model: nn.Module, workload: Workload, x: Tensor, y: Tensor
) -> Callable[[], Tensor]:
    """The training loop's forward and backward on one batch, as a ``step`` closure."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = workload.loss(model(x), x, y)
        loss.backward()
        return loss

    return closure


def median_or_none(values: list[float | None]) -> float | None:
    """The median, or ``None`` if any seed missed the target."""
    if any(v is None for v in values):
        return None
    return statistics.median(values)  # type: ignore[type-var]


def benchmark(workload: str, data: dict[str, Tensor], args: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in args.optimizers or PLAN[workload]:
        _, classify_grid, ae_grid = OPTIMIZERS[name]
        grid = ae_grid if workload == "autoencoder" else classify_grid
        search = [run(name, hp, 0, workload, data, args) for hp in grid]
        for hp, r in zip(grid, search, strict=True):
            print(f"  {workload} {name:15s} {label(hp):22s} seed 0: {fmt(r)}", flush=True)
        reached = [i for i, r in enumerate(search) if r["seconds"] is not None]
        row: dict[str, Any] = {
            "grid": [{"hyperparameters": hp, **r} for hp, r in zip(grid, search, strict=True)],
            "best": None,
            "seeds": [],
            "steps": None,
            "seconds": None,
        }
        out[name] = row
        if not reached:
            continue
        best = min(reached, key=lambda i: search[i]["seconds"])
        seeds = [search[best]] + [
            run(name, grid[best], seed, workload, data, args) for seed in range(1, args.seeds)
        ]
        print(f"  {workload} {name:15s} best {label(grid[best])}: {[fmt(r) for r in seeds]}")
        row.update(
            best=grid[best],
            seeds=seeds,
            steps=median_or_none([r["steps"] for r in seeds]),
            seconds=median_or_none([r["seconds"] for r in seeds]),
        )
    return out


def fmt(r: dict[str, Any]) -> str:
    if r["steps"] is None:
        return "missed"
    return f"{r['steps']} steps / {r['seconds']:.1f} s"


def ran(results: dict[str, dict[str, Any]]) -> list[str]:
    """The optimizers that ran on any workload, in the order of :data:`OPTIMIZERS`."""
    names = {name for rows in results.values() for name in rows}
    return [name for name in OPTIMIZERS if name in names]


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def report(results: dict[str, dict[str, Any]], args: Any) -> list[str]:
    lines = [
        "# Time to target on Fashion-MNIST",
        "",
        f"{provenance(args.device)} Batch {args.batch_size}; a grid of {len(KL_GRID)} step "
        "sizes per optimizer (learning rates; for kfrob the KL clip κ) searched with seed 0, "
        f"the best then run with {args.seeds} seeds; medians over seeds; seconds are training time "
        "only (evaluation excluded). "
        + " ".join(f"`{name}`: {ABOUT[name]}." for name in ran(results))
        + " Runs stop "
        "after "
        f"{args.max_seconds:g} s of training or {args.max_steps} steps ('missed'). "
        + (
            f"Evaluated every {args.eval_every} steps."
            if args.eval_every
            else "Evaluated every "
            + ", ".join(f"{n} steps ({w})" for w, n in EVAL_EVERY.items())
            + "."
        ),
        "",
    ]
    for workload, rows in results.items():
        target = (
            f"{accuracy_target(workload, args):.0%} test accuracy"
            if workload != "autoencoder"
            else f"training reconstruction error ≤ {args.ae_target:g}"
        )
        lines += [
            f"## {workload}: {target}",
            "",
            "| optimizer | best of the grid | steps | seconds | ms/step | steps / AdamW | "
            "seconds / AdamW | steps / SGD | seconds / SGD |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        adamw, sgd = rows.get("adamw", {}), rows.get("sgd", {})
        for name, row in rows.items():
            steps, seconds = row["steps"], row["seconds"]
            per_step = "n/a" if steps is None else f"{1e3 * seconds / steps:.1f}"
            lines.append(
                f"| {name} | {'missed' if row['best'] is None else label(row['best'])} | "
                f"{steps if steps is not None else 'missed'} | "
                f"{'missed' if seconds is None else f'{seconds:.1f}'} | {per_step} | "
                f"{ratio(steps, adamw.get('steps'))} | {ratio(seconds, adamw.get('seconds'))} | "
                f"{ratio(steps, sgd.get('steps'))} | {ratio(seconds, sgd.get('seconds'))} |"
            )
        lines.append("")
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    workloads = list(results)
    names = list(dict.fromkeys(name for rows in results.values() for name in rows))
    width = 0.8 / max(1, len(names))
    for k, key in enumerate(("steps", "seconds")):
        ax = axes[k]
        for i, name in enumerate(names):
            values = []
            for w in workloads:
                row, base = results[w].get(name, {}), results[w].get("adamw", {})
                ok = row.get(key) is not None and base.get(key)
                values.append(row[key] / base[key] if ok else 0.0)
            ax.bar([j + i * width for j in range(len(workloads))], values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel(f"{key} to target / AdamW's")
        ax.set_title(f"{key} to target (lower is better)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn,autoencoder")
    parser.add_argument("--optimizers", default=None, help="comma-separated; default: PLAN")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ae-target", type=float, default=6.5)
    parser.add_argument(
        "--accuracy-target", type=float, default=None, help="test accuracy for mlp and cnn"
    )
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--max-seconds", type=float, default=180.0, help="training time per run")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--embedded", action="store_true", help="the subset shipped with kfrob (smoke tests)"
    )
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="time_to_target", help="results file name")
    add_device_argument(parser)
    args = parser.parse_args()
    args.optimizers = args.optimizers.split(",") if args.optimizers else None

    x_train, y_train = load_fashion_mnist("train", args.data_dir, embedded=args.embedded)
    x_test, y_test = load_fashion_mnist("test", args.data_dir, embedded=args.embedded)
    data = {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "x_eval": x_train[:10000],
        "y_eval": y_train[:10000],
    }
    data = {name: tensor.to(args.device) for name, tensor in data.items()}
    results = {}
    for workload in args.workloads.split(","):
        results[workload] = benchmark(workload, data, args)
    name = args.name
    write_report(args.out, f"{name}.md", report(results, args))
    out = Path(args.out)
    (out / f"{name}.json").write_text(
        json.dumps(
            {"args": vars(args) | {"device": str(args.device)}, "results": results}, indent=2
        )
    )
    plot(results, out / f"{name}.png")


if __name__ == "__main__":
    main()
