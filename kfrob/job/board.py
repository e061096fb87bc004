"""TensorBoard logging for one training run.

Tags (``step`` is the optimizer step):

* ``train/loss``, ``train/accuracy`` (classifiers), ``train/lr``, ``train/step_time``:
  averages over the last ``log_every`` steps;
* ``test/loss``, ``test/accuracy``: at each evaluation;
* ``kfrob/<layer>/<quantity>`` and ``kfrob/kl_clip_factor``, ``kfrob/fisher_trace``: what
  :meth:`kfrob.FrobPreconditionedSGD.diagnostics` returns (update and gradient norms in the
  factor metric and the Euclidean one, damping, condition numbers of ``A`` and ``G``, …);
* histograms ``eigenvalues/<layer>/A`` and ``eigenvalues/<layer>/G`` at each inverse refresh;
* the run's hyperparameters and final metrics (``add_hparams``, the HPARAMS tab).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from kfrob.optimizer import FrobPreconditionedSGD

__all__ = ["Board"]


class Board:
    """A ``SummaryWriter`` on ``run_dir`` that knows what a training run logs."""

    def __init__(self, run_dir: str | Path) -> None:
        self.writer = SummaryWriter(str(run_dir))

    def scalars(self, prefix: str, values: dict[str, float | None], step: int) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def eigenvalues(self, optimizer: FrobPreconditionedSGD, step: int) -> None:
        """Histograms of the eigenvalues of each layer's factors behind its inverse."""
        for layer, sides in optimizer.preconditioner.eigenvalues().items():
            for side, values in sides.items():
                self.writer.add_histogram(f"eigenvalues/{layer}/{side}", values.float(), step)

    def hparams(self, hyperparameters: dict[str, Any], metrics: dict[str, float | None]) -> None:
        """Hyperparameters (numbers, strings and booleans; others as text) with the final
        metrics, for TensorBoard's HPARAMS tab."""
        plain = {
            key: value if isinstance(value, int | float | str | bool) else str(value)
            for key, value in hyperparameters.items()
        }
        final = {f"hparam/{k}": v for k, v in metrics.items() if v is not None}
        self.writer.add_hparams(plain, final, run_name=".")

    def close(self) -> None:
        self.writer.close()
