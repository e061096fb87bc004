"""K-FAC preconditioning for any Lightning training, as a callback.

    trainer = lightning.Trainer(callbacks=[kfrob.lightning.FrobPreconditioner()])

At ``setup`` the callback registers kfrob's hooks on the LightningModule's supported layers.
In ``on_before_optimizer_step`` — once per optimizer step, after gradient accumulation and
after a ``GradScaler`` has unscaled the gradients — it folds the window's statistics into the
factors, refreshes inverses when due, and replaces every gradient by its preconditioned,
KL-clipped direction. Whatever optimizer ``configure_optimizers`` returns (SGD, AdamW, …)
then steps with those gradients; its learning rates feed the KL clip, and weight decay and
momentum stay its own.

How it fits Lightning's machinery:

* ``accumulate_grad_batches=k``: Lightning divides each micro-batch loss by ``k``, kfrob's
  accumulation convention; the factors equal those of the whole batch.
* ``precision="16-mixed"``: the trainer's ``GradScaler`` is passed on, so its scale is
  removed from ``G``; a step the scaler skips has non-finite statistics or gradients and is
  rejected whole. ``"bf16-mixed"`` needs nothing: factors are float32 anyway.
* Gradient clipping (``gradient_clip_val``) runs *after* this hook: it clips the
  preconditioned directions, i.e. it bounds the step the optimizer takes.
* Checkpoints carry the callback's state (factors, inverses, counters); ``Trainer.fit(
  ckpt_path=...)`` resumes exactly.
* Manual optimization (and so several optimizers) is refused with a ``RuntimeError``: there
  is no single optimizer step to precondition. ``FrobPreconditionedSGD`` itself can also be
  returned from ``configure_optimizers`` (without this callback).
* Every ``log_every_n_steps`` optimizer steps, kfrob's diagnostics are logged through
  ``pl_module.log_dict`` under ``kfrob/``.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kfrob.lightning needs Lightning: install it with pip install 'kfrob[lightning]'"
    ) from err

import torch
from torch.optim import Optimizer

from kfrob.optimizer import FrobPreconditionedSGD

__all__ = ["FrobPreconditioner"]


class FrobPreconditioner(pl.Callback):
    """Precondition the gradients of any Lightning optimizer with Kronecker factors.

    Takes ``FrobPreconditionedSGD``'s curvature arguments with the same defaults and
    meaning (learning rate, momentum, weight decay and the ``GradScaler`` come from the
    trainer); ``log_diagnostics`` turns the logging of
    :meth:`FrobPreconditionedSGD.diagnostics` on or off. Under a DDP strategy the
    trainer's process group is detected: factors are averaged over ranks and the inverse
    work is shared (``inverse_placement`` as in the optimizer).
    """

    def __init__(
        self,
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        factor_update_freq: int = 1,
        inverse_update_freq: int = 10,
        kl_clip: float | None = 1e-3,
        domain: str = "covariance",
        codomain: str = "fisher",
        exponent: float = 1.0,
        damping_method: str = "factored",
        eigenbasis_refresh: str = "eigh",
        weight_sharing: str = "expand",
        factor_decay_warmup: bool = False,
        stagger_refreshes: bool = False,
        fisher: str | None = None,
        loss: str | None = None,
        loss_reduction: str = "mean",
        inverse_placement: str = "replicated",
        eigenvalue_correction: bool = False,
        log_diagnostics: bool = True,
    ) -> None:
        self.options: dict[str, Any] = {
            "damping": damping,
            "factor_decay": factor_decay,
            "factor_update_freq": factor_update_freq,
            "inverse_update_freq": inverse_update_freq,
            "kl_clip": kl_clip,
            "domain": domain,
            "codomain": codomain,
            "exponent": exponent,
            "damping_method": damping_method,
            "eigenbasis_refresh": eigenbasis_refresh,
            "weight_sharing": weight_sharing,
            "factor_decay_warmup": factor_decay_warmup,
            "stagger_refreshes": stagger_refreshes,
            "fisher": fisher,
            "loss": loss,
            "loss_reduction": loss_reduction,
            "inverse_placement": inverse_placement,
            "eigenvalue_correction": eigenvalue_correction,
        }
        self.log_diagnostics = log_diagnostics
        self.engine: FrobPreconditionedSGD | None = None
        self._pending_state: dict[str, Any] | None = None
        # validate the arguments now, on a throwaway module, for an early clear error
        FrobPreconditionedSGD(torch.nn.Linear(1, 1), lr=0.0, **self.options).close()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "FrobPreconditioner supports automatic optimization (one optimizer); with "
                "manual optimization use FrobPreconditionedSGD.precondition_grads() yourself"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.engine = FrobPreconditionedSGD(pl_module, lr=0.0, grad_scaler=scaler, **self.options)
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine is not None:
            self.engine.close()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        engine = self.engine
        if engine is None:
            return
        due = engine.steps % max(1, trainer.log_every_n_steps) == 0
        if self.log_diagnostics and due and engine.preconditioner.inverses:
            stats = {f"kfrob/{k}": v for k, v in engine.diagnostics().items()}
            pl_module.log_dict(stats, on_step=True, on_epoch=False)
        lrs = {p: float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        engine.precondition_grads(lrs)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.engine is None else self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = state_dict
        else:
            self.engine.load_state_dict(state_dict)
