"""Refresh cost: each way of refreshing the inverses against bare ``eigh``, and staggering.

Part 1, for each workload (MLP, deep autoencoder, CNN; batch 128), after ``--warm`` training
steps so that the factors are realistic: the time of one refresh of all layers by

* ``eigh``: exact damping, batched ``torch.linalg.eigh`` per factor size (the default for
  exact damping);
* ``subspace``: exact damping, one subspace-iteration step from the previous eigenbases
  (``eigenbasis_refresh="subspace"``);
* ``cholesky``: factored damping with ``p = 1`` and every side dense, Cholesky inverses;
* ``defaults``: factored damping with the structures the cost model chooses (a low-rank
  side is refreshed by a Nyström step from its sketch, a dense one by Cholesky);

each divided by the bare ``torch.linalg.eigh`` calls on the same factors, one per factor,
timed round-robin in the same run (medians over ``--rounds``).

Part 2, staggering: per-step times of kfrob (factored, MC Fisher) with and without
``stagger_refreshes`` at factor/inverse frequencies 1/10 and 10/100, round-robin with SGD
over ``--cycles`` refresh cycles: the median, the mean (amortised) and the slowest step, as
ratios to SGD's median step. Staggering should leave the mean alone and cut the slowest step.

    python scripts/bench_refresh.py          # writes results/refresh.md
    python scripts/bench_refresh.py --device cuda   # on the GPU (synchronised before clock reads)

Absolute times on a shared 2-core CPU are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable

import torch
from bench_step import bare_eigh, random_batch, step_times
from report import add_device_argument, provenance, sync, write_report
from torch import nn

from kfrob import FrobPreconditionedSGD
from kfrob.job.workloads import WORKLOADS
from kfrob.preconditioner import KroneckerPreconditioner

REFRESHES = {  # name: preconditioner options
    "eigh": {"damping_method": "exact"},
    "subspace": {"damping_method": "exact", "eigenbasis_refresh": "subspace"},
    "cholesky": {
        "damping_method": "factored", "domain_structure": "dense", "codomain_structure": "dense",
    },
    "defaults": {},
}  # fmt: skip


def train_steps(
    opt: torch.optim.Optimizer, model: nn.Module, workload: str, steps: int
) -> list[float]:
    """Seconds of each of ``steps`` training steps on the fixed batch of 128 (on the
    model's device)."""
    device = next(model.parameters()).device
    return step_times(opt, model, WORKLOADS[workload].task, *random_batch(128, device), steps)


def make_optimizer(model: nn.Module, workload: str, **options: object) -> FrobPreconditionedSGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrobPreconditionedSGD(
            model,
            lr=1e-3,
            loss=WORKLOADS[workload].kfrob_loss,
            **{"step_rule": "preconditioned_sgd", **options},  # type: ignore[arg-type]
        )


def refresh_costs(workload: str, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one refresh of every layer per method, and of the bare eighs."""
    model = WORKLOADS[workload].build().to(args.device)
    trained = make_optimizer(model, workload, damping_method="exact")
    train_steps(trained, model, workload, args.warm)
    state = trained.preconditioner.state_dict()
    damping = dict.fromkeys(trained.preconditioner.layers, 1e-3)
    factors = [f.value for layer in trained.preconditioner.layers.values() for f in layer.factors]
    trained.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preconditioners = {
            name: KroneckerPreconditioner(model, **options)  # type: ignore[arg-type]
            for name, options in REFRESHES.items()
        }
    for pre in preconditioners.values():
        pre.load_state_dict(state)  # the trained factors, and eigenbases to start from

    def refresh(pre: KroneckerPreconditioner) -> Callable[[], None]:
        eigenbases = dict(pre.inverses)

        def run() -> None:
            pre.inverses = dict(eigenbases)  # every subspace step starts from the same bases
            pre.update_inverses(damping)

        return run

    calls = {"bare eigh": lambda: bare_eigh(factors)} | {
        n: refresh(p) for n, p in preconditioners.items()
    }
    for call in calls.values():  # warm-up
        call()
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, call in calls.items():
            sync(args.device)
            start = time.perf_counter()
            call()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    for pre in preconditioners.values():
        pre.remove_hooks()
    return {name: statistics.median(t) for name, t in times.items()}


def step_spread(workload: str, freqs: tuple[int, int], args: argparse.Namespace) -> dict:
    """Per-step times with and without staggering, as ratios to SGD's median step."""
    factor_freq, inverse_freq = freqs
    make = WORKLOADS[workload].build
    models = {name: make().to(args.device) for name in ("sgd", "plain", "staggered")}
    opts: dict[str, torch.optim.Optimizer] = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=1e-3),
        **{
            name: make_optimizer(
                models[name],
                workload,
                factor_update_freq=factor_freq,
                inverse_update_freq=inverse_freq,
                stagger_refreshes=name == "staggered",
            )
            for name in ("plain", "staggered")
        },
    }
    for name, opt in opts.items():  # warm-up: allocations, first refreshes
        train_steps(opt, models[name], workload, inverse_freq)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.cycles):
        for name, opt in opts.items():
            times[name] += train_steps(opt, models[name], workload, inverse_freq)
    sgd = statistics.median(times["sgd"])
    return {
        name: {
            "median": statistics.median(times[name]) / sgd,
            "mean": statistics.fmean(times[name]) / sgd,
            "max": max(times[name]) / sgd,
        }
        for name in ("plain", "staggered")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,autoencoder,cnn")
    parser.add_argument("--freqs", default="1/10,10/100")
    parser.add_argument("--warm", type=int, default=20, help="training steps before timing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cycles", type=int, default=3, help="refresh cycles per optimizer")
    parser.add_argument("--out", default="results")
    add_device_argument(parser)
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    lines = [
        "# Refresh cost and staggered refreshes",
        "",
        f"{provenance(args.device)} Batch 128.",
        "",
        "## One refresh of all layers, against the bare `eigh` of the same factors",
        "",
        f"Medians over {args.rounds} round-robin rounds, after {args.warm} training steps.",
        "",
        "| workload | bare eigh ms | eigh refresh | subspace refresh | cholesky refresh "
        "| defaults refresh |",
        "|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        costs = refresh_costs(workload, args)
        bare = costs["bare eigh"]
        ratios = " | ".join(f"{costs[name] / bare:.2f}" for name in REFRESHES)
        lines.append(f"| {workload} | {1e3 * bare:.1f} | {ratios} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Staggered refreshes: step time over SGD's median step",
        "",
        f"{args.cycles} refresh cycles per optimizer, round-robin with SGD; factored damping,"
        " MC Fisher.",
        "",
        "| workload | factor/inverse freq | median | mean | slowest | median, staggered | "
        "mean, staggered | slowest, staggered |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workload in workloads:
        for freq in args.freqs.split(","):
            f, i = (int(v) for v in freq.split("/"))
            spread = step_spread(workload, (f, i), args)
            plain, staggered = spread["plain"], spread["staggered"]
            cells = [f"{s[k]:.2f}" for s in (plain, staggered) for k in ("median", "mean", "max")]
            lines.append(f"| {workload} | {freq} | {' | '.join(cells)} |")
            print(lines[-1], flush=True)
    write_report(args.out, "refresh.md", lines)


if __name__ == "__main__":
    main()
