"""One training run: a workload, its data, one optimizer, checkpoints and TensorBoard.

:func:`train` is what ``kfrob train`` runs. It is deterministic given the config: the seed
fixes the model's initialisation, the data order (one permutation of the images per epoch,
or the random windows of a text, from their own generator) and kfrob's Monte Carlo sampler,
so every optimizer of a comparison sees the same initial model and the same batches, and a
resumed run takes exactly the steps of an uninterrupted one.

The run directory holds ``config.yaml`` (the effective config, overrides included, which
``kfrob train --resume`` continues with), ``checkpoint.pt`` (written atomically at each
epoch's end, every ``logging.checkpoint_every`` steps, on ``Ctrl-C`` and at the end), the
TensorBoard event files and ``result.json``. Training time (``seconds``) counts the
training steps only: evaluation, diagnostics, logging and checkpoints are excluded, and the
clock starts after ``training.warmup_steps`` untimed steps on a throwaway copy
(:func:`warm_up`), so that the first optimizer of a process does not pay its start-up.
A run ends when its epochs are done, at ``training.max_steps`` or after the step that takes
its training time past ``training.max_seconds``, whichever comes first.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kfrob.job.board import Board
from kfrob.job.config import Config
from kfrob.job.datasets import Dataset, TextDataset, load_data
from kfrob.job.optimizers import build_optimizer
from kfrob.job.regularization import penalty
from kfrob.job.runs import (
    CHECKPOINT,
    CONFIG,
    RUN,
    BatchOrder,
    Interrupt,
    open_run_dir,
    record_run,
    save_atomically,
    saved_run,
)
from kfrob.job.workloads import WORKLOADS, Workload
from kfrob.optimizer import FrobPreconditionedSGD

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "RUN",
    "BatchOrder",
    "Dataset",
    "RunResult",
    "TextDataset",
    "load_data",
    "record_run",
    "saved_run",
    "train",
    "warm_up",
]


@dataclass
class RunResult:
    """What a run measured. ``history`` has one entry per evaluation: ``step``, ``epoch``,
    ``seconds`` (training time so far), ``train_loss`` and ``train_accuracy`` (means over the
    last ``eval_every`` training batches, or an epoch's; the accuracy ``None`` but for a
    classifier), then the held-out split's: ``test_loss`` and ``test_accuracy`` (``None``
    for the autoencoder) for images, ``val_loss`` (nats per byte) for text. ``final`` is
    the last entry's losses, held-out metrics and ``seconds``."""

    optimizer: str
    workload: str
    data: str
    steps: int
    seconds: float
    history: list[dict[str, float | None]]
    target_step: int | None = None
    target_seconds: float | None = None
    interrupted: bool = False
    run_dir: str = ""
    final: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module, workload: Workload, x: Tensor, y: Tensor, batch_size: int = 1000
) -> dict[str, float | None]:
    """Mean loss over the held-out ``(x, y)`` (samples along the first dimension), in eval
    mode: ``{"test_loss", "test_accuracy"}`` for images (the accuracy ``None`` but for a
    classifier), ``{"val_loss"}`` for text (every window has the same length, so the mean
    over windows is the mean over bytes)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        out = model(xb)
        loss_sum += workload.loss(out, xb, yb) * len(xb)
        if workload.task == "classify":
            correct += (out.argmax(-1) == yb).sum()
    model.train(was_training)
    split = workload.held_out
    values: dict[str, float | None] = {f"{split}_loss": float(loss_sum) / len(x)}
    if workload.data == "images":
        accuracy = float(correct) / len(x) if workload.task == "classify" else None
        values[f"{split}_accuracy"] = accuracy
    return values


def warm_up(config: Config, optimizer_name: str, data: Dataset | TextDataset, steps: int) -> None:
    """``steps`` untimed training steps (forward, backward, kfrob's diagnostics, the
    optimizer's step) and one evaluation on a throwaway model and optimizer, so that the
    process's one-off costs (thread pools, kernel selection, allocator growth, the first
    decompositions) are paid before the clock starts. The run itself is untouched: it
    reseeds torch and builds its own model, optimizer and batch order afterwards."""
    workload = WORKLOADS[config.workload]
    x_held, y_held = data.held_out
    device = x_held.device
    model = config.build_model().to(device)
    optimizer = build_optimizer(
        optimizer_name, config.optimizers[optimizer_name], model, workload, config.training.seed
    )
    order = data.order(config.training.batch_size, config.training.seed)
    is_kfrob = isinstance(optimizer, FrobPreconditionedSGD)
    for step in range(steps):
        x, y = data.batch(order.indices(step).to(device))
        optimizer.zero_grad(set_to_none=True)
        output = model(x)
        workload.loss(output, x, y).backward()
        if is_kfrob and (step + 1) % config.logging.log_every == 0:
            optimizer.diagnostics()
        optimizer.step()
    evaluate(model, workload, x_held[:1000], y_held[:1000])
    close = getattr(optimizer, "close", None)
    if close is not None:
        close()


def train(
    config: Config,
    optimizer_name: str,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    data: Dataset | TextDataset | None = None,
) -> RunResult:
    """Train ``config.workload`` with ``config.optimizers[optimizer_name]``, logging into
    ``run_dir``; ``resume`` continues from ``run_dir/checkpoint.pt``. ``progress=None``
    shows the tqdm bar only on a terminal. Returns the result also written to
    ``run_dir/result.json``; on ``Ctrl-C`` it checkpoints and returns with
    ``interrupted=True``."""
    run_dir = Path(run_dir)
    saved = open_run_dir(run_dir, resume, config, optimizer_name)
    record_run(run_dir, config, [optimizer_name])
    settings = config.training
    device = torch.device(settings.device)
    workload = WORKLOADS[config.workload]
    data = (data or load_data(config.data, config.model.context)).to(device)
    if settings.warmup_steps:
        warm_up(config, optimizer_name, data, settings.warmup_steps)
    torch.manual_seed(settings.seed)
    model = config.build_model().to(device)
    optimizer = build_optimizer(
        optimizer_name, config.optimizers[optimizer_name], model, workload, settings.seed
    )
    order = data.order(settings.batch_size, settings.seed)
    steps_per_epoch = order.steps_per_epoch
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    budget = settings.max_seconds if settings.max_seconds is not None else float("inf")
    split = workload.held_out

    step, seconds, history = 0, 0.0, []
    # per-step (loss, accuracy) of the last eval_every steps (an epoch if unset): the training
    # loss an evaluation reports is a moving average of the same length every time
    recent: deque[Tensor] = deque(maxlen=settings.eval_every or steps_per_epoch)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer_state"])
        order.load_state_dict(saved["order"])
        step, seconds, history = saved["step"], saved["seconds"], saved["history"]
        recent.extend(t.to(device) for t in saved["recent"])

    def checkpoint() -> None:
        save_atomically(
            run_dir / CHECKPOINT,
            {
                "config": config.model_dump(),
                "optimizer": optimizer_name,
                "model": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "order": order.state_dict(),
                "step": step,
                "seconds": seconds,
                "history": history,
                "recent": [t.cpu() for t in recent],
            },
        )

    board = Board(run_dir)
    is_kfrob = isinstance(optimizer, FrobPreconditionedSGD)
    window: list[Tensor] = []  # per-step (loss, correct) since the last log, on the device
    window_seconds = 0.0
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc=f"{optimizer_name} ({config.workload})",
        unit="step",
        disable=(not progress) if progress is not None else None,
        dynamic_ncols=True,
    )
    model.train()
    interrupt = Interrupt()
    with interrupt.installed():
        if saved is not None:
            bar.write(f"{optimizer_name}: resumed at step {step} of {total_steps}")
        bar.write(f"{optimizer_name}: training on {data.source}, {device}")
        while step < total_steps and seconds < budget and not interrupt.requested:
            x, y = data.batch(order.indices(step).to(device))

            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            output = model(x)
            loss = workload.loss(output, x, y)
            extra = penalty(
                config.regularization, step, model, optimizer,
                lambda out, x=x, y=y: workload.loss(out, x, y), x, y,
            )  # fmt: skip
            (loss if extra is None else loss + extra).backward()
            paused = time.perf_counter()
            log_now = (step + 1) % config.logging.log_every == 0
            diagnostics = optimizer.diagnostics() if is_kfrob and log_now else None
            resumed = time.perf_counter()
            refreshes = getattr(optimizer, "refreshes", 0)
            optimizer.step()
            if workload.task == "classify":
                accuracy = (output.detach().argmax(-1) == y).float().mean()
            else:
                accuracy = torch.zeros((), device=device)
            extra = torch.zeros_like(loss) if extra is None else extra.detach()
            stats = torch.stack([loss.detach(), accuracy, extra.to(loss)])
            elapsed = (paused - started) + (time.perf_counter() - resumed)
            step += 1
            window.append(stats)
            recent.append(stats)
            out_of_time = seconds + elapsed >= budget

            if log_now or step == total_steps or out_of_time:
                synced = time.perf_counter()
                means = torch.stack(window).mean(0).tolist()  # one host read per log window
                elapsed += time.perf_counter() - synced
                seconds += elapsed
                window_seconds += elapsed
                train_values = {
                    "loss": means[0],
                    "accuracy": means[1] if workload.task == "classify" else None,
                    "lr": optimizer.param_groups[0]["lr"],
                    "step_time": window_seconds / len(window),
                }
                if config.regularization.kind != "none":  # the penalty and its share
                    train_values["penalty"] = means[2]
                    train_values["penalty_share"] = means[2] / (means[0] + means[2] or 1.0)
                board.scalars("train", train_values, step)
                if diagnostics is not None:
                    board.scalars("kfrob", dict(diagnostics), step)
                bar.set_postfix(
                    loss=f"{means[0]:.4f}",
                    **({"acc": f"{means[1]:.3f}"} if workload.task == "classify" else {}),
                )
                window, window_seconds = [], 0.0
            else:
                seconds += elapsed
                window_seconds += elapsed
            bar.update(1)
            last = step == total_steps or seconds >= budget  # the window was written above
            if config.logging.histograms and getattr(optimizer, "refreshes", 0) != refreshes:
                board.eigenvalues(optimizer, step)  # type: ignore[arg-type]

            epoch_done = step % steps_per_epoch == 0
            eval_due = settings.eval_every is not None and step % settings.eval_every == 0
            if eval_due or epoch_done or last:
                train_means = torch.stack(list(recent)).mean(0).tolist()
                entry = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "seconds": seconds,
                    "train_loss": train_means[0],
                    "train_accuracy": train_means[1] if workload.task == "classify" else None,
                    **evaluate(model, workload, *data.held_out),
                }
                history.append(entry)
                held = {"loss": entry[f"{split}_loss"], "accuracy": entry.get(f"{split}_accuracy")}
                board.scalars(split, held, step)
                if epoch_done or last:
                    bar.write(_describe(optimizer_name, entry))
            every = config.logging.checkpoint_every
            if epoch_done or last or (every is not None and step % every == 0):
                checkpoint()
        if interrupt.requested:
            checkpoint()
    bar.close()

    result = _result(config, optimizer_name, data.source, step, seconds, history, run_dir)
    result.interrupted = interrupt.requested
    if not result.interrupted:
        board.hparams(_hyperparameters(config, optimizer_name), result.final)
    board.close()
    (run_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result


def _hyperparameters(config: Config, name: str) -> dict[str, Any]:
    return {
        "optimizer": name,
        "workload": config.workload,
        "batch_size": config.training.batch_size,
        "seed": config.training.seed,
        **(config.model.model_dump() if WORKLOADS[config.workload].sized else {}),
        **config.optimizers[name],
    }


def _describe(name: str, entry: dict[str, float | None]) -> str:
    parts = [f"{name}: epoch {entry['epoch']:.2f}", f"step {entry['step']}"]
    for key in ("train_loss", "test_loss", "test_accuracy", "val_loss"):
        if entry.get(key) is not None:
            parts.append(f"{key.replace('_', ' ')} {entry[key]:.4f}")
    parts.append(f"{entry['seconds']:.1f} s")
    return ", ".join(parts)


def _result(
    config: Config,
    name: str,
    source: str,
    step: int,
    seconds: float,
    history: list[dict[str, float | None]],
    run_dir: Path,
) -> RunResult:
    result = RunResult(name, config.workload, source, step, seconds, history, run_dir=str(run_dir))
    workload = WORKLOADS[config.workload]
    target = config.training.target
    if target is not None:
        for entry in history:
            value = entry[target.metric]
            if value is not None and target.reached(value):
                result.target_step = int(entry["step"])  # type: ignore[arg-type]
                result.target_seconds = entry["seconds"]
                break
    if history:
        last = history[-1]
        keys = ("train_loss", *(k for k in last if k.startswith(workload.held_out)), "seconds")
        result.final = {key: last[key] for key in keys}
    return result
