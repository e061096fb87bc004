"""Which module types kfrob preconditions, and the :class:`~kfrob.layers.base.LayerMath`
that serves each. A layer kind registers itself with one line at the end of its file:

    register(nn.Linear, LinearMath)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kfrob.layers.base import LayerMath

__all__ = [
    "functional_users",
    "layer_math",
    "register",
    "register_by_name",
    "unregister",
    "unsupported_reason",
]

LayerFactory = Callable[[nn.Module, str], LayerMath]

_REGISTRY: dict[type[nn.Module], LayerFactory] = {}
#: kinds of optional libraries, by ``module.qualname`` (served without importing them)
_BY_NAME: dict[str, LayerFactory] = {}


def register(kinds: type[nn.Module] | tuple[type[nn.Module], ...], factory: LayerFactory) -> None:
    """Serve modules of ``kinds`` (exact types or subclasses) with ``factory(module,
    weight_sharing)``. A later registration of the same type replaces the earlier one."""
    for kind in kinds if isinstance(kinds, tuple) else (kinds,):
        _REGISTRY[kind] = factory


def register_by_name(qualified_name: str, factory: LayerFactory) -> None:
    """Serve modules whose class (or a base class) is ``qualified_name``
    (``"package.module.Class"``) with ``factory``: for kinds of libraries kfrob does not
    depend on, such as transformers' ``Conv1D``."""
    _BY_NAME[qualified_name] = factory


def unregister(kind: type[nn.Module]) -> None:
    """Stop serving modules of exactly ``kind`` (no error if it was not registered)."""
    _REGISTRY.pop(kind, None)


def _factory(module: nn.Module) -> LayerFactory | None:
    for kind in type(module).__mro__:  # the most specific registration wins
        if kind in _REGISTRY:
            return _REGISTRY[kind]
        by_name = _BY_NAME.get(f"{kind.__module__}.{kind.__qualname__}")
        if by_name is not None:
            return by_name
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``'s own parameters cannot be preconditioned (``None`` when they can)."""
    factory = _factory(module)
    if factory is not None:
        refuses = getattr(factory, "refuses", None)
        return None if refuses is None else refuses(module)
    if isinstance(module, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention projects functionally inside its forward, out of the hooks' "
            "reach (build attention from nn.Linear layers to precondition it)"
        )
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} is not a supported convolution"
    return f"{type(module).__name__} has no Kronecker-factored curvature in kfrob"


def functional_users(model: nn.Module) -> dict[str, str]:
    """Submodules whose parameters their parent uses functionally, without calling them
    (``nn.MultiheadAttention``'s ``out_proj``): their hooks would never fire. Maps each
    one's qualified name to the reason."""
    users: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, _ in module.named_modules():
                if child:
                    users[f"{name}.{child}" if name else child] = (
                        "its nn.MultiheadAttention uses it functionally, out of the hooks' reach"
                    )
    return users


def layer_math(module: nn.Module, weight_sharing: str = "expand") -> LayerMath | None:
    """The :class:`LayerMath` for a registered module, else ``None``; ``weight_sharing``
    (``"expand"`` or ``"reduce"``) applies to layers that share weights over locations."""
    factory = _factory(module)
    if factory is None or unsupported_reason(module) is not None:
        return None
    return factory(module, weight_sharing)
