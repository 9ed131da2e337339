"""Steps own one optimisation step: forward/backward passes and the optimizer update (this package only re-exports).

A step is called as ``step(model, x, y, generator=None)`` and returns the
:class:`~maxup.objectives.ObjectiveResult` of the pass it trained on. A new step is one
file in this folder (see :class:`maxup.steps.base.Step` and CONTRIBUTING.md).
"""
from .._reexport import reexport

__all__ = reexport(__name__, globals(), first=("base", "sam"))
