"""Pure batch operations: noise, occlusion, crop/flip and sample mixing.

Every function takes its randomness as arguments (``lam``, ``perm``, ``boxes``,
``centers``, ``noise``, ``offsets``), works on any device, and returns new tensors
without editing its inputs. ``lam`` may be a float (one value for the batch) or a
(B,) tensor (one per sample). Boxes are (B, 4) integer tensors ``(y0, x0, y1, x1)``,
half-open, in pixels. ``perm`` pairs sample i with sample ``perm[i]``; any batch
size works, odd ones included. The ``sample_*`` helpers draw the arguments from an
optional ``torch.Generator``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _random as R


def _per_sample(value, batch: int, like: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """``value`` (float or (B,) tensor) as a (B,) tensor of ``like``'s dtype and device; with ``name``,
    checked to lie in [0, 1] (see :func:`_check_unit`)."""
    if name is not None:
        _check_unit(name, value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # filled on the device: no host copy
        return torch.full((batch,), float(value), dtype=like.dtype, device=like.device)
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0 or t.shape == (1,):
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-sample values must be a float or have shape ({batch},), got {tuple(t.shape)}")
    return t


def _checkable(value) -> bool:
    """Whether checking ``value``'s numbers is free: a Python number or a CPU tensor. On an accelerator the
    check would stall the step for a host synchronisation, so values there (drawn in range by the
    augmentation modules) are trusted."""
    if not isinstance(value, torch.Tensor):
        return True
    # a host-read count (maxup.train.syncs.HostSyncCounter) runs CPU data as if it were on the device
    return value.device.type == "cpu" and not R.counting_as_device()


def _check_unit(name: str, value) -> None:
    """A mixing weight (a float or a tensor of them) in [0, 1]: outside it the mixed targets go negative."""
    if _checkable(value):
        with R.host_only():  # a Python number or a CPU tensor: no device waits for this read
            t = torch.as_tensor(value, dtype=torch.float64)
            if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
                raise ValueError(f"{name} must lie in [0, 1] (a weight of the first image), got {value!r}")


def _check_fill(fill) -> None:
    """A fill value (or tensor of them) that is finite: an inf or NaN fill spreads NaN beyond the box."""
    if _checkable(fill):
        with R.host_only():  # a Python number or a CPU tensor: no device waits for this read
            if not bool(torch.isfinite(torch.as_tensor(fill, dtype=torch.float64)).all()):
                raise ValueError(f"fill must be finite, got {fill!r}")


def _check_boxes(boxes: torch.Tensor, height: int, width: int) -> None:
    """(B, 4) boxes ``(y0, x0, y1, x1)`` with 0 <= y0 <= y1 <= H and 0 <= x0 <= x1 <= W."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes must be a (B, 4) tensor of (y0, x0, y1, x1), got {shape}")
    if boxes.is_floating_point() or boxes.is_complex() or boxes.dtype == torch.bool:
        raise ValueError(f"boxes must hold integer pixel coordinates, got dtype {boxes.dtype}")
    if _checkable(boxes) and boxes.numel():
        y0, x0, y1, x1 = boxes.unbind(1)
        if not bool(((0 <= y0) & (y0 <= y1) & (y1 <= height) & (0 <= x0) & (x0 <= x1) & (x1 <= width)).all()):
            raise ValueError(f"boxes must satisfy 0 <= y0 <= y1 <= {height} and 0 <= x0 <= x1 <= {width} "
                             f"(half-open, inside the {height}x{width} image), got {boxes.tolist()}")


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _partner(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` along the batch. ``index_select`` copies whole rows; advanced indexing
    computes an offset per element and is several times slower on CPU."""
    return x.index_select(0, perm.to(device=x.device, dtype=torch.long))


def _mix_targets(targets: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight * t + (1 - weight) * t[perm], weight per sample."""
    return torch.lerp(_partner(targets, perm), targets, weight.to(targets.dtype)[:, None])


def _paste_(out: torch.Tensor, src: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, src, out)`` written into ``out`` (a fresh tensor the caller owns),
    for a 0/1 float ``mask`` that broadcasts against both.

    ``lerp`` with a weight of exactly 0 or 1 returns one end bit for bit when both inputs are
    finite (an inf or NaN in either gives NaN at that pixel, where ``torch.where`` would not);
    on CPU it is several times faster than ``torch.where``/``masked_fill`` with a mask broadcast
    over the channels, and working in place saves allocating one more batch-sized tensor.
    """
    return out.lerp_(src, mask)


# ---------------------------------------------------------------- boxes and masks


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A (B, H, W) boolean mask, True inside each sample's box."""
    return _box_weight(boxes, height, width, torch.uint8).view(torch.bool)


def _box_weight(boxes: torch.Tensor, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """:func:`box_mask` as 0/1 numbers of ``dtype``: the outer product of a row and a column
    indicator (a broadcast multiply is several times faster on CPU than a broadcast ``&``)."""
    boxes = boxes.to(torch.long)
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])).to(dtype)
    in_cols = ((cols >= boxes[:, 1:2]) & (cols < boxes[:, 3:4])).to(dtype)
    return in_rows[:, :, None] * in_cols[:, None, :]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Pixel area of each box."""
    return ((boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)).to(torch.float32)


def sample_boxes(area, height: int, width: int, *, generator=None, device=None) -> torch.Tensor:
    """CutMix boxes: side ratio sqrt(area), centre uniform over the image, clipped to it.

    ``area`` is a (B,) tensor of target area fractions; clipping makes the real area
    smaller, which is why CutMix recomputes lambda from the box.
    """
    area = torch.as_tensor(area, dtype=torch.float32, device=device)
    n = area.shape[0]
    ratio = area.clamp(0, 1).sqrt()
    h = (ratio * height).long()
    w = (ratio * width).long()
    cy = R.randint(height, (n,), generator=generator, device=device)
    cx = R.randint(width, (n,), generator=generator, device=device)
    y0, x0 = cy - h // 2, cx - w // 2
    return torch.stack([y0.clamp(0, height), x0.clamp(0, width),
                        (y0 + h).clamp(0, height), (x0 + w).clamp(0, width)], 1)


def sample_cutout_boxes(n: int, size: tuple[int, int], height: int, width: int, *, generator=None, device=None):
    """Cutout boxes of ``size`` (h, w) centred anywhere in the image, clipped (DeVries and Taylor 2017)."""
    cy = R.randint(height, (n,), generator=generator, device=device)
    cx = R.randint(width, (n,), generator=generator, device=device)
    y0, x0 = cy - size[0] // 2, cx - size[1] // 2
    return torch.stack(
        [y0.clamp(0, height), x0.clamp(0, width), (y0 + size[0]).clamp(0, height), (x0 + size[1]).clamp(0, width)], 1
    )


def sample_inner_boxes(scale, height: int, width: int, *, generator=None, device=None) -> torch.Tensor:
    """Boxes with sides round(scale * side) (at least 1) placed wholly inside the image (ResizeMix)."""
    scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
    n = scale.shape[0]
    h = (scale * height).round().long().clamp(1, height)
    w = (scale * width).round().long().clamp(1, width)
    y0 = R.randint(height - h + 1, (n,), generator=generator, device=device)
    x0 = R.randint(width - w + 1, (n,), generator=generator, device=device)
    return torch.stack([y0, x0, y0 + h, x0 + w], 1)


# ---------------------------------------------------------------- single-image ops


def gaussian_noise(x: torch.Tensor, sigma, noise: torch.Tensor | None = None, *, generator=None) -> torch.Tensor:
    """x + sigma * noise, noise ~ N(0, I) drawn from ``generator`` unless given; sigma float or (B,)."""
    if noise is None:
        noise = R.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if isinstance(sigma, (int, float)):  # a Python number stays one (no tensor copied to the device)
        return x + float(sigma) * noise
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.dim() == 1:
        sigma = _bcast(sigma, x)
    return x + sigma * noise


def cutout(x: torch.Tensor, boxes: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Fill each sample's box with ``fill``; labels are unchanged."""
    _check_boxes(boxes, x.shape[-2], x.shape[-1])
    _check_fill(fill)
    mask = _box_weight(boxes.to(x.device), x.shape[-2], x.shape[-1], x.dtype)
    return torch.lerp(x, x.new_full((), fill).expand_as(x), mask[:, None])


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flip: torch.Tensor, padding: int, padding_mode: str = "constant"):
    """Pad by ``padding``, take the H x W window at ``offsets`` (B, 2) = (dy, dx) in [0, 2*padding],
    and mirror horizontally where ``flip`` (B,) is True. Vectorised: one gather over the flattened
    padded image, with a (B, 1, H*W) source index shared by the channels."""
    b, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, mode=padding_mode) if padding else x
    hp, wp = xp.shape[-2:]
    offsets = offsets.to(device=x.device, dtype=torch.long)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)
    cols = torch.where(flip.to(x.device)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, index).view(b, c, h, w)


# ---------------------------------------------------------------- mixing ops


def mixup(x: torch.Tensor, targets: torch.Tensor, lam, perm: torch.Tensor):
    """Mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * x[perm]``, targets alike.

    Works on any input shape (images, signals, features). Returns ``(x_mix, t_mix)``.
    """
    lam = _per_sample(lam, x.shape[0], x, "lam")
    return _partner(x, perm).lerp_(x, _bcast(lam, x)), _mix_targets(targets, perm, lam)


def cutmix(x: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor, perm: torch.Tensor):
    """CutMix (Yun et al. 2019): paste ``x[perm]`` inside each box.

    The label weight of the kept image is recomputed from the clipped box:
    ``lam = 1 - area / (H * W)``. Returns ``(x_mix, t_mix, lam)``.
    """
    h, w = x.shape[-2:]
    _check_boxes(boxes, h, w)
    boxes = boxes.to(x.device)
    lam = 1.0 - box_area(boxes).expand(x.shape[0]) / (h * w)
    out = _paste_(_partner(x, perm), x, 1.0 - _box_weight(boxes, h, w, x.dtype)[:, None])
    return out, _mix_targets(targets, perm, lam), lam


def hmix(x: torch.Tensor, targets: torch.Tensor, lam, boxes: torch.Tensor, perm: torch.Tensor):
    """HMix: a CutMix box pasted into a Mixup blend (after Park et al. 2022).

    Outside the box the image is ``lam_m * x + (1 - lam_m) * x[perm]`` with
    ``lam_m = min(1, lam / (1 - box_fraction))``, inside it is ``x[perm]``; so the label
    weight of ``x`` is ``(1 - box_fraction) * lam_m``, which equals ``lam`` whenever the
    box leaves room for it. No box gives Mixup; a box of area ``1 - lam`` gives CutMix.
    Returns ``(x_mix, t_mix, weight)``.
    """
    h, w = x.shape[-2:]
    _check_boxes(boxes, h, w)
    boxes = boxes.to(x.device)
    lam = _per_sample(lam, x.shape[0], x, "lam")
    outside = 1.0 - box_area(boxes).expand(x.shape[0]).to(x.dtype) / (h * w)
    lam_m = torch.where(outside > 0, (lam / outside.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(lam))
    partner = _partner(x, perm)
    blend = torch.lerp(partner, x, _bcast(lam_m, x))
    out = _paste_(blend, partner, _box_weight(boxes, h, w, x.dtype)[:, None])
    weight = outside * lam_m
    return out, _mix_targets(targets, perm, weight), weight


def gaussian_mask(lam, centers: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """GMix mask ``exp(-pi |p - c|^2 / ((1 - lam) H W))`` of shape (B, H, W).

    Its integral over the plane is ``(1 - lam) H W``: the partner's share before the
    image border cuts it. Separable, so it costs two 1-D exponentials per sample.
    ``centers`` is (B, 2) = (cy, cx) in pixel coordinates (floats).
    """
    centers = centers.to(torch.float32)
    lam = torch.as_tensor(lam, dtype=torch.float32, device=centers.device).expand(centers.shape[0])
    spread = ((1.0 - lam) * height * width).clamp_min(1e-12)[:, None]
    dy = torch.arange(height, device=centers.device, dtype=torch.float32) + 0.5 - centers[:, 0:1]
    dx = torch.arange(width, device=centers.device, dtype=torch.float32) + 0.5 - centers[:, 1:2]
    # rows of lam == 1 (no partner) are zero: a (B, H) multiply instead of a (B, H, W) where
    gy = torch.exp(-torch.pi * dy.square() / spread) * (lam < 1).to(torch.float32)[:, None]
    gx = torch.exp(-torch.pi * dx.square() / spread)
    return gy[:, :, None] * gx[:, None, :]


def gmix(x: torch.Tensor, targets: torch.Tensor, lam, centers: torch.Tensor, perm: torch.Tensor):
    """GMix (Park et al. 2022): blend ``x[perm]`` in through a Gaussian mask (any H, W).

    ``x_mix = (1 - M) * x + M * x[perm]`` with ``M = gaussian_mask(lam, centers, H, W)``;
    the label weight of ``x`` is ``1 - mean(M)``. Returns ``(x_mix, t_mix, weight)``.
    """
    h, w = x.shape[-2:]
    centers = centers.to(x.device).expand(x.shape[0], 2)
    mask = gaussian_mask(_per_sample(lam, x.shape[0], x, "lam"), centers, h, w).to(x.dtype)
    out = torch.lerp(x, _partner(x, perm), mask[:, None])
    weight = 1.0 - mask.mean(dim=(1, 2))
    return out, _mix_targets(targets, perm, weight), weight


def resizemix(x: torch.Tensor, targets: torch.Tensor, boxes: torch.Tensor, perm: torch.Tensor):
    """ResizeMix (Qin et al. 2020): paste the whole of ``x[perm]``, resized bilinearly, into each box.

    The label weight of ``x`` is ``1 - area / (H * W)``. Returns ``(x_mix, t_mix, lam)``.
    """
    b, _, h, w = x.shape
    _check_boxes(boxes, h, w)
    boxes = boxes.to(device=x.device, dtype=torch.long)
    size = (boxes[:, 2:] - boxes[:, :2]).to(x.dtype).clamp_min(1)
    # normalised source coordinates (align_corners=False) of every output pixel in the partner image
    v = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5 - boxes[:, 0:1]) / size[:, 0:1] * 2 - 1
    u = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5 - boxes[:, 1:2]) / size[:, 1:2] * 2 - 1
    grid = torch.stack([u[:, None, :].expand(b, h, w), v[:, :, None].expand(b, h, w)], dim=-1)
    patch = F.grid_sample(_partner(x, perm), grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = _paste_(patch, x, 1.0 - _box_weight(boxes, h, w, x.dtype)[:, None])
    lam = (1.0 - box_area(boxes) / (h * w)).expand(b)
    return out, _mix_targets(targets, perm, lam), lam
