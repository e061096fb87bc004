"""The Lightning callback under a real ``lightning.Trainer`` on the CPU."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from kfrob import FrobPreconditionedSGD  # noqa: E402
from kfrob.lightning import FrobPreconditioner  # noqa: E402

warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*plain update.*")


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen) * torch.linspace(0.2, 2.0, 6)
    y = (x @ torch.randn(6, 3, generator=gen)).argmax(1)
    return TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.make_optimizer = make_optimizer
        self.losses: list[float] = []
        self.seen_grads: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self)

    def optimizer_step(self, *args: object, **kwargs: object) -> None:
        super().optimizer_step(*args, **kwargs)  # type: ignore[arg-type]


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=0.1)


def adamw(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(module.parameters(), lr=1e-2)


def trainer(**kwargs: object) -> pl.Trainer:
    options: dict[str, object] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_steps": 12,
        **kwargs,
    }
    return pl.Trainer(**options)  # type: ignore[arg-type]


def loader(batch_size: int = 16, n: int = 64) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


def parameters(module: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["sgd", "adamw"])
def test_fit_with_callback_trains_and_changes_the_gradients(
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
) -> None:
    with_kfrob = Classifier(make_optimizer)
    trainer(max_steps=40, callbacks=[FrobPreconditioner()]).fit(with_kfrob, loader())
    plain = Classifier(make_optimizer)
    trainer(max_steps=40).fit(plain, loader())
    assert with_kfrob.losses[-1] < 0.7 * with_kfrob.losses[0]
    differences = [
        float((p - q).abs().max())
        for p, q in zip(with_kfrob.parameters(), plain.parameters(), strict=True)
    ]
    assert max(differences) > 1e-3  # the preconditioner changed the steps


def test_callback_with_sgd_equals_the_plain_kfrob_loop() -> None:
    module = Classifier(sgd)
    trainer(max_steps=8, callbacks=[FrobPreconditioner(inverse_update_freq=3)]).fit(
        module, loader()
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = FrobPreconditionedSGD(
        model, lr=0.1, inverse_update_freq=3, step_rule="preconditioned_sgd"
    )
    for step, (x, y) in enumerate(loader()):
        if step == 4:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for step, (x, y) in enumerate(loader()):  # second epoch, same order
        if step == 4:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for p, q in zip(module.net.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_gives_the_factors_of_the_whole_batch() -> None:
    callbacks = [FrobPreconditioner(), FrobPreconditioner()]
    trainer(max_steps=1, callbacks=[callbacks[0]]).fit(Classifier(sgd), loader(batch_size=16))
    trainer(max_steps=1, accumulate_grad_batches=2, callbacks=[callbacks[1]]).fit(
        Classifier(sgd), loader(batch_size=8)
    )
    whole, split = (c.engine.factors() for c in callbacks)  # type: ignore[union-attr]
    for name, (a, g) in whole.items():
        torch.testing.assert_close(split[name][0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split[name][1], g, rtol=1e-4, atol=1e-7)


def test_bf16_mixed_keeps_float32_finite_factors() -> None:
    callback = FrobPreconditioner()
    module = Classifier(sgd)
    trainer(max_steps=10, precision="bf16-mixed", callbacks=[callback]).fit(module, loader())
    for a, g in callback.engine.factors().values():  # type: ignore[union-attr]
        assert a.dtype == g.dtype == torch.float32
        assert torch.isfinite(a).all() and torch.isfinite(g).all()
    assert module.losses[-1] < module.losses[0]


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    """One batch an epoch, so Lightning's data order on resume cannot differ: only kfrob's
    state (factors, inverses, counters) decides whether the runs agree."""
    options = {"inverse_update_freq": 3, "factor_update_freq": 2}
    data = loader(batch_size=16, n=16)
    straight = Classifier(sgd)
    trainer(max_steps=8, callbacks=[FrobPreconditioner(**options)]).fit(straight, data)

    first = Classifier(sgd)
    run = trainer(max_steps=5, callbacks=[FrobPreconditioner(**options)])
    run.fit(first, data)
    checkpoint = tmp_path / "half.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = Classifier(sgd)
    trainer(max_steps=8, callbacks=[FrobPreconditioner(**options)]).fit(
        resumed, data, ckpt_path=checkpoint
    )
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_gradient_clipping_applies_after_preconditioning() -> None:
    """Lightning clips the preconditioned directions: the SGD step is at most lr·clip."""
    clip, lr = 0.05, 0.1
    module = Classifier(sgd)
    before = parameters(module)
    trainer(max_steps=1, gradient_clip_val=clip, callbacks=[FrobPreconditioner(kl_clip=None)]).fit(
        module, loader()
    )
    step = torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, module.parameters(), strict=True)]
    )
    assert float(step.norm()) == pytest.approx(lr * clip, rel=1e-4)


def test_frob_sgd_in_configure_optimizers_works_with_the_closure() -> None:
    module = Classifier(lambda m: FrobPreconditionedSGD(m, lr=0.1, step_rule="preconditioned_sgd"))
    trainer(max_steps=30).fit(module, loader())
    assert module.losses[-1] < 0.7 * module.losses[0]


def test_diagnostics_are_logged() -> None:
    module = Classifier(sgd)
    run = trainer(max_steps=4, log_every_n_steps=1, callbacks=[FrobPreconditioner()])
    run.fit(module, loader())
    assert "kfrob/fisher_trace" in run.logged_metrics
    assert "kfrob/net.0/update_norm_metric" in run.logged_metrics


def test_manual_optimization_is_refused() -> None:
    class Manual(Classifier):
        def __init__(self) -> None:
            super().__init__(sgd)
            self.automatic_optimization = False

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
            opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            opt.step()  # type: ignore[union-attr]

    with pytest.raises(RuntimeError, match="automatic optimization"):
        trainer(max_steps=1, callbacks=[FrobPreconditioner()]).fit(Manual(), loader())


def test_invalid_options_fail_early() -> None:
    with pytest.raises(ValueError, match="invalid damping="):
        FrobPreconditioner(damping=-1.0)
    with pytest.raises(TypeError, match="lr"):
        FrobPreconditioner(lr=0.1)  # type: ignore[call-arg]


def test_import_without_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "kfrob.lightning", raising=False)
    with pytest.raises(ImportError, match=r"kfrob\[lightning\]"):
        importlib.import_module("kfrob.lightning")


def test_16_mixed_with_a_grad_scaler_removes_the_loss_scale() -> None:
    """On CPU Lightning's "16-mixed" means bf16; an explicit fp16 plugin with a scaler tests
    the scaler path: ``G`` matches the float32 run (a leaked scale would multiply it by
    4096²)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    mixed, full = FrobPreconditioner(), FrobPreconditioner()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_steps=1, plugins=[plugin], callbacks=[mixed]).fit(Classifier(sgd), loader())
    trainer(max_steps=1, callbacks=[full]).fit(Classifier(sgd), loader())
    assert mixed.engine.grad_scaler is scaler  # type: ignore[union-attr]
    for name, (a, g) in full.engine.factors().items():  # type: ignore[union-attr]
        a16, g16 = mixed.engine.factors()[name]  # type: ignore[union-attr]
        assert a16.dtype == g16.dtype == torch.float32
        torch.testing.assert_close(g16, g, rtol=5e-3, atol=1e-5)
        torch.testing.assert_close(a16, a, rtol=5e-3, atol=1e-4)


def test_lightning_cli_example_runs_on_the_embedded_data() -> None:
    example = importlib.import_module("examples.lightning_fashion_mnist")
    config = Path(__file__).parents[1] / "configs" / "lightning_fashion_mnist.yaml"
    cli = example.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "6",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, FrobPreconditioner)]
    assert len(callbacks) == 1 and callbacks[0].engine is not None
    assert callbacks[0].engine.steps == 6
    assert callbacks[0].engine.options.curvature.fisher == "mc"


class SaveFactors(pl.Callback):
    """Each rank writes its factors and parameters at the end of training."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        callback = next(c for c in trainer.callbacks if isinstance(c, FrobPreconditioner))
        engine = callback.engine
        assert engine is not None
        torch.save(
            {
                "factors": engine.factors(),
                "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "distributed": engine.communicator is not None,
            },
            Path(self.out) / f"rank{trainer.global_rank}.pt",
        )


def test_ddp_ranks_share_their_factors(tmp_path: Path) -> None:
    # two CPU ranks see different halves of each batch (DistributedSampler); kfrob's
    # factors are averaged over them, so both ranks hold the same factors and parameters
    callbacks = [FrobPreconditioner(loss="cross_entropy"), SaveFactors(str(tmp_path))]
    run = trainer(strategy="ddp_spawn", devices=2, max_steps=6, callbacks=callbacks)
    run.fit(Classifier(sgd), loader())
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["distributed"] for r in ranks)
    for name, (a, g) in ranks[0]["factors"].items():
        a1, g1 = ranks[1]["factors"][name]
        assert torch.equal(a, a1) and torch.equal(g, g1), name
    for key, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][key]), key
