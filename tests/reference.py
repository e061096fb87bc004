"""Brute-force references for the tests, written without any kfrob code.

* Convolution patches come from a convolution with an identity kernel and the layer's own
  stride, padding (incl. ``'same'`` and padding modes) and dilation, so PyTorch's conv
  semantics define them, not kfrob's unfolding.
* Per-sample output gradients come from ``torch.func.vmap(torch.func.grad(...))`` of each
  sample's own loss term.
* Kronecker-factored solves use dense ``torch.kron`` matrices and ``torch.linalg.solve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap


def conv_patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """Patches ``(B, C_in·K, locations)`` seen by each output location of ``conv``."""
    k = conv.kernel_size
    c_in = conv.in_channels
    size = c_in * int(torch.tensor(k).prod())
    eye = torch.eye(size, dtype=x.dtype).reshape(size, c_in, *k)
    cls = nn.Conv1d if isinstance(conv, nn.Conv1d) else nn.Conv2d
    extractor = cls(
        c_in,
        size,
        k,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        padding_mode=conv.padding_mode,
        bias=False,
    )
    with torch.no_grad():
        extractor.weight.copy_(eye)
        patches = extractor(x)
    return patches.reshape(x.shape[0], size, -1)


def domain_factor_linear(x: Tensor, bias: bool) -> Tensor:
    """``A`` for ``nn.Linear``: mean of ``a aᵀ`` over all rows of ``x (..., d)``."""
    rows = x.reshape(-1, x.shape[-1]).double()
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows.T @ rows / rows.shape[0]


def domain_factor_conv(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``A`` per group ``(groups, in, in)``: mean over samples and locations of patch products."""
    patches = conv_patches(conv, x).double()  # (B, C_in K, L)
    groups = conv.groups
    per_group = patches.shape[1] // groups
    out = []
    for g in range(groups):
        rows = patches[:, g * per_group : (g + 1) * per_group].permute(0, 2, 1)
        rows = rows.reshape(-1, per_group)
        if conv.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        out.append(rows.T @ rows / rows.shape[0])
    return torch.stack(out)


def per_sample_output_grads(
    head: Callable[[Tensor], Tensor],
    loss_term: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    targets: Tensor,
) -> Tensor:
    """``∂ℓ_n/∂y_n`` for every sample ``n``: ``ℓ_n = loss_term(head(y_n), t_n)``."""

    def own_loss(y_n: Tensor, t_n: Tensor) -> Tensor:
        return loss_term(head(y_n.unsqueeze(0)), t_n.unsqueeze(0))

    return vmap(grad(own_loss))(y, targets)


def codomain_factor(grads: Tensor, groups: int = 1) -> Tensor:
    """``G`` per group from per-sample output gradients ``(N, C_out, *spatial)``:
    ``(1/N) Σ_n Σ_locations g gᵀ``."""
    n, c = grads.shape[0], grads.shape[1]
    g = grads.reshape(n, c, -1).double()
    per_group = c // groups
    out = []
    for k in range(groups):
        gk = g[:, k * per_group : (k + 1) * per_group]
        out.append(torch.einsum("nil,njl->ij", gk, gk) / n)
    return torch.stack(out)


def vec(matrix: Tensor) -> Tensor:
    """Column-major vectorisation, so that ``kron(A, G) vec(V) = vec(G V A)``."""
    return matrix.mT.reshape(-1)


def unvec(vector: Tensor, rows: int, cols: int) -> Tensor:
    return vector.reshape(cols, rows).mT


def dense_solve(a: Tensor, g: Tensor, v: Tensor, damping: float, power: float = 1.0) -> Tensor:
    """``(kron(A, G) + λI)^{-p} vec(V)`` with a dense matrix (power via a dense eigh)."""
    n = a.shape[0] * g.shape[0]
    matrix = torch.kron(a.double(), g.double()) + damping * torch.eye(n, dtype=torch.float64)
    if power == 1.0:
        solution = torch.linalg.solve(matrix, vec(v.double()))
    else:
        evals, evecs = torch.linalg.eigh(matrix)
        solution = evecs @ (evals.pow(-power) * (evecs.T @ vec(v.double())))
    return unvec(solution, v.shape[0], v.shape[1])


def random_spd(n: int, generator: torch.Generator, scale: float = 1.0) -> Tensor:
    x = torch.randn(n, 2 * n, generator=generator, dtype=torch.float64)
    return scale * (x @ x.T / (2 * n)) + 1e-2 * torch.eye(n, dtype=torch.float64)


class CountingMethod:
    """An inverse method that records what it is asked to compute and delegates the rest to
    ``inner`` (inject it as ``preconditioner.method``). ``calls`` holds, per call, the
    layers' names and the damping they were given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[list[str], dict[str, float]]] = []

    def compute(self, layers: Any, damping: Any, held: Any) -> Any:
        self.calls.append(([layer.name for layer in layers], dict(damping)))
        return self.inner.compute(layers, damping, held)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class UnregisteredLayerNorm(nn.Module):
    """``nn.LayerNorm``'s computation in a module type kfrob has no curvature for: the
    tests' example of a layer that gets plain SGD (its parameters and their names are
    ``nn.LayerNorm``'s)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias)
