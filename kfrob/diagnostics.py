"""Flatness and complexity diagnostics for models.

The functions in the first part of this module look only at a model and a batch of data; no
optimizer is involved. They are randomised trace estimators built on autograd:

* :func:`hessian_trace` — Hutchinson's estimate of ``tr(∇²_θ L)``, the trace of the Hessian of
  the batch loss with respect to the parameters (a flatness measure).
* :func:`geometric_complexity` — the geometric complexity of Dherin et al. (2022), the batch mean
  of ``‖∂f(x)/∂x‖²_F``, the squared Frobenius norm of each sample's input–output Jacobian.

Both are unbiased Monte-Carlo estimators whose standard error shrinks like ``1/sqrt(n_samples)``.
Both are free of side effects: they leave ``.grad`` of every parameter as it was, never change
parameters or the train/eval mode, and restore every buffer (e.g. BatchNorm running statistics)
that the forward pass may update. Neither changes the global random state unless called without
a ``generator`` (the probes then come from the default generator), or unless the model itself
draws random numbers in its forward pass (e.g. dropout in train mode).

The last part reads an optimizer's Kronecker factors: :func:`fisher_trace` and
:func:`step_diagnostics`, the per-layer norms of a step that
:meth:`kfrob.FrobPreconditionedSGD.diagnostics` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from kfrob.norms import frobenius_inner, frobenius_norm, nuclear_to_frobenius_ratio

if TYPE_CHECKING:
    from kfrob.preconditioner import KroneckerPreconditioner, StepPlan

__all__ = [
    "factors_of",
    "fisher_trace",
    "geometric_complexity",
    "hessian_trace",
    "step_diagnostics",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _draw_probe(
    like: Tensor,
    kind: Literal["rademacher", "gaussian"],
    generator: torch.Generator | None,
) -> Tensor:
    """Draw a random probe with the shape, dtype and device of ``like``.

    ``"rademacher"`` gives i.i.d. entries uniform on ``{-1, +1}``; ``"gaussian"`` gives i.i.d.
    ``N(0, 1)`` entries. Either way ``E[v] = 0`` and ``E[v vᵀ] = I``. The numbers are drawn on the
    generator's device (so a CPU generator can drive probes for CUDA tensors) and then moved to
    ``like.device``.
    """
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        bits = torch.randint(0, 2, like.shape, generator=generator, device=device)
        probe = bits.to(like.dtype) * 2 - 1
    else:
        probe = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return probe.to(like.device)


def _check_n_samples(n_samples: int) -> None:
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")


@contextmanager
def _buffers_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (object and value) on exit.

    A forward pass in train mode updates e.g. BatchNorm running statistics in place; a
    diagnostic must not, so the values are copied back afterwards. Buffers that a module
    re-assigns rather than updates in place are put back as well.
    """
    saved = [
        (module, name, buffer, buffer.detach().clone())
        for module in model.modules()
        for name, buffer in module.named_buffers(recurse=False)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in saved:
                if not torch.equal(buffer, value):  # an unneeded write would break a
                    buffer.copy_(value)  # differentiable result that saved the buffer
                if getattr(module, name) is not buffer:
                    setattr(module, name, buffer)


# ---------------------------------------------------------------------------------------------
# Model-level diagnostics
# ---------------------------------------------------------------------------------------------


def hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batch: tuple[Tensor, Tensor],
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    params: Iterable[Tensor] | None = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Hutchinson estimate of the trace of the loss Hessian with respect to the parameters.

    Let ``L(θ) = loss_fn(model(inputs), targets)`` for ``(inputs, targets) = batch`` and let
    ``H = ∇²_θ L`` with ``θ`` the concatenation of ``params`` (default: every parameter of
    ``model`` that requires grad). For any random probe ``v`` with ``E[v vᵀ] = I``,

        ``E[vᵀ H v] = tr(H E[v vᵀ]) = tr(H)``,

    so the mean of ``vᵀ H v`` over ``n_samples`` independent probes is an unbiased estimate of
    ``tr(H)``. The probes are Rademacher (i.i.d. ±1 entries). For i.i.d. zero-mean, unit-variance
    entries, ``Var[vᵀ H v] = 2‖H‖²_F + (E[v⁴] - 3) Σ_i H_ii²``, which is smallest when
    ``E[v⁴] = 1``, i.e. for Rademacher entries: their variance is ``2 Σ_{i≠j} H_ij²`` (against
    ``2‖H‖²_F`` for Gaussian probes), and the estimate is exact, for any ``n_samples``, whenever
    ``H`` is diagonal. The standard error of the returned mean is ``sqrt(Var[vᵀ H v] / n_samples)``.

    Each product ``H v`` is a Hessian-vector product by double backward: the gradient ``g`` is
    computed once with ``create_graph=True``, then ``H v = ∇_θ (gᵀ v)`` for each probe, so the
    cost is about ``n_samples`` backward passes through the gradient graph.

    The trace is a flatness measure: at a minimum, sharp basins (large curvature in many
    directions) have a large trace and flat basins a small one. Away from minima ``H`` need not be
    positive semi-definite, and the trace may be negative.

    The model is run in whatever mode it is in; with dropout in train mode the Hessian is that of
    the loss under the one random mask drawn by the single forward pass.

    Args:
        model: the network; called once as ``model(inputs)``.
        loss_fn: maps ``(outputs, targets)`` to a scalar loss, e.g. ``nn.functional.mse_loss``.
        batch: ``(inputs, targets)``.
        n_samples: number of probes, at least 1.
        generator: source of the probes; ``None`` uses the default generator.
        params: the parameters ``θ`` the Hessian is taken with respect to (each must require
            grad); ``None`` means all parameters of ``model`` that require grad.
        create_graph: keep the graph of the estimate, so that it can be differentiated with
            respect to ``θ`` (a flatness penalty, :func:`kfrob.penalties.hessian_trace_penalty`);
            its gradient costs a third-order pass, about twice the estimate itself.

    Returns:
        A 0-dim tensor holding the estimate of ``tr(H)``, detached unless ``create_graph``.

    Raises:
        ValueError: if ``n_samples < 1``, if there are no parameters, if a given parameter does
            not require grad, or if the loss is not a scalar.
    """
    _check_n_samples(n_samples)
    if params is None:
        theta = [p for p in model.parameters() if p.requires_grad]
    else:
        theta = list(params)
        if not all(p.requires_grad for p in theta):
            raise ValueError("every tensor in params must require grad")
    if not theta:
        raise ValueError("hessian_trace needs at least one parameter that requires grad")

    inputs, targets = batch
    with torch.enable_grad(), _buffers_preserved(model):
        loss = loss_fn(model(inputs), targets)
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss = loss.reshape(())
        if not loss.requires_grad:  # the loss does not depend on θ at all
            return torch.zeros((), dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)

        # Gradient blocks that are unused or constant in θ have zero Hessian rows (and, by
        # symmetry, zero columns), so only the others enter gᵀv.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:  # the loss is at most linear in θ
            return torch.zeros((), dtype=loss.dtype, device=loss.device)

        quadratic_forms = []
        for _ in range(n_samples):
            probes = [_draw_probe(theta[i], "rademacher", generator) for i in live]
            g_dot_v = sum((grads[i] * v).sum() for i, v in zip(live, probes, strict=True))
            hvps = torch.autograd.grad(
                g_dot_v,
                [theta[i] for i in live],
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            vhv = torch.zeros((), dtype=loss.dtype, device=loss.device)
            for hv, v in zip(hvps, probes, strict=True):
                if hv is not None:  # None: gᵀv does not depend on this block
                    hv = hv if create_graph else hv.detach()
                    vhv = vhv + (hv * v).sum().to(vhv)
            quadratic_forms.append(vhv)
    return torch.stack(quadratic_forms).mean()


def geometric_complexity(
    model: nn.Module,
    inputs: Tensor,
    n_samples: int = 16,
    generator: torch.Generator | None = None,
    *,
    create_graph: bool = False,
) -> Tensor:
    """Estimate the geometric complexity of ``model`` on a batch of inputs.

    Following Dherin et al., "Why neural networks find simple solutions: the many regularizers
    of geometric complexity" (NeurIPS 2022), the geometric complexity on a batch
    ``x_1, ..., x_B`` (samples along dim 0 of ``inputs``) is

        ``GC = (1/B) Σ_b ‖J_b‖²_F``,   ``J_b = ∂f(x_b)/∂x_b``,

    where ``J_b`` is the Jacobian of the flattened output of sample ``b`` with respect to its
    flattened input, of shape ``(out_features, in_features)``.

    It is estimated with random projections of the output: for ``u ~ N(0, I)`` in output space,
    ``E‖uᵀ J‖² = tr(J Jᵀ E[u uᵀ]) = ‖J‖²_F``. One vector–Jacobian product through autograd on the
    whole batch, with an independent probe ``u_b`` per sample, yields every ``u_bᵀ J_b`` at once;
    the returned value is ``(1/(n_samples·B)) Σ_s Σ_b ‖u_{s,b}ᵀ J_b‖²``. Its variance is
    ``(2 / (n_samples·B²)) Σ_b ‖J_b J_bᵀ‖²_F``.

    The per-sample reading of the batched product requires that the model treat samples
    independently: output ``b`` may depend on input ``b`` only. That rules out e.g. BatchNorm in
    train mode (which mixes samples through the batch statistics); put such a model in eval mode
    first. The model is run in whatever mode it is in.

    Args:
        model: maps ``inputs`` of shape ``(B, ...)`` to outputs of shape ``(B, ...)``.
        inputs: a batch of floating-point inputs, samples along dim 0; it is detached, so no
            gradient flows into whatever produced it.
        n_samples: number of probes per sample, at least 1.
        generator: source of the probes; ``None`` uses the default generator.
        create_graph: keep the graph of the estimate (double backward), so that it can be
            differentiated with respect to the model's parameters (a penalty,
            :func:`kfrob.penalties.geometric_complexity_penalty`); its gradient costs about one
            more backward pass per probe.

    Returns:
        A 0-dim tensor holding the estimate of ``GC``, detached unless ``create_graph``.

    Raises:
        ValueError: if ``n_samples < 1``, if ``inputs`` has no batch dimension or is empty, or if
            the output's leading dimension differs from the batch size.
    """
    _check_n_samples(n_samples)
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must have a non-empty batch dim 0, got {tuple(inputs.shape)}")
    batch_size = inputs.shape[0]

    x = inputs.detach().requires_grad_(True)
    with torch.enable_grad(), _buffers_preserved(model):
        outputs = model(x)
        if outputs.dim() == 0 or outputs.shape[0] != batch_size:
            raise ValueError(
                f"model output must have batch size {batch_size} along dim 0, "
                f"got shape {tuple(outputs.shape)}"
            )
        if not outputs.requires_grad:  # the output does not depend on anything
            return torch.zeros((), dtype=outputs.dtype, device=outputs.device)

        total = torch.zeros((), dtype=outputs.dtype, device=outputs.device)
        for _ in range(n_samples):
            u = _draw_probe(outputs, "gaussian", generator)
            (u_jacobian,) = torch.autograd.grad(
                outputs,
                x,
                grad_outputs=u,
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
            if u_jacobian is None:  # the output does not depend on the input
                break
            u_jacobian = u_jacobian if create_graph else u_jacobian.detach()
            total = total + u_jacobian.square().sum()
    return total / (n_samples * batch_size)


# ---------------------------------------------------------------------------------------------
# Curvature of an optimizer's factors
# ---------------------------------------------------------------------------------------------


def factors_of(source: Any) -> Mapping[str, tuple[Tensor, Tensor]]:
    """``{layer: (A, G)}`` from a :class:`~kfrob.KroneckerPreconditioner`, an optimizer
    holding one as ``.preconditioner``, or such a mapping itself (returned as it is).

    Raises:
        ValueError: ``source`` is none of these.
    """
    if isinstance(source, Mapping):
        return source
    preconditioner = getattr(source, "preconditioner", source)
    if not hasattr(preconditioner, "factors"):
        raise ValueError(
            "factors must be {layer: (A, G)}, a KroneckerPreconditioner or an optimizer "
            f"holding one as .preconditioner, got {type(source).__name__}"
        )
    return preconditioner.factors()


def fisher_trace(source: Any) -> Tensor:
    """``Σ_layers tr(A ⊗ G) = Σ_layers Σ_blocks tr(A)·tr(G)``: the trace of the Kronecker-factored
    curvature, read off the running factors at no extra cost (identity sides count
    ``tr(I) = n``). ``source`` is anything :func:`factors_of` takes. A 0-dim tensor on the
    factors' device."""
    traces = [
        (
            torch.diagonal(a, dim1=-2, dim2=-1).sum(-1)
            * torch.diagonal(g, dim1=-2, dim2=-1).sum(-1)
        ).sum()
        for a, g in factors_of(source).values()
    ]
    return torch.stack(traces).sum() if traces else torch.zeros(())


def step_diagnostics(
    preconditioner: KroneckerPreconditioner, plan: StepPlan, damping: Mapping[str, float]
) -> dict[str, float]:
    """Diagnostics of a step, as a flat dict: ``plan`` is
    :meth:`KroneckerPreconditioner.plan` of the directions (or a step rule's
    :meth:`~kfrob.rules.StepRule.step_plan`), ``damping`` each layer's ``λ``.

    Per preconditioned layer ``name`` (``g`` its direction matrix ``[∇W + wd·W, ∇b]``,
    ``Δ`` its update: the plan's ``taken`` where a step rule set it, else ``lr·ν·R(g)`` with
    ``R`` the damped preconditioner and ``ν`` the KL clip):

    * ``{name}/grad_norm``: ``‖g‖_F``; ``{name}/grad_norm_metric``: ``sqrt⟨g, R(g)⟩``, the
      dual norm of ``g`` in the damped metric;
    * ``{name}/update_norm``: ``‖Δ‖_F``; ``{name}/update_norm_metric``:
      ``sqrt(tr(A Δᵀ G Δ))``, the step's length in the (undamped) factor metric;
    * ``{name}/damping``: ``λ``; ``{name}/cond_A``, ``{name}/cond_G``: the factors' condition
      numbers ``e_max / e_min`` (largest over blocks; ``inf`` for a singular factor);
    * ``{name}/nuclear_frobenius_ratio``: ``‖[W, b]‖_* / ‖[W, b]‖_F`` of the layer's parameters,
      a smooth effective rank;
    * ``{name}/rank_A``, ``{name}/rank_G``: the eigenpairs a full side keeps (its width when
      dense, the ``rank`` when low-rank; see :meth:`KroneckerPreconditioner.structures`);

    and globally ``kl_clip_factor`` (``ν``) and ``fisher_trace`` (:func:`fisher_trace`). Every
    norm comes from :mod:`kfrob.norms`. Values are Python floats (this reads to the host).
    """
    nu = plan.kl_clip_factor
    factors = preconditioner.factors()
    structures = preconditioner.structures()
    out: dict[str, float] = {}
    for step in plan.layers:
        name = step.layer.name
        a, g = (f if f.dim() == 3 else f.unsqueeze(0) for f in factors[name])
        update = step.lr * nu * step.preconditioned if step.taken is None else step.taken
        params = step.layer.math.parameter_matrix()
        metric_sq = frobenius_norm(update, codomain=g, domain_inverse=a, check=False).square()
        values = {
            "grad_norm": frobenius_norm(step.matrix).square().sum().sqrt(),
            "grad_norm_metric": frobenius_inner(step.matrix, step.preconditioned).sum().sqrt(),
            "update_norm": frobenius_norm(update).square().sum().sqrt(),
            "update_norm_metric": metric_sq.sum().sqrt(),
            "damping": torch.tensor(float(damping[name])),
            "cond_A": _condition_number(a),
            "cond_G": _condition_number(g),
            "nuclear_frobenius_ratio": nuclear_to_frobenius_ratio(params).mean(),
        }
        out.update({f"{name}/{key}": float(value) for key, value in values.items()})
        widths = {"domain": ("A", a.shape[-1]), "codomain": ("G", g.shape[-1])}
        for side, choice in structures.get(name, {}).items():
            label, width = widths[side]
            rank = preconditioner.options.inverse.rank
            out[f"{name}/rank_{label}"] = float(rank if choice.structure == "low_rank" else width)
    out["kl_clip_factor"] = float(nu)
    out["fisher_trace"] = float(fisher_trace(preconditioner))
    return out


def _condition_number(factor: Tensor) -> Tensor:
    """Largest ``e_max / e_min`` over the blocks of a symmetric PSD ``(k, n, n)`` factor."""
    eigenvalues = torch.linalg.eigvalsh(factor.double())
    return (eigenvalues[..., -1] / eigenvalues[..., 0].clamp(min=0)).max()
