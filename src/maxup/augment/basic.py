"""Augmentations of one sample at a time: Gaussian noise, Cutout, random crop and flip."""
from __future__ import annotations

import math

import torch

from .. import functional as MF
from .._checks import check_int, check_positive, check_probability
from ..functional import _random as R
from ..registry import register
from .base import Augmentation

__all__ = ["Cutout", "GaussianNoise", "RandomCropFlip"]


@register("gaussian", "Gaussian noise N(0, sigma^2) on the inputs", sigma=0.1)
class GaussianNoise(Augmentation):
    """Adds N(0, sigma^2) noise to every element (any input shape)."""

    search_space = {"sigma": (0.05, 1.0, "log")}

    def __init__(self, sigma: float = 0.1, *, num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.sigma = check_positive("sigma", sigma, allow_zero=True)

    def apply(self, x, t, generator):
        sigma = self.sigma if self.p >= 1.0 else self.sigma * self._applied(x.shape[0], generator, x.device).to(x.dtype)
        return MF.gaussian_noise(x, sigma, generator=generator), t

    def _options(self):
        return {"sigma": self.sigma, **super()._options()}


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    return check_int(name, pair[0], minimum=0), check_int(name, pair[1], minimum=0)


@register("cutout", "Cutout: a box of the image set to zero")
class Cutout(Augmentation):
    """Cutout (DeVries and Taylor 2017): a ``size`` box, centred anywhere and clipped, set to ``fill``.

    ``size=None`` (default) takes half of each side, the paper's 16 x 16 on 32 x 32 CIFAR-10.
    """

    domain = "image"
    #: in pixels: images smaller than 16 need a narrower range (``--space cutout.size=1..4`` on 8x8 digits)
    search_space = {"size": (2, 16, "int")}

    def __init__(self, size: int | tuple[int, int] | None = None, *, fill: float = 0.0, num_classes: int | None = None,
                 p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.size = None if size is None else _pair("size", size)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
            raise ValueError(f"fill must be a finite number (the value of the cut-out pixels), got {fill!r}")
        self.fill = float(fill)

    def apply(self, x, t, generator):
        n, (h, w) = x.shape[0], x.shape[-2:]
        if self.size is not None and (self.size[0] > h or self.size[1] > w):
            raise ValueError(f"Cutout size {self.size} is larger than the {h}x{w} images: every image would be "
                             f"blanked; choose a size of at most ({h}, {w}) (default: half of each side)")
        size = self.size or (h // 2, w // 2)
        boxes = MF.sample_cutout_boxes(n, size, h, w, generator=generator, device=x.device)
        boxes = boxes * self._applied(n, generator, x.device)[:, None]
        return MF.cutout(x, boxes, self.fill), t

    def _options(self):
        return {"size": self.size, "fill": self.fill, **super()._options()}


@register("cropflip", "random crop after padding, and horizontal flip")
class RandomCropFlip(Augmentation):
    """Random crop after ``padding`` (zeros or reflection) and a horizontal flip with probability ``flip``."""

    domain = "image"
    search_space = {"padding": (1, 4, "int"), "flip": [0.0, 0.5]}

    def __init__(self, padding: int = 4, *, flip: float = 0.5, padding_mode: str = "constant",
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.padding = check_int("padding", padding, minimum=0)
        self.flip = check_probability("flip", flip)
        if padding_mode not in ("constant", "reflect", "replicate"):
            raise ValueError(f"padding_mode must be 'constant', 'reflect' or 'replicate', got {padding_mode!r}")
        self.padding_mode = padding_mode

    def apply(self, x, t, generator):
        n, (h, w) = x.shape[0], x.shape[-2:]
        if self.padding >= min(h, w):
            raise ValueError(f"RandomCropFlip padding={self.padding} is not smaller than the {h}x{w} images: a crop "
                             f"could hold no image at all; choose padding < {min(h, w)}")
        applied = self._applied(n, generator, x.device)
        offsets = R.randint(2 * self.padding + 1, (n, 2), generator=generator, device=x.device)
        offsets = torch.where(applied[:, None], offsets, torch.full_like(offsets, self.padding))
        flip = (R.rand((n,), generator=generator, device=x.device) < self.flip) & applied
        return MF.crop_flip(x, offsets, flip, self.padding, self.padding_mode), t

    def _options(self):
        return {"padding": self.padding, "flip": self.flip, "padding_mode": self.padding_mode, **super()._options()}


