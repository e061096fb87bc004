"""The benchmark workloads, defined once: Fashion-MNIST-shaped models (input ``(1, 28, 28)``).

* ``mlp``: 784-512-256-10 with ReLU, a classifier;
* ``autoencoder``: the deep autoencoder of the K-FAC literature, 784-1000-500-250-30 and the
  mirrored decoder, ReLU except at the code layer, trained to reconstruct its input;
* ``cnn``: two 5×5 conv layers (32, 64 channels) with max-pooling, then 3136-128-10.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from torch import nn


def relu_stack(widths: list[int]) -> list[nn.Module]:
    """Linear layers through ``widths`` with a ReLU between consecutive ones."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(pairwise(widths)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(d_in, d_out))
    return layers


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), *relu_stack([784, 512, 256, 10]))


def autoencoder() -> nn.Module:
    encoder, decoder = [784, 1000, 500, 250, 30], [30, 250, 500, 1000, 784]
    return nn.Sequential(nn.Flatten(), *relu_stack(encoder), *relu_stack(decoder))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), *relu_stack([64 * 7 * 7, 128, 10]),
    )  # fmt: skip


# name -> (model factory, "classify" or "reconstruct")
WORKLOADS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "mlp": (mlp, "classify"),
    "autoencoder": (autoencoder, "reconstruct"),
    "cnn": (cnn, "classify"),
}
