"""Which module types kfrob preconditions, and the :class:`~kfrob.layers.base.LayerMath`
that serves each. A layer kind registers itself with one line at the end of its file:

    register(nn.Linear, LinearMath)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kfrob.layers.base import LayerMath

__all__ = ["layer_math", "register", "unregister", "unsupported_reason"]

LayerFactory = Callable[[nn.Module, str], LayerMath]

_REGISTRY: dict[type[nn.Module], LayerFactory] = {}


def register(kinds: type[nn.Module] | tuple[type[nn.Module], ...], factory: LayerFactory) -> None:
    """Serve modules of ``kinds`` (exact types or subclasses) with ``factory(module,
    weight_sharing)``. A later registration of the same type replaces the earlier one."""
    for kind in kinds if isinstance(kinds, tuple) else (kinds,):
        _REGISTRY[kind] = factory


def unregister(kind: type[nn.Module]) -> None:
    """Stop serving modules of exactly ``kind`` (no error if it was not registered)."""
    _REGISTRY.pop(kind, None)


def _factory(module: nn.Module) -> LayerFactory | None:
    for kind in type(module).__mro__:  # the most specific registration wins
        if kind in _REGISTRY:
            return _REGISTRY[kind]
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``'s own parameters cannot be preconditioned (``None`` when they can)."""
    if _factory(module) is not None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} is not a supported convolution"
    return f"{type(module).__name__} has no Kronecker-factored curvature in kfrob"


def layer_math(module: nn.Module, weight_sharing: str = "expand") -> LayerMath | None:
    """The :class:`LayerMath` for a registered module, else ``None``; ``weight_sharing``
    (``"expand"`` or ``"reduce"``) applies to layers that share weights over locations."""
    factory = _factory(module)
    return None if factory is None else factory(module, weight_sharing)
