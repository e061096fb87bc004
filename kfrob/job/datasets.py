"""The data of a training run: Fashion-MNIST images or byte windows of text.

Both kinds answer the training loop the same way: ``order(batch_size, seed)`` gives the
data order (:class:`~kfrob.job.runs.BatchOrder` or :class:`~kfrob.job.runs.WindowOrder`,
whose ``indices(step)`` say which samples a step takes), ``batch(indices)`` the step's
``(inputs, targets)`` on the data's device, and ``held_out`` the evaluation split
(``split`` names it: ``"test"`` or ``"val"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from kfrob.data import (
    download_fashion_mnist,
    explicit_data_dir,
    find_data_dir,
    load_fashion_mnist,
)
from kfrob.job.config import DataConfig
from kfrob.job.runs import BatchOrder, WindowOrder
from kfrob.text import evaluation_starts, load_corpus, windows

__all__ = ["Dataset", "TextDataset", "load_data"]


@dataclass
class Dataset:
    """Train and test images ``(N, 1, 28, 28)`` with labels ``(N,)``, and a description of
    where they came from."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str
    split: ClassVar[str] = "test"

    def to(self, device: torch.device) -> Dataset:
        moved = (t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        return Dataset(*moved, self.source)

    def order(self, batch_size: int, seed: int) -> BatchOrder:
        return BatchOrder(len(self.x_train), batch_size, seed)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, 1, 28, 28)`` and labels ``(B,)`` at ``indices`` ``(B,)``."""
        return self.x_train[indices], self.y_train[indices]

    @property
    def held_out(self) -> tuple[Tensor, Tensor]:
        return self.x_test, self.y_test


@dataclass
class TextDataset:
    """The training text as bytes, uint8 ``(n,)``, and the fixed validation windows: inputs
    and next-byte targets, int64 ``(N, context)`` each."""

    train: Tensor
    x_val: Tensor
    y_val: Tensor
    context: int
    source: str
    split: ClassVar[str] = "val"

    def to(self, device: torch.device) -> TextDataset:
        moved = (t.to(device) for t in (self.train, self.x_val, self.y_val))
        return TextDataset(*moved, self.context, self.source)

    def order(self, batch_size: int, seed: int) -> WindowOrder:
        """Random windows; an epoch holds as many window bytes as the training text."""
        steps_per_epoch = max(1, len(self.train) // (batch_size * self.context))
        return WindowOrder(len(self.train) - self.context, batch_size, steps_per_epoch, seed)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets ``(B, context)`` of the windows starting at ``indices``."""
        return windows(self.train, indices, self.context)

    @property
    def held_out(self) -> tuple[Tensor, Tensor]:
        return self.x_val, self.y_val


def load_data(config: DataConfig, context: int | None = None) -> Dataset | TextDataset:
    """The data a config's ``data`` section asks for: images for the sources ``embedded``,
    ``full`` and ``auto`` (:func:`load_images`), text for ``stdlib`` and ``files``
    (:func:`load_text`, which needs the model's ``context``)."""
    if config.source in ("stdlib", "files"):
        if context is None:
            raise ValueError(f"data.source {config.source!r} needs the model's context length")
        return load_text(config, context)
    return load_images(config)


def load_text(config: DataConfig, context: int) -> TextDataset:
    """The standard library's sources (``stdlib``) or the files under ``data.dir``
    (``files``), split by file (:func:`kfrob.text.load_corpus`), the training text capped at
    ``train_bytes``, the validation text at ``val_bytes`` with ``val_windows`` windows of
    ``context`` bytes spread evenly over it."""
    directory = config.dir if config.source == "files" else None
    corpus = load_corpus(directory, train_bytes=config.train_bytes, val_bytes=config.val_bytes)
    if len(corpus.train) <= context:
        raise ValueError(
            f"{corpus.source}: the training text is shorter than a window of context + 1 = "
            f"{context + 1} bytes"
        )
    starts = evaluation_starts(len(corpus.val), context, config.val_windows)
    x_val, y_val = windows(corpus.val, starts, context)
    source = f"{corpus.source}; {len(starts)} validation windows of {context} bytes"
    return TextDataset(corpus.train, x_val, y_val, context, source)


def load_images(config: DataConfig) -> Dataset:
    """The embedded subset, the full set, or ``auto``: full if found, else embedded. A
    directory named explicitly (``data.dir``, else ``$KFROB_DATA``) is the only place looked
    at, and never falls back: missing or incomplete, it is an error (or, with ``download``,
    where the files are downloaded to); otherwise the standard places are searched, and
    ``download`` fetches into the user cache. ``train_size``/``test_size`` keep the first
    images of each split."""
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
