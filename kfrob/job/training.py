"""One training run: a workload, its data, one optimizer, checkpoints and TensorBoard.

:func:`train` is what ``kfrob train`` runs. It is deterministic given the config: the seed
fixes the model's initialisation, the data order (one permutation per epoch from its own
generator) and kfrob's Monte Carlo sampler, so every optimizer of a comparison sees the same
initial model and the same batches, and a resumed run takes exactly the steps of an
uninterrupted one.

The run directory holds ``config.yaml`` (the effective config, overrides included, which
``kfrob train --resume`` continues with), ``checkpoint.pt`` (written atomically at each
epoch's end, every ``logging.checkpoint_every`` steps, on ``Ctrl-C`` and at the end), the
TensorBoard event files and ``result.json``. Training time (``seconds``) counts the
training steps only: evaluation, diagnostics, logging and checkpoints are excluded, and the
clock starts after ``training.warmup_steps`` untimed steps on a throwaway copy
(:func:`warm_up`), so that the first optimizer of a process does not pay its start-up.
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

from kfrob.data import (
    download_fashion_mnist,
    explicit_data_dir,
    find_data_dir,
    load_fashion_mnist,
)
from kfrob.job.board import Board
from kfrob.job.config import Config, DataConfig
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
    "load_data",
    "record_run",
    "saved_run",
    "train",
    "warm_up",
]


@dataclass
class Dataset:
    """Train and test tensors and a description of where they came from."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str

    def to(self, device: torch.device) -> Dataset:
        moved = (t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        return Dataset(*moved, self.source)


def load_data(config: DataConfig) -> Dataset:
    """The data a config asks for: the embedded subset, the full set, or ``auto``: full if
    found, else embedded. A directory named explicitly (``data.dir``, else ``$KFROB_DATA``)
    is the only place looked at, and never falls back: missing or incomplete, it is an error
    (or, with ``download``, where the files are downloaded to); otherwise the standard places
    are searched, and ``download`` fetches into the user cache. ``train_size``/``test_size``
    keep the first images of each split."""
    directory: Path | None = None
    if config.source != "embedded":
        explicit = explicit_data_dir(config.dir)
        try:
            directory = find_data_dir(config.dir, named_by="data.dir / --data-dir")
        except FileNotFoundError:
            if config.download:
                directory = download_fashion_mnist(explicit[0] if explicit else None)
            elif config.source == "full" or explicit is not None:
                raise
    if directory is None:
        source = "the embedded Fashion-MNIST subset shipped with kfrob"
        splits = [load_fashion_mnist(split, embedded=True) for split in ("train", "test")]
    else:
        source = f"Fashion-MNIST from {directory}"
        splits = [load_fashion_mnist(split, directory) for split in ("train", "test")]
    (x_train, y_train), (x_test, y_test) = splits
    x_train, y_train = x_train[: config.train_size], y_train[: config.train_size]
    x_test, y_test = x_test[: config.test_size], y_test[: config.test_size]
    source += f" ({len(x_train)} training / {len(x_test)} test images)"
    return Dataset(x_train, y_train, x_test, y_test, source)


@dataclass
class RunResult:
    """What a run measured. ``history`` has one entry per evaluation: ``step``, ``epoch``,
    ``seconds`` (training time so far), ``train_loss`` and ``train_accuracy`` (means over the
    last ``eval_every`` training batches, or an epoch's), ``test_loss``, ``test_accuracy``
    (``None`` for a reconstruction workload)."""

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
    """Mean loss and (for classifiers) accuracy over ``(x, y)``, in eval mode."""
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
    accuracy = float(correct) / len(x) if workload.task == "classify" else None
    return {"test_loss": float(loss_sum) / len(x), "test_accuracy": accuracy}


def warm_up(config: Config, optimizer_name: str, data: Dataset, steps: int) -> None:
    """``steps`` untimed training steps (forward, backward, kfrob's diagnostics, the
    optimizer's step) and one evaluation on a throwaway model and optimizer, so that the
    process's one-off costs (thread pools, kernel selection, allocator growth, the first
    decompositions) are paid before the clock starts. The run itself is untouched: it
    reseeds torch and builds its own model, optimizer and batch order afterwards."""
    workload = WORKLOADS[config.workload]
    device = data.x_train.device
    model = workload.build().to(device)
    optimizer = build_optimizer(
        optimizer_name, config.optimizers[optimizer_name], model, workload, config.training.seed
    )
    order = BatchOrder(len(data.x_train), config.training.batch_size, config.training.seed)
    is_kfrob = isinstance(optimizer, FrobPreconditionedSGD)
    for step in range(steps):
        batch = order.indices(step).to(device)
        x, y = data.x_train[batch], data.y_train[batch]
        optimizer.zero_grad(set_to_none=True)
        output = model(x)
        workload.loss(output, x, y).backward()
        if is_kfrob and (step + 1) % config.logging.log_every == 0:
            optimizer.diagnostics()
        optimizer.step()
    evaluate(model, workload, data.x_test[:1000], data.y_test[:1000])
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
    data: Dataset | None = None,
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
    data = (data or load_data(config.data)).to(device)
    if settings.warmup_steps:
        warm_up(config, optimizer_name, data, settings.warmup_steps)
    torch.manual_seed(settings.seed)
    model = workload.build().to(device)
    optimizer = build_optimizer(
        optimizer_name, config.optimizers[optimizer_name], model, workload, settings.seed
    )
    order = BatchOrder(len(data.x_train), settings.batch_size, settings.seed)
    steps_per_epoch = order.steps_per_epoch
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)

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
        while step < total_steps and not interrupt.requested:
            batch = order.indices(step).to(device)
            x, y = data.x_train[batch], data.y_train[batch]

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

            if log_now or step == total_steps:
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
            if config.logging.histograms and getattr(optimizer, "refreshes", 0) != refreshes:
                board.eigenvalues(optimizer, step)  # type: ignore[arg-type]

            epoch_done = step % steps_per_epoch == 0
            eval_due = settings.eval_every is not None and step % settings.eval_every == 0
            if eval_due or epoch_done or step == total_steps:
                train_means = torch.stack(list(recent)).mean(0).tolist()
                entry = {
                    "step": step,
                    "epoch": step / steps_per_epoch,
                    "seconds": seconds,
                    "train_loss": train_means[0],
                    "train_accuracy": train_means[1] if workload.task == "classify" else None,
                    **evaluate(model, workload, data.x_test, data.y_test),
                }
                history.append(entry)
                board.scalars(
                    "test", {"loss": entry["test_loss"], "accuracy": entry["test_accuracy"]}, step
                )
                if epoch_done or step == total_steps:
                    bar.write(_describe(optimizer_name, entry))
            every = config.logging.checkpoint_every
            if epoch_done or step == total_steps or (every is not None and step % every == 0):
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
        **config.optimizers[name],
    }


def _describe(name: str, entry: dict[str, float | None]) -> str:
    parts = [f"{name}: epoch {entry['epoch']:.2f}", f"step {entry['step']}"]
    parts.append(f"train loss {entry['train_loss']:.4f}")
    parts.append(f"test loss {entry['test_loss']:.4f}")
    if entry["test_accuracy"] is not None:
        parts.append(f"test accuracy {entry['test_accuracy']:.4f}")
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
        result.final = {
            key: last[key] for key in ("train_loss", "test_loss", "test_accuracy", "seconds")
        }
    return result
