"""A run directory and how a run resumes: the effective config, checkpoints written
atomically, the data order (:class:`BatchOrder` for images, :class:`WindowOrder` for
text), and the first ``Ctrl-C`` turned into a clean stop.

The run directory holds ``config.yaml`` (the effective config, overrides included, which
``kfrob train --resume`` continues with), ``run.json`` (the optimizers it trains) and
``checkpoint.pt``; :mod:`kfrob.job.training` writes the TensorBoard events and
``result.json`` beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kfrob.job.config import Config, dump_config, load_config

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "RUN",
    "BatchOrder",
    "Interrupt",
    "WindowOrder",
    "open_run_dir",
    "record_run",
    "save_atomically",
    "saved_run",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.yaml"  # the effective config, overrides included: what --resume continues
RUN = "run.json"  # which of its optimizers the run trains
# config keys that may change between a run and its resumption
RESUMABLE_CHANGES = (
    "training.epochs",
    "training.max_steps",
    "training.max_seconds",
    "training.device",
    "training.warmup_steps",
    "logging.",
)


class Interrupt:
    """Turns the first SIGINT into a flag checked between steps (a second one aborts)."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[Interrupt]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def save_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then an atomic rename: never a torn checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resumable(saved: dict[str, Any], config: Config, optimizer: str) -> None:
    if saved["optimizer"] != optimizer:
        raise ValueError(f"checkpoint is of optimizer {saved['optimizer']!r}, not {optimizer!r}")
    old, new = _flatten(saved["config"]), _flatten(config.model_dump())
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        raise ValueError(
            "cannot resume: the config differs from the checkpoint's in "
            + ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed)
            + f"; only {', '.join(RESUMABLE_CHANGES)}* may change"
        )


class BatchOrder:
    """The batches of every epoch: one permutation of the ``n`` training indices per epoch,
    drawn from a generator seeded with ``seed``, cut into batches. Its state (where the
    current epoch's permutation and the next one's come from) lets a resumed run draw
    exactly the batches an uninterrupted one would."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_start = self.generator.get_state()
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        """The training indices of optimizer step ``step`` (counting from 0)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            if position == 0:  # a new epoch; mid-epoch, a loaded state says where it began
                self._epoch_start = self.generator.get_state()
            self.generator.set_state(self._epoch_start)
            self._permutation = torch.randperm(self.n, generator=self.generator)
            self._epoch = epoch
        return self._permutation[position * self.batch_size :][: self.batch_size]

    def state_dict(self) -> dict[str, Tensor]:
        return {"epoch_start": self._epoch_start, "next": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._epoch_start = state["epoch_start"]
        self.generator.set_state(state["next"])
        self._epoch = -1


class WindowOrder:
    """The windows of every step of a text: ``batch_size`` start offsets drawn uniformly
    from ``range(n)`` (every offset at which a window fits). An epoch is ``steps_per_epoch``
    steps; its offsets are drawn at once from a generator seeded with a hash of ``(seed,
    epoch)``, so a step's windows depend on the seed and the step alone and a resumed run
    draws exactly the windows an uninterrupted one would (there is no state to save)."""

    def __init__(self, n: int, batch_size: int, steps_per_epoch: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = steps_per_epoch
        self._epoch = -1
        self._starts = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        """The start offsets ``(batch_size,)`` of optimizer step ``step`` (from 0)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            digest = hashlib.sha256(f"{self.seed}/{epoch}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "big"))
            shape = (self.steps_per_epoch, self.batch_size)
            self._starts = torch.randint(self.n, shape, generator=generator)
            self._epoch = epoch
        return self._starts[position]

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Nothing to restore: the windows are a function of the seed and the step."""


def open_run_dir(run_dir: Path, resume: bool, config: Config, name: str) -> dict | None:
    """The checkpoint to resume from (validated against the config), or ``None`` for a new
    run, which must not overwrite an old one."""
    path = run_dir / CHECKPOINT
    if resume:
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {path}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        _check_resumable(saved, config, name)
        return saved
    if path.exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it, or another --logdir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def record_run(run_dir: Path, config: Config, optimizers: list[str]) -> None:
    """Write the run's effective config (``config.yaml``) and the optimizers it trains
    (``run.json``) into ``run_dir``: all that ``--resume`` needs to continue it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG).write_text(dump_config(config))
    (run_dir / RUN).write_text(json.dumps({"optimizers": optimizers}) + "\n")


def saved_run(run_dir: Path, overrides: list[str] | None = None) -> tuple[Config, list[str]] | None:
    """The config (with ``overrides`` on top) and optimizers that :func:`record_run` wrote
    into ``run_dir``, or ``None`` if it wrote nothing there."""
    if not (run_dir / CONFIG).is_file():
        return None
    config = load_config(run_dir / CONFIG, overrides)
    run = run_dir / RUN
    return config, json.loads(run.read_text())["optimizers"] if run.is_file() else []
