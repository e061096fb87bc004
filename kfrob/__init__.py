"""kfrob: K-FAC-style preconditioning built on Frobenius-type norms.

The public entry point is :class:`FrobPreconditionedSGD`; :mod:`kfrob.norms` holds the
Frobenius-type norm family and :mod:`kfrob.diagnostics` the curvature diagnostics.
"""

from kfrob.alerts import KfrobWarning
from kfrob.optimizer import FrobPreconditionedSGD
from kfrob.preconditioner import KroneckerPreconditioner

__all__ = ["FrobPreconditionedSGD", "KfrobWarning", "KroneckerPreconditioner"]
__version__ = "0.1.0"
