"""Integrations with other training frameworks; each needs its framework, this package none.

- :mod:`maxup.integrations.lightning` (``pip install "maxup[lightning]"``): :class:`MaxUpModule`,
  :class:`MaxUpMixin`, :func:`maxup_training_step` for PyTorch Lightning.

The names are re-exported lazily: ``from maxup.integrations import MaxUpModule`` imports Lightning then.
"""
from __future__ import annotations

import importlib

#: name -> the module that defines it
_EXPORTS = {"MaxUpMixin": "lightning", "MaxUpModule": "lightning", "maxup_training_step": "lightning"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
