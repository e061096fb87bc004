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
* A loss that ignores positions (``ignore_index``): in ``training_step``, before calling the
  module's forward, ``callback.engine.set_loss_mask(targets != ignore_index)`` (see
  :meth:`kfrob.KroneckerPreconditioner.set_loss_mask`); the MC Fisher samples its labels in
  the module's own ``forward`` hook, so ``training_step`` must compute the logits by calling
  ``self(...)``.
* Every ``log_every_n_steps`` optimizer steps, kfrob's diagnostics are logged through
  ``pl_module.log_dict`` under ``kfrob/`` (all of them, or only the names given in
  ``log_diagnostics``).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kfrob.lightning needs Lightning: install it with pip install 'kfrob[lightning]'"
    ) from err

from collections.abc import Collection

from torch.optim import Optimizer

from kfrob.diagnostics import step_diagnostics
from kfrob.options import PreconditionerOptions, with_flat_keywords
from kfrob.preconditioner import KroneckerPreconditioner

__all__ = ["FrobPreconditioner"]


class FrobPreconditioner(pl.Callback):
    """Precondition the gradients of any Lightning optimizer with Kronecker factors.

    Takes a :class:`~kfrob.options.PreconditionerOptions`, or the same flat keywords as
    :class:`kfrob.FrobPreconditionedSGD` (``loss``, ``damping``, ``inverse_update_freq``, …)
    with the same defaults; learning rate, momentum, weight decay and the ``GradScaler``
    come from the trainer. ``log_diagnostics`` is ``True`` (log every diagnostic of
    :func:`kfrob.diagnostics.step_diagnostics`), ``False``, or the names to log (e.g.
    ``["update_norm_metric", "kl_clip_factor"]``: a per-layer name is logged for every
    layer). Under a DDP strategy the trainer's process group is detected: factors are
    averaged over ranks and the inverse work is shared.
    """

    def __init__(
        self,
        options: PreconditionerOptions | None = None,
        *,
        log_diagnostics: bool | Collection[str] = True,
        **flat: Any,
    ) -> None:
        if options is None:
            options = PreconditionerOptions.from_flat(**flat)  # validated here, at once
        elif flat:
            raise TypeError(f"pass options or flat keywords, not both (got {sorted(flat)})")
        self.options = options
        self.log_diagnostics = log_diagnostics
        self.engine: KroneckerPreconditioner | None = None
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.engine is not None:
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "FrobPreconditioner supports automatic optimization (one optimizer); with "
                "manual optimization call KroneckerPreconditioner.step() yourself"
            )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.engine = KroneckerPreconditioner(pl_module, self.options, grad_scaler=scaler)
        if self._pending_state is not None:
            self.engine.load_state_dict(self._pending_state)
            self._pending_state = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.engine is not None:
            self.engine.remove_hooks()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        engine = self.engine
        if engine is None:
            return
        lrs = {  # the KL clip's rate: lr / (1 − momentum) for optimizers with momentum
            p: float(group["lr"]) / (1.0 - group.get("momentum", 0.0))
            for group in optimizer.param_groups
            for p in group["params"]
        }
        due = engine.steps % max(1, trainer.log_every_n_steps) == 0
        if self.log_diagnostics and due and engine.inverses:
            grads = {p: p.grad for p in engine.parameters if p.grad is not None}
            stats = step_diagnostics(engine, engine.plan(grads, lrs), engine.damping)
            pl_module.log_dict(
                {f"kfrob/{k}": v for k, v in stats.items() if self._logs(k)},
                on_step=True,
                on_epoch=False,
            )
        engine.step(lrs)

    def _logs(self, key: str) -> bool:
        chosen = self.log_diagnostics
        return chosen is True or key.rsplit("/", 1)[-1] in chosen  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {} if self.engine is None else self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state = state_dict.get("kfrob", state_dict)  # kfrob 0.1 saved the optimizer's state
        if self.engine is None:
            self._pending_state = state
        else:
            self.engine.load_state_dict(state)


with_flat_keywords(FrobPreconditioner.__init__)
