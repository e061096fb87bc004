"""The layer registry: one file per layer kind, each owning its parameters and their layout,
what its hooks record and how a gradient becomes a matrix (:class:`LayerMath`).

Adding a layer kind is one new file here, with a ``LayerMath`` subclass and a
``register(ModuleType, TheMath)`` line, and one import below.
"""

from kfrob.layers import conv, embedding, linear, norm  # noqa: F401  (each registers its kinds)
from kfrob.layers.base import WEIGHT_SHARING, LayerMath
from kfrob.layers.conv import ConvMath
from kfrob.layers.embedding import EmbeddingMath
from kfrob.layers.linear import LinearMath, TransposedLinearMath
from kfrob.layers.norm import ChannelNormMath, RowNormMath
from kfrob.layers.registry import (
    functional_users,
    layer_math,
    register,
    register_by_name,
    unregister,
    unsupported_reason,
)

__all__ = [
    "WEIGHT_SHARING",
    "ChannelNormMath",
    "ConvMath",
    "EmbeddingMath",
    "LayerMath",
    "LinearMath",
    "RowNormMath",
    "TransposedLinearMath",
    "functional_users",
    "layer_math",
    "register",
    "register_by_name",
    "unregister",
    "unsupported_reason",
]
