"""The engine's ``state_dict``: factors, inverses, counters, and older formats read back.

Format 2 (this version)::

    {"version": 2, "steps": int, "generator": RNG state or None, "nonfinite_steps": tensor,
     "layers": {name: {"domain": factor state or None, "codomain": …, "inverse": inverse
                       state or None, …the inverse method's own entries}},
     "disabled": {name: reason}, "skipped_windows": tensor}

kfrob 0.1 saved the same layer entries under the optimizer's ``"kfrob"`` entry
(``{"steps", "generator", "nonfinite_steps", "preconditioner": {"layers", "disabled",
"skipped_windows"}, "last_reduction_ratio"}``); :func:`upgrade` reads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfrob.capture import CurvatureCapture
from kfrob.factors import BlockDiagonalFactor, RunningFactor, SketchedFactor, sketch_of
from kfrob.inverses import InverseMethod
from kfrob.placement import Placement
from kfrob.schedule import RefreshSchedule
from kfrob.tracking import TrackedLayer

__all__ = ["FORMAT", "EngineState", "upgrade"]

FORMAT = 2


def upgrade(state: dict[str, Any]) -> dict[str, Any]:
    """An engine state of this format from any format kfrob wrote; ``ValueError`` for one
    written by a newer kfrob or for something that is not a kfrob state."""
    if not isinstance(state, dict):
        raise ValueError("kfrob state has no 'layers' entry")
    if "preconditioner" in state:  # kfrob 0.1: the optimizer's "kfrob" entry
        return {
            **state["preconditioner"],
            "version": FORMAT,
            "steps": state.get("steps", 0),
            "generator": state.get("generator"),
            "nonfinite_steps": state.get("nonfinite_steps"),
        }
    version = state.get("version", FORMAT)
    if version > FORMAT:
        raise ValueError(
            f"kfrob state of format version {version} was written by a newer kfrob; this "
            f"one reads versions up to {FORMAT}"
        )
    if not isinstance(state.get("layers"), dict):
        raise ValueError("kfrob state has no 'layers' entry")
    return state


class EngineState:
    """``state_dict`` / ``load_state_dict`` of :class:`kfrob.KroneckerPreconditioner`, from
    the engine's parts declared here."""

    layers: dict[str, TrackedLayer]
    inverses: dict[str, Any]
    disabled: dict[str, str]
    method: InverseMethod
    placement: Placement
    schedule: RefreshSchedule
    capture: CurvatureCapture
    generator: torch.Generator | None
    steps: int
    skipped_windows: Tensor
    nonfinite_steps: Tensor
    _inverses_after_load: bool

    def state_dict(self) -> dict[str, Any]:
        """Factors, inverses this rank holds, the inverse method's per-layer state, the step
        counter and the state of the MC Fisher's ``generator`` (if one was given)."""
        layers = {}
        for name, layer in self.layers.items():
            inverse = self.inverses.get(name)
            held = hasattr(inverse, "state_dict")  # not absent, not on another rank
            layers[name] = {
                "domain": layer.domain.state_dict() if layer.domain else None,
                "codomain": layer.codomain.state_dict() if layer.codomain else None,
                "inverse": inverse.state_dict() if held else None,  # type: ignore[union-attr]
                **self.method.layer_state(layer),
            }
        return {
            "version": FORMAT,
            "steps": self.steps,
            "generator": None if self.generator is None else self.generator.get_state(),
            "nonfinite_steps": self.nonfinite_steps,
            "layers": layers,
            "disabled": dict(self.disabled),
            "skipped_windows": self.skipped_windows,
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the layer if ``state`` does not fit this model."""
        saved = upgrade(state)["layers"]
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
                if factor is None:
                    continue
                width = layer.math.in_features if side == "domain" else layer.math.out_features
                blocks = layer.math.blocks
                want = (blocks, width) if factor.diagonal else (blocks, width, width)
                if isinstance(factor, BlockDiagonalFactor):  # (blocks · parts, part, part)
                    want = tuple(factor.average.shape)
                got = tuple(entry["value"].shape)
                if "basis" in entry:  # a sketched factor: (blocks, width + 1, rank)
                    want, got = (blocks, width), tuple(entry["basis"].shape[:2])
                if got != want:
                    raise ValueError(
                        f"kfrob state for layer {name!r}: {side} factor of shape {got}, "
                        f"expected {want}"
                    )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load onto each layer's device; nothing changes on error. Statistics recorded since
        the last step are dropped, as is any early send of them. Layers saved without an
        inverse (e.g. by another rank with ``inverse_placement="owner"``) get one at the
        next step, from the loaded factors."""
        self.check_state_dict(state)
        state = upgrade(state)
        self.placement.drop_early()
        self.capture.new_window()
        for name, layer in self.layers.items():
            entry = state["layers"][name]
            for side in ("domain", "codomain"):
                if entry[side] is not None:
                    _load_factor(layer, side, entry[side])
            if entry["inverse"] is None:
                self.inverses.pop(name, None)
            else:
                device = layer.math.device
                self.inverses[name] = self.placement.loaded_inverse(name, entry["inverse"], device)
            self.method.load_layer_state(layer, entry, self.inverses.get(name))
        self.disabled = dict(state.get("disabled", {}))
        self.skipped_windows = state["skipped_windows"].clone()
        self.steps = int(state["steps"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        if state.get("nonfinite_steps") is not None:
            self.nonfinite_steps = state["nonfinite_steps"].to(self.nonfinite_steps.device)
        self.capture.active = self.schedule.records(self.steps)
        self._inverses_after_load = any(
            entry["inverse"] is None for entry in state["layers"].values()
        )


def _load_factor(layer: TrackedLayer, side: str, state: dict[str, Any]) -> None:
    """Load one factor, held as a sketch if it was saved as one (and dense otherwise)."""
    factor: RunningFactor = getattr(layer, side)
    sketched = "basis" in state
    if sketched != isinstance(factor, SketchedFactor):
        math = layer.math
        width = math.in_features if side == "domain" else math.out_features
        factor = RunningFactor(
            math.blocks, width, per_sample_scale=side == "codomain",
            per_step=factor.per_step, device=math.device, dtype=math.factor_dtype,
        )  # fmt: skip
        if sketched:
            basis = state["basis"].to(math.device, math.factor_dtype)
            zeros = basis.new_zeros(basis.shape[::2])
            factor = sketch_of(factor, basis, zeros, "loaded as a sketch")
        setattr(layer, side, factor)
    factor.load_state_dict(state)
