"""kfrob's warnings: one category, pointed at the user's line.

Every warning kfrob issues is a :class:`KfrobWarning`, so that users can filter them
(``warnings.filterwarnings("ignore", category=kfrob.KfrobWarning)``), and is attributed to the
first frame of the call stack outside kfrob and torch: the user's ``opt.step()``, the model
call whose hook noticed something, or the constructor call.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["KfrobWarning", "warn"]

_INTERNAL = tuple(
    str(Path(module.__file__).resolve().parent) + os.sep  # type: ignore[arg-type]
    for module in (sys.modules[__package__], torch)
)


class KfrobWarning(UserWarning):
    """A warning issued by kfrob (a fallback, a skipped step, a layer left to plain SGD)."""


def warn(message: str) -> None:
    """Issue ``message`` as a :class:`KfrobWarning` attributed to the user's code."""
    frame = sys._getframe(0)
    level = 1
    while frame.f_back is not None and _is_internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, KfrobWarning, stacklevel=level)


def _is_internal(filename: str) -> bool:
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return False
    return path.startswith(_INTERNAL)
