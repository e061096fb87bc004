"""Time to AdamW's loss on the transformer workload: kfrob against AdamW and SGD.

Each contender trains the byte-level GPT of ``configs/transformer.yaml`` for the config's
training-time budget (60 s) with each learning rate of its 3-point grid on seed 0; the best
learning rate (lowest final validation loss) then runs with the other seeds. The target
``L*`` is AdamW's final validation loss at its best learning rate, the median over seeds;
for every run the table gives the training seconds of the first evaluation at or below
``L*`` (every 25 steps), and the median over seeds as a ratio to AdamW's own. Seconds are
training time only, measured by the training job (warm-up steps untimed, evaluation
excluded); the contenders take turns, one run each, in an order that rotates every round.

    python scripts/transformer_time_to_target.py     # kfrob, kfrob-sgd, AdamW, SGD; 3 seeds
    python scripts/transformer_time_to_target.py --contenders kfrob,adamw --seeds 1
    python scripts/transformer_time_to_target.py --name transformer_schedules --seeds 1 \
        --lrs 0.003 --contenders kfrob,kfrob-5-20,kfrob-10-20,kfrob-20-40,kfrob-10-80,adamw

Results go to ``results/<name>.{md,json}`` (``--name``, default
``transformer_time_to_target``); ``--report-only`` renders the saved runs again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from report import provenance

from kfrob.job.config import load_config
from kfrob.job.training import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "transformer.yaml"

ADAM_GRID = (1e-3, 3e-3, 1e-2)


def schedule(factors: int, inverses: int) -> tuple[dict[str, Any], tuple[float, ...]]:
    """kfrob's defaults with factors every ``factors`` steps and bases every ``inverses``."""
    return (
        {"type": "kfrob", "factor_update_freq": factors, "inverse_update_freq": inverses},
        ADAM_GRID,
    )


# label: (constructor arguments besides lr, learning-rate grid)
CONTENDERS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "kfrob": ({"type": "kfrob"}, ADAM_GRID),
    "kfrob-1-10": schedule(1, 10),
    "kfrob-5-20": schedule(5, 20),
    "kfrob-10-20": schedule(10, 20),
    "kfrob-20-40": schedule(20, 40),
    "kfrob-10-80": schedule(10, 80),
    "kfrob-mc": ({"type": "kfrob", "fisher": "mc"}, ADAM_GRID),
    "kfrob-graft": (
        {
            "type": "kfrob",
            "step_rule": "adam_grafted",
            "factor_update_freq": 1,
            "inverse_update_freq": 10,
            "fisher": "mc",
        },
        ADAM_GRID,
    ),
    "kfrob-graft-5-20": ({"type": "kfrob", "step_rule": "adam_grafted"}, ADAM_GRID),
    "kfrob-sgd": ({"type": "kfrob", "step_rule": "preconditioned_sgd"}, (0.1, 0.3, 1.0)),
    "adamw": ({"type": "adamw"}, ADAM_GRID),
    "sgd": ({"type": "sgd", "momentum": 0.9}, (0.1, 0.3, 1.0)),
}
ABOUT = {
    "kfrob": "`FrobPreconditionedSGD(model, lr, loss=...)` with its defaults (Adam in the "
    "Kronecker eigenbasis; factors every 10 steps, eigenbases every 40, the empirical Fisher)",
    "kfrob-1-10": "the same with factors every step and eigenbases every 10",
    "kfrob-5-20": "the same with factors every 5 steps and eigenbases every 20",
    "kfrob-10-20": "the same with factors every 10 steps and eigenbases every 20",
    "kfrob-20-40": "the same with factors every 20 steps and eigenbases every 40",
    "kfrob-10-80": "the same with factors every 10 steps and eigenbases every 80",
    "kfrob-mc": "`kfrob` with the MC Fisher (`fisher='mc'`: a sampled backward pass on "
    "factor steps)",
    "kfrob-graft": "`FrobPreconditionedSGD(model, lr, loss=..., step_rule='adam_grafted')` "
    "(each layer's preconditioned first moment at the length of its Adam step) with factors "
    "every step, inverses every 10, the MC Fisher",
    "kfrob-graft-5-20": "`step_rule='adam_grafted'` with the rule's defaults (factors every 5 "
    "steps, inverses every 20, the empirical Fisher)",
    "kfrob-sgd": "`FrobPreconditionedSGD(model, lr, loss=..., step_rule='preconditioned_sgd')` "
    "(the KL-clipped K-FAC step)",
    "adamw": "`torch.optim.AdamW` defaults besides the learning rate",
    "sgd": "`torch.optim.SGD` with momentum 0.9",
}


def run(label: str, lr: float, seed: int, root: Path, seconds: float | None) -> dict[str, Any]:
    arguments, _ = CONTENDERS[label]
    overrides = [f"training.seed={seed}", "logging.histograms=false"]
    if seconds is not None:
        overrides.append(f"training.max_seconds={seconds}")
    config = load_config(CONFIG, overrides)
    config = config.model_copy(update={"optimizers": {label: {**arguments, "lr": lr}}})
    result = train(config, label, root / f"{label}-{lr:g}-{seed}", progress=False)
    history = [(h["seconds"], h["val_loss"]) for h in result.history if h["val_loss"] is not None]
    return {"lr": lr, "seed": seed, "steps": result.steps, "history": history,
            "final": history[-1][1]}  # fmt: skip


def seconds_to(history: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, loss in history if loss <= target), None)


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def rotated(labels: list[str], by: int) -> list[str]:
    return labels[by % len(labels) :] + labels[: by % len(labels)]


def measure(
    labels: list[str], seeds: int, seconds: float | None, lrs: tuple[float, ...] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Each contender's grid (``lrs`` instead, if given) on seed 0 (``"grid"``) and its best
    learning rate on every seed. The contenders take turns, one run each, in an order that
    rotates every round, so a drift of the machine's speed during the hour the runs take
    reaches all of them alike."""
    runs: dict[str, list[dict[str, Any]]] = {}
    grids: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    grid = {label: lrs or CONTENDERS[label][1] for label in labels}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for point in range(len(grid[labels[0]])):
            for label in rotated(labels, point):
                r = run(label, grid[label][point], 0, root, seconds)
                grids[label].append(r)
                print(f"{label} lr={r['lr']:g}: {r['final']:.4f}, {r['steps']} steps", flush=True)
        for label in labels:
            # a diverged run (NaN) is never the best
            runs[label] = [min(grids[label], key=lambda r: _finite_or_inf(r["final"]))]
            runs[f"{label} grid"] = grids[label]
        for seed in range(1, seeds):
            for label in rotated(labels, seed):
                runs[label].append(run(label, runs[label][0]["lr"], seed, root, seconds))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contenders", default="kfrob,kfrob-sgd,adamw,sgd")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=None, help="default: the config's")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"))
    parser.add_argument("--name", default="transformer_time_to_target")
    parser.add_argument("--report-only", action="store_true", help="re-render the saved JSON")
    parser.add_argument("--lrs", default=None, help="one grid for every contender, e.g. 0.003")
    args = parser.parse_args()
    lrs = None if args.lrs is None else tuple(float(v) for v in args.lrs.split(","))
    measured = args.contenders.split(",")
    budget = args.max_seconds or load_config(CONFIG).training.max_seconds
    out = Path(args.out)
    saved = out / f"{args.name}.json"
    if args.report_only:
        runs = json.loads(saved.read_text())["runs"]
    else:
        runs = measure(measured, args.seeds, args.max_seconds, lrs)
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    labels = [label for label in CONTENDERS if label in runs]
    # the target: AdamW's final loss at its best learning rate, the median over seeds
    finals = [r["final"] for r in runs.get("adamw", [])]
    target = (
        statistics.median(finals) if finals else min(r["final"] for rs in runs.values() for r in rs)
    )
    times = {label: [seconds_to(r["history"], target) for r in runs[label]] for label in labels}

    def median_reached(values: list[float | None]) -> float | None:
        reached = [v for v in values if v is not None]
        return statistics.median(reached) if reached else None

    reference = median_reached(times.get("adamw", []))
    lines = [
        "# Time to AdamW's loss on the transformer workload",
        "",
        f"{provenance()} The byte-level GPT of `configs/transformer.yaml`, {budget:g} s of "
        "training time per run; "
        + (
            f"the learning rate{'s' if len(args.lrs.split(',')) > 1 else ''} {args.lrs} "
            "for every contender"
            if args.lrs
            else "a 3-point learning-rate grid per contender"
        )
        + " on seed 0, the "
        f"best then on {args.seeds} seeds. Target: AdamW's final validation loss at its best "
        f"learning rate, the median over seeds, **{target:.4f} nats/byte**; seconds to "
        "target are the medians over the seeds that reached it. "
        + " ".join(f"`{label}`: {ABOUT[label]}." for label in labels),
        "",
        "| optimizer | best lr | final val loss (median) | steps (median) | seeds at target "
        "| seconds to target | seconds / AdamW |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        rs, t = runs[label], median_reached(times[label])
        reached = sum(v is not None for v in times[label])
        ratio = "n/a" if t is None or not reference else f"{t / reference:.2f}"
        lines.append(
            f"| {label} | {rs[0]['lr']:g} | {statistics.median(r['final'] for r in rs):.4f} | "
            f"{statistics.median(r['steps'] for r in rs):.0f} | {reached} of {len(rs)} | "
            f"{'missed' if t is None else f'{t:.1f}'} | {ratio} |"
        )
    lines.append("")
    for label in labels:
        grid = runs.get(f"{label} grid", [])
        if grid:
            finals = ", ".join(f"lr {r['lr']:g}: {r['final']:.4f}" for r in grid)
            lines.append(f"* `{label}` on seed 0: {finals}.")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    summary = {"target": target, "runs": runs, "seconds_to_target": times}
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
