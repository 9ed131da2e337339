"""maxup: MaxUp, the Mixup family, sharpness-aware training and GradAug for PyTorch."""
from . import augment, functional, methods, objectives, steps
from .objectives import ERM, MaxUp

__version__ = "0.1.0"
__all__ = ["ERM", "MaxUp", "augment", "functional", "methods", "objectives", "steps"]
