"""Batch augmentations: small modules that draw randomness and call :mod:`maxup.functional`.

Every augmentation is called as ``aug(x, y, generator=None) -> (x_aug, y_soft)``.
Integer labels need ``num_classes`` at construction; soft (B, C) targets pass through.
Inputs are never edited in place; any device works, and so does a DataLoader
``collate_fn`` (see :func:`collate`). An augmentation that acts inside the model's forward
(Manifold Mixup, embedding noise) returns its draw from ``aug.draw(x, y, generator)`` as a
forward context (:mod:`maxup.functional.context`).

>>> aug = CutMix(alpha=1.0, num_classes=10, per_sample=True)
>>> x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
>>> xa, ya = aug(x, y, generator=torch.Generator().manual_seed(0))
>>> xa.shape, ya.shape
(torch.Size([8, 3, 32, 32]), torch.Size([8, 10]))

This package only re-exports: every module in this folder is imported and its ``__all__``
exported, so a new augmentation is one new file (it registers itself as a method term).
"""
from .._reexport import reexport

__all__ = reexport(__name__, globals(), first=("base", "basic", "mixing"))
