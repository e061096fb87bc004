"""kfrob's options: one frozen dataclass per concern, validated once, here.

* :class:`CurvatureOptions` — what is measured: the inner products on each side, the Fisher,
  how weight sharing enters the factors, and their running average;
* :class:`InverseOptions` — how the damped inverse is computed (the damping method, its
  exponent, how eigenbases are refreshed, the eigenvalue correction);
* :class:`ScheduleOptions` — how often factors and inverses are updated;
* :class:`ParallelOptions` — the process group and where inverses live under data parallelism;
* :class:`DampingAdaptation` — the Levenberg–Marquardt rule for ``λ``;
* :class:`PreconditionerOptions` — all of the above, with the damping ``λ`` and the KL clip.

Every field is a plain value with a ``Literal`` or numeric type, so configs (YAML, jsonargparse)
can build them. An invalid value raises ``ValueError("invalid <name>=<value>: expected
<allowed>")`` with the flat keyword name users pass to :class:`kfrob.FrobPreconditionedSGD`.
:meth:`PreconditionerOptions.from_flat` builds the objects from those flat keywords.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from kfrob.structure import Structure

__all__ = [
    "CurvatureOptions",
    "DampingAdaptation",
    "InverseOptions",
    "ParallelOptions",
    "PreconditionerOptions",
    "ScheduleOptions",
    "check_group",
    "flat_parameters",
    "with_flat_keywords",
]

Domain = Literal["covariance", "diagonal", "identity"]
Codomain = Literal["fisher", "diagonal", "identity"]
Fisher = Literal["empirical", "mc"]
Loss = Literal["cross_entropy", "mse"]
LossReduction = Literal["mean", "sum"]
WeightSharing = Literal["expand", "reduce"]
DampingMethod = Literal["factored", "exact", "exact_where_dense"]
EigenbasisRefresh = Literal["eigh", "subspace"]
InversePlacement = Literal["replicated", "owner"]
Source = Literal["activations", "gradients"]
#: where a layer's factors come from: ``"activations"``, the hooks' inputs and per-sample
#: output gradients (K-FAC's ``A``, ``G``); ``"gradients"``, the gradient matrices themselves
#: (Shampoo's ``R = E[Vᵀ V]``, ``L = E[V Vᵀ]``)
SOURCES: tuple[str, ...] = get_args(Source)


def require(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ``ValueError`` naming the option unless ``ok``."""
    if not ok:
        raise ValueError(f"invalid {name}={value!r}: expected {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _bool(name: str, value: Any) -> None:
    require(name, value, isinstance(value, bool), "a bool")


def _choice(name: str, value: Any, kind: Any) -> None:
    options = get_args(kind)
    require(name, value, value in options, f"one of {options}")


@dataclass(frozen=True, kw_only=True)
class CurvatureOptions:
    """What the factors measure. ``source`` is where they come from (:data:`SOURCES`; see
    :mod:`kfrob.sources`). ``fisher=None`` means ``"mc"`` when ``loss`` is given and
    ``"empirical"`` otherwise; the resolved value is stored (gradient factors need no
    Fisher and ignore it)."""

    source: Source = "activations"
    domain: Domain = "covariance"
    codomain: Codomain = "fisher"
    fisher: Fisher | None = None
    loss: Loss | None = None
    loss_reduction: LossReduction = "mean"
    weight_sharing: WeightSharing = "expand"
    factor_decay: float = 0.95
    factor_decay_warmup: bool = False

    def __post_init__(self) -> None:
        decay = self.factor_decay
        require("factor_decay", decay, _number(decay) and 0 <= decay < 1, "[0, 1)")
        _bool("factor_decay_warmup", self.factor_decay_warmup)
        require("curvature_source", self.source, self.source in SOURCES, f"one of {SOURCES}")
        _choice("domain", self.domain, Domain)
        _choice("codomain", self.codomain, Codomain)
        _choice("weight_sharing", self.weight_sharing, WeightSharing)
        fisher = self.fisher
        options = get_args(Fisher)
        require("fisher", fisher, fisher is None or fisher in options, f"None or one of {options}")
        _choice("loss_reduction", self.loss_reduction, LossReduction)
        if fisher == "mc" or self.loss is not None:
            _choice("loss", self.loss, Loss)
        if fisher is None:
            object.__setattr__(self, "fisher", "mc" if self.loss is not None else "empirical")

    @property
    def monte_carlo(self) -> bool:
        """Whether ``G`` comes from labels sampled from the model (the MC Fisher)."""
        return self.fisher == "mc"


@dataclass(frozen=True, kw_only=True)
class InverseOptions:
    """How a layer's damped inverse ``(A ⊗ G + λI)^{-p}`` is computed (see
    :mod:`kfrob.inverses`: ``damping_method`` ``"factored"``, ``"exact"`` or
    ``"exact_where_dense"``), and each side's structure (:mod:`kfrob.structure`):
    ``"dense"``, ``"low_rank"`` (the ``rank`` leading eigenpairs and a trace-keeping identity
    for the rest), ``"block_diagonal"`` (the factor's diagonal blocks of at most
    ``max_block_size``, as equal as the width allows) or ``"auto"``: low-rank where a dense
    side would cost more than ``dense_budget`` times the layer's forward and backward pass.
    Exact damping keeps every side dense."""

    damping_method: DampingMethod = "factored"
    exponent: float = 1.0
    eigenbasis_refresh: EigenbasisRefresh = "eigh"
    eigenvalue_correction: bool = False
    domain_structure: Structure = "auto"
    codomain_structure: Structure = "auto"
    rank: int = 32
    max_block_size: int = 512
    dense_budget: float = 0.5

    def __post_init__(self) -> None:
        for name in ("domain_structure", "codomain_structure"):
            value = getattr(self, name)
            _choice(name, value, Structure)
            require(
                name, value,
                value not in ("low_rank", "block_diagonal") or self.damping_method != "exact",
                "'auto' or 'dense' with damping_method='exact' (exact damping and EKFAC keep "
                "dense eigenbases)",
            )  # fmt: skip
        require("rank", self.rank, _positive_int(self.rank), "an integer >= 1")
        block = self.max_block_size
        require("max_block_size", block, _positive_int(block), "an integer >= 1")
        budget = self.dense_budget
        require("dense_budget", budget, _number(budget) and budget > 0, "a finite number > 0")
        p = self.exponent
        require("exponent", p, _number(p) and p > 0, "a finite number > 0")
        _choice("damping_method", self.damping_method, DampingMethod)
        _choice("eigenbasis_refresh", self.eigenbasis_refresh, EigenbasisRefresh)
        require(
            "eigenbasis_refresh",
            self.eigenbasis_refresh,
            self.eigenbasis_refresh == "eigh" or self.damping_method == "exact",
            "'eigh' unless damping_method='exact' (only exact damping keeps eigenbases)",
        )
        _bool("eigenvalue_correction", self.eigenvalue_correction)
        require(
            "eigenvalue_correction",
            True,
            not self.eigenvalue_correction or self.damping_method == "exact",
            "False unless damping_method='exact' (EKFAC needs the eigenbases)",
        )


@dataclass(frozen=True, kw_only=True)
class ScheduleOptions:
    """Factors are updated every ``factor_update_freq`` steps, inverses every
    ``inverse_update_freq`` steps; ``stagger_refreshes`` spreads the layers' refreshes over
    the steps of that cycle (see :mod:`kfrob.schedule`)."""

    factor_update_freq: int = 1
    inverse_update_freq: int = 10
    stagger_refreshes: bool = False

    def __post_init__(self) -> None:
        for name in ("factor_update_freq", "inverse_update_freq"):
            value = getattr(self, name)
            require(name, value, _positive_int(value), "an integer >= 1")
        _bool("stagger_refreshes", self.stagger_refreshes)


@dataclass(frozen=True, kw_only=True)
class ParallelOptions:
    """The data-parallel process group (``None``: the default group when one of more than
    one rank is initialised), where inverses live (see :mod:`kfrob.placement`), and
    ``verify_factors``: a debugging check that compares a checksum of every layer's factors
    across ranks after each factor update and raises, on every rank, naming the first layer
    that differs (one small all-gather per update)."""

    process_group: Any = None
    inverse_placement: InversePlacement = "replicated"
    verify_factors: bool = False

    def __post_init__(self) -> None:
        _choice("inverse_placement", self.inverse_placement, InversePlacement)
        _bool("verify_factors", self.verify_factors)


@dataclass(frozen=True, kw_only=True)
class DampingAdaptation:
    """The Levenberg–Marquardt rule (:mod:`kfrob.damping`): every ``interval`` steps ``λ``
    is divided or multiplied by ``factor`` and kept in ``[min_damping, max_damping]``."""

    interval: int = 5
    factor: float = (19 / 20) ** 5
    min_damping: float = 1e-8
    max_damping: float = 1e3

    def __post_init__(self) -> None:
        require(
            "damping_adaptation_interval", self.interval, _positive_int(self.interval),
            "an integer >= 1",
        )  # fmt: skip
        f = self.factor
        require("damping_adaptation_factor", f, _number(f) and 0 < f < 1, "a number in (0, 1)")
        low, high = self.min_damping, self.max_damping
        require("min_damping", low, _number(low) and low > 0, "a finite number > 0")
        require(
            "max_damping", high, _number(high) and high >= low,
            f"a finite number >= min_damping={low!r}",
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PreconditionerOptions:
    """Everything :class:`kfrob.KroneckerPreconditioner` needs: ``damping`` is the initial
    ``λ > 0`` (per parameter group in the optimizer), ``kl_clip`` the ``κ > 0`` bounding the
    step's length in the curvature metric (``None``: no clip), ``adaptation`` the damping
    rule (``None``: fixed ``λ``)."""

    curvature: CurvatureOptions = field(default_factory=CurvatureOptions)
    inverse: InverseOptions = field(default_factory=InverseOptions)
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    damping: float = 1e-3
    kl_clip: float | None = 1e-3
    adaptation: DampingAdaptation | None = None

    def __post_init__(self) -> None:
        lam, kappa = self.damping, self.kl_clip
        require("damping", lam, _number(lam) and lam > 0, "a finite number > 0")
        require(
            "kl_clip", kappa, kappa is None or (_number(kappa) and kappa > 0),
            "None or a finite number > 0",
        )  # fmt: skip
        curvature = self.curvature
        require(
            "eigenvalue_correction", True,
            not (self.inverse.eigenvalue_correction and curvature.source != "activations"),
            "False with curvature_source='gradients' (EKFAC pairs each call's inputs with its "
            "output gradients)",
        )  # fmt: skip
        if self.inverse.eigenvalue_correction and (
            curvature.domain != "covariance" or curvature.codomain != "fisher"
        ):
            require(
                "eigenvalue_correction", True, False,
                "False unless domain='covariance' and codomain='fisher' (both eigenbases)",
            )  # fmt: skip
        inverse = self.inverse
        if self.parallel.inverse_placement == "owner":
            for name in ("domain_structure", "codomain_structure"):
                require(
                    name, getattr(inverse, name), getattr(inverse, name) != "low_rank",
                    "'auto' or 'dense' with inverse_placement='owner' (a low-rank side's "
                    "sketch needs its basis on every rank)",
                )  # fmt: skip
        rule = self.adaptation
        if rule is not None:
            require(
                "damping", lam, rule.min_damping <= lam <= rule.max_damping,
                "a number in [min_damping, max_damping] with adaptive_damping",
            )  # fmt: skip
            require(
                "loss_reduction", curvature.loss_reduction, curvature.loss_reduction == "mean",
                "'mean' with adaptive_damping (A ⊗ G is the curvature of the mean loss)",
            )  # fmt: skip

    # --- the flat keywords of FrobPreconditionedSGD ------------------------------------------
    @classmethod
    def from_flat(cls, **options: Any) -> PreconditionerOptions:
        """Build the options from the flat keyword arguments of
        :class:`kfrob.FrobPreconditionedSGD` (every one optional, same defaults);
        ``TypeError`` for an unknown keyword."""
        unknown = sorted(set(options) - set(FLAT))
        if unknown:
            raise TypeError(f"unknown kfrob option(s) {unknown}; expected some of {sorted(FLAT)}")
        parts: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            part, key = FLAT[name]
            parts.setdefault(part, {})[key] = value
        top = parts.pop("", {})
        adaptive = top.pop("adaptive_damping", False)
        _bool("adaptive_damping", adaptive)
        rule = DampingAdaptation(**parts.pop("adaptation", {}))  # validated even when off
        built = {part: _PARTS[part](**values) for part, values in parts.items()}
        return cls(**built, **top, adaptation=rule if adaptive else None)

    def flat(self) -> dict[str, Any]:
        """The flat keyword arguments that build these options."""
        out: dict[str, Any] = {}
        for name, (part, key) in FLAT.items():
            if part == "":
                out[name] = (
                    self.adaptation is not None
                    if name == "adaptive_damping"
                    else getattr(self, key)
                )
            elif part == "adaptation":
                out[name] = getattr(self.adaptation or DampingAdaptation(), key)
            else:
                out[name] = getattr(getattr(self, part), key)
        return out


_PARTS = {
    "curvature": CurvatureOptions,
    "inverse": InverseOptions,
    "schedule": ScheduleOptions,
    "parallel": ParallelOptions,
    "adaptation": DampingAdaptation,
}

#: flat keyword → (the part of :class:`PreconditionerOptions`, its field there)
FLAT: dict[str, tuple[str, str]] = {
    **{("curvature_source" if f.name == "source" else f.name): (part, f.name)
       for part, kind in _PARTS.items() if part != "adaptation" for f in fields(kind)},
    "damping": ("", "damping"),
    "kl_clip": ("", "kl_clip"),
    "adaptive_damping": ("", "adaptive_damping"),
    "damping_adaptation_interval": ("adaptation", "interval"),
    "damping_adaptation_factor": ("adaptation", "factor"),
    "min_damping": ("adaptation", "min_damping"),
    "max_damping": ("adaptation", "max_damping"),
}  # fmt: skip


def check_group(group: dict[str, Any]) -> None:
    """Validate a parameter group's step hyperparameters (``lr``, ``momentum``,
    ``nesterov``, ``weight_decay``, ``damping``, ``betas``, ``eps``) where present."""
    if "lr" in group:
        lr = group["lr"]
        require("lr", lr, _number(lr) and lr >= 0, "a finite number >= 0")
    momentum = group.get("momentum", 0.0)
    if "momentum" in group:
        require("momentum", momentum, _number(momentum) and 0 <= momentum < 1, "a number in [0, 1)")
    if "nesterov" in group:
        nesterov = group["nesterov"]
        _bool("nesterov", nesterov)
        require("nesterov", nesterov, not nesterov or momentum > 0, "momentum > 0 with it")
    if "weight_decay" in group:
        decay = group["weight_decay"]
        require("weight_decay", decay, _number(decay) and decay >= 0, ">= 0")
    if "damping" in group:
        lam = group["damping"]
        require("damping", lam, _number(lam) and lam > 0, "a finite number > 0")
    if "betas" in group:
        betas = group["betas"]
        require(
            "betas", betas,
            isinstance(betas, tuple | list) and len(betas) == 2
            and all(_number(b) and 0 <= b < 1 for b in betas),
            "two numbers in [0, 1)",
        )  # fmt: skip
    if "eps" in group:
        eps = group["eps"]
        require("eps", eps, _number(eps) and eps > 0, "a finite number > 0")


def with_flat_keywords(
    function: Any, required: tuple[str, ...] = (), defaults: Mapping[str, Any] | None = None
) -> None:
    """Give ``function`` (a front's ``__init__`` that takes ``**flat``) a signature listing the
    flat keywords in place of ``**flat``, with their defaults (``defaults`` overriding the
    options' own: a step rule's) and types; the parameters named in ``required`` are shown
    without a default."""
    own = inspect.signature(function)
    params = [
        p.replace(default=inspect.Parameter.empty) if p.name in required else p
        for p in own.parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    flat = [
        p.replace(default=defaults[p.name]) if defaults and p.name in defaults else p
        for p in flat_parameters()
    ]
    function.__signature__ = own.replace(parameters=params + flat)


def flat_parameters() -> list[inspect.Parameter]:
    """The flat keywords as keyword-only ``inspect.Parameter`` objects with their defaults
    and types, for the signatures of the fronts that take them (config tools and ``help()``
    read those)."""
    defaults: dict[str, Any] = {"adaptive_damping": False}
    hints: dict[str, Any] = {"adaptive_damping": bool}
    for part, kind in {**_PARTS, "": PreconditionerOptions}.items():
        resolved = get_type_hints(kind)
        declared = {f.name: f.default for f in fields(kind)}  # as declared: fisher=None
        for name, (owner, key) in FLAT.items():
            if owner == part and key in resolved:
                hints[name], defaults[name] = resolved[key], declared[key]
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                          annotation=hints[name])
        for name in FLAT
    ]  # fmt: skip
