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
    WindowOrder,
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
    run = _set_up(config, optimizer_name, Path(run_dir), resume, data)
    board = Board(run.run_dir)
    bar = _progress_bar(run, progress)
    run.model.train()
    interrupt = Interrupt()
    with interrupt.installed():
        if run.resumed:
            bar.write(f"{optimizer_name}: resumed at step {run.step} of {run.total_steps}")
        bar.write(f"{optimizer_name}: training on {run.data.source}, {run.device}")
        while run.step < run.total_steps and run.seconds < run.budget and not interrupt.requested:
            _record_step(run, _timed_step(run), board, bar)
            _evaluate_and_checkpoint(run, board, bar)
        if interrupt.requested:
            _checkpoint(run)
    bar.close()
    return _finish(run, board, interrupt.requested)


@dataclass
class _Run:
    """A run's parts and its live state: steps taken, training time, evaluations, and the
    per-step ``(loss, accuracy, penalty)`` on the device of the steps since the last log
    (``window``) and of the last ``eval_every`` steps (``recent``; an epoch if unset, so that
    every evaluation's training loss is a moving average of the same length)."""

    config: Config
    optimizer_name: str
    run_dir: Path
    device: torch.device
    workload: Workload
    data: Dataset | TextDataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    order: BatchOrder | WindowOrder
    total_steps: int
    budget: float
    recent: deque[Tensor]
    is_kfrob: bool
    resumed: bool = False
    step: int = 0
    seconds: float = 0.0
    history: list[dict[str, float | None]] = field(default_factory=list)
    window: list[Tensor] = field(default_factory=list)
    window_seconds: float = 0.0


@dataclass
class _Step:
    """One timed step's ``(loss, accuracy, penalty)``, training time, whether it logs, kfrob's
    diagnostics (on a logging step) and the optimizer's refresh count before its step."""

    stats: Tensor
    elapsed: float
    log_now: bool
    diagnostics: dict[str, float] | None
    refreshes: int


def _set_up(
    config: Config, name: str, run_dir: Path, resume: bool, data: Dataset | TextDataset | None
) -> _Run:
    """Opens (or reopens, for ``resume``) the run directory, loads the data onto the device
    (unless given), warms up, then seeds torch and builds the model, optimizer and batch
    order, restoring them and the run's state from the checkpoint when resuming."""
    saved = open_run_dir(run_dir, resume, config, name)
    record_run(run_dir, config, [name])
    settings = config.training
    device = torch.device(settings.device)
    workload = WORKLOADS[config.workload]
    data = (data or load_data(config.data, config.model.context)).to(device)
    if settings.warmup_steps:
        warm_up(config, name, data, settings.warmup_steps)
    torch.manual_seed(settings.seed)
    model = config.build_model().to(device)
    optimizer = build_optimizer(name, config.optimizers[name], model, workload, settings.seed)
    order = data.order(settings.batch_size, settings.seed)
    total_steps = settings.epochs * order.steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    budget = settings.max_seconds if settings.max_seconds is not None else float("inf")
    recent: deque[Tensor] = deque(maxlen=settings.eval_every or order.steps_per_epoch)
    is_kfrob = isinstance(optimizer, FrobPreconditionedSGD)
    run = _Run(
        config, name, run_dir, device, workload, data, model, optimizer, order, total_steps,
        budget, recent, is_kfrob,
    )  # fmt: skip
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer_state"])
        order.load_state_dict(saved["order"])
        run.step, run.seconds, run.history = saved["step"], saved["seconds"], saved["history"]
        recent.extend(t.to(device) for t in saved["recent"])
        run.resumed = True
    return run


def _checkpoint(run: _Run) -> None:
    """Writes the run's state, everything a resumed run continues from, to its checkpoint."""
    save_atomically(
        run.run_dir / CHECKPOINT,
        {
            "config": run.config.model_dump(),
            "optimizer": run.optimizer_name,
            "model": run.model.state_dict(),
            "optimizer_state": run.optimizer.state_dict(),
            "order": run.order.state_dict(),
            "step": run.step,
            "seconds": run.seconds,
            "history": run.history,
            "recent": [t.cpu() for t in run.recent],
        },
    )


def _progress_bar(run: _Run, progress: bool | None) -> tqdm:
    """The tqdm bar over the run's steps, starting at the steps already taken; ``None``
    shows it only on a terminal."""
    return tqdm(
        total=run.total_steps,
        initial=run.step,
        desc=f"{run.optimizer_name} ({run.config.workload})",
        unit="step",
        disable=(not progress) if progress is not None else None,
        dynamic_ncols=True,
    )


def _timed_step(run: _Run) -> _Step:
    """One training step on step ``run.step``'s batch (forward, loss plus any penalty due,
    backward, the optimizer's step, its statistics), timed but for the batch's gathering and
    kfrob's diagnostics (between backward and step, on a logging step); ``run`` is unchanged."""
    config, workload, model, optimizer = run.config, run.workload, run.model, run.optimizer
    step = run.step
    x, y = run.data.batch(run.order.indices(step).to(run.device))

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
    diagnostics = optimizer.diagnostics() if run.is_kfrob and log_now else None
    resumed = time.perf_counter()
    refreshes = getattr(optimizer, "refreshes", 0)
    optimizer.step()
    if workload.task == "classify":
        accuracy = (output.detach().argmax(-1) == y).float().mean()
    else:
        accuracy = torch.zeros((), device=run.device)
    extra = torch.zeros_like(loss) if extra is None else extra.detach()
    stats = torch.stack([loss.detach(), accuracy, extra.to(loss)])
    elapsed = (paused - started) + (time.perf_counter() - resumed)
    return _Step(stats, elapsed, log_now, diagnostics, refreshes)


def _record_step(run: _Run, timed: _Step, board: Board, bar: tqdm) -> None:
    """Counts a step taken into the run, writes the log window (:func:`_log`) on a logging
    step, the last step and the one that runs out the time budget, advances the bar, and
    writes the eigenvalue histograms after a refresh if ``logging.histograms``."""
    run.step += 1
    run.window.append(timed.stats)
    run.recent.append(timed.stats)
    out_of_time = run.seconds + timed.elapsed >= run.budget
    if timed.log_now or run.step == run.total_steps or out_of_time:
        _log(run, timed, board, bar)
    else:
        run.seconds += timed.elapsed
        run.window_seconds += timed.elapsed
    bar.update(1)
    if run.config.logging.histograms and getattr(run.optimizer, "refreshes", 0) != timed.refreshes:
        board.eigenvalues(run.optimizer, run.step)  # type: ignore[arg-type]


def _log(run: _Run, timed: _Step, board: Board, bar: tqdm) -> None:
    """Writes the log window's means and kfrob's diagnostics to TensorBoard and the bar and
    starts a new window; the one host read of the window (it waits for the device) counts
    as training time of the step that triggered it."""
    synced = time.perf_counter()
    means = torch.stack(run.window).mean(0).tolist()  # one host read per log window
    elapsed = timed.elapsed + (time.perf_counter() - synced)
    run.seconds += elapsed
    run.window_seconds += elapsed
    classify = run.workload.task == "classify"
    train_values = {
        "loss": means[0],
        "accuracy": means[1] if classify else None,
        "lr": run.optimizer.param_groups[0]["lr"],
        "step_time": run.window_seconds / len(run.window),
    }
    if run.config.regularization.kind != "none":  # the penalty and its share
        train_values["penalty"] = means[2]
        train_values["penalty_share"] = means[2] / (means[0] + means[2] or 1.0)
    board.scalars("train", train_values, run.step)
    if timed.diagnostics is not None:
        board.scalars("kfrob", dict(timed.diagnostics), run.step)
    bar.set_postfix(loss=f"{means[0]:.4f}", **({"acc": f"{means[1]:.3f}"} if classify else {}))
    run.window, run.window_seconds = [], 0.0


def _evaluate_and_checkpoint(run: _Run, board: Board, bar: tqdm) -> None:
    """Evaluates every ``eval_every`` steps, at each epoch's end and at the last step (into the
    history and TensorBoard, and the bar but for ``eval_every``), then checkpoints at each
    epoch's end, at the last step and every ``logging.checkpoint_every`` steps."""
    settings, step = run.config.training, run.step
    last = step == run.total_steps or run.seconds >= run.budget  # (_log wrote its window)
    epoch_done = step % run.order.steps_per_epoch == 0
    eval_due = settings.eval_every is not None and step % settings.eval_every == 0
    if eval_due or epoch_done or last:
        train_means = torch.stack(list(run.recent)).mean(0).tolist()
        entry = {
            "step": step,
            "epoch": step / run.order.steps_per_epoch,
            "seconds": run.seconds,
            "train_loss": train_means[0],
            "train_accuracy": train_means[1] if run.workload.task == "classify" else None,
            **evaluate(run.model, run.workload, *run.data.held_out),
        }
        run.history.append(entry)
        split = run.workload.held_out
        held = {"loss": entry[f"{split}_loss"], "accuracy": entry.get(f"{split}_accuracy")}
        board.scalars(split, held, step)
        if epoch_done or last:
            bar.write(_describe(run.optimizer_name, entry))
    every = run.config.logging.checkpoint_every
    if epoch_done or last or (every is not None and step % every == 0):
        _checkpoint(run)


def _finish(run: _Run, board: Board, interrupted: bool) -> RunResult:
    """The run's result, also logged (its hyperparameters and final metrics, but for an
    interrupted run) to TensorBoard and written to ``result.json``."""
    result = _result(run)
    result.interrupted = interrupted
    if not result.interrupted:
        board.hparams(_hyperparameters(run.config, run.optimizer_name), result.final)
    board.close()
    (run.run_dir / "result.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
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


def _result(run: _Run) -> RunResult:
    """The run's :class:`RunResult`: the step and training time at which the history first
    reaches ``training.target`` (if set) and the last evaluation's metrics."""
    config, history = run.config, run.history
    result = RunResult(
        run.optimizer_name, config.workload, run.data.source, run.step, run.seconds, history,
        run_dir=str(run.run_dir),
    )  # fmt: skip
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
