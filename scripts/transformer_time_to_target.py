"""Time to AdamW's loss on the transformer workload: kfrob against AdamW and SGD.

Each contender trains the byte-level GPT of ``configs/transformer.yaml`` for the config's
training-time budget (60 s) with each learning rate of its 3-point grid on seed 0; the best
learning rate (lowest final validation loss) then runs with the other seeds. The target
``L*`` is AdamW's best final validation loss on seed 0; for every run the table gives the
training seconds of the first evaluation at or below ``L*`` (every 25 steps), and the
median over seeds as a ratio to AdamW's own. Seconds are training time only, measured by
the training job (warm-up steps untimed, evaluation excluded); contenders run one after
another in the order below.

    python scripts/transformer_time_to_target.py                     # all, 3 seeds
    python scripts/transformer_time_to_target.py --contenders kfrob-adam,adamw --seeds 1

Results go to ``results/<name>.{md,json}`` (``--name``, default
``transformer_time_to_target``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from report import provenance

from kfrob.job.config import load_config
from kfrob.job.training import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "transformer.yaml"

# label: (constructor arguments besides lr, learning-rate grid)
CONTENDERS: dict[str, tuple[dict[str, Any], tuple[float, ...]]] = {
    "kfrob-adam": ({"type": "kfrob", "step_rule": "eigenbasis_adam"}, (1e-3, 3e-3, 1e-2)),
    "kfrob": ({"type": "kfrob"}, (0.1, 0.3, 1.0)),
    "adamw": ({"type": "adamw"}, (1e-3, 3e-3, 1e-2)),
    "sgd": ({"type": "sgd", "momentum": 0.9}, (0.1, 0.3, 1.0)),
}
ABOUT = {
    "kfrob-adam": "`FrobPreconditionedSGD(model, lr, loss=..., step_rule='eigenbasis_adam')`",
    "kfrob": "`FrobPreconditionedSGD(model, lr, loss=...)` (preconditioned SGD, KL clip)",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=None, help="default: the config's")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"))
    parser.add_argument("--name", default="transformer_time_to_target")
    args = parser.parse_args()
    labels = args.contenders.split(",")
    budget = args.max_seconds or load_config(CONFIG).training.max_seconds
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for label in labels:  # the grid on seed 0
            grid = [run(label, lr, 0, root, args.max_seconds) for lr in CONTENDERS[label][1]]
            best = min(grid, key=lambda r: r["final"])
            again = [
                run(label, best["lr"], s, root, args.max_seconds) for s in range(1, args.seeds)
            ]
            runs[label] = [best, *again]
            for r in grid:
                print(
                    f"{label} lr={r['lr']:g}: {r['final']:.4f} after {r['steps']} steps", flush=True
                )
    target = (
        runs["adamw"][0]["final"]
        if "adamw" in runs
        else min(r["final"] for rs in runs.values() for r in rs)
    )
    times = {label: [seconds_to(r["history"], target) for r in rs] for label, rs in runs.items()}

    def median(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else statistics.median(values)  # type: ignore[type-var]

    reference = median(times.get("adamw", [None]))
    lines = [
        "# Time to AdamW's loss on the transformer workload",
        "",
        f"{provenance()} The byte-level GPT of `configs/transformer.yaml`, {budget:g} s of "
        "training time per run; a 3-point learning-rate grid per contender on seed 0, the "
        f"best then on {args.seeds} seeds. Target: AdamW's "
        f"best final validation loss on seed 0, **{target:.4f} nats/byte**. "
        + " ".join(f"`{label}`: {ABOUT[label]}." for label in labels),
        "",
        "| optimizer | best lr | final val loss (median) | steps (median) | seconds to target "
        "(median) | seconds / AdamW |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        rs, t = runs[label], median(times[label])
        ratio = "n/a" if t is None or not reference else f"{t / reference:.2f}"
        lines.append(
            f"| {label} | {rs[0]['lr']:g} | {statistics.median(r['final'] for r in rs):.4f} | "
            f"{statistics.median(r['steps'] for r in rs):.0f} | "
            f"{'missed' if t is None else f'{t:.1f}'} | {ratio} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.name}.json").write_text(
        json.dumps({"target": target, "runs": runs, "seconds_to_target": times}, indent=1) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
