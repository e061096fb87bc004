"""The Kronecker-factored preconditioner: tracked layers, their factors and damped inverses.

For every supported layer it keeps a domain factor ``A`` and a co-domain factor ``G`` (or
neither for an identity side), refreshes their damped inverses on request, and maps a
layer's gradient matrix ``V`` (``(blocks, out, in)``, bias last) to its Riesz
representative in the chosen Frobenius-type metric, ``(A ⊗ G + λI)^{-p} vec(V)``.
It holds no optimizer bookkeeping (learning rates, momentum, step control): see
:class:`kfrob.FrobPreconditionedSGD`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from kfrob.capture import CurvatureCapture, TrackedLayer
from kfrob.factors import RunningFactor
from kfrob.fisher import SAMPLED_LOSSES
from kfrob.kronecker import (
    EigenInverse,
    InverseFactors,
    Side,
    decompose,
    eigen_scaling,
    factored_inverses,
)
from kfrob.layers import layer_math, unsupported_reason

__all__ = [
    "CODOMAINS",
    "DAMPING_METHODS",
    "DOMAINS",
    "FISHERS",
    "LOSS_REDUCTIONS",
    "KroneckerPreconditioner",
]

DOMAINS = ("covariance", "diagonal", "identity")
CODOMAINS = ("fisher", "diagonal", "identity")
DAMPING_METHODS = ("exact", "factored")
FISHERS = ("empirical", "mc")
LOSS_REDUCTIONS = ("mean", "sum")

Inverse = EigenInverse | InverseFactors


class KroneckerPreconditioner:
    """Kronecker factors of ``model``'s ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers.

    Args:
        model: the model; hooks go on its supported submodules.
        domain: ``"covariance"`` (``A``), ``"diagonal"`` (``diag A``) or ``"identity"``.
        codomain: ``"fisher"`` (``G``), ``"diagonal"`` (``diag G``) or ``"identity"``.
        exponent: ``p`` in ``(A ⊗ G + λI)^{-p}``: 1 for K-FAC, ½ for an inverse root.
        damping_method: ``"exact"`` (eigenbases, damps the Kronecker product) or
            ``"factored"`` (π-damping of each factor; Cholesky inverses when ``p = 1``).
        fisher: ``"empirical"`` (gradients of the training loss) or ``"mc"`` (gradients of a
            loss with labels drawn from the model; needs ``loss``).
        loss: the training loss kind for ``fisher="mc"``: ``"cross_entropy"`` or ``"mse"``.
        loss_reduction: ``"mean"`` or ``"sum"``: how the training loss reduces over samples.
        generator: random generator for the MC Fisher's labels.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        domain: str = "covariance",
        codomain: str = "fisher",
        exponent: float = 1.0,
        damping_method: str = "exact",
        fisher: str = "empirical",
        loss: str | None = None,
        loss_reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        self.domain = domain
        self.codomain = codomain
        self.exponent = exponent
        self.damping_method = damping_method
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.layers: dict[str, TrackedLayer] = {}
        self.unsupported: dict[str, str] = {}
        self.disabled: dict[str, str] = {}
        self.inverses: dict[str, Inverse] = {}
        self.skipped_windows = torch.zeros((), dtype=torch.long)
        self._collect_layers(model)
        sampled_loss = SAMPLED_LOSSES[loss] if fisher == "mc" and loss is not None else None
        self.capture = CurvatureCapture(model, self.layers.values(), sampled_loss, generator)

    # --- set-up --------------------------------------------------------------------------
    def _collect_layers(self, model: nn.Module) -> None:
        owners: dict[int, list[str]] = {}
        modules = list(model.named_modules())
        for name, module in modules:
            for p in module.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        for name, module in modules:
            if not list(module.parameters(recurse=False)):
                continue
            math = layer_math(module)
            shared = sorted(
                {other for p in module.parameters(recurse=False) for other in owners[id(p)]}
                - {name}
            )
            label = name or type(module).__name__
            if math is None:
                self.unsupported[label] = str(unsupported_reason(module))
            elif shared:
                tied = ", ".join(other or type(model).__name__ for other in shared)
                self.unsupported[label] = f"its parameters are tied to {tied}"
            else:
                device = module.weight.device  # type: ignore[union-attr]
                self.layers[name] = TrackedLayer(
                    name,
                    module,
                    math,
                    self._factor(self.domain, math.blocks, math.in_features, False, device),
                    self._factor(self.codomain, math.blocks, math.out_features, True, device),
                )
        if self.unsupported:
            listing = "; ".join(f"{n} ({why})" for n, why in self.unsupported.items())
            warnings.warn(
                f"kfrob: these modules' parameters get plain SGD updates: {listing}",
                stacklevel=4,
            )

    @staticmethod
    def _factor(
        kind: str, blocks: int, size: int, codomain: bool, device: torch.device
    ) -> RunningFactor | None:
        if kind == "identity":
            return None
        return RunningFactor(
            blocks, size, diagonal=kind == "diagonal", per_sample_scale=codomain, device=device
        )

    # --- inspection ----------------------------------------------------------------------
    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{layer name: (A, G)}``: current running factors, bias coordinate last.

        Matrices are ``(in, in)`` and ``(out, out)``, or ``(groups, ·, ·)`` for grouped
        convolutions; diagonal sides are returned as diagonal matrices and identity sides as
        identities.
        """
        out: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self.layers.items():
            math = layer.math
            pair = tuple(
                _as_matrix(factor, math.blocks, size, layer.module.weight.device)  # type: ignore[union-attr]
                for factor, size in (
                    (layer.domain, math.in_features),
                    (layer.codomain, math.out_features),
                )
            )
            a, g = (m.squeeze(0) if math.blocks == 1 else m for m in pair)
            out[name] = (a, g)
        return out

    def eigenvalues(self) -> dict[str, dict[str, Tensor]]:
        """``{layer name: {"A": eigenvalues, "G": eigenvalues}}`` of the factors behind each
        current inverse, ascending, ``(blocks, n)``; identity sides are left out.

        Exact damping stores them with its eigenbases; for factored (Cholesky) inverses they
        are computed here from the current factors with ``torch.linalg.eigvalsh``.
        """
        out: dict[str, dict[str, Tensor]] = {}
        for name, inverse in self.inverses.items():
            layer = self.layers[name]
            if isinstance(inverse, EigenInverse):
                sides = {"A": inverse.domain, "G": inverse.codomain}
                out[name] = {k: s.eigenvalues for k, s in sides.items() if s.estimated}
            else:
                factors = {"A": layer.domain, "G": layer.codomain}
                out[name] = {
                    k: torch.linalg.eigvalsh(f.value) for k, f in factors.items() if f is not None
                }
        return out

    def active_layers(self) -> Iterator[TrackedLayer]:
        """Layers that are preconditioned (not fallen back to plain SGD)."""
        return (layer for name, layer in self.layers.items() if name not in self.disabled)

    # --- factors -------------------------------------------------------------------------
    def update_factors(
        self, decay: float, grad_scale: Tensor | None = None, accept: Tensor | None = None
    ) -> Tensor:
        """Fold the statistics recorded since the last call into the running factors.

        A window is accepted for all layers or for none: if any statistic is non-finite
        (a NaN/Inf batch, or a loss-scale overflow) every layer keeps its previous factors.
        ``grad_scale`` is the loss scale the backward pass ran under; it is removed from
        ``G``. ``accept`` (a bool tensor) can veto the window, e.g. for non-finite gradients.
        Returns whether the window was accepted (a bool tensor; no host sync).
        """
        pending = [
            (f, f is layer.codomain)
            for layer in self.layers.values()
            for f in layer.factors
            if f.pending
        ]
        if not pending:
            return torch.ones((), dtype=torch.bool) if accept is None else accept
        stats = []
        for factor, is_codomain in pending:
            repeats = self.capture.calls_per_forward(factor)
            # the MC Fisher's sampled loss is a per-sample sum (see kfrob.fisher)
            reduction = "sum" if is_codomain and self.fisher == "mc" else self.loss_reduction
            stat = factor.statistic(reduction, repeats)
            # the MC Fisher differentiates its own, unscaled loss: only the empirical G
            # carries the loss scale of the training backward
            if is_codomain and grad_scale is not None and self.fisher == "empirical":
                stat = stat / grad_scale.to(stat).square()
            stats.append(stat)
        finite = torch.stack([torch.isfinite(s).all() for s in stats]).all()
        accept = finite if accept is None else finite & accept.to(finite.device)
        for (factor, _), stat in zip(pending, stats, strict=True):
            factor.fold(stat, decay, accept)
        self.capture.new_window()
        self.skipped_windows = self.skipped_windows.to(accept.device) + (~accept).long()
        return accept

    # --- inverses ------------------------------------------------------------------------
    def missing_inverses(self) -> bool:
        """Whether some active layer that has run forward has no inverse yet."""
        return any(
            layer.forward_calls > 0 and layer.name not in self.inverses
            for layer in self.active_layers()
        )

    def update_inverses(self, damping: dict[str, float], only_missing: bool = False) -> None:
        """Recompute each active layer's damped inverse from its current factors.

        ``damping`` maps layer names to ``λ``. A layer whose hooks never fired although its
        weight has a gradient falls back to plain SGD with a warning. A decomposition that
        fails even in float64 keeps the layer's last good inverse (warned once per layer).
        ``only_missing`` refreshes only layers that have no inverse yet.
        """
        for name, layer in self.layers.items():
            if name in self.disabled or (only_missing and name in self.inverses):
                continue
            weight, bias = layer.module.weight, layer.module.bias  # type: ignore[union-attr]
            if not weight.requires_grad:  # frozen: nothing to precondition, nothing to refresh
                continue
            if layer.math.has_bias != (bias is not None and bias.requires_grad):
                self._disable(name, "its bias was frozen or unfrozen after kfrob was created")
                continue
            if not all(bool(f.initialized) for f in layer.factors):
                if layer.forward_calls == 0 and weight.grad is not None:
                    self._disable(name, "its forward hooks never fired (called functionally?)")
                continue
            inverse = self._inverse(layer, damping[name])
            if inverse is None:
                if name not in self.inverses:
                    self._disable(name, "its factors could not be decomposed")
                else:
                    warnings.warn(
                        f"kfrob: decomposition failed for {name}; keeping its last inverse",
                        stacklevel=3,
                    )
                continue
            self.inverses[name] = inverse

    def _inverse(self, layer: TrackedLayer, damping: float) -> Inverse | None:
        math = layer.math
        factors = (layer.codomain, layer.domain)
        if (
            self.damping_method == "factored"
            and self.exponent == 1.0
            and all(f is None or not f.diagonal for f in factors)
        ):
            values = [f.value if f is not None else None for f in factors]
            return factored_inverses(values[0], values[1], damping)
        sides: list[Side] = []
        for factor, size in zip(factors, (math.out_features, math.in_features), strict=True):
            if factor is None:
                ones = torch.ones(math.blocks, size, device=layer.module.weight.device)  # type: ignore[union-attr]
                sides.append(Side(None, ones, estimated=False))
                continue
            side = decompose(factor.value, diagonal=factor.diagonal)
            if side is None:
                return None
            sides.append(side)
        scaling = eigen_scaling(sides[0], sides[1], damping, self.exponent, self.damping_method)
        return EigenInverse(sides[0], sides[1], scaling)

    def _disable(self, name: str, reason: str) -> None:
        self.disabled[name] = reason
        self.inverses.pop(name, None)
        warnings.warn(f"kfrob: {name} falls back to plain SGD: {reason}", stacklevel=4)

    # --- preconditioning -----------------------------------------------------------------
    def precondition(self, name: str, matrix: Tensor) -> Tensor | None:
        """The layer's preconditioned gradient matrix in float32, or ``None`` if it has no
        inverse yet."""
        inverse = self.inverses.get(name)
        if inverse is None or name in self.disabled:
            return None
        return inverse.apply(matrix.to(torch.float32))

    # --- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": {
                name: {
                    "domain": layer.domain.state_dict() if layer.domain else None,
                    "codomain": layer.codomain.state_dict() if layer.codomain else None,
                    "inverse": self.inverses[name].state_dict() if name in self.inverses else None,
                }
                for name, layer in self.layers.items()
            },
            "disabled": dict(self.disabled),
            "skipped_windows": self.skipped_windows,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the layer if ``state`` does not fit this model."""
        saved = state.get("layers") if isinstance(state, dict) else None
        if not isinstance(saved, dict):
            raise ValueError("kfrob state has no 'layers' entry")
        missing = sorted(set(self.layers) - set(saved))
        extra = sorted(set(saved) - set(self.layers))
        if missing or extra:
            raise ValueError(
                f"kfrob state does not match the model: missing layers {missing}, "
                f"unexpected layers {extra}"
            )
        for name, layer in self.layers.items():
            for side in ("domain", "codomain"):
                factor: RunningFactor | None = getattr(layer, side)
                entry = saved[name].get(side)
                if (factor is None) != (entry is None):
                    raise ValueError(f"kfrob state for layer {name!r}: {side} factor mismatch")
                if factor is not None and entry["value"].shape != factor.value.shape:
                    raise ValueError(
                        f"kfrob state for layer {name!r}: {side} factor of shape "
                        f"{tuple(entry['value'].shape)}, expected {tuple(factor.value.shape)}"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load factors and inverses onto each layer's device; nothing changes on error."""
        self.check_state_dict(state)
        saved = state["layers"]
        for name, layer in self.layers.items():
            for factor, entry in zip(layer.factors, _present(saved[name]), strict=True):
                factor.load_state_dict(entry)
            device = layer.module.weight.device  # type: ignore[union-attr]
            inverse = saved[name]["inverse"]
            if inverse is None:
                self.inverses.pop(name, None)
            else:
                kind = EigenInverse if inverse["kind"] == "eigen" else InverseFactors
                self.inverses[name] = kind.from_state_dict(inverse, device)
        self.disabled = dict(state.get("disabled", {}))
        self.skipped_windows = state["skipped_windows"].clone()

    def remove_hooks(self) -> None:
        self.capture.remove()


def _present(entry: dict[str, Any]) -> list[dict[str, Tensor]]:
    """The saved factor states of a layer in ``TrackedLayer.factors`` order."""
    return [entry[side] for side in ("domain", "codomain") if entry[side] is not None]


def _as_matrix(
    factor: RunningFactor | None, blocks: int, size: int, device: torch.device
) -> Tensor:
    if factor is None:
        return torch.eye(size, device=device).expand(blocks, size, size)
    if factor.diagonal:
        return torch.diag_embed(factor.value)
    return factor.value
