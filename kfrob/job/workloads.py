"""The training job's workloads, defined once for the job, the examples and the benchmark
scripts. Their layers have names (``fc1``, ``enc2``, ``conv1``, ``blocks.0.attn.qkv``, …),
and so have kfrob's diagnostics and TensorBoard tags for them.

Three take Fashion-MNIST images (input ``(N, 1, 28, 28)``):

* ``mlp``: 784-512-256-10 with ReLU, a classifier (cross-entropy);
* ``autoencoder``: the deep autoencoder of the K-FAC literature, 784-1000-500-250-30 and the
  mirrored decoder, ReLU except at the code and output layers, trained to reconstruct its
  input with the loss ``½‖f(x) − x‖²`` summed over pixels and averaged over the batch (the
  negative log-likelihood of a unit-variance Gaussian, which kfrob's ``loss="mse"`` Fisher
  samples from);
* ``cnn``: two 5×5 conv layers (32, 64 channels) with max-pooling, then 3136-128-10, a
  classifier (cross-entropy).

One takes bytes of text (input ``(N, T)`` int64, see :mod:`kfrob.text`):

* ``transformer``: a small decoder-only GPT (:mod:`kfrob.job.transformer`) predicting each
  next byte, logits ``(N, T, 256)``, loss the mean cross-entropy over all ``N·T`` positions
  (kfrob's ``cross_entropy`` Fisher treats every leading dimension as samples). Its size is
  configurable (the job's ``model`` section); the image models are fixed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from kfrob.job.transformer import transformer

__all__ = [
    "WORKLOADS",
    "Workload",
    "autoencoder",
    "cnn",
    "mlp",
    "reconstruction_loss",
    "relu_stack",
    "training_loss",
    "transformer",
]


def relu_stack(widths: list[int], prefix: str = "fc") -> list[tuple[str, nn.Module]]:
    """Linear layers through ``widths``, named ``<prefix>1``, ``<prefix>2``, …, with a ReLU
    (``<prefix>1_relu``, …) between consecutive ones."""
    layers: list[tuple[str, nn.Module]] = []
    for i, (d_in, d_out) in enumerate(pairwise(widths), start=1):
        if i > 1:
            layers.append((f"{prefix}{i - 1}_relu", nn.ReLU()))
        layers.append((f"{prefix}{i}", nn.Linear(d_in, d_out)))
    return layers


def _named(*layers: tuple[str, nn.Module]) -> nn.Sequential:
    """An ``nn.Sequential`` whose layers have names (``fc1``, ``conv2``, …), so that
    kfrob's diagnostics and TensorBoard tags say ``kfrob/fc1/…`` rather than an index."""
    return nn.Sequential(OrderedDict(layers))


def mlp() -> nn.Module:
    """784-512-256-10: ``flatten``, ``fc1``, ``fc2``, ``fc3``."""
    return _named(("flatten", nn.Flatten()), *relu_stack([784, 512, 256, 10]))


def autoencoder() -> nn.Module:
    """``enc1``…``enc4`` (784-1000-500-250-30), then ``dec1``…``dec4`` back to 784."""
    encoder, decoder = [784, 1000, 500, 250, 30], [30, 250, 500, 1000, 784]
    return _named(
        ("flatten", nn.Flatten()), *relu_stack(encoder, "enc"), *relu_stack(decoder, "dec")
    )


def cnn() -> nn.Module:
    """``conv1``, ``conv2`` (5×5, 32 and 64 channels, each with ReLU and 2×2 max-pooling),
    then ``fc1``, ``fc2`` (3136-128-10)."""
    return _named(
        ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("conv1_relu", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("conv2_relu", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), *relu_stack([64 * 7 * 7, 128, 10]),
    )  # fmt: skip


def reconstruction_loss(output: Tensor, images: Tensor) -> Tensor:
    """``½‖f(x) − x‖²`` summed over pixels, averaged over the batch."""
    return 0.5 * (output - images.flatten(1)).square().sum(1).mean()


@dataclass(frozen=True)
class Workload:
    """A model factory and how it is trained.

    ``task`` is ``"classify"`` (loss = cross-entropy against the labels; accuracy is
    reported), ``"reconstruct"`` (loss = :func:`reconstruction_loss` against the input) or
    ``"language_model"`` (loss = cross-entropy of every position's logits against the next
    byte); ``kfrob_loss`` names that loss for kfrob's Monte Carlo Fisher. ``data`` is
    ``"images"`` (Fashion-MNIST) or ``"text"`` (byte windows); ``sized`` says whether
    ``build`` takes the model's size as keyword arguments.
    """

    build: Callable[..., nn.Module]
    task: str
    data: str = "images"
    sized: bool = False

    @property
    def kfrob_loss(self) -> str:
        return "mse" if self.task == "reconstruct" else "cross_entropy"

    @property
    def held_out(self) -> str:
        """The split evaluated during training: ``"test"`` (images) or ``"val"`` (text)."""
        return "val" if self.data == "text" else "test"

    @property
    def metrics(self) -> tuple[str, ...]:
        """What each evaluation reports (and a target may name)."""
        accuracy = ("test_accuracy",) if self.task == "classify" else ()
        return ("train_loss", f"{self.held_out}_loss", *accuracy)

    @property
    def quality(self) -> str:
        """The held-out metric a comparison shows: accuracy for a classifier, else loss."""
        return self.metrics[-1]

    def loss(self, output: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
        """The training loss of a batch (mean over its samples)."""
        return training_loss(self.task, output, inputs, targets)


def training_loss(task: str, output: Tensor, inputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against ``targets`` for ``"classify"`` (logits ``(N, C)``, labels
    ``(N,)``) and ``"language_model"`` (logits ``(N, T, V)``, next bytes ``(N, T)``, the
    mean over all ``N·T`` positions), :func:`reconstruction_loss` against ``inputs`` for
    ``"reconstruct"``."""
    if task == "classify":
        return F.cross_entropy(output, targets)
    if task == "language_model":
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return reconstruction_loss(output, inputs)


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(mlp, "classify"),
    "autoencoder": Workload(autoencoder, "reconstruct"),
    "cnn": Workload(cnn, "classify"),
    "transformer": Workload(transformer, "language_model", data="text", sized=True),
}
