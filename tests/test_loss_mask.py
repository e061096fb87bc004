"""A loss mask (``optimizer.set_loss_mask(targets != ignore_index)``) takes the ignored
positions out of the curvature: their rows are not added and they count as no samples, for
the empirical and the MC Fisher, on every per-token layer kind (embedding, linear, norm).

References: the same model run on the kept tokens alone (no mask), and explicit per-token
gradients with ``torch.func`` over the kept tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfrob import FrobPreconditionedSGD
from kfrob.job.transformer import transformer
from tests.reference import codomain_factor, per_sample_output_grads
from tests.test_factors import ce_term

IGNORE = -100


def per_token_model() -> nn.Module:
    """Embedding, linear, layer norm and head, each applied to every token on its own."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(11, 6), nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 7)
    )


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """Tokens ``(3, 4)``, targets with ignored positions, and the mask of kept positions."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (3, 4), generator=gen)
    targets = torch.randint(0, 7, (3, 4), generator=gen)
    targets[0, 3] = targets[1, 0] = targets[2, 2:] = IGNORE
    return tokens, targets, targets != IGNORE


def factors_after_one_step(
    tokens: Tensor, targets: Tensor, mask: Tensor | None, reduction: str, fisher: str
) -> dict[str, tuple[Tensor, Tensor]]:
    model = per_token_model()
    opt = FrobPreconditionedSGD(
        model, lr=0.0, loss="cross_entropy", fisher=fisher, loss_reduction=reduction,
        generator=torch.Generator().manual_seed(3), step_rule="preconditioned_sgd",
    )  # fmt: skip
    opt.set_loss_mask(mask)
    logits = model(tokens)
    F.cross_entropy(
        logits.reshape(-1, 7), targets.reshape(-1), ignore_index=IGNORE, reduction=reduction
    ).backward()
    opt.step()
    opt.close()
    return opt.preconditioner.factors()


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_factors_equal_those_of_the_kept_tokens_alone(fisher: str, reduction: str) -> None:
    tokens, targets, keep = batch()
    masked = factors_after_one_step(tokens, targets, keep, reduction, fisher)
    alone = factors_after_one_step(tokens[keep][None], targets[keep][None], None, reduction, fisher)
    unmasked = factors_after_one_step(tokens, targets, None, reduction, fisher)
    assert masked.keys() == alone.keys() == {"0", "1", "2", "4"}
    for name, (a, g) in masked.items():
        torch.testing.assert_close(a, alone[name][0])
        torch.testing.assert_close(g, alone[name][1])
        # the mask matters: without it the ignored tokens' inputs enter every A
        assert not torch.allclose(a, unmasked[name][0])


def test_masked_head_factors_match_per_token_gradients() -> None:
    """The head's ``A`` is the mean of ``[h, 1][h, 1]ᵀ`` over the kept tokens and its ``G``
    the mean over them of per-token loss gradients' outer products (empirical Fisher)."""
    tokens, targets, keep = batch()
    a, g = factors_after_one_step(tokens, targets, keep, "mean", "empirical")["4"]
    model = per_token_model()
    with torch.no_grad():
        hidden = model[:4](tokens)[keep].double()
    rows = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=hidden.dtype)], 1)
    torch.testing.assert_close(a.double(), rows.T @ rows / len(rows))
    grads = per_sample_output_grads(nn.Identity(), ce_term, model(tokens)[keep], targets[keep])
    torch.testing.assert_close(g.double(), codomain_factor(grads)[0], rtol=1e-4, atol=1e-7)


def test_mask_serves_one_forward_pass() -> None:
    tokens, _, keep = batch()
    model = per_token_model()
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    embedding = opt.preconditioner.layers["0"]
    opt.set_loss_mask(keep)
    model(tokens)
    assert embedding.domain.rows == int(keep.sum())
    model(tokens)  # no mask: every position counts
    assert embedding.domain.rows == int(keep.sum()) + tokens.numel()
    opt.close()


def test_position_embedding_keeps_positions_some_sequence_keeps() -> None:
    """A GPT's position embedding sees ``arange(T)`` broadcast over the batch: it keeps the
    positions some sequence keeps; the token embedding keeps exactly the kept tokens."""
    model = transformer(d_model=8, n_layers=1, n_heads=2, context=6)
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    tokens = torch.randint(0, 256, (2, 6))
    keep = torch.tensor([[True] * 4 + [False] * 2, [True] * 3 + [False] * 3])
    opt.set_loss_mask(keep)
    logits = model(tokens)
    targets = torch.where(keep, tokens, IGNORE)
    F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=IGNORE).backward()
    layers = opt.preconditioner.layers
    assert layers["tokens"].domain.rows == 7
    assert layers["positions"].domain.rows == 4  # positions 0..3
    opt.step()
    a_tokens, _ = opt.preconditioner.factors()["tokens"]
    counts = torch.bincount(tokens[keep], minlength=256).double()
    torch.testing.assert_close(a_tokens.diagonal().double(), counts / 7)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.close()


def test_bad_masks_are_refused() -> None:
    tokens, _, keep = batch()
    model = per_token_model()
    opt = FrobPreconditionedSGD(model, lr=0.1, loss="cross_entropy", step_rule="preconditioned_sgd")
    with pytest.raises(TypeError, match="bool tensor"):
        opt.set_loss_mask(keep.float())
    opt.set_loss_mask(keep[:, :3])
    with (
        pytest.warns(UserWarning, match="does not select"),
        pytest.raises(ValueError, match="loss mask has shape"),
    ):
        model(tokens)
    model(tokens)  # the refused mask is gone
    opt.close()


def test_reduce_layers_keep_every_position_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = FrobPreconditionedSGD(
        model, lr=0.1, loss="cross_entropy", weight_sharing="reduce", step_rule="preconditioned_sgd"
    )
    x, keep = torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    keep[0, 4] = False
    opt.set_loss_mask(keep)
    with pytest.warns(UserWarning, match="weight_sharing='reduce'"):
        model(x)
    assert opt.preconditioner.layers["0"].domain.rows == 2  # one row per sequence
    opt.close()
