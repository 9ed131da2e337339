"""Augmentations that soften the targets: label smoothing, Soft Augmentation, LUMix.

Built on :mod:`maxup.functional.soft`; called like every augmentation,
``aug(x, y, generator=None) -> (x_aug, y_soft)``.
"""
from __future__ import annotations

import math

import torch

from .. import functional as MF
from .._checks import check_positive, check_probability
from ..functional import _random as R
from ..registry import register
from .base import Augmentation
from .mixing import _Mixing

__all__ = ["LUMix", "LabelSmoothing", "SoftAugmentation"]

#: the largest shift spread of SoftAugmentation (image sides), and the redraws of a shift that leaves the image
MAX_SIGMA = 10.0
MAX_REDRAWS = 1000


@register("smooth", "label smoothing: targets (1 - eps) t + eps / K")
class LabelSmoothing(Augmentation):
    """Label smoothing (Szegedy et al. 2016): ``t -> (1 - eps) t + eps / K``; the inputs are unchanged.

    Linear in the targets, so its place among mixing augmentations does not matter.
    It draws nothing: MaxUp over label smoothing alone would draw identical copies.

    >>> LabelSmoothing(0.1, num_classes=4)(x[:2], torch.tensor([0, 3]))[1]
    tensor([[0.9250, 0.0250, 0.0250, 0.0250],
            [0.0250, 0.0250, 0.0250, 0.9250]])
    """

    random = False
    search_space = {"eps": (0.01, 0.3, "log")}

    def __init__(self, eps: float = 0.1, *, num_classes: int | None = None):
        super().__init__(num_classes=num_classes)
        self.eps = check_probability("eps", eps)

    def apply(self, x, t, generator):
        return x, MF.soft_targets(t, smoothing=self.eps, check=False)

    def _options(self):
        return {"eps": self.eps, "num_classes": self.num_classes}


@register("soft_augment", "Soft Augmentation: an aggressive crop (or occlusion) whose target confidence falls with "
          "the visible fraction")
class SoftAugmentation(Augmentation):
    """Soft Augmentation (Liu et al., CVPR 2023): an aggressive crop or occlusion whose target
    confidence falls with the visible fraction ``v`` of the image.

    The label keeps ``p = p_max - (p_max - 1/K) ((T - v) / T)^k`` (``p_max`` for ``v >= T``,
    :func:`maxup.functional.softening_curve`) and ``1 - p`` is spread evenly over the other
    classes (:func:`maxup.functional.soften_targets`).

    - ``transform="crop"`` (the paper's soft crop): the image is shifted by ``(dy, dx)``
      pixels, each ``trunc(z * sigma * side)`` with ``z ~ N(0, 1)`` redrawn until
      ``|dy| <= H`` and ``|dx| <= W``; the uncovered part is the fill;
      ``v = (H - |dy|) (W - |dx|) / (H W)``.
    - ``transform="cutout"``: a box of ``|dy|`` by ``|dx|`` pixels, drawn the same way, is
      set to the fill at a uniform position inside the image; ``v = 1 - |dy| |dx| / (H W)``.

    ``fill=None`` (default) fills with one ``fill_scale * N(0, 1)`` value per sample and
    channel (for standardised inputs); a number fills with it (``fill_scale`` is then unused
    and must stay at its default). ``reweight=True`` also weights each sample's loss by its
    own ``p`` (the paper's "target & weight" variant) by scaling its target row by ``p``: the
    soft cross-entropy of that row is then ``p`` times the loss; such rows sum to ``p``, so
    this augmentation must come last in a spec (pass ``reweight=False`` to follow it with
    another augmentation).

    The defaults are the recipe the authors' CIFAR code runs (github.com/youngleox/
    soft_augmentation, ``cifar/train.py`` and ``cifar/utils.py``): ``--crop 12`` px of 32
    (``sigma = 0.375``), ``--pcrop 2`` (``power = 2``), ``--bgcrop 0.01``
    (``fill_scale = 0.01``), ``T = 1``, ``--max_p 1`` and ``--rw`` on (``reweight=True``).
    The values this class had before, ``sigma=0.3125`` (10 px), ``power=4``,
    ``fill_scale=1`` and ``reweight=False``, are the defaults of the authors' ``SoftCrop``
    and ``get_training_dataloader``, which ``train.py`` overrides; pass them to get that
    setting. The authors' reweighting multiplies a (B, 1) weight by a (B,) loss, so each
    batch's loss is the batch-mean confidence times the unweighted mean loss; here each
    sample is weighted by its own ``p``.

    >>> aug = SoftAugmentation(num_classes=10)
    >>> xa, ta = aug(x, y, generator=torch.Generator().manual_seed(0))   # ta[i, y[i]] = p_i**2 (reweight)
    """

    domain = "image"

    def __init__(self, transform: str = "crop", *, sigma: float = 0.375, power: float = 2.0, threshold: float = 1.0,
                 p_max: float = 1.0, fill: float | None = None, fill_scale: float = 0.01, reweight: bool = True,
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        if transform not in ("crop", "cutout"):
            raise ValueError(f"transform must be 'crop' or 'cutout', got {transform!r}")
        self.transform = transform
        self.sigma = check_positive("sigma", sigma)
        if self.sigma > MAX_SIGMA:
            raise ValueError(f"sigma must be at most {MAX_SIGMA} (the shift's spread in image sides; the authors' "
                             f"code uses 0.375, 12 px of 32), got {sigma!r}")
        self.power = check_positive("power", power)
        self.threshold = check_probability("threshold", threshold)
        if self.threshold == 0:
            raise ValueError("threshold must be in (0, 1]: the visible fraction from which targets stay at p_max")
        self.p_max = check_probability("p_max", p_max)
        if fill is not None and (isinstance(fill, bool) or not isinstance(fill, (int, float))
                                 or not math.isfinite(fill)):
            raise ValueError(f"fill must be a finite number or None (one fill_scale * N(0, 1) value per sample and "
                             f"channel), got {fill!r}")
        self.fill = None if fill is None else float(fill)
        self.fill_scale = check_positive("fill_scale", fill_scale, allow_zero=True)
        if self.fill is not None and self.fill_scale != 0.01:
            raise ValueError(f"fill_scale scales the random fill of fill=None; with fill={fill!r} it has no effect: "
                             f"drop fill_scale or fill")
        if not isinstance(reweight, bool):
            raise ValueError(f"reweight must be True or False, got {reweight!r}")
        self.reweight = reweight
        if reweight:
            self.last = ("reweight (on by default) scales each target row by its confidence, and later "
                         "augmentations expect rows that sum to one: put soft_augment last, or pass "
                         "soft_augment(reweight=false)")

    def _offsets(self, n: int, h: int, w: int, generator, device) -> torch.Tensor:
        """(n, 2) shifts trunc(z * sigma * side), z ~ N(0, 1) redrawn while a shift exceeds its side."""
        side = torch.tensor([h, w], dtype=torch.float32, device=device)
        z = R.randn((n, 2), generator=generator, device=device) * self.sigma * side
        bad = z.abs() > side
        for _ in range(MAX_REDRAWS):  # sigma <= MAX_SIGMA: a redraw fits with probability > 0.07
            if not bool(bad.any()):
                break
            z = torch.where(bad, R.randn((n, 2), generator=generator, device=device) * self.sigma * side, z)
            bad = z.abs() > side
        else:
            z = torch.maximum(torch.minimum(z, side), -side)  # only reached with probability < 1e-30
        return z.trunc().long()

    def apply(self, x, t, generator):
        n, c, (h, w) = x.shape[0], x.shape[1], x.shape[-2:]
        if t.shape[1] < 2:
            raise ValueError("SoftAugmentation needs at least 2 classes")
        offsets = self._offsets(n, h, w, generator, x.device)
        if self.p < 1.0:
            offsets = offsets * self._applied(n, generator, x.device)[:, None]
        fill = self.fill
        if fill is None:
            fill = R.randn((n, c), generator=generator, device=x.device)
            if self.fill_scale != 1.0:
                fill = fill * self.fill_scale
        if self.transform == "crop":
            out, visible = MF.shift_crop(x, offsets, fill)
        else:
            size = offsets.abs()
            y0 = R.randint(h - size[:, 0] + 1, (n,), generator=generator, device=x.device)
            x0 = R.randint(w - size[:, 1] + 1, (n,), generator=generator, device=x.device)
            out, visible = MF.occlude(x, torch.stack([y0, x0, y0 + size[:, 0], x0 + size[:, 1]], 1), fill)
        conf = MF.softening_curve(visible, t.shape[1], p_max=self.p_max, threshold=self.threshold,
                                  power=self.power).to(device=t.device, dtype=t.dtype)
        targets = MF.soften_targets(t, conf)
        if self.reweight:
            targets = targets * conf[:, None]
        return out, targets

    def _options(self):
        return {"transform": self.transform, "sigma": self.sigma, "power": self.power, "threshold": self.threshold,
                "p_max": self.p_max, "fill": self.fill, "fill_scale": self.fill_scale, "reweight": self.reweight,
                **super()._options()}


@register("lumix", "LUMix: Mixup or CutMix with the label ratio perturbed by U[-u, u] (this project's rule)",
          per_sample=True)
class LUMix(_Mixing):
    """LUMix: Mixup or CutMix whose label ratio is perturbed to model label uncertainty.

    The images mix as Mixup (``base="mixup"``, any input shape) or CutMix (``base="cutmix"``,
    images; lambda recomputed from the clipped box); the targets mix with
    ``lam_y = clip(lam + delta, 0, 1)``, ``delta ~ U[-uncertainty, uncertainty]`` drawn per
    sample (:func:`maxup.functional.lumix`).

    **This perturbation is this project's stand-in**: LUMix (Sun, Chen, He, Yuille, Torr, Bai,
    "LUMix: Improving Mixup by Better Modelling Label Uncertainty", 2022) perturbs the label
    weights, but its exact rule could not be checked here.

    >>> aug = LUMix(alpha=1.0, uncertainty=0.1, num_classes=10, per_sample=True)
    """

    def __init__(self, alpha: float = 1.0, *, base: str = "mixup", uncertainty: float = 0.1, per_sample: bool = False,
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        if base not in ("mixup", "cutmix"):
            raise ValueError(f"base must be 'mixup' or 'cutmix', got {base!r}")
        self.base = base
        self.domain = "image" if base == "cutmix" else "tensor"
        self.uncertainty = check_probability("uncertainty", uncertainty)

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        boxes = None
        if self.base == "cutmix":
            boxes = MF.sample_boxes(1.0 - lam, *x.shape[-2:], generator=generator, device=x.device)
        u = R.rand((x.shape[0],), generator=generator, device=x.device)
        delta = (2.0 * u - 1.0) * self.uncertainty
        if self.p < 1.0:  # untouched samples (lam = 1) keep their label
            delta = torch.where(lam.expand(x.shape[0]) < 1, delta, torch.zeros_like(delta))
        out, targets, _ = MF.lumix(x, t, lam, perm, delta, boxes)
        return out, targets

    def _options(self):
        return {"base": self.base, "uncertainty": self.uncertainty, **super()._options()}
