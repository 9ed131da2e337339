"""Objectives map ``(model, x, y)`` to a loss: :class:`ERM` and :class:`MaxUp` (this package only re-exports)."""
from .._reexport import reexport

__all__ = reexport(__name__, globals(), first=("base",))
