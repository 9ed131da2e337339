"""Batch augmentations: small modules that draw randomness and call :mod:`maxup.functional`.

Every augmentation is called as ``aug(x, y, generator=None) -> (x_aug, y_soft)``.
Integer labels need ``num_classes`` at construction; soft (B, C) targets pass through.
Inputs are never edited in place; any device works, and so does a DataLoader
``collate_fn`` (see :func:`collate`).

>>> aug = CutMix(alpha=1.0, num_classes=10, per_sample=True)
>>> x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
>>> xa, ya = aug(x, y, generator=torch.Generator().manual_seed(0))
>>> xa.shape, ya.shape
(torch.Size([8, 3, 32, 32]), torch.Size([8, 10]))
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import functional as MF
from .._checks import check_inputs, check_int, check_positive, check_probability, check_range
from ..functional import _random as R


class Augmentation(nn.Module):
    """Base class: checks the batch, turns labels into soft targets, calls :meth:`apply`."""

    #: the rank the inputs must have (None: any rank >= 2)
    image_only = False
    #: token-sequence augmentations (:mod:`maxup.augment.text`): ids in, integer targets kept
    sequence = False
    #: why it must be the last augmentation of a Compose (None: it may go anywhere)
    last: str | None = None
    #: the label values were checked (on the first call; later calls check shapes only: no host read)
    _values_checked = False

    def __init__(self, *, num_classes: int | None = None, p: float = 1.0):
        super().__init__()
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, minimum=1)
        self.p = check_probability("p", p)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        if self.sequence:  # Compose / RandomChoice of token augmentations: each member checks its inputs
            return self.apply(x, y, generator)
        x = check_inputs(x, exact_dim=4 if self.image_only else None)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y holds {y.shape[0]} labels but x holds {x.shape[0]} samples; they must match")
        targets = MF.soft_targets(y, self.num_classes, check=not self._values_checked)
        self._values_checked = True
        return self.apply(x, targets.to(x.device), generator)

    def apply(self, x: torch.Tensor, t: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _applied(self, n: int, generator, device) -> torch.Tensor:
        """(n,) booleans: which samples the augmentation touches (probability ``p``)."""
        if self.p >= 1.0:
            return torch.ones(n, dtype=torch.bool, device=device)
        return R.rand((n,), generator=generator, device=device) < self.p

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())

    def _options(self) -> dict:
        return {"num_classes": self.num_classes, "p": self.p}


class Identity(Augmentation):
    """Leaves the inputs as they are; only turns labels into soft targets."""

    def apply(self, x, t, generator):
        return x, t


class GaussianNoise(Augmentation):
    """Adds N(0, sigma^2) noise to every element (any input shape)."""

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


class Cutout(Augmentation):
    """Cutout (DeVries and Taylor 2017): a ``size`` box, centred anywhere and clipped, set to ``fill``.

    ``size=None`` (default) takes half of each side, the paper's 16 x 16 on 32 x 32 CIFAR-10.
    """

    image_only = True

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


class RandomCropFlip(Augmentation):
    """Random crop after ``padding`` (zeros or reflection) and a horizontal flip with probability ``flip``."""

    image_only = True

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


class _Mixing(Augmentation):
    """Shared draw of the mixing ops: lam ~ Beta(alpha, alpha) per batch or per sample, a random partner permutation."""

    def __init__(self, alpha: float = 1.0, *, per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.alpha = check_positive("alpha", alpha)
        self.per_sample = bool(per_sample)

    def _draw(self, x, generator):
        """(k,) lambdas, k = B per sample or 1 per batch (one box, centre or scale for the batch too), and a partner permutation."""
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


class Mixup(_Mixing):
    """Mixup (Zhang et al. 2018) on any input shape: ``lam x_i + (1 - lam) x_perm(i)``, lam ~ Beta(alpha, alpha)."""

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        return MF.mixup(x, t, lam, perm)


class CutMix(_Mixing):
    """CutMix (Yun et al. 2019): paste a box of area ``(1 - lam) H W``; lambda recomputed from the clipped box."""

    image_only = True

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        boxes = MF.sample_boxes(1.0 - lam, *x.shape[-2:], generator=generator, device=x.device)
        out, targets, _ = MF.cutmix(x, t, boxes, perm)
        return out, targets


class HMix(_Mixing):
    """HMix: a CutMix box of area ``ratio * (1 - lam)`` inside a Mixup blend; label weight ``lam``.

    ``ratio=0`` is Mixup, ``ratio=1`` is CutMix (see :func:`maxup.functional.hmix`).
    """

    image_only = True

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


class GMix(_Mixing):
    """GMix (Park et al. 2022): the partner blended in through a Gaussian mask of area ``(1 - lam) H W``."""

    image_only = True

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        h, w = x.shape[-2:]
        centers = R.rand((lam.shape[0], 2), generator=generator, device=x.device)
        centers = torch.stack([centers[:, 0] * h, centers[:, 1] * w], 1)
        out, targets, _ = MF.gmix(x, t, lam, centers, perm)
        return out, targets


class ResizeMix(Augmentation):
    """ResizeMix (Qin et al. 2020): the partner, resized to ``scale`` ~ U(scale) of each side, pasted at random."""

    image_only = True

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


class Compose(Augmentation):
    """Apply augmentations one after the other; the first turns labels into soft targets."""

    def __init__(self, augmentations: Sequence[Augmentation], *, num_classes: int | None = None):
        augmentations = list(augmentations)
        if not augmentations or not all(isinstance(a, Augmentation) for a in augmentations):
            raise ValueError("augmentations must be a non-empty list of maxup.augment.Augmentation modules")
        early = next((a for a in augmentations[:-1] if a.last), None)
        if early is not None:
            raise ValueError(f"{type(early).__name__} must be the last augmentation: {early.last}")
        super().__init__(num_classes=num_classes or _common_classes(augmentations))
        self.augmentations = nn.ModuleList(augmentations)
        self.last = augmentations[-1].last  # a Compose inside a Compose keeps its last member's constraint
        self.image_only = any(a.image_only for a in augmentations)
        self.sequence = _sequence(augmentations)

    def apply(self, x, t, generator):
        for aug in self.augmentations:
            x, t = aug(x, t, generator)
        return x, t

    def _options(self):
        return {}


class RandomChoice(Augmentation):
    """Apply one of ``augmentations`` to the whole batch, chosen with probabilities ``weights``."""

    def __init__(self, augmentations: Sequence[Augmentation], *, weights: Sequence[float] | None = None,
                 num_classes: int | None = None):
        augmentations = list(augmentations)
        if not augmentations or not all(isinstance(a, Augmentation) for a in augmentations):
            raise ValueError("augmentations must be a non-empty list of maxup.augment.Augmentation modules")
        super().__init__(num_classes=num_classes or _common_classes(augmentations))
        self.augmentations = nn.ModuleList(augmentations)
        self.last = next((a.last for a in augmentations if a.last), None)  # the drawn member may need it
        w = torch.ones(len(augmentations)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (len(augmentations),) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {len(augmentations)} non-negative numbers with a positive sum, got {weights!r}")
        self.register_buffer("weights", (w / w.sum()).float(), persistent=False)
        self.image_only = any(a.image_only for a in augmentations)
        self.sequence = _sequence(augmentations)

    def apply(self, x, t, generator):
        u = R.host_rand(1, generator=generator)[0]  # a host choice: from the host generator
        i = min(int(torch.searchsorted(self.weights.cumsum(0).cpu(), torch.tensor([u]), right=True)), len(self.weights) - 1)
        return self.augmentations[i](x, t, generator)

    def _options(self):
        return {"weights": [round(float(w), 4) for w in self.weights]}


def _common_classes(augmentations) -> int | None:
    found = {a.num_classes for a in augmentations if a.num_classes is not None}
    if len(found) > 1:
        raise ValueError(f"augmentations disagree on num_classes: {sorted(found)}")
    return found.pop() if found else None


def _sequence(augmentations) -> bool:
    found = {a.sequence for a in augmentations}
    if len(found) > 1:
        raise ValueError("token-sequence augmentations (embed_noise, word_dropout, token_sub) cannot be combined "
                         "with image or feature augmentations")
    return found.pop()


def collate(augment: Augmentation, generator: torch.Generator | None = None):
    """A DataLoader ``collate_fn`` that stacks (x, y) samples and augments the batch.

    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate(Mixup(num_classes=10)))

    Manifold Mixup is refused: it mixes inside the model's forward pass, which a loader cannot do.
    """
    if any(isinstance(m, ManifoldMixup) for m in augment.modules()):
        raise ValueError("collate cannot apply ManifoldMixup: it mixes hidden features inside the model's forward "
                         "pass; pass it to maxup.ERM / maxup.MaxUp (or run the model under "
                         "maxup.functional.mix_hidden(model, aug.plan)) instead of the DataLoader")

    def fn(batch):
        xs, ys = zip(*batch)
        return augment(torch.stack(xs), torch.as_tensor(ys) if not torch.is_tensor(ys[0]) else torch.stack(ys), generator)

    return fn


from .text import EmbeddingNoise, TokenAugmentation, TokenSubstitution, WordDropout  # noqa: E402 (subclasses)
from .manifold import ManifoldMixup  # noqa: E402
from .soft import LUMix, LabelSmoothing, SoftAugmentation  # noqa: E402

__all__ = [
    "Augmentation", "Compose", "CutMix", "Cutout", "EmbeddingNoise", "GMix", "GaussianNoise", "HMix", "Identity",
    "Mixup", "RandomChoice", "RandomCropFlip", "ResizeMix", "TokenAugmentation", "TokenSubstitution",
    "WordDropout", "collate", "LUMix", "LabelSmoothing", "ManifoldMixup", "SoftAugmentation",
]
