"""Empirical risk minimisation: the mean loss on one (optionally augmented) copy of the batch."""
from __future__ import annotations

import torch

from ..augment import Augmentation
from ..functional import soft_targets
from ..registry import register
from .base import Objective, ObjectiveResult, augmented, plain

__all__ = ["ERM"]


@register("erm", "plain training on one (augmented) copy of each sample")
class ERM(Objective):
    """Empirical risk: the mean cross-entropy on one (optionally augmented) copy of the batch.

    >>> objective = ERM(maxup.augment.Cutout(8, num_classes=10))
    >>> result = objective(model, x, y)          # result.loss.backward()
    """

    def __init__(self, augment: Augmentation | None = None):
        if augment is not None and not callable(augment):
            raise ValueError("augment must be a maxup.augment.Augmentation (or None for no augmentation)")
        self.augment = augment

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        if self.augment is None:  # the augmentations check their batch; without one, check it here
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
                raise ValueError("x must be a non-empty batch (B, ...) of inputs")
            if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must hold one label or target row per sample of x ({x.shape[0]})")
            if y.is_floating_point():
                y = soft_targets(y)  # soft targets: non-negative rows that sum to one
            return plain(model, x, y)
        return plain(model, *augmented(self.augment, x, y, generator))

    def __repr__(self) -> str:
        return f"ERM({self.augment!r})" if self.augment is not None else "ERM()"


