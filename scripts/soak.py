"""Soak test: thousands of kfrob steps with faults injected, against a fault-free twin.

Faults, drawn at random each step: a batch with a NaN input (the step must change nothing),
an overflowing loss under a ``GradScaler`` (the scaler skips the step; the factors must not
absorb it), and periodic checkpoint/restart cycles (a new model and optimizer are built
from a ``torch.save`` checkpoint on disk). Reports steps done, faults survived, restarts, the
final training loss against the same run without faults, and resident memory (RSS) over the
run, which should stay flat.

    python scripts/soak.py                 # 6000 steps, writes results/soak.md
    python scripts/soak.py --steps 500     # quick look
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from report import provenance, write_report
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def make_data(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 0.5, 32)
    x = torch.randn(4096, 32, generator=gen) * scales
    y = (x / scales @ torch.randn(32, 5, generator=gen)).argmax(1)
    return x, y


def build(
    state: dict | None = None,
) -> tuple[nn.Module, FrobPreconditionedSGD, torch.amp.GradScaler]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5)
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=200)
    opt = FrobPreconditionedSGD(
        model,
        lr=0.1,
        step_rule="preconditioned_sgd",
        loss="cross_entropy",
        grad_scaler=scaler,
        inverse_update_freq=10,
        generator=torch.Generator().manual_seed(0),
    )
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    return model, opt, scaler


def run(steps: int, faults: bool, args: argparse.Namespace) -> dict[str, float]:
    x, y = make_data()
    rng = random.Random(args.seed)
    order = torch.Generator().manual_seed(args.seed)
    model, opt, scaler = build()
    counts = {"nan_batches": 0, "overflows": 0, "restarts": 0}
    rss = []
    checkpoint = Path(tempfile.mkdtemp()) / "soak.pt"
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=order)
        xb = x[idx]
        loss_factor = 1.0
        if faults and rng.random() < args.fault_rate:
            xb = xb.clone()
            xb[0, 0] = float("nan")
            counts["nan_batches"] += 1
        elif faults and rng.random() < args.fault_rate:
            loss_factor = float("inf")
            counts["overflows"] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), y[idx]) * loss_factor
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if faults and step % args.restart_every == 0:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict(),
                },
                checkpoint,
            )
            opt.close()
            del model, opt, scaler
            model, opt, scaler = build(torch.load(checkpoint, weights_only=True))
            counts["restarts"] += 1
        if step % max(1, steps // 20) == 0:
            rss.append(rss_mib())
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    warm = rss[len(rss) // 4] if rss else 0.0
    return {
        "final_loss": final,
        "finite": float(finite),
        "rss_start": warm,
        "rss_end": rss[-1] if rss else 0.0,
        **counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--fault-rate", type=float, default=0.01)
    parser.add_argument("--restart-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the expected 'skipped a step' warnings

    start = time.perf_counter()
    faulty = run(args.steps, True, args)
    clean = run(args.steps, False, args)
    elapsed = time.perf_counter() - start
    growth = faulty["rss_end"] - faulty["rss_start"]
    lines = [
        "# Soak: kfrob under injected faults",
        "",
        f"{provenance()} {elapsed:.0f} s for both runs.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| steps | {args.steps} |",
        f"| NaN batches survived | {faulty['nan_batches']} |",
        f"| overflowing (scaler-skipped) steps survived | {faulty['overflows']} |",
        f"| checkpoint/restart cycles | {faulty['restarts']} |",
        f"| parameters finite at the end | {bool(faulty['finite'])} |",
        f"| final training loss, with faults | {faulty['final_loss']:.4f} |",
        f"| final training loss, fault-free twin | {clean['final_loss']:.4f} |",
        f"| RSS after warm-up → end (MiB) | {faulty['rss_start']:.1f} → "
        f"{faulty['rss_end']:.1f} ({growth:+.1f}) |",
    ]
    write_report(args.out, "soak.md", lines)
    if not faulty["finite"] or abs(growth) > 50:
        raise SystemExit("soak failed: non-finite parameters or memory growth over 50 MiB")


if __name__ == "__main__":
    main()
