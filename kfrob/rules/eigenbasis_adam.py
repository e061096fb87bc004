"""Adam in each layer's Kronecker eigenbasis: ``step_rule="eigenbasis_adam"``, the default
rule of :class:`kfrob.FrobPreconditionedSGD`.

A layer's gradient matrix ``V`` ``(k, out, in)`` is rotated into the eigenbases of its
factors, ``A = Q_A diag(e_A) Q_Aᵀ`` and ``G = Q_G diag(e_G) Q_Gᵀ`` (from the layer's last
exact-damping refresh; a diagonal or identity side's basis is the coordinate basis), and
Adam runs on the rotated entries:

    m ← β₁ m + (1 − β₁) V                          (in the parameters' own coordinates)
    v ← β₂ v + (1 − β₂) (Q_Gᵀ V Q_A)²              (elementwise, in the eigenbasis)
    Δ = Q_G [ (Q_Gᵀ m Q_A / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε) ] Q_Aᵀ

and the parameters move by ``−lr · Δ`` (with decoupled weight decay ``−lr · wd · W``, as
in AdamW). This is SOAP's rule (Vyas et al., 2025) with K-FAC's factors in place of
Shampoo's: K-FAC supplies the directions, Adam's second moment the scale along each, so the
step needs neither damping nor a KL clip to be well scaled. The first moment lives in the
parameters' coordinates and is rotated each step, so a refresh of the bases never stales
it; the second moment is kept across refreshes. Between refreshes the rotated first moment
``Q_Gᵀ m Q_A`` is advanced by the same recursion with the rotated gradient (the rotation is
linear), so a step rotates twice (the gradient in, the direction out), not three times; it
is rotated afresh from ``m`` after each refresh. Parameters without Kronecker factors get
plain Adam (their basis is the coordinate basis).

Rotated entries whose root mean square ``√v`` is at the rounding level of the rotation
(at most ``n · ε_machine`` times the largest entry mixed into them, ``n`` the width mixed
over) take no step: the gradient has no component there (e.g. along the all-ones direction
of a softmax layer's outputs, where the loss is constant), so they are rounding noise,
which Adam's normalisation would otherwise turn into steps as long as any other. A side
held in coordinates (diagonal, identity) mixes nothing: an embedding's column of a rare
token is measured against itself, not against the common tokens'.

A layer whose inverse holds no eigenbases (a structured side: low-rank or block-diagonal,
under ``damping_method="exact_where_dense"``) runs Adam in its own coordinates and takes
the K-FAC direction of the bias-corrected first moment at the length of that Adam step,
``Δ = D · ‖N‖_F / ‖D‖_F`` with ``D = (A ⊗ G + λI)⁻¹ m̂`` and ``N = m̂ / (√v̂ + ε)`` (as
:mod:`kfrob.rules.adam_grafted` does, with the same graft): rotating a wide side every
step would cost more than the layer's own pass, and the structured inverse keeps the
curvature's direction for less.

State per parameter, in ``optimizer.state[p]``: ``"step"``, ``"exp_avg"`` and
``"exp_avg_sq"``, parameter-shaped, except that a layer's weight holds its layer's
``(k, out, in)`` matrices (``m`` in the parameters' coordinates, ``v`` rotated, and
``"exp_avg_rotated"``, ``m`` in the eigenbases, so that a checkpoint resumes bit for bit)
and its bias none of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kfrob.finite import select
from kfrob.kronecker import EigenInverse, InverseFactors, rotate_by
from kfrob.options import PreconditionerOptions, require
from kfrob.rules.adam import AdamRule, advance_all, blend_, graft_, normalised_all, plain_adam
from kfrob.rules.base import StepRule, register_rule

__all__ = ["EigenbasisAdam", "Rotations", "adam_directions", "held_bases"]


Bases = tuple[Tensor | None, Tensor | None]


@dataclass
class Rotations:
    """What :func:`adam_directions` keeps between steps, all derived (rebuilt by
    :func:`held_bases` when a state is loaded): ``held``, the bases each layer's rotated
    first moment was rotated into (by weight); ``stacked``, the bases of layers of one shape
    stacked ``(L, k, n, n)`` for batched rotations, with the per-layer bases they stack."""

    held: dict[Tensor, Bases] = field(default_factory=dict)
    stacked: dict[tuple[int, ...], tuple[list[Bases], Bases]] = field(default_factory=dict)


class _Layer(NamedTuple):
    weight: Tensor
    math: Any
    inverse: EigenInverse | InverseFactors | None
    gradient: Tensor  # (k, out, in), in the factors' dtype
    owned: bool  # whether ``gradient`` shares no memory with the raw gradients


def _bases_of(inverse: EigenInverse | InverseFactors | None) -> Bases:
    bases = None if inverse is None else inverse.eigenbases
    return (None, None) if bases is None else bases


def _rotates(inverse: EigenInverse | InverseFactors | None) -> bool:
    """Whether the layer's inverse holds eigenbases (a structured one grafts instead)."""
    return inverse is not None and inverse.eigenbases is not None


def _batches(matrices: list[Tensor], bases: list[Bases]) -> list[list[int]]:
    """Indices of the matrices that rotate as one batch: same shape, dtype and device, and
    bases of the same shapes."""
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, (matrix, sides) in enumerate(zip(matrices, bases, strict=True)):
        shapes = tuple(None if q is None else q.shape for q in sides)
        batches.setdefault((matrix.shape, matrix.dtype, matrix.device, shapes), []).append(i)
    return list(batches.values())


def _stacked(rotations: Rotations, members: list[Bases], used: dict) -> Bases:
    """The members' bases stacked ``(L, k, n, n)`` per side (``None``: not rotated),
    reused from ``rotations`` while they are the same tensors (a stack holds its members,
    so their ids are not reused while it is kept); ``used`` collects what stays kept."""
    key = tuple(id(q) for sides in members for q in sides)
    kept = rotations.stacked.get(key)
    if kept is None:
        stacks = tuple(
            None if side[0] is None else torch.stack(side)  # type: ignore[arg-type]
            for side in zip(*members, strict=True)
        )
        kept = (members, stacks)  # type: ignore[assignment]
    used[key] = kept
    return kept[1]  # type: ignore[return-value]


def _rotate_all(
    rotations: Rotations, matrices: list[Tensor], bases: list[Bases], used: dict,
    back: bool = False, support: list[Tensor] | None = None,
) -> list[Tensor]:  # fmt: skip
    """Each matrix ``(k, out, in)`` rotated into (or, with ``back``, out of) its bases, the
    layers of one shape as one stacked batch; with ``support`` (each layer's rotated second
    moment) the entries at the rounding floor are zeroed first (:func:`_support`)."""
    rotated: list[Tensor] = list(matrices)
    for members in _batches(matrices, bases):
        sides = [bases[i] for i in members]
        if all(q is None for q in sides[0]):
            continue
        stack = torch.stack([matrices[i] for i in members])
        if support is not None:
            stack = stack * _support(torch.stack([support[i] for i in members]), sides[0])
        stack = rotate_by(stack, *_stacked(rotations, sides, used), back=back)
        for i, value in zip(members, stack.unbind(), strict=True):
            rotated[i] = value
    return rotated


def _support(v: Tensor, bases: Bases) -> Tensor | float:
    """``(..., k, out, in)``: 1 where an entry's root mean square ``√v`` is above the
    rounding floor of the rotation, else 0. A rotated side mixes the entries along its
    dimension, so the floor is ``n · ε_machine`` times the largest entry the rotation mixed
    into this one (``n`` the width it mixed over); with no side rotated there is no floor
    (``1.0``)."""
    mixed = [d for d, basis in zip((-2, -1), bases, strict=True) if basis is not None]
    if not mixed:
        return 1.0
    rms = v.sqrt()
    width = sum(v.shape[d] for d in mixed)
    floor = rms.amax(dim=mixed, keepdim=True) * (width * torch.finfo(v.dtype).eps)
    return (rms > floor).to(v.dtype)


def held_bases(
    layers: Mapping[Tensor, tuple[Any, EigenInverse | InverseFactors | None]],
    state: Mapping[Tensor, dict[str, Any]],
) -> Rotations:
    """What :func:`adam_directions` keeps in ``rotations`` for a state just loaded together
    with its inverses: each layer's rotated first moment was rotated into the bases of the
    inverse it was saved with."""
    return Rotations(
        held={
            weight: _bases_of(inverse)
            for weight, (_, inverse) in layers.items()
            if _rotates(inverse) and "exp_avg_rotated" in state.get(weight, {})
        }
    )


@torch.no_grad()
def adam_directions(
    groups: list[dict[str, Any]],
    state: Mapping[Tensor, dict[str, Any]],
    directions: dict[Tensor, Tensor],
    layers: Mapping[Tensor, tuple[Any, EigenInverse | InverseFactors | None]],
    finite: Tensor,
    rotations: Rotations,
) -> None:
    """Replace each entry of ``directions`` (raw gradients) by its Adam direction ``Δ``.

    ``layers`` maps each preconditioned layer's weight to ``(its LayerMath, its inverse
    or None)`` (an :class:`InverseFactors` grafts, see the module docstring); a layer's
    weight and bias share one rotated second moment, so the layer's whole matrix moves
    together. ``groups`` are the optimizer's parameter groups (``betas``, ``eps``);
    ``state`` its per-parameter state (with each rotated layer's rotated first moment);
    ``rotations`` what the optimizer keeps between steps (:class:`Rotations`). Layers of one
    shape rotate as one batch, and each of Adam's operations is one ``torch._foreach``
    kernel over all layers of a parameter group and device."""
    settings = {p: g for g in groups for p in g["params"]}
    parts: dict[tuple[Any, ...], list[_Layer]] = {}
    for weight, (math, inverse) in layers.items():
        if weight not in directions or not math.covers(directions):
            continue
        gradient = math.gradient_matrix(directions).to(math.factor_dtype)  # type: ignore[union-attr]
        owned = _owns(gradient, [directions[p] for p in math.parameters])
        group = settings[weight]
        key = (id(group), gradient.device)
        parts.setdefault(key, []).append(_Layer(weight, math, inverse, gradient, owned))
    used: dict[tuple[int, ...], Any] = {}
    done: set[Tensor] = set()
    for part in parts.values():
        group = settings[part[0].weight]
        moved = _part(part, group, state, finite, rotations, used)
        for layer, direction in zip(part, moved, strict=True):
            for p, value in layer.math.split(direction).items():
                directions[p] = value.to(p.dtype)
                done.add(p)
    rotations.stacked = used
    plain = {p: g for p, g in directions.items() if p not in done}
    directions.update(plain_adam(groups, state, plain, finite)[1])


def _part(
    layers: list[_Layer], group: dict[str, Any], state: Mapping[Tensor, dict[str, Any]],
    finite: Tensor, rotations: Rotations, used: dict,
) -> list[Tensor]:  # fmt: skip
    """The Adam directions ``(k, out, in)`` of layers that share a parameter group and a
    device."""
    (beta1, beta2), eps = group["betas"], group["eps"]
    bases = [_bases_of(layer.inverse) for layer in layers]
    finite = finite.to(layers[0].gradient.device)
    safe = [_zeroed_unless(finite, layer) for layer in layers]
    gate = finite.to(safe[0].dtype)
    rotated = _rotate_all(rotations, safe, bases, used)
    states = [state[layer.weight] for layer in layers]
    for layer, s in zip(layers, states, strict=True):
        if "exp_avg" not in s:  # a fresh state: nothing kept applies
            rotations.held.pop(layer.weight, None)
    m, v, steps, spare = advance_all(states, safe, rotated, gate, beta1, beta2)
    means = _rotated_means(layers, states, m, rotated, bases, gate * (1 - beta1), rotations, used)
    unbiased, adam = normalised_all(means, v, steps, beta1, beta2, eps, into=spare)
    adam = _rotate_all(rotations, adam, bases, used, back=True, support=v)
    for i, layer in enumerate(layers):
        if layer.inverse is not None and not _rotates(layer.inverse):
            adam[i] = _grafted(layer.inverse, unbiased[i], adam[i])
    return adam


def _owns(matrix: Tensor, sources: list[Tensor]) -> bool:
    """Whether ``matrix`` shares no memory with any of ``sources`` (a sparse source was
    densified into a new tensor)."""
    memory = matrix.untyped_storage().data_ptr()
    return all(s.is_sparse or s.untyped_storage().data_ptr() != memory for s in sources)


def _zeroed_unless(finite: Tensor, layer: _Layer) -> Tensor:
    """The layer's gradient, or zeros where the 0-dim ``finite`` is False: in place when
    the layer owns it (a fresh temporary as large as a layer costs page faults on a CPU)."""
    if layer.owned:
        return layer.gradient.masked_fill_(finite.logical_not(), 0.0)
    return select(finite, layer.gradient, 0.0)


def _rotated_means(
    layers: list[_Layer], states: list[dict[str, Any]], m: list[Tensor], rotated: list[Tensor],
    bases: list[Bases], weight: Tensor, rotations: Rotations, used: dict,
) -> list[Tensor]:  # fmt: skip
    """Each layer's first moment in its eigenbases, ``Q_Gᵀ m Q_A`` (``m`` itself where no
    side rotates): the state's ``"exp_avg_rotated"`` advanced by the rotated gradient
    (``weight`` ``= f (1 − β₁)``) while ``rotations`` says it was rotated into these bases,
    else rotated afresh (after a refresh, or with nothing kept)."""
    means = list(m)
    held, fresh = [], []
    for i, (layer, s) in enumerate(zip(layers, states, strict=True)):
        if not _rotates(layer.inverse):
            continue
        before = rotations.held.get(layer.weight)
        same = before is not None and all(a is b for a, b in zip(before, bases[i], strict=True))
        (held if same and "exp_avg_rotated" in s else fresh).append(i)
        rotations.held[layer.weight] = bases[i]
    if held:
        kept = [states[i]["exp_avg_rotated"] for i in held]
        blend_(kept, [rotated[i] for i in held], weight)
        for i, mean in zip(held, kept, strict=True):
            means[i] = mean
    if fresh:
        new = _rotate_all(rotations, [m[i] for i in fresh], [bases[i] for i in fresh], used)
        for i, mean in zip(fresh, new, strict=True):
            means[i] = states[i]["exp_avg_rotated"] = mean.clone()
    return means


def _grafted(inverse: InverseFactors, unbiased: Tensor, adam: Tensor) -> Tensor:
    """``D · ‖N‖_F / ‖D‖_F``: the K-FAC direction ``D`` of the bias-corrected first moment
    ``unbiased`` at the length of the Adam direction ``N`` (``adam``). ``D`` is scaled in
    place, and is ``unbiased`` itself when both sides are the identity: the caller does not
    use ``unbiased`` again."""
    direction = inverse.apply(unbiased)
    graft_([direction], [adam])
    return direction


@register_rule
class EigenbasisAdam(AdamRule):
    """Adam in each layer's Kronecker eigenbasis (module docstring). Its defaults: exact
    eigenbases where every side of a layer is dense (the cost model makes wide sides
    low-rank, and those layers graft), no KL clip, factors every 10 steps and eigenbases
    every 40, the empirical Fisher and a dense budget of 0.4 (each measured in
    ``docs/performance.md#step-rules``)."""

    name = "eigenbasis_adam"
    defaults: Mapping[str, Any] = {
        "damping_method": "exact_where_dense",
        "kl_clip": None,
        "factor_update_freq": 10,
        "inverse_update_freq": 40,
        "fisher": "empirical",
        "dense_budget": 0.4,
    }

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self.rotations = Rotations()

    @classmethod
    def check(cls, options: PreconditionerOptions, nesterov: bool) -> None:
        """Also: eigenbases (exact damping), no eigenvalue correction, and inverses that every
        rank holds."""
        super().check(options, nesterov)
        rule, inverse = f"with step_rule={cls.name!r}", options.inverse
        require(
            "damping_method", inverse.damping_method,
            inverse.damping_method in ("exact", "exact_where_dense"),
            f"'exact' or 'exact_where_dense' {rule} (its eigenbases carry the rotation)",
        )  # fmt: skip
        require(
            "eigenvalue_correction", inverse.eigenvalue_correction,
            not inverse.eigenvalue_correction, f"False {rule} (Adam's second moment replaces it)",
        )  # fmt: skip
        placement = options.parallel.inverse_placement
        require(
            "inverse_placement", placement, placement == "replicated",
            f"'replicated' {rule} (every rank rotates its own gradients)",
        )  # fmt: skip

    def layers(self) -> dict[Tensor, tuple[Any, EigenInverse | InverseFactors | None]]:
        """Each active layer's weight, with its math and its inverse (``None`` before its
        first refresh)."""
        pre = self.host.preconditioner
        return {
            layer.math.weight: (layer.math, pre.inverses.get(layer.name))
            for layer in pre.active_layers()
        }

    @torch.no_grad()
    def directions(
        self, directions: dict[Tensor, Tensor], finite: Tensor,
        state: Mapping[Tensor, dict[str, Any]],
    ) -> None:  # fmt: skip
        groups = self.host.param_groups
        adam_directions(groups, state, directions, self.layers(), finite, self.rotations)

    def fork(self) -> StepRule:
        twin = copy.copy(self)
        twin.rotations = Rotations(dict(self.rotations.held), dict(self.rotations.stacked))
        return twin

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The rotated first moments were rotated into the loaded inverses' bases."""
        self.rotations = held_bases(self.layers(), self.host.state)
