"""Several optimizers on one workload, side by side: what ``kfrob compare`` runs.

Each optimizer trains with the same config, hence the same seed, initial model and batch
order (:func:`kfrob.job.training.train`). The comparison is written to ``out_dir`` as
``comparison.md`` (the table), ``comparison.png`` (training loss and the held-out metric —
test accuracy, test loss or validation loss — against steps and against training time, one
line per optimizer) and ``comparison.json`` (every evaluation of
every run, machine-readable).
"""

from __future__ import annotations

import json
import platform
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kfrob.job.config import Config
from kfrob.job.training import (
    CHECKPOINT,
    RunResult,
    load_data,
    open_run_dir,
    record_run,
    train,
)
from kfrob.job.workloads import WORKLOADS

__all__ = ["compare", "plot", "report", "table", "timing"]


def compare(
    config: Config,
    names: list[str],
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    command: str | None = None,
) -> dict[str, RunResult]:
    """Train each optimizer in ``names`` (keys of ``config.optimizers``) into
    ``out_dir/<name>`` and write the comparison; stops early if one run is interrupted
    (``resume=True`` picks every run up where it stopped; finished runs are not re-run)."""
    out_dir = Path(out_dir)
    data = load_data(config.data, config.model.context)
    if resume:  # refuse a changed config before anything is written
        for name in names:
            if (out_dir / name / CHECKPOINT).is_file():
                open_run_dir(out_dir / name, True, config, name)
    record_run(out_dir, config, names)
    results: dict[str, RunResult] = {}
    for name in names:
        results[name] = train(
            config, name, out_dir / name, resume=resume and (out_dir / name).exists(),
            progress=progress, data=data,
        )  # fmt: skip
        if results[name].interrupted:
            return results
    summary = report(config, results, command)
    ran = f"`{command}` on" if command else "measured"
    provenance = (
        f"{config.workload} on {next(iter(results.values())).data}; {ran} "
        f"{summary['date']}, {summary['machine']}. {summary['timing']}"
    )
    (out_dir / "comparison.md").write_text(table(config, results) + "\n\n" + provenance + "\n")
    caption = f"{command + ', ' if command else ''}{summary['date'][:10]}, {summary['machine']}"
    plot(config, results, out_dir / "comparison.png", caption=caption)
    (out_dir / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def report(
    config: Config, results: dict[str, RunResult], command: str | None = None
) -> dict[str, Any]:
    """Everything in the comparison, for machines: the config, where and when it ran, and
    each run's result."""
    return {
        "config": config.model_dump(),
        "command": command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
        "timing": timing(config),
        "runs": {name: result.to_json() for name, result in results.items()},
    }


def timing(config: Config) -> str:
    """How the seconds in the table were taken, in a sentence."""
    warmup, every = config.training.warmup_steps, config.training.eval_every
    budget = config.training.max_seconds
    evaluations = f"every {every} steps" if every else "after each epoch"
    start = (
        f"after {warmup} untimed warm-up steps of each optimizer on a throwaway model, "
        if warmup
        else "with no warm-up (the first optimizer pays the process's start-up), "
    )
    return (
        "Training time is the wall-clock time of the training steps (forward, backward, "
        f"optimizer step), taken {start}in the order of the table; it excludes evaluation "
        f"({evaluations}), diagnostics, logging and checkpoints. Seconds to target are those "
        "at the first evaluation that reached it."
        + (
            f" Each run stopped after the step that took its training time past {budget:g} s."
            if budget is not None
            else ""
        )
    )


def table(config: Config, results: dict[str, RunResult]) -> str:
    """A Markdown table: final training loss, the held-out metric (test accuracy, test loss
    or validation loss), training time, and steps and seconds to the target."""
    target = config.training.target
    workload = WORKLOADS[config.workload]
    quality = workload.quality
    label = quality.replace("_", " ") + (" (nats/byte)" if workload.data == "text" else "")
    header = ["optimizer", "steps", "final train loss", label, "train time (s)"]
    if target is not None:
        relation = "≥" if target.higher_is_better else "≤"
        header += [f"steps to {target.metric} {relation} {target.value:g}", "seconds to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        final = result.final
        row = [
            name,
            str(result.steps),
            f"{final['train_loss']:.4f}",
            f"{final[quality]:.4f}",
            f"{result.seconds:.1f}",
        ]
        if target is not None:
            reached = result.target_step is not None
            row += [
                str(result.target_step) if reached else "not reached",
                f"{result.target_seconds:.1f}" if reached else "—",
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(
    config: Config, results: dict[str, RunResult], path: str | Path, caption: str = ""
) -> None:
    """A 2×2 figure: training loss and the held-out metric (test accuracy, test loss or
    validation loss) against steps and against training seconds, one line per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    second = WORKLOADS[config.workload].quality
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    for name, result in results.items():
        steps = [e["step"] for e in result.history]
        seconds = [e["seconds"] for e in result.history]
        for row, metric in enumerate(("train_loss", second)):
            values = [e[metric] for e in result.history]
            axes[row, 0].plot(steps, values, label=name)
            axes[row, 1].plot(seconds, values, label=name)
    for row, metric in enumerate(("training loss", second.replace("_", " "))):
        axes[row, 0].set_ylabel(metric)
        for column, x_label in enumerate(("step", "training time (s)")):
            axes[row, column].set_xlabel(x_label)
            axes[row, column].grid(alpha=0.3)
            if metric.endswith("loss"):
                axes[row, column].set_yscale("log")
    target = config.training.target
    if target is not None:
        row = 0 if target.metric == "train_loss" else 1
        if target.metric == second or row == 0:
            for ax in axes[row]:
                ax.axhline(target.value, color="grey", linestyle=":", linewidth=1)
    axes[0, 0].legend()
    title = f"{config.workload} on {next(iter(results.values())).data}"
    fig.suptitle(textwrap.fill(title, 150), fontsize=10)
    if caption:  # the command and the machine
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
