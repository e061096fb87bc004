"""Regularizers built on kfrob's norms and diagnostics, usable with any optimizer.

Every function returns a differentiable 0-dim (or batch-shaped) tensor: add ``λ · penalty`` to
the loss before ``backward()``. The values come from :mod:`kfrob.norms` and
:mod:`kfrob.diagnostics`; this module only chooses the matrices, sums over layers and keeps the
graph.

Penalties of one weight ``W``, a ``(..., out, in)`` matrix whose leading dims are a batch (pass a
convolution kernel ``(out, in, *k)`` as ``w.flatten(1)``; :func:`matrix_penalty` does that):

* :func:`schatten_penalty` — ``‖W‖_{S_p} = (Σ σ_i^p)^{1/p}``; ``p = 1`` is the nuclear norm
  (:func:`nuclear_penalty`). One SVD: ``O(out·in·min(out, in))``.
* :func:`nuclear_frobenius_penalty` — ``Σσ / sqrt(Σσ²)``, scale invariant, in ``[1, sqrt(rank)]``.
  One SVD.
* :func:`frobenius_penalty` — ``‖W‖² = tr(M_X⁻¹ Wᵀ M_Y W)`` in chosen domain and co-domain
  inner products; identities give plain weight decay ``Σ W²`` (``O(out·in)``); K-FAC's
  ``A = M_X⁻¹`` and ``G = M_Y`` give ``tr(A Wᵀ G W)``, the squared length of ``W`` in the
  running metric (two products, ``O(out·in·(out + in))``; Cholesky when ``domain`` is given).

Penalties of a model:

* :func:`matrix_penalty` — one of the above summed over the model's weight matrices (all
  layers of kfrob's registry, or the ``layers`` named); weights of equal shape are
  stacked into one batched call. ``kind="metric_frobenius"`` reads ``{layer: (A, G)}`` from
  ``opt.preconditioner.factors()`` and penalizes ``tr(A Vᵀ G V)`` with ``V = [W, b]``.
* :func:`geometric_complexity_penalty` — ``(1/B) Σ_b ‖∂f(x_b)/∂x_b‖²_F`` by double backward
  (:func:`kfrob.diagnostics.geometric_complexity`); about ``2·n_samples`` extra backward passes.
* :func:`hessian_trace_penalty` — Hutchinson's ``tr(∇²_θ L)``
  (:func:`kfrob.diagnostics.hessian_trace`); a third-order pass per probe, the most expensive.
* :func:`linear_chain_fisher_trace` — the cheap, exact flatness proxy for a chain of linear
  maps: ``Σ_l tr(A_l)·tr(G_l)``, the Kronecker-factored Fisher trace, with ``A_l`` and ``G_l``
  written as functions of the other layers' weights; ``O(L·d³)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kfrob.diagnostics import factors_of, geometric_complexity, hessian_trace
from kfrob.layers import LayerMath, layer_math
from kfrob.norms import frobenius_inner, nuclear_to_frobenius_ratio, schatten_norm

__all__ = [
    "MATRIX_KINDS",
    "frobenius_penalty",
    "geometric_complexity_penalty",
    "hessian_trace_penalty",
    "linear_chain_fisher_trace",
    "matrix_penalty",
    "nuclear_frobenius_penalty",
    "nuclear_penalty",
    "penalized_layers",
    "schatten_penalty",
]

MatrixKind = Literal["nuclear", "schatten", "nuclear_frobenius", "frobenius", "metric_frobenius"]
MATRIX_KINDS: tuple[str, ...] = (
    "nuclear",
    "schatten",
    "nuclear_frobenius",
    "frobenius",
    "metric_frobenius",
)


def _as_matrix(weight: Tensor) -> Tensor:
    if weight.dim() < 2:
        raise ValueError(
            f"weight must be a (batch of) matrix (..., out, in), got shape {tuple(weight.shape)}"
        )
    return weight


# ------------------------------------------------------------------------- one weight


def schatten_penalty(
    weight: Tensor,
    p: float = 1.0,
    *,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    domain_inverse: Tensor | None = None,
) -> Tensor:
    """Schatten-p norm ``(Σ_i σ_i^p)^{1/p}`` of ``W``'s singular values in the given metric.

    ``σ_i`` are the singular values of ``M_Y^{1/2} W M_X^{-1/2}`` (:func:`kfrob.norms.
    schatten_norm`; identities by default). ``weight`` is ``(..., out, in)``, a batch over the
    leading dims.
    The gradient of ``σ_i`` is ``u_i v_iᵀ``, defined where the singular values are distinct
    and, for ``p = 1``, nonzero. Cost: one SVD, ``O(out·in·min(out, in))``.

    Raises:
        ValueError: ``p < 1``, or shapes that do not fit (from :mod:`kfrob.norms`).
    """
    matrix = _as_matrix(weight)
    return schatten_norm(matrix, p, domain, codomain, domain_inverse=domain_inverse, check=False)


def nuclear_penalty(
    weight: Tensor,
    *,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    domain_inverse: Tensor | None = None,
) -> Tensor:
    """Nuclear norm ``Σ_i σ_i`` (Schatten-1, the convex surrogate of the rank); one SVD."""
    return schatten_penalty(
        weight, 1.0, domain=domain, codomain=codomain, domain_inverse=domain_inverse
    )


def nuclear_frobenius_penalty(
    weight: Tensor,
    *,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    domain_inverse: Tensor | None = None,
) -> Tensor:
    """Normalized nuclear norm ``Σσ_i / sqrt(Σσ_i²)`` (:func:`kfrob.norms.
    nuclear_to_frobenius_ratio`), between 1 and ``sqrt(rank W)``.

    Invariant to the scale of ``W``: it penalizes how spread the spectrum is, not its size, so
    it cannot be lowered by shrinking every entry (which is how the nuclear norm biases a
    solution). Not convex. A zero matrix gives 0. Cost: one SVD.
    """
    return nuclear_to_frobenius_ratio(
        _as_matrix(weight), domain, codomain, domain_inverse=domain_inverse, check=False
    )


def frobenius_penalty(
    weight: Tensor,
    *,
    domain: Tensor | None = None,
    codomain: Tensor | None = None,
    domain_inverse: Tensor | None = None,
) -> Tensor:
    """Squared Frobenius-type norm ``‖W‖² = tr(M_X⁻¹ Wᵀ M_Y W)`` (not halved).

    With identities this is ``Σ W²``: ``λ/2 · penalty`` is weight decay ``λ``. With K-FAC's
    ``domain_inverse=A`` and ``codomain=G`` it is ``tr(A Wᵀ G W) = E‖W a‖²_G``, weight decay
    measured in the running curvature metric, whose gradient is ``2 G W A``. Cost
    ``O(out·in)`` with identities, ``O(out·in·(out + in))`` with Grams.
    """
    matrix = _as_matrix(weight)
    return frobenius_inner(
        matrix, matrix, domain, codomain, domain_inverse=domain_inverse, check=False
    )


# ------------------------------------------------------------------------------ model


def penalized_layers(model: nn.Module, layers: Iterable[str] | None = None) -> dict[str, LayerMath]:
    """The model's layers with a weight matrix, by name: the layer kinds of kfrob's registry
    (:mod:`kfrob.layers`: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, …), as their
    :class:`~kfrob.layers.LayerMath`, which knows each kind's parameter layout.

    Raises:
        ValueError: a name in ``layers`` that is not such a layer (the message lists those).
    """
    maths = ((name, layer_math(m)) for name, m in model.named_modules())
    found = {name: math for name, math in maths if math is not None}
    if layers is None:
        return found
    chosen = list(layers)
    unknown = [name for name in chosen if name not in found]
    if unknown:
        raise ValueError(
            f"layers: {unknown} not among the model's weight layers; allowed: {sorted(found)}"
        )
    return {name: found[name] for name in chosen}


def matrix_penalty(
    model: nn.Module,
    kind: MatrixKind = "nuclear",
    *,
    layers: Iterable[str] | None = None,
    p: float = 1.0,
    factors: Any = None,
) -> Tensor:
    """Sum over the model's weight matrices of a matrix penalty.

    ``kind``: ``"nuclear"`` (:func:`nuclear_penalty`), ``"schatten"`` (Schatten-``p``),
    ``"nuclear_frobenius"`` (:func:`nuclear_frobenius_penalty`), ``"frobenius"`` (``Σ W²``,
    :func:`frobenius_penalty`), or ``"metric_frobenius"``: ``Σ_l tr(A_l V_lᵀ G_l V_l)`` with
    ``V_l = [W_l, b_l]`` and the running factors ``factors`` (``{layer: (A, G)}`` as returned by
    ``KroneckerPreconditioner.factors()``, or the preconditioner, or an optimizer holding one as
    ``.preconditioner``); the factors are constants (detached) and the default layers are
    those that have factors. A grouped convolution's groups are separate matrices.

    ``layers`` names the modules (as in ``model.named_modules()``); default: every layer of
    kfrob's registry. Weights of equal shape go through one batched SVD.

    Raises:
        ValueError: unknown ``kind`` (the allowed kinds are listed), ``p < 1``, an unknown layer,
            ``"metric_frobenius"`` without factors, or factors whose sizes do not fit.
    """
    if kind not in MATRIX_KINDS:
        raise ValueError(f"kind must be one of {list(MATRIX_KINDS)}, got {kind!r}")
    if not p >= 1:
        raise ValueError(f"p must be in [1, inf], got {p}")
    if kind == "metric_frobenius":
        return _metric_frobenius(model, layers, factors)
    chosen = penalized_layers(model, layers)
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for math in chosen.values():
        matrix = math.weight_matrix()  # (blocks, out, in): a grouped conv's blocks apart
        groups.setdefault(tuple(matrix.shape[1:]), []).append(matrix)
    total = next(model.parameters()).new_zeros(())
    for matrices in groups.values():
        stack = torch.cat(matrices)  # (matrices of this shape, out, in): one batched call
        if kind == "frobenius":
            values = stack.square().sum((-2, -1))
        elif kind == "nuclear_frobenius":
            values = nuclear_frobenius_penalty(stack)
        else:
            values = schatten_penalty(stack, 1.0 if kind == "nuclear" else p)
        total = total + values.sum()
    return total


def _metric_frobenius(model: nn.Module, layers: Iterable[str] | None, factors: Any) -> Tensor:
    if factors is None:
        raise ValueError(
            "factors: kind='metric_frobenius' needs the running factors, e.g. "
            "factors=opt.preconditioner.factors()"
        )
    table = factors_of(factors)
    names = list(table) if layers is None else list(layers)
    chosen = penalized_layers(model, names)
    total = next(model.parameters()).new_zeros(())
    for name, math in chosen.items():
        if name not in table:
            raise ValueError(f"layers: {name!r} has no factors; layers with factors: {list(table)}")
        a, g = (f.detach() for f in table[name])
        matrix = math.matrix()  # [W, b] (blocks, out, in), as the factors are
        matrix = matrix[0] if math.blocks == 1 else matrix
        fits = a.dim() == g.dim() == matrix.dim() and a.shape[:-2] == matrix.shape[:-2]
        if not fits or a.shape[-1] != matrix.shape[-1] or g.shape[-1] != matrix.shape[-2]:
            raise ValueError(
                f"factors[{name!r}]: A {tuple(a.shape)} and G {tuple(g.shape)} do not fit the "
                f"layer's [W, b] of shape {tuple(matrix.shape)}"
            )
        total = total + frobenius_penalty(matrix, codomain=g, domain_inverse=a).sum()
    return total


def geometric_complexity_penalty(
    model: nn.Module,
    inputs: Tensor,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Differentiable geometric complexity ``(1/B) Σ_b ‖∂f(x_b)/∂x_b‖²_F`` (Dherin et al. 2022).

    The unbiased random-projection estimate of :func:`kfrob.diagnostics.geometric_complexity`
    with its graph kept: its gradient with respect to the parameters is an unbiased estimate
    of the gradient of ``GC``. Cost: ``n_samples`` vector–Jacobian products with
    ``create_graph`` (double backward), then as many again in ``backward()``.
    """
    return geometric_complexity(model, inputs, n_samples, generator, create_graph=True)


def hessian_trace_penalty(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: tuple[Tensor, Tensor],
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    params: Iterable[Tensor] | None = None,
) -> Tensor:
    """Differentiable Hutchinson estimate of the flatness ``tr(∇²_θ L)`` on ``batch``.

    :func:`kfrob.diagnostics.hessian_trace` with its graph kept (Rademacher probes,
    ``mean_v vᵀ H v``); its gradient is an unbiased estimate of ``∇_θ tr(H)``. Cost: one
    double-backward per probe, and a third-order pass per probe in ``backward()`` — several
    times a training step; apply it every few steps for large models.
    """
    return hessian_trace(model, loss_fn, batch, n_samples, generator, params, create_graph=True)


def linear_chain_fisher_trace(
    weights: Sequence[Tensor], input_covariance: Tensor | None = None
) -> Tensor:
    """Exact Fisher (Gauss–Newton) trace of a bias-free linear chain, by its Kronecker factors.

    For ``f(x) = W_L ⋯ W_1 x`` (``weights = [W_1, …, W_L]``, ``W_l`` of shape
    ``(d_l, d_{l-1})``) and the loss ``½‖f(x) − y‖²`` with ``E[x xᵀ] = Σ``, layer ``l``'s
    Fisher block is ``E[a aᵀ] ⊗ BᵀB`` exactly (``a = W_{<l} x``, ``B = W_{>l}``; the output
    Jacobian does not depend on ``x``), so K-FAC is exact here and

        ``tr F = Σ_l tr(A_l)·tr(G_l) = Σ_l tr(W_{<l} Σ W_{<l}ᵀ) · ‖W_{>l}‖²_F``,

    equal to ``tr ∇²L`` where the residual vanishes. With ``Σ = I`` (the default) this is the
    form that, under the restricted isometry property, approximates the Hessian trace of deep
    matrix sensing (Gatmiry et al. 2023). Differentiable; cost ``O(L·d³)`` (prefix and suffix
    products).

    Raises:
        ValueError: an empty chain, shapes that do not compose, or a ``Σ`` that does not fit.
    """
    if not weights:
        raise ValueError("weights must hold at least one matrix")
    if any(w.dim() != 2 for w in weights):
        raise ValueError(f"weights must be matrices, got {[tuple(w.shape) for w in weights]}")
    for i, (w, nxt) in enumerate(pairwise(weights)):
        if nxt.shape[1] != w.shape[0]:
            raise ValueError(
                f"weights[{i + 1}] of shape {tuple(nxt.shape)} does not compose with "
                f"weights[{i}] of shape {tuple(w.shape)}"
            )
    d_in = weights[0].shape[1]
    if input_covariance is not None and input_covariance.shape != (d_in, d_in):
        raise ValueError(
            f"input_covariance must be ({d_in}, {d_in}), got {tuple(input_covariance.shape)}"
        )
    ref = weights[0]
    prefix = [torch.eye(d_in, dtype=ref.dtype, device=ref.device)]  # W_{<l}
    for w in weights[:-1]:
        prefix.append(w @ prefix[-1])
    d_out = weights[-1].shape[0]
    suffix = [torch.eye(d_out, dtype=ref.dtype, device=ref.device)]  # W_{>l}, built backwards
    for w in reversed(weights[1:]):
        suffix.append(suffix[-1] @ w)
    suffix.reverse()
    total = ref.new_zeros(())
    for before, after in zip(prefix, suffix, strict=True):
        cov = before if input_covariance is None else before @ input_covariance
        trace_a = (cov * before).sum()  # tr(W_{<l} Σ W_{<l}ᵀ)
        total = total + trace_a * after.square().sum()
    return total
