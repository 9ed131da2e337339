"""The mixing augmentations: Mixup, CutMix, HMix, GMix, ResizeMix (two samples into one, labels by weight)."""
from __future__ import annotations

import torch

from .. import functional as MF
from .._checks import check_positive, check_probability, check_range
from ..functional import _random as R
from ..registry import register
from .base import Augmentation

__all__ = ["CutMix", "GMix", "HMix", "Mixup", "ResizeMix"]


class _Mixing(Augmentation):
    """Shared draw of the mixing ops: lam ~ Beta(alpha, alpha) per batch or per sample, a random partner permutation."""

    mixes_rows = True
    #: ``maxup tune`` searches alpha (Beta(alpha, alpha)): small alphas mix little, 1 is uniform, 2 mixes evenly
    search_space = {"alpha": (0.1, 2.0, "log")}

    def __init__(self, alpha: float = 1.0, *, per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.alpha = check_positive("alpha", alpha)
        self.per_sample = bool(per_sample)

    def _draw(self, x, generator):
        """(k,) lambdas, k = B per sample or 1 per batch (one box, centre or scale for the batch too), and a
        partner permutation."""
        n = x.shape[0]
        k = n if self.per_sample else 1
        if self.alpha == 1.0:  # Beta(1, 1) is U(0, 1): one uniform draw instead of two gamma samplers
            lam = R.rand((k,), generator=generator, device=x.device)
        else:
            lam = R.beta(self.alpha, (k,), generator=generator, device=x.device)
        if self.p < 1.0:
            lam = torch.where(self._applied(k, generator, x.device), lam, torch.ones_like(lam))
        return lam, R.randperm(n, generator=generator, device=x.device)

    def _options(self):
        return {"alpha": self.alpha, "per_sample": self.per_sample, **super()._options()}


@register("mixup", "Mixup: convex blend of two samples and their labels", per_sample=True)
class Mixup(_Mixing):
    """Mixup (Zhang et al. 2018) on any input shape: ``lam x_i + (1 - lam) x_perm(i)``, lam ~ Beta(alpha, alpha)."""

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        return MF.mixup(x, t, lam, perm)


@register("cutmix", "CutMix: a box pasted from another sample, label by area", per_sample=True)
class CutMix(_Mixing):
    """CutMix (Yun et al. 2019): paste a box of area ``(1 - lam) H W``; lambda recomputed from the clipped box."""

    domain = "image"

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        boxes = MF.sample_boxes(1.0 - lam, *x.shape[-2:], generator=generator, device=x.device)
        out, targets, _ = MF.cutmix(x, t, boxes, perm)
        return out, targets


@register("hmix", "HMix: a CutMix box inside a Mixup blend", per_sample=True)
class HMix(_Mixing):
    """HMix: a CutMix box of area ``ratio * (1 - lam)`` inside a Mixup blend; label weight ``lam``.

    ``ratio=0`` is Mixup, ``ratio=1`` is CutMix (see :func:`maxup.functional.hmix`).
    """

    domain = "image"
    search_space = {"alpha": (0.1, 2.0, "log"), "ratio": (0.0, 1.0)}

    def __init__(self, alpha: float = 1.0, *, ratio: float = 0.5, per_sample: bool = False,
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        self.ratio = check_probability("ratio", ratio)

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        boxes = MF.sample_boxes(self.ratio * (1.0 - lam), *x.shape[-2:], generator=generator, device=x.device)
        out, targets, _ = MF.hmix(x, t, lam, boxes, perm)
        return out, targets

    def _options(self):
        return {"ratio": self.ratio, **super()._options()}


@register("gmix", "GMix (Park et al.): another sample blended in through a Gaussian mask, on images; for G-Mix, "
          "SAM on the Mixup loss (Li and Tang), see sam_mixup", per_sample=True)
class GMix(_Mixing):
    """GMix (Park et al. 2022): the partner blended in through a Gaussian mask of area ``(1 - lam) H W``.

    Not G-Mix (Li and Tang 2023, SAM on the Mixup loss): that is the step
    :class:`maxup.steps.SAMMixup`, the spec term ``sam_mixup``.
    """

    domain = "image"

    def check(self, x, y):
        try:
            return super().check(x, y)
        except ValueError as err:
            if isinstance(x, torch.Tensor) and x.dim() != 4:
                raise ValueError(f"{err}. gmix is GMix, the Gaussian-mask augmentation for images (Park et al.); "
                                 "for G-Mix, SAM on the Mixup loss (Li and Tang), use sam_mixup") from None
            raise

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        h, w = x.shape[-2:]
        centers = R.rand((lam.shape[0], 2), generator=generator, device=x.device)
        centers = torch.stack([centers[:, 0] * h, centers[:, 1] * w], 1)
        out, targets, _ = MF.gmix(x, t, lam, centers, perm)
        return out, targets


@register("resizemix", "ResizeMix: another sample, shrunk, pasted in", per_sample=True)
class ResizeMix(Augmentation):
    """ResizeMix (Qin et al. 2020): the partner, resized to ``scale`` ~ U(scale) of each side, pasted at random."""

    mixes_rows = True

    domain = "image"

    def __init__(self, scale: tuple[float, float] = (0.1, 0.8), *, per_sample: bool = False,
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.scale = check_range("scale", scale, low=0.0, high=1.0)
        self.per_sample = bool(per_sample)

    def apply(self, x, t, generator):
        n, (h, w) = x.shape[0], x.shape[-2:]
        k = n if self.per_sample else 1
        lo, hi = self.scale
        tau = lo + (hi - lo) * R.rand((k,), generator=generator, device=x.device)
        perm = R.randperm(n, generator=generator, device=x.device)
        boxes = MF.sample_inner_boxes(tau, h, w, generator=generator, device=x.device)
        boxes = boxes * self._applied(k, generator, x.device)[:, None]
        out, targets, _ = MF.resizemix(x, t, boxes, perm)
        return out, targets

    def _options(self):
        return {"scale": self.scale, "per_sample": self.per_sample, **super()._options()}


