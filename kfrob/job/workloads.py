"""The three Fashion-MNIST workloads (input ``(N, 1, 28, 28)``), defined once for the
training job, the examples and the benchmark scripts. Their layers have names (``fc1``,
``enc2``, ``conv1``, …), and so have kfrob's diagnostics and TensorBoard tags for them.

* ``mlp``: 784-512-256-10 with ReLU, a classifier (cross-entropy);
* ``autoencoder``: the deep autoencoder of the K-FAC literature, 784-1000-500-250-30 and the
  mirrored decoder, ReLU except at the code and output layers, trained to reconstruct its
  input with the loss ``½‖f(x) − x‖²`` summed over pixels and averaged over the batch (the
  negative log-likelihood of a unit-variance Gaussian, which kfrob's ``loss="mse"`` Fisher
  samples from);
* ``cnn``: two 5×5 conv layers (32, 64 channels) with max-pooling, then 3136-128-10, a
  classifier (cross-entropy).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "WORKLOADS",
    "Workload",
    "autoencoder",
    "cnn",
    "mlp",
    "reconstruction_loss",
    "relu_stack",
    "training_loss",
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
    reported) or ``"reconstruct"`` (loss = :func:`reconstruction_loss` against the input);
    ``kfrob_loss`` names that loss for kfrob's Monte Carlo Fisher.
    """

    build: Callable[[], nn.Module]
    task: str

    @property
    def kfrob_loss(self) -> str:
        return "cross_entropy" if self.task == "classify" else "mse"

    def loss(self, output: Tensor, images: Tensor, labels: Tensor) -> Tensor:
        """The training loss of a batch (mean over its samples)."""
        return training_loss(self.task, output, images, labels)


def training_loss(task: str, output: Tensor, images: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy against ``labels`` for ``"classify"``, :func:`reconstruction_loss`
    against ``images`` for ``"reconstruct"``."""
    if task == "classify":
        return F.cross_entropy(output, labels)
    return reconstruction_loss(output, images)


WORKLOADS: dict[str, Workload] = {
    "mlp": Workload(mlp, "classify"),
    "autoencoder": Workload(autoencoder, "reconstruct"),
    "cnn": Workload(cnn, "classify"),
}
