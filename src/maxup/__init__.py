"""maxup: MaxUp, the Mixup family, sharpness-aware training and GradAug for PyTorch."""
from . import augment, functional, methods, objectives, optim, steps, train
from .objectives import ERM, MaxUp
from .train import Trainer, fit

__version__ = "0.1.0"
__all__ = ["ERM", "MaxUp", "Trainer", "augment", "fit", "functional", "methods", "objectives", "optim", "steps",
           "train"]
