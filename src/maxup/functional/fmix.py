"""FMix (Harris et al. 2020): masks cut from a thresholded low-frequency image, and the mixing by them.

Pure functions with injectable randomness, like :mod:`maxup.functional.mixing`: the
complex Gaussian spectrum and ``lam`` are arguments (or drawn from a ``torch.Generator``),
every op works on any device and returns new tensors. A mask is the weight of the kept
image: 1 keeps ``x``, 0 takes the partner ``x[perm]``.

>>> g = torch.Generator().manual_seed(0)
>>> mask = fmix_mask(0.3, (28, 28), generator=g)               # one mask: the top round(0.3 * 784) pixels
>>> mask.shape, int(mask.sum())
(torch.Size([1, 28, 28]), 235)
>>> x, t = torch.rand(8, 1, 28, 28), torch.eye(10)[torch.arange(8)]
>>> x_mix, t_mix, weight = fmix(x, t, mask, torch.randperm(8, generator=g))
>>> round(weight[0].item() * 784)                                # the label weight of x: the mask's mean
235

Reference: Harris, Marcu, Painter, Niranjan, Prügel-Bennett and Hare, "FMix: Enhancing
Mixed Sample Data Augmentation", arXiv:2002.12047; the authors' code is
github.com/ecs-vlc/FMix, ``fmix.py`` (``fftfreqnd``, ``get_spectrum``,
``make_low_freq_image``, ``binarise_mask``, ``sample_mask``). docs/methods/fmix.md says
where this reading differs from that code and why.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from . import _random as R
from .mixing import _check_unit, _mix_targets, _partner, _per_sample

__all__ = ["binarise_mask", "fmix", "fmix_frequencies", "fmix_mask", "fmix_spectrum", "low_freq_image"]


def _check_shape(shape) -> tuple[int, int]:
    try:
        h, w = shape
    except (TypeError, ValueError):
        raise ValueError(f"shape must be the image size (H, W), got {shape!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"shape must be two positive ints (H, W), got {shape!r}")
    return h, w


def _check_decay(decay_power) -> float:
    if isinstance(decay_power, bool) or not isinstance(decay_power, Real) or not math.isfinite(decay_power) \
            or decay_power < 0:
        raise ValueError(f"decay_power must be a finite number >= 0 (the spectrum falls as 1/f**decay_power), "
                         f"got {decay_power!r}")
    return float(decay_power)


def _check_soft(max_soft) -> float:
    if isinstance(max_soft, bool) or not isinstance(max_soft, Real) or not 0.0 <= max_soft <= 0.5:
        raise ValueError(f"max_soft must be a number in [0, 0.5] (the share of pixels on each side of the mask's "
                         f"edge that get a soft ramp), got {max_soft!r}")
    return float(max_soft)


def fmix_frequencies(height: int, width: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """The (H, W // 2 + 1) radial frequencies ``sqrt(fy^2 + fx^2)`` of a real 2-D FFT of an H x W image.

    ``fy`` runs over ``fftfreq(H)``, ``fx`` over the non-negative ``rfftfreq(W)`` (the authors'
    ``fftfreqnd(h, w)``, which keeps one more, unused, column when W is odd).
    """
    height, width = _check_shape((height, width))
    fy = torch.fft.fftfreq(height, device=device, dtype=dtype)
    fx = torch.fft.rfftfreq(width, device=device, dtype=dtype)
    return (fy[:, None].square() + fx[None, :].square()).sqrt()


def fmix_spectrum(n: int, height: int, width: int, *, generator=None, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """``n`` complex Gaussian spectra as (n, H, W // 2 + 1, 2) real tensors, (real, imaginary) last.

    The randomness of :func:`fmix_mask`; its layout is the authors' ``param`` (drawn by
    ``get_spectrum``) with the channel axis as the batch.
    """
    height, width = _check_shape((height, width))
    return R.randn((n, height, width // 2 + 1, 2), generator=generator, device=device, dtype=dtype)


def low_freq_image(spectrum: torch.Tensor, height: int, width: int, decay_power: float = 3.0) -> torch.Tensor:
    """(n, H, W) low-frequency images in [0, 1] from (n, H, W // 2 + 1, 2) Gaussian spectra.

    Each coefficient is scaled by ``1 / max(f, 1 / max(H, W)) ** decay_power``, the scaled
    complex spectrum goes through an inverse real 2-D FFT, and each image is shifted and
    scaled to [0, 1] (a constant image gives zeros). Computed in the spectrum's dtype.
    """
    height, width = _check_shape((height, width))
    decay_power = _check_decay(decay_power)
    expected = (height, width // 2 + 1, 2)
    if not isinstance(spectrum, torch.Tensor) or spectrum.dim() != 4 or tuple(spectrum.shape[1:]) != expected:
        shape = tuple(spectrum.shape) if isinstance(spectrum, torch.Tensor) else type(spectrum).__name__
        raise ValueError(f"spectrum must be a (n, {height}, {width // 2 + 1}, 2) tensor of (real, imaginary) "
                         f"Gaussian draws for {height}x{width} masks, got {shape}")
    if not spectrum.is_floating_point():
        raise ValueError(f"spectrum must be a floating-point tensor, got dtype {spectrum.dtype}")
    freqs = fmix_frequencies(height, width, device=spectrum.device)
    scale = (1.0 / freqs.clamp_min(1.0 / max(height, width)).pow(decay_power)).to(spectrum.dtype)
    coeffs = torch.view_as_complex((spectrum * scale[:, :, None]).contiguous())
    image = torch.fft.irfft2(coeffs, s=(height, width))
    low = image.amin(dim=(1, 2), keepdim=True)
    span = image.amax(dim=(1, 2), keepdim=True) - low
    return (image - low) / span.clamp_min(torch.finfo(image.dtype).tiny)


def binarise_mask(image: torch.Tensor, lam, max_soft: float = 0.0) -> torch.Tensor:
    """(n, H, W) masks: the ``round(lam * H * W)`` largest pixels of each image are 1, the rest 0.

    ``lam`` is a float or an (n,) tensor in [0, 1]. With ``max_soft > 0`` the edge is a ramp:
    ``s = int(H * W * min(max_soft, lam, 1 - lam))`` pixels on each side of the threshold fall
    linearly from 1 to 0 in the images' order (the authors' ``binarise_mask``); the mask's
    mean is still ``round(lam * H * W) / (H * W)``. Ties keep the pixel that comes first.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be an (n, H, W) tensor of low-frequency images, got {shape}")
    max_soft = _check_soft(max_soft)
    n, h, w = image.shape
    size = h * w
    if isinstance(lam, torch.Tensor) and lam.numel() not in (1, n):
        raise ValueError(f"lam must be a float or hold one value per mask ({n}), got shape {tuple(lam.shape)}")
    lam = _per_sample(lam, n, image.new_empty((), dtype=torch.float64), "lam")
    num = (lam * size).round()
    order = image.reshape(n, size).argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(size, device=image.device).expand(n, size))
    if max_soft == 0.0:
        mask = rank < num.long()[:, None]
    else:
        rank = rank.to(torch.float64)
        soft = (size * torch.minimum(lam, 1.0 - lam).clamp(max=max_soft)).floor()
        high = (num + soft).clamp(max=size)
        ramp = ((high[:, None] - 1.0 - rank) / (2.0 * soft[:, None] - 1.0).clamp_min(1.0)).clamp(0.0, 1.0)
        mask = torch.where(soft[:, None] > 0, ramp, (rank < num[:, None]).to(torch.float64))
    return mask.to(image.dtype if image.is_floating_point() else torch.float32).reshape(n, h, w)


def fmix_mask(lam, shape, decay_power: float = 3.0, max_soft: float = 0.0, *, spectrum: torch.Tensor | None = None,
              generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """FMix masks (k, H, W): a low-frequency image per mask, its top ``round(lam * H * W)`` pixels set to 1.

    ``lam`` is a float (one mask, or one per given spectrum) or a (k,) tensor (one mask
    per value); the mask keeps ``x`` where it is 1. ``spectrum`` (k, H, W // 2 + 1, 2) injects
    the Gaussian draws (see :func:`fmix_spectrum`); otherwise they come from ``generator``
    on ``device``. The mask's dtype is the spectrum's (float32 when drawn).

    >>> m = fmix_mask(torch.tensor([0.2, 0.7]), (8, 8), generator=torch.Generator().manual_seed(0))
    >>> m.shape, m.sum(dim=(1, 2)).tolist()
    (torch.Size([2, 8, 8]), [13.0, 45.0])
    """
    h, w = _check_shape(shape)
    decay_power, max_soft = _check_decay(decay_power), _check_soft(max_soft)
    _check_unit("lam", lam)
    if spectrum is None:
        k = torch.as_tensor(lam).numel() if isinstance(lam, torch.Tensor) else 1
        if device is None and isinstance(lam, torch.Tensor):
            device = lam.device
        spectrum = fmix_spectrum(k, h, w, generator=generator, device=device)
    return binarise_mask(low_freq_image(spectrum, h, w, decay_power), lam, max_soft)


def fmix(x: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor):
    """FMix: ``x_mix = M * x + (1 - M) * x[perm]``, labels by the mask's area.

    ``mask`` is (H, W), (1, H, W) (one mask for the batch) or (B, H, W), values in [0, 1]
    (from :func:`fmix_mask`); it is shared by the channels. The label weight of ``x`` is
    ``mean(M)``: ``t_mix = mean(M) t + (1 - mean(M)) t[perm]``. Returns ``(x_mix, t_mix, weight)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a batch of images of shape (B, C, H, W), got {shape}")
    b, _, h, w = x.shape
    if not isinstance(mask, torch.Tensor) or mask.shape[-2:] != (h, w) or mask.dim() not in (2, 3) \
            or (mask.dim() == 3 and mask.shape[0] not in (1, b)):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be ({h}, {w}), (1, {h}, {w}) or ({b}, {h}, {w}) for a batch of {b} "
                         f"{h}x{w} images, got {shape}")
    _check_unit("mask", mask)
    mask = mask.to(device=x.device, dtype=x.dtype).reshape(-1, h, w)
    out = torch.lerp(_partner(x, perm), x, mask[:, None])
    weight = mask.mean(dim=(1, 2)).expand(b)
    return out, _mix_targets(targets, perm, weight), weight
