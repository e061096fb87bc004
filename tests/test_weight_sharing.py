"""K-FAC-reduce for convolutions (``weight_sharing="reduce"``) against brute force: the
factors from mean patches and summed per-sample output gradients, and the exact Fisher of a
sample whose patches are all equal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from kfrob import FrobPreconditionedSGD
from tests.reference import conv_patches, per_sample_output_grads, vec
from tests.test_factors import CONVS, captured_factors, ce_term, conv_factors


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CONVS))
def test_reduced_conv_factors(name: str, reduction: str) -> None:
    conv, head, x, y, targets, a, g = conv_factors(name, reduction, weight_sharing="reduce")
    mean_patch = conv_patches(conv, x).double().mean(-1)  # (N, C_in·K)
    summed_grad = per_sample_output_grads(head, ce_term, y, targets).double()
    summed_grad = summed_grad.reshape(5, conv.out_channels, -1).sum(-1)  # (N, C_out)
    for k in range(conv.groups):
        a_rows = mean_patch.chunk(conv.groups, dim=1)[k]
        if conv.bias is not None:
            a_rows = torch.cat([a_rows, torch.ones(5, 1, dtype=a_rows.dtype)], 1)
        g_rows = summed_grad.chunk(conv.groups, dim=1)[k]
        torch.testing.assert_close(a[k].double(), a_rows.T @ a_rows / 5, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g[k].double(), g_rows.T @ g_rows / 5, rtol=1e-4, atol=1e-7)


def test_reduce_is_the_exact_fisher_of_a_sample_with_equal_patches() -> None:
    """A spatially constant input without padding gives every location the same patch, so
    the sample's gradient is ``ĝ âᵀ`` and ``A ⊗ G = vec(∇W) vec(∇W)ᵀ`` exactly."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3)
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    model = nn.Sequential(conv, head)
    x = torch.randn(1, 2, 1, 1).expand(1, 2, 6, 6).contiguous()
    target = torch.tensor([2])
    a, g = captured_factors(model, x, target, "mean", weight_sharing="reduce")["0"]

    params = dict(model.named_parameters())
    grads = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), target))(params)
    matrix = torch.cat([grads["0.weight"].reshape(3, -1), grads["0.bias"][:, None]], 1)
    fisher = torch.outer(vec(matrix.double()), vec(matrix.double()))
    torch.testing.assert_close(torch.kron(a.double(), g.double()), fisher, rtol=1e-4, atol=1e-9)


def test_invalid_weight_sharing_names_the_argument() -> None:
    with pytest.raises(ValueError, match="invalid weight_sharing="):
        FrobPreconditionedSGD(
            nn.Linear(2, 2), lr=0.1, weight_sharing="mean", step_rule="preconditioned_sgd"
        )
