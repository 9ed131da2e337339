"""Soft targets that follow the augmentation: Soft Augmentation's curve, LUMix's perturbed label ratio.

Pure functions; the randomness (offsets, boxes, lambdas, perturbations) comes in as arguments.
"""
from __future__ import annotations

import torch

from .._checks import check_int, check_positive, check_probability
from .mixing import (
    _box_weight,
    _check_boxes,
    _check_fill,
    _mix_targets,
    _per_sample,
    box_area,
    crop_flip,
    cutmix,
    mixup,
)

__all__ = ["lumix", "occlude", "perturb_ratio", "shift_crop", "soften_targets", "softening_curve"]


# ---------------------------------------------------------------- Soft Augmentation (Liu et al., CVPR 2023)


def softening_curve(visible, num_classes: int, *, p_max: float = 1.0, threshold: float = 1.0,
                    power: float = 2.0) -> torch.Tensor:
    """Target confidence of a sample of which the fraction ``visible`` is left (Soft Augmentation).

    ``p = p_max - (p_max - 1/K) * ((T - v) / T)^k`` for ``v < T``, else ``p_max``; ``v`` is
    clipped to [0, 1], so ``v = 0`` gives chance, ``1/K``. Defaults: what the authors' CIFAR
    code runs (``T = 1``, ``k = 2`` from ``train.py --pcrop 2``, ``p_max = 1``; Liu, Yan,
    Leal-Taixe, Hays, Ramanan, "Soft Augmentation for Image Classification", CVPR 2023;
    github.com/youngleox/soft_augmentation). ``power=4.0`` is the default of their ``SoftCrop``
    helper, which ``train.py`` overrides.

    >>> softening_curve(torch.tensor([0.0, 0.5, 1.0]), 10)
    tensor([0.1000, 0.7750, 1.0000])
    >>> softening_curve(torch.tensor([0.5]), 10, power=4.0)
    tensor([0.9438])
    """
    check_int("num_classes", num_classes, minimum=2)
    p_max = check_probability("p_max", p_max)
    if p_max < 1.0 / num_classes:
        raise ValueError(f"p_max must be at least 1/num_classes = {1.0 / num_classes:.4g} (chance), got {p_max!r}")
    threshold = check_probability("threshold", threshold)
    if threshold == 0:
        raise ValueError("threshold must be in (0, 1]: the visible fraction from which targets stay at p_max")
    power = check_positive("power", power)
    v = torch.as_tensor(visible, dtype=torch.float32).clamp(0.0, 1.0)
    drop = ((threshold - v).clamp_min(0.0) / threshold) ** power
    return p_max - (p_max - 1.0 / num_classes) * drop


def soften_targets(targets: torch.Tensor, p) -> torch.Tensor:
    """``p * t + (1 - p) * (1 - t) / (K - 1)`` per row: a one-hot row keeps ``p`` on its class and
    spreads ``1 - p`` evenly over the other ``K - 1``; every row still sums to one.

    ``p`` is a float or one confidence per row (B,).
    """
    k = targets.shape[-1]
    if k < 2:
        raise ValueError(f"soften_targets needs at least 2 classes, got targets of shape {tuple(targets.shape)}")
    p = _per_sample(p, targets.shape[0], targets, "p")[:, None]
    return p * targets + (1.0 - p) * (1.0 - targets) / (k - 1)


def shift_crop(x: torch.Tensor, offsets: torch.Tensor, fill=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image moved by ``offsets`` (B, 2) = (dy, dx) pixels, the uncovered part set to ``fill``.

    Output pixel (i, j) is ``x[i + dy, j + dx]`` where that lies in the image, else ``fill`` (a
    number, or (B, C) values per sample and channel). This is a crop of the same size whose
    window is shifted off the image. Returns ``(x_crop, visible)`` with the visible fraction
    ``(H - |dy|) (W - |dx|) / (H W)`` (0 when a shift reaches a whole side).
    """
    b, _, h, w = x.shape
    offsets = offsets.to(device=x.device, dtype=torch.long)
    dy, dx = offsets[:, 0], offsets[:, 1]
    pad = int(offsets.abs().max()) if offsets.numel() else 0
    pad = min(pad, max(h, w))
    shifted = crop_flip(x, offsets.clamp(-pad, pad) + pad, torch.zeros(b, dtype=torch.bool, device=x.device), pad)
    boxes = torch.stack([(-dy).clamp(0, h), (-dx).clamp(0, w), (h - dy).clamp(0, h), (w - dx).clamp(0, w)], 1)
    inside = _box_weight(boxes, h, w, x.dtype)[:, None]
    return torch.lerp(_fill(x, fill), shifted, inside), box_area(boxes) / (h * w)


def occlude(x: torch.Tensor, boxes: torch.Tensor, fill=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's box set to ``fill`` (a number or (B, C) values); returns ``(x_occluded, visible)``
    with the visible fraction ``1 - area / (H W)``. Boxes are (B, 4) ``(y0, x0, y1, x1)``, half-open."""
    h, w = x.shape[-2:]
    _check_boxes(boxes, h, w)
    boxes = boxes.to(x.device)
    inside = _box_weight(boxes, h, w, x.dtype)[:, None]
    return torch.lerp(x, _fill(x, fill), inside), 1.0 - box_area(boxes) / (h * w)


def _fill(x: torch.Tensor, fill) -> torch.Tensor:
    _check_fill(fill)
    fill = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    if fill.dim() == 2:
        if fill.shape != x.shape[:2]:
            raise ValueError(f"fill must be a number or have shape {tuple(x.shape[:2])} (B, C), "
                             f"got {tuple(fill.shape)}")
        fill = fill[:, :, None, None]
    return fill.expand_as(x)


# ---------------------------------------------------------------- LUMix (Sun et al. 2022)


def perturb_ratio(lam, delta) -> torch.Tensor:
    """The perturbed label ratio ``clip(lam + delta, 0, 1)`` (LUMix, this project's rule)."""
    lam = torch.as_tensor(lam, dtype=torch.float32)
    delta = torch.as_tensor(delta, dtype=torch.float32, device=lam.device)
    return (lam + delta).clamp(0.0, 1.0)


def lumix(x: torch.Tensor, targets: torch.Tensor, lam, perm: torch.Tensor, delta, boxes: torch.Tensor | None = None):
    """Mixup (``boxes=None``) or CutMix (``boxes`` given) whose label ratio is perturbed.

    The images mix as in :func:`mixup` with ``lam`` or :func:`cutmix` with ``boxes`` (lam then
    ``1 - area / (H W)``); the targets mix with ``lam_y = clip(lam + delta, 0, 1)`` instead of
    ``lam``: ``t = lam_y * t + (1 - lam_y) * t[perm]``. ``delta`` is a float or one value per
    sample. Returns ``(x_mix, t_mix, lam_y)``.

    LUMix (Sun, Chen, He, Yuille, Torr, Bai, "LUMix: Improving Mixup by Better Modelling Label
    Uncertainty", 2022) perturbs the label weights to model label uncertainty; its exact rule
    could not be checked here, so this is the documented stand-in used by
    :class:`maxup.augment.LUMix`: ``delta ~ U[-u, u]``, one per sample.
    """
    n = x.shape[0]
    if boxes is None:
        out, _ = mixup(x, targets, lam, perm)
        lam_x = _per_sample(lam, n, targets, "lam")
    else:
        out, _, lam_x = cutmix(x, targets, boxes, perm)
    lam_y = perturb_ratio(lam_x.to(targets.device), _per_sample(delta, n, targets))
    return out, _mix_targets(targets, perm, lam_y), lam_y
