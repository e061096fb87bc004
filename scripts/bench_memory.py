"""Memory: kfrob's factors and inverses against the parameters, and peak process memory.

For each workload of the training job:

* **state**: bytes of the parameters, of kfrob's running factors (``A``, ``G`` and the
  window sums the hooks add into), of its inverses (eigenbases and eigenvalues for exact
  damping, the two damped inverse matrices for factored damping, bases and weights for
  low-rank sides, diagonal blocks for block-diagonal ones) and of SGD's momentum and AdamW's
  two moments, each as a multiple of the parameter bytes, for kfrob with its defaults
  (low-rank sides where the cost model puts them, held as sketches), with every side dense,
  with every side block-diagonal (``max_block_size=128``), and
  with exact damping;
* **peak**: the peak resident memory of a fresh process (Linux: ``VmHWM``, reset just
  before training) that builds the model and trains ``--steps`` steps at batch 128, for
  SGD (momentum 0.9), AdamW and kfrob; reported as each peak over SGD's, and as each
  process's growth in MiB over its memory before training (imports, model). With
  ``--device cuda`` the peak is the device's instead: CUDA's caching allocator's peak
  allocation (``torch.cuda.max_memory_allocated``, reset just before training), and the
  growth is over the bytes allocated before training (the model).

    python scripts/bench_memory.py             # writes results/memory.md
    python scripts/bench_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from bench_step import random_batch, timed_steps
from report import (
    add_device_argument,
    device_memory,
    provenance,
    reset_peak_memory,
    sync,
    write_report,
)
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.job.workloads import WORKLOADS
from kfrob.kronecker import EigenInverse, InverseFactors
from kfrob.structure import BlockDiagonalPower, DiagonalPower, LowRankPower

MiB = 2**20


def nbytes(tensors: list[Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def build(optimizer: str, model: nn.Module, workload: str) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if optimizer == "sgd":
            return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if optimizer == "adamw":
            return torch.optim.AdamW(model.parameters(), lr=1e-4)
        return FrobPreconditionedSGD(
            model,
            lr=1e-3,
            loss=WORKLOADS[workload].kfrob_loss,
            **{"step_rule": "preconditioned_sgd", **KFROB[optimizer]},
        )


#: the kfrob contenders: defaults, every side dense, every side block-diagonal, exact damping
KFROB: dict[str, dict[str, str | int]] = {
    "kfrob": {},
    "kfrob-dense": {"domain_structure": "dense", "codomain_structure": "dense"},
    "kfrob-blocks": {
        "domain_structure": "block_diagonal",
        "codomain_structure": "block_diagonal",
        "max_block_size": 128,
    },
    "kfrob-exact": {"damping_method": "exact"},
}
NAMES = ("sgd", "adamw", *KFROB)


def side_tensors(side: object) -> list[Tensor | None]:
    """The tensors one side of a factored inverse holds."""
    if isinstance(side, LowRankPower):
        return [side.basis, side.weights, side.scale, side.eigenvalues]
    if isinstance(side, DiagonalPower):
        return [side.values]
    if isinstance(side, BlockDiagonalPower):
        return [side.parts]
    return [side]  # type: ignore[list-item]


def train(
    opt: torch.optim.Optimizer, model: nn.Module, workload: str, steps: int, device: torch.device
) -> None:
    x, y = random_batch(128, device)
    timed_steps(opt, model, WORKLOADS[workload].task, x, y, steps)


def state_bytes(workload: str, device: torch.device) -> dict[str, float]:
    """Each optimizer's state after a few steps, as a multiple of the parameter bytes."""
    out: dict[str, float] = {}
    params = 0
    for optimizer in NAMES:
        torch.manual_seed(0)
        model = WORKLOADS[workload].build().to(device)
        params = nbytes(list(model.parameters()))
        opt = build(optimizer, model, workload)
        train(opt, model, workload, 2, device)
        if isinstance(opt, FrobPreconditionedSGD):
            pre = opt.preconditioner
            factors = [f.average for layer in pre.layers.values() for f in layer.factors]
            sums = [f._sum for layer in pre.layers.values() for f in layer.factors]
            inverses: list[Tensor | None] = []
            for inverse in pre.inverses.values():
                if isinstance(inverse, EigenInverse):
                    for side in (inverse.codomain, inverse.domain):
                        inverses += [side.basis, side.eigenvalues]
                    inverses.append(inverse.scaling)
                elif isinstance(inverse, InverseFactors):
                    inverses += side_tensors(inverse.codomain) + side_tensors(inverse.domain)
            out[f"{optimizer} factors"] = nbytes(factors) / params
            out[f"{optimizer} window sums"] = nbytes(sums) / params
            out[f"{optimizer} inverses"] = nbytes(inverses) / params
        else:
            state = [t for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]
            out[f"{optimizer} state"] = nbytes([t for t in state if t.dim() > 0]) / params
    out["parameter MiB"] = params / MiB
    return out


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``: now, ``VmHWM``: peak), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(optimizer: str, workload: str, steps: int, device: torch.device) -> None:
    """Run in a fresh process: resident memory before training and its peak during
    training, in KiB. The peak counter is reset first (``/proc/self/clear_refs``), so
    neither the import of torch nor the parent's memory (``ru_maxrss`` survives fork and
    exec) is mistaken for training's peak. On CUDA: the device's allocated bytes before
    training and their peak during it (the allocator's peak counter reset first)."""
    torch.manual_seed(0)
    model = WORKLOADS[workload].build().to(device)
    opt = build(optimizer, model, workload)
    if device_memory(device) is None:  # the CPU: the process's resident memory
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = status_kib("VmRSS")
        train(opt, model, workload, steps, device)
        peak = status_kib("VmHWM")
    else:  # an accelerator: its allocator's bytes
        sync(device)
        reset_peak_memory(device)
        before = device_memory(device)[0] // 1024  # type: ignore[index]
        train(opt, model, workload, steps, device)
        sync(device)
        peak = device_memory(device)[1] // 1024  # type: ignore[index]
    print(json.dumps({"before_kib": before, "peak_kib": peak}))


def peak(optimizer: str, workload: str, steps: int, device: torch.device) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", optimizer, workload, str(steps)]
    command += ["--device", str(device)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,autoencoder,cnn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="results")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    add_device_argument(parser)
    args = parser.parse_args()
    device = args.device
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), device)
        return
    on_device = device_memory(device) is not None  # the peak is the device's, not the RSS
    memory = "peak memory allocated on the device" if on_device else "peak resident memory"
    lines = [
        "# Memory of kfrob against SGD and AdamW",
        "",
        f"{provenance(device)} State after 2 steps; {memory} of a fresh process "
        f"training {args.steps} steps at batch 128 on random images.",
        "",
        "## Optimizer state, as a multiple of the parameter bytes",
        "",
        "| workload | parameters (MiB) | SGD momentum | AdamW moments | kfrob factors "
        "| kfrob window sums | kfrob inverses | dense factors | dense window sums "
        "| dense inverses | block-diagonal factors | block-diagonal inverses | exact inverses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peaks: dict[str, dict[str, dict[str, float]]] = {}
    for workload in args.workloads.split(","):
        s = state_bytes(workload, device)
        keys = [
            "sgd state", "adamw state", "kfrob factors", "kfrob window sums",
            "kfrob inverses", "kfrob-dense factors", "kfrob-dense window sums",
            "kfrob-dense inverses", "kfrob-blocks factors", "kfrob-blocks inverses",
            "kfrob-exact inverses",
        ]  # fmt: skip
        cells = " | ".join(f"{s[key]:.2f}" for key in keys)
        lines.append(f"| {workload} | {s['parameter MiB']:.2f} | {cells} |")
        peaks[workload] = {name: peak(name, workload, args.steps, device) for name in NAMES}
        print(workload, peaks[workload], flush=True)
    lines += [
        "",
        "## Peak device memory of a training process"
        if on_device
        else "## Peak resident memory of a training process",
        "",
        "| workload | SGD peak (MiB) | AdamW / SGD | kfrob / SGD | kfrob dense / SGD "
        "| kfrob block-diagonal / SGD | kfrob exact / SGD | growth in training (MiB): SGD "
        "| AdamW | kfrob | kfrob dense | kfrob block-diagonal | kfrob exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = NAMES
    for workload, p in peaks.items():
        ratios = [p[name]["peak_kib"] / p["sgd"]["peak_kib"] for name in names[1:]]
        growth = [(p[name]["peak_kib"] - p[name]["before_kib"]) / 1024 for name in names]
        lines.append(
            f"| {workload} | {p['sgd']['peak_kib'] / 1024:.0f} | "
            + " | ".join(f"{r:.2f}" for r in ratios)
            + " | "
            + " | ".join(f"{g:.0f}" for g in growth)
            + " |"
        )
    write_report(args.out, "memory.md", lines)


if __name__ == "__main__":
    main()
