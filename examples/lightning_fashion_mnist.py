"""Fashion-MNIST with Lightning and kfrob's callback, driven by LightningCLI.

    python examples/lightning_fashion_mnist.py fit --config configs/lightning_fashion_mnist.yaml

The config adds ``kfrob.lightning.FrobPreconditioner`` to the trainer's callbacks; the
model's own optimizer (SGD by default, ``--model.optimizer adamw`` for AdamW) then steps with
K-FAC-preconditioned gradients. The config's TensorBoard logger writes to
``runs/lightning-fashion-mnist`` (``tensorboard --logdir runs``): ``train_loss``,
``val_acc`` and kfrob's diagnostics under ``kfrob/net.fc1/...``; the callback's
``log_diagnostics: false`` leaves those out. Data: the full Fashion-MNIST if it is installed
(``$KFROB_DATA``, Debian's ``dataset-fashion-mnist``) and ``data.embedded`` is false, else
the subset shipped inside kfrob; the script says which it used.
"""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kfrob.data import load_any_fashion_mnist, load_fashion_mnist


class FashionMNIST(pl.LightningDataModule):
    """Fashion-MNIST images flattened to 784 features."""

    def __init__(self, batch_size: int = 128, embedded: bool = True, data_dir: str | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.embedded = embedded
        self.data_dir = data_dir

    def setup(self, stage: str) -> None:
        splits = {}
        for split in ("train", "test"):
            if self.embedded:
                x, y = load_fashion_mnist(split, embedded=True)
                source = "embedded subset"
            else:
                x, y, source = load_any_fashion_mnist(split, self.data_dir)
            splits[split] = TensorDataset(x.flatten(1), y)
        print(
            f"data: Fashion-MNIST, {source}: {len(splits['train'])} train, "
            f"{len(splits['test'])} test images"
        )
        self.train_set, self.test_set = splits["train"], splits["test"]

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        return DataLoader(self.train_set, self.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1000)


class MLPClassifier(pl.LightningModule):
    """The MLP 784-512-256-10 (ReLU) with SGD or AdamW."""

    def __init__(self, lr: float = 0.1, optimizer: str = "sgd", momentum: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers = [("fc1", nn.Linear(784, 512)), ("relu1", nn.ReLU())]
        layers += [("fc2", nn.Linear(512, 256)), ("relu2", nn.ReLU()), ("fc3", nn.Linear(256, 10))]
        self.net = nn.Sequential(OrderedDict(layers))  # named: kfrob/net.fc1/... in the logs

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum
        )


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(MLPClassifier, FashionMNIST, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
