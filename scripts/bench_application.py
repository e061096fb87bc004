"""Applying a layer's inverse factors: to the gradient matrix, or to the per-sample rows.

A Linear or Conv layer's gradient is a sum over its ``rows`` (samples, or sample × location):
``V = gᵀ a`` with ``g`` ``(rows, out)`` and ``a`` ``(rows, in)``. Its preconditioned
direction ``P_G V P_A`` can be formed two ways:

* from the matrix, as kfrob does: ``P_G (gᵀ a) P_A``, with each side dense or structured as
  the cost model chose (a dense side costs ``2·out·in·n`` flops, a rank-``r`` side
  ``4·out·in·r``);
* from the rows: ``(g P_G)ᵀ (a P_A)``, each side applied to the rows (``rows·n²`` dense,
  ``4·rows·n·r`` low-rank) and one product ``2·rows·out·in`` — cheaper than a dense side
  when the rows are fewer than the widths, but that product costs as much as autograd's own
  weight gradient ``gᵀ a``, which the step needs anyway (the KL clip pairs it with the
  direction, and a layer's weight gradient always exists).

For every Linear and Conv layer of the MLP, the autoencoder, the CNN (batch 128) and the
transformer workload's GPT (32 × 64 tokens), on the rows of one real forward and backward
pass and the inverses of kfrob's defaults after its first refresh, the table times (medians
over round-robin rounds, after a warm-up) the weight gradient ``gᵀ a`` itself, the dense
application (``P_G V P_A`` with dense inverses of the same shapes), kfrob's application
(``KroneckerPreconditioner.precondition``: each side as the cost model chose) and the
application from the rows with kfrob's side operators, which the script checks equals
kfrob's to float32 precision.

    python scripts/bench_application.py             # writes results/application.md
    python scripts/bench_application.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from report import add_device_argument, provenance, sync, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.job.transformer import transformer
from kfrob.job.workloads import WORKLOADS, training_loss
from kfrob.kronecker import InverseFactors
from kfrob.layers.conv import ConvMath
from kfrob.layers.linear import LinearMath
from kfrob.structure import apply_left, apply_right

# the transformer workload's model (configs/transformer.yaml) and batch
GPT = {"d_model": 64, "n_layers": 4, "n_heads": 4, "context": 64}
GPT_BATCH = 32


def batch(workload: str, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    if workload == "transformer":
        tokens = torch.randint(0, 256, (GPT_BATCH, GPT["context"] + 1), generator=g)
        return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    images = torch.rand(size, 1, 28, 28, generator=g)
    return images.to(device), torch.randint(0, 10, (size,), generator=g).to(device)


def model_of(workload: str) -> tuple[nn.Module, str, str]:
    """The model, its task (for the loss) and kfrob's loss name."""
    if workload == "transformer":
        return transformer(**GPT), "language_model", "cross_entropy"
    spec = WORKLOADS[workload]
    return spec.build(), spec.task, spec.kfrob_loss


def rows_and_inverses(
    workload: str, size: int, device: torch.device
) -> list[tuple[str, Tensor, Tensor, InverseFactors, Any]]:
    """``(name, g, a, inverse, preconditioner)`` for every Linear/Conv layer with factored
    inverses, after kfrob's first refresh; ``g`` ``(k, rows, out)``, ``a`` ``(k, rows, in)``
    from one more forward and backward pass."""
    torch.manual_seed(0)
    model, task, loss_name = model_of(workload)
    model = model.to(device)
    x, y = batch(workload, size, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = FrobPreconditionedSGD(model, lr=1e-4, loss=loss_name, step_rule="preconditioned_sgd")
        for _ in range(2):
            opt.zero_grad()
            training_loss(task, model(x), x, y).backward()
            opt.step()
    pre = opt.preconditioner
    layers = {
        name: layer
        for name, layer in pre.layers.items()
        if isinstance(layer.math, LinearMath | ConvMath)
        and isinstance(pre.inverses.get(name), InverseFactors)
    }
    seen: dict[str, dict[str, Tensor]] = {name: {} for name in layers}
    hooks = []
    for name, layer in layers.items():

        def forward(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            seen[name]["a"] = layers[name].math.input_rows(args[0].detach())

        def backward(module: nn.Module, grad_in: Any, grad_out: Any, name: str = name) -> None:
            seen[name]["g"] = layers[name].math.output_rows(grad_out[0].detach())

        hooks.append(layer.module.register_forward_hook(forward))
        hooks.append(layer.module.register_full_backward_hook(backward))
    with pre.paused():
        opt.zero_grad()
        training_loss(task, model(x), x, y).backward()
    for h in hooks:
        h.remove()
    return [
        (name, seen[name]["g"], seen[name]["a"], pre.inverses[name], pre)
        for name in layers
        if "a" in seen[name] and "g" in seen[name]
    ]


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def spd_inverse(n: int, k: int, device: torch.device) -> Tensor:
    m = torch.randn(k, n, n, device=device) / n**0.5
    return torch.linalg.inv(m @ m.mT + torch.eye(n, device=device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,autoencoder,cnn,transformer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="results")
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    torch.set_grad_enabled(False)
    lines = [
        "# Applying the inverse factors: to the gradient matrix or to the per-sample rows",
        "",
        f"{provenance(device)} Batch {args.batch_size} (the transformer: {GPT_BATCH} × "
        f"{GPT['context']} tokens); medians over {args.rounds} round-robin rounds after a "
        "warm-up, in milliseconds. `gᵀa`: the weight gradient itself (what autograd forms). "
        "`dense`: `P_G V P_A` with dense inverses. `kfrob`: kfrob's application, each side "
        "as the cost model chose (`dense`/`low_rank`). `rows`: `(g P_G)ᵀ (a P_A)` with "
        "kfrob's side operators (checked equal to `kfrob`: the largest relative difference "
        "is the last column).",
        "",
        "| workload | layer | out × in | rows | sides (G, A) | gᵀa ms | dense / gᵀa | "
        "kfrob / gᵀa | rows / gᵀa | rows / kfrob | max rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    totals: list[str] = []
    for workload in args.workloads.split(","):
        with torch.enable_grad():
            entries = rows_and_inverses(workload, args.batch_size, device)
        sums = {"grad": 0.0, "dense": 0.0, "kfrob": 0.0, "rows": 0.0}
        for name, g, a, inverse, pre in entries:
            k, out, width = g.shape[0], g.shape[-1], a.shape[-1]
            matrix = g.mT @ a
            dense_g, dense_a = spd_inverse(out, k, device), spd_inverse(width, k, device)
            contenders: dict[str, Callable[[], Any]] = {
                "grad": lambda g=g, a=a: g.mT @ a,
                "dense": lambda m=matrix, dg=dense_g, da=dense_a: dg @ m @ da,
                "kfrob": lambda m=matrix, name=name, pre=pre: pre.precondition(name, m),
                "rows": lambda g=g, a=a, inv=inverse: (
                    apply_left(inv.codomain, g.mT) @ apply_right(a, inv.domain)
                ),
            }
            reference = contenders["kfrob"]()
            from_rows = contenders["rows"]()
            diff = float((from_rows - reference).norm() / reference.norm())
            for fn in contenders.values():
                fn()
            times: dict[str, list[float]] = {key: [] for key in contenders}
            order = list(contenders)
            for r in range(args.rounds):
                for key in order[r % len(order) :] + order[: r % len(order)]:
                    times[key].append(timed(contenders[key], device))
            ms = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            for key in sums:
                sums[key] += ms[key]
            sides = pre.structures()[name]
            chosen = f"{sides['codomain'].structure}, {sides['domain'].structure}"
            lines.append(
                f"| {workload} | {name} | {out} × {width} | {a.shape[-2]} | {chosen} | "
                f"{ms['grad']:.3f} | {ms['dense'] / ms['grad']:.2f} | "
                f"{ms['kfrob'] / ms['grad']:.2f} | {ms['rows'] / ms['grad']:.2f} | "
                f"{ms['rows'] / ms['kfrob']:.2f} | {diff:.1e} |"
            )
            print(lines[-1], flush=True)
        totals.append(
            f"| {workload} | {sums['grad']:.2f} | {sums['dense'] / sums['grad']:.2f} | "
            f"{sums['kfrob'] / sums['grad']:.2f} | {sums['rows'] / sums['grad']:.2f} | "
            f"{sums['rows'] / sums['kfrob']:.2f} |"
        )
    lines += [
        "",
        "Whole models (sums over their layers):",
        "",
        "| workload | gᵀa ms | dense / gᵀa | kfrob / gᵀa | rows / gᵀa | rows / kfrob |",
        "|---|---|---|---|---|---|",
        *totals,
    ]
    write_report(args.out, "application.md", lines)


if __name__ == "__main__":
    main()
