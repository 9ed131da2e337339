"""Randomized smoothing certification (see :mod:`maxup.certify.smoothing`; this package only re-exports)."""
from .._reexport import reexport

__all__ = reexport(__name__, globals())
