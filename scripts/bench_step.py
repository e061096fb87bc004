"""Step overhead: kfrob's amortised step against SGD, AdamW and the linear-algebra limit.

For each workload (the MLP 784-512-256-10, the deep autoencoder 784-1000-500-250-30 with its
mirrored decoder, a small CNN), batch size and (factor, inverse) update frequency, the
optimizers run round-robin on the same model and batch; each round times a whole refresh
cycle (``inverse_update_freq`` steps, at least ``--steps``) so kfrob's time is amortised over
its refreshes. Reported, as medians over rounds:

* ``kfrob / SGD`` and ``kfrob / AdamW``: step-time ratios (forward + backward + step);
* ``kfrob / limit``: the limit is SGD's step + the bare ``torch.linalg.eigh`` time of all
  factors / inverse_freq + the bare ``aᵀa``, ``gᵀg`` matmul time / factor_freq, measured in
  the same run;
* ``refresh / eigh``: one inverse refresh against the bare ``eigh`` calls on the same factors;
* a breakdown of kfrob's step: factor update, inverse refresh, preconditioning, the rest
  (forward, backward with hooks, momentum and update).

    python scripts/bench_step.py                       # writes results/step_overhead.md
    python scripts/bench_step.py --workloads mlp --batch-sizes 128 --rounds 3   # quick look

Absolute times on a shared 2-core CPU are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch
from report import provenance, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.capture import CurvatureCapture
from kfrob.job.workloads import WORKLOADS, training_loss
from kfrob.preconditioner import KroneckerPreconditioner

PHASES = ("capture", "factor update", "inverse refresh", "preconditioning")


class PhaseTimer:
    """Accumulates wall time of chosen kfrob methods (patched for the run). A call inside
    another timed call counts for the outer phase only, so phases never overlap."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._inside = False

    @contextmanager
    def patched(self) -> Any:
        originals = {}
        targets = [
            ("capture", CurvatureCapture, "_on_forward"),
            ("capture", CurvatureCapture, "_on_output_grad"),
            ("capture", CurvatureCapture, "_on_model_output"),
            ("factor update", KroneckerPreconditioner, "update_factors"),
            ("inverse refresh", KroneckerPreconditioner, "update_inverses"),
            ("preconditioning", KroneckerPreconditioner, "precondition_"),
        ]
        for phase, cls, name in targets:
            original = cls.__dict__[name]
            originals[(cls, name)] = original
            function = original.__func__ if isinstance(original, staticmethod) else original

            def timed(*args: Any, _function: Any = function, _phase: str = phase, **kw: Any) -> Any:
                if self._inside:
                    return _function(*args, **kw)
                self._inside = True
                start = time.perf_counter()
                try:
                    return _function(*args, **kw)
                finally:
                    self._inside = False
                    self.totals[_phase] += time.perf_counter() - start

            setattr(cls, name, staticmethod(timed) if isinstance(original, staticmethod) else timed)
        try:
            yield self
        finally:
            for (cls, name), original in originals.items():
                setattr(cls, name, original)


def loss_of(kind: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The workload's own training loss."""
    return training_loss(kind, model(x), x, y)


def random_batch(size: int) -> tuple[Tensor, Tensor]:
    """A fixed batch of random 28×28 images and labels (the same in every call)."""
    gen = torch.Generator().manual_seed(0)
    return torch.rand(size, 1, 28, 28, generator=gen), torch.randint(0, 10, (size,), generator=gen)


def step_times(
    opt: torch.optim.Optimizer, model: nn.Module, kind: str, x: Tensor, y: Tensor, steps: int
) -> list[float]:
    """Seconds of each of ``steps`` consecutive steps."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad()
        loss_of(kind, model, x, y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def timed_steps(
    opt: torch.optim.Optimizer, model: nn.Module, kind: str, x: Tensor, y: Tensor, steps: int
) -> float:
    """Mean seconds per step over ``steps`` consecutive steps."""
    return statistics.fmean(step_times(opt, model, kind, x, y, steps))


def bare_eigh(factors: list[Tensor]) -> float:
    """Seconds for one ``torch.linalg.eigh`` call per factor (float64 where float32 fails,
    as kfrob retries)."""
    start = time.perf_counter()
    for f in factors:
        try:
            torch.linalg.eigh(f)
        except torch.linalg.LinAlgError:
            torch.linalg.eigh(f.double())
    return time.perf_counter() - start


def bare_linear_algebra(
    opt: FrobPreconditionedSGD, x: Tensor, model: nn.Module, kind: str, y: Tensor
) -> tuple[float, float]:
    """Seconds for bare eigh of every factor, and for the bare aᵀa, gᵀg products."""
    eigh_time = bare_eigh(
        [f.value for layer in opt.preconditioner.layers.values() for f in layer.factors]
    )
    rows: list[Tensor] = []
    hooks = []
    for layer in opt.preconditioner.layers.values():

        def grab(module: nn.Module, args: Any, output: Tensor, math: Any = layer.math) -> None:
            rows.append(math.input_rows(args[0].detach()))
            output.register_hook(lambda g, math=math: rows.append(math.output_rows(g)))

        hooks.append(layer.module.register_forward_hook(grab))
    opt.preconditioner.capture.active = False
    loss_of(kind, model, x, y).backward()
    for h in hooks:
        h.remove()
    start = time.perf_counter()
    for r in rows:
        r.mT @ r
    return eigh_time, time.perf_counter() - start


def bench(
    workload: str, batch: int, freqs: tuple[int, int], method: str, args: argparse.Namespace
) -> dict:
    make, kind = WORKLOADS[workload].build, WORKLOADS[workload].task
    x, y = random_batch(batch)
    factor_freq, inverse_freq = freqs
    cycle = max(args.steps, inverse_freq)
    models = {name: make() for name in ("sgd", "adamw", "kfrob")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts: dict[str, torch.optim.Optimizer] = {
            "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=1e-3),
            "adamw": torch.optim.AdamW(models["adamw"].parameters(), lr=1e-4),
            "kfrob": FrobPreconditionedSGD(
                models["kfrob"],
                lr=1e-3,
                factor_update_freq=factor_freq,
                inverse_update_freq=inverse_freq,
                damping_method=method,
                weight_sharing=args.weight_sharing,
                loss=WORKLOADS[workload].kfrob_loss,  # the Monte Carlo Fisher, as in training
            ),
        }
    for name, opt in opts.items():  # warm-up: allocations, first refresh
        timed_steps(opt, models[name], kind, x, y, min(cycle, 3))
    times: dict[str, list[float]] = defaultdict(list)
    timer = PhaseTimer()
    for _ in range(args.rounds):
        for name, opt in opts.items():
            if name == "kfrob":
                before = dict(timer.totals)
                with timer.patched():
                    t = timed_steps(opt, models[name], kind, x, y, cycle)
                for phase, total in timer.totals.items():
                    times[phase].append((total - before.get(phase, 0.0)) / cycle)
            else:
                t = timed_steps(opt, models[name], kind, x, y, cycle)
            times[name].append(t)
    kfrob_opt = opts["kfrob"]
    assert isinstance(kfrob_opt, FrobPreconditionedSGD)
    eighs, matmuls = [], []
    for _ in range(args.rounds):
        e, m = bare_linear_algebra(kfrob_opt, x, models["kfrob"], kind, y)
        eighs.append(e)
        matmuls.append(m)
    med = {k: statistics.median(v) for k, v in times.items()}
    eigh_time, matmul_time = statistics.median(eighs), statistics.median(matmuls)
    limit = med["sgd"] + eigh_time / inverse_freq + matmul_time / factor_freq
    refresh = med.get("inverse refresh", 0.0) * cycle / max(1, cycle // inverse_freq)
    rest = med["kfrob"] - sum(med.get(p, 0.0) for p in PHASES)
    return {
        "workload": workload,
        "batch": batch,
        "freqs": f"{factor_freq}/{inverse_freq}",
        "damping": method,
        "sgd_ms": 1e3 * med["sgd"],
        "adamw_ms": 1e3 * med["adamw"],
        "kfrob_ms": 1e3 * med["kfrob"],
        "vs_sgd": med["kfrob"] / med["sgd"],
        "vs_adamw": med["kfrob"] / med["adamw"],
        "vs_limit": med["kfrob"] / limit,
        "refresh_vs_eigh": refresh / eigh_time,
        "breakdown": {p: med.get(p, 0.0) / med["kfrob"] for p in PHASES}
        | {"rest": rest / med["kfrob"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,autoencoder,cnn")
    parser.add_argument("--batch-sizes", default="128,512")
    parser.add_argument("--freqs", default="1/10,10/100")
    parser.add_argument("--damping-methods", default="factored,exact")
    parser.add_argument("--weight-sharing", default="expand", help="expand or reduce (convs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="minimum steps per timed cycle")
    parser.add_argument("--out", default="results")
    parser.add_argument("--name", default="step_overhead", help="results/<name>.md")
    args = parser.parse_args()
    rows = []
    for workload in args.workloads.split(","):
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            for freq, method in itertools.product(
                args.freqs.split(","), args.damping_methods.split(",")
            ):
                f, i = (int(v) for v in freq.split("/"))
                row = bench(workload, batch, (f, i), method, args)
                rows.append(row)
                print(
                    f"{workload:12s} B={batch:<4d} {row['freqs']:>6s} {method:8s} "
                    f"kfrob {row['kfrob_ms']:7.1f} ms"
                    f"  ×SGD {row['vs_sgd']:5.2f}  ×AdamW {row['vs_adamw']:5.2f}"
                    f"  ×limit {row['vs_limit']:5.2f}  refresh/eigh {row['refresh_vs_eigh']:5.2f}",
                    flush=True,
                )
    lines = [
        "# Step overhead of kfrob",
        "",
        f"{provenance()} Medians over {args.rounds} round-robin rounds; kfrob's time is "
        f"amortised over whole refresh cycles. Weight sharing: {args.weight_sharing}.",
        "",
        "| workload | batch | factor/inverse freq | damping | SGD ms | AdamW ms | kfrob ms | "
        "kfrob/SGD | kfrob/AdamW | kfrob/limit | refresh/eigh | capture | factors | refresh | "
        "precond | rest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"| {r['workload']} | {r['batch']} | {r['freqs']} | {r['damping']} | "
            f"{r['sgd_ms']:.1f} | {r['adamw_ms']:.1f} | {r['kfrob_ms']:.1f} | "
            f"{r['vs_sgd']:.2f} | {r['vs_adamw']:.2f} | {r['vs_limit']:.2f} | "
            f"{r['refresh_vs_eigh']:.2f} | {b['capture']:.0%} | {b['factor update']:.0%} | "
            f"{b['inverse refresh']:.0%} | {b['preconditioning']:.0%} | {b['rest']:.0%} |"
        )
    write_report(args.out, f"{args.name}.md", lines)


if __name__ == "__main__":
    main()
