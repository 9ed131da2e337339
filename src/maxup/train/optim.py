"""Deprecated: renamed :mod:`maxup.train.optimizers` (``maxup.optim`` holds SAM); this path goes in the next release."""
import warnings

from .optimizers import *  # noqa: F401,F403
from .optimizers import __all__  # noqa: F401

warnings.warn("maxup.train.optim is renamed maxup.train.optimizers; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
