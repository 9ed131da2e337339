"""Spectral-residual saliency (Hou and Zhang, CVPR 2007) in torch, and SaliencyMix's boxes around each image's peak.

Pure functions: no randomness of their own (``lam`` and ``perm`` are arguments), any device,
new tensors out. :func:`spectral_residual` follows OpenCV's ``StaticSaliencySpectralResidual``
(``modules/saliency/src/staticSaliencySpectralResidual.cpp`` of opencv_contrib) step by step:
gray image, bilinear resize to 64 x 64, 2-D DFT, log amplitude minus its 3 x 3 mean (reflected
border), back through the inverse DFT with the original phase, magnitude, 5 x 5 Gaussian blur
(sigma 8), squared, divided by its maximum, resized back to the image. :func:`saliencymix`
pastes a CutMix box of ``x[perm]`` centred on that image's most salient pixel, as the
SaliencyMix authors' ``saliency_bbox`` does, and labels by the pasted area.

>>> x = 0.1 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
>>> x[1, :, 12:15, 20:23] += 0.8                   # a bright square on a dim textured image
>>> s = spectral_residual(x)
>>> s.shape, saliency_peaks(s)[1].tolist()        # its most salient pixel: at the square
(torch.Size([4, 32, 32]), [14, 21])
>>> x_mix, t_mix, w = saliencymix(x, torch.eye(4), torch.tensor([0.75]), torch.tensor([1, 2, 3, 0]))
>>> w.tolist(), t_mix[0].tolist()                 # one 16 x 16 box around it, pasted into every image
([0.75, 0.75, 0.75, 0.75], [0.75, 0.25, 0.0, 0.0])

Reference: Uddin, Monira, Shin, Chung and Bae, "SaliencyMix: A Saliency Guided Data
Augmentation Strategy for Better Regularization", ICLR 2021 (arXiv:2006.01791); the authors'
code is github.com/afm-shahab-uddin/SaliencyMix (``saliency_bbox``). Hou and Zhang, "Saliency
Detection: A Spectral Residual Approach", CVPR 2007. docs/methods/saliencymix.md says where
this reading differs from both and why.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .mixing import _check_unit, _partner, cutmix

__all__ = ["FINE_GRAINED_NEIGHBORHOODS", "GRAY_WEIGHTS", "fine_grained", "saliency_boxes", "saliency_peaks",
           "saliencymix", "spectral_residual", "to_bytes", "to_gray"]

#: luma weights of (R, G, B): OpenCV's ``COLOR_BGR2GRAY`` applied to an image in B, G, R order
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _check_images(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point batch of images (B, C, H, W), got {what}")
    return x


def _check_size(size, name: str = "size") -> tuple[int, int]:
    try:
        h, w = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair (H, W): the saliency's working resolution, 64 in "
                         f"OpenCV; got {size!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int) or v < 3:
            raise ValueError(f"{name} must be ints >= 3 (the 3x3 and 5x5 filters need 3 pixels), such as 64 "
                             f"(OpenCV's); got {size!r}")
    return h, w


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) intensity of (B, C, H, W) images: the channel itself for C = 1, ``0.299 R + 0.587 G + 0.114 B``
    for C = 3 (channels in R, G, B order), the mean of the channels otherwise."""
    x = _check_images(x)
    c = x.shape[1]
    if c == 1:
        return x[:, 0]
    if c == 3:
        return GRAY_WEIGHTS[0] * x[:, 0] + GRAY_WEIGHTS[1] * x[:, 1] + GRAY_WEIGHTS[2] * x[:, 2]
    return x.mean(dim=1)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) resized bilinearly with half-pixel centres and edge clamping, no antialiasing: OpenCV's
    ``INTER_LINEAR``."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    return F.interpolate(img[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _filter(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, H, W) filtered by the separable 1-D ``kernel`` along both axes, reflected border (OpenCV's
    ``BORDER_DEFAULT``, ``BORDER_REFLECT_101``: ``gfedcb|abcdefgh|gfedcba``)."""
    k = kernel.numel()
    r = k // 2
    padded = F.pad(img[:, None], (r, r, r, r), mode="reflect")
    kernel = kernel.to(img.dtype)
    out = F.conv2d(padded, kernel.view(1, 1, 1, k))
    return F.conv2d(out, kernel.view(1, 1, k, 1))[:, 0]


def _gaussian_kernel(size: int, sigma: float, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel(size, sigma)``: ``exp(-(i - (size - 1) / 2)^2 / (2 sigma^2))``, summing to 1."""
    i = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    k = torch.exp(-i.square() / (2.0 * sigma * sigma))
    return k / k.sum()


def spectral_residual(x: torch.Tensor, *, size=64) -> torch.Tensor:
    """Spectral-residual saliency maps (B, H, W) of images (B, C, H, W), each scaled to a maximum of 1.

    OpenCV's ``StaticSaliencySpectralResidual`` in torch (module notes): the intensity
    (:func:`to_gray`) resized to ``size`` (64 x 64), ``A = log |DFT|`` and the phase ``P``,
    the residual ``R = A - mean3x3(A)``, ``m = |IDFT(exp(R + iP))|`` blurred by a 5 x 5 Gaussian
    of sigma 8, squared, divided by its maximum, resized back to H x W. Computed in float64 (as
    OpenCV does; float32 on MPS, which has no float64) and returned in the input's dtype: the
    log amplitude makes the map sensitive to small coefficients, which float32 rounds away.
    Amplitudes below float64's ``eps`` times the largest are rounding noise: their log is taken
    at that floor (OpenCV leaves ``log(0)`` undefined), so a constant image gives a finite map.
    """
    x = _check_images(x)
    size = _check_size(size)
    h, w = x.shape[-2:]
    work = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    gray = _resize(to_gray(x.to(work)), size)
    spectrum = torch.fft.fft2(gray)
    info = torch.finfo(gray.dtype)
    amplitude = spectrum.abs()
    floor = amplitude.amax(dim=(-2, -1), keepdim=True) * info.eps  # below it a coefficient is rounding noise
    log_amp = amplitude.maximum(floor.clamp_min(info.tiny)).log()
    box = torch.full((3,), 1.0 / 3.0, dtype=gray.dtype, device=gray.device)
    residual = log_amp - _filter(log_amp, box)
    # exp(R + iP): each coefficient scaled by exp(R) / |coefficient| (real arithmetic: no trigonometry); a zero
    # coefficient has the angle 0, as OpenCV's cartToPolar gives it
    gain = residual.exp()
    zero = amplitude == 0
    parts = torch.view_as_real(spectrum) * torch.where(zero, 0.0, gain / amplitude.clamp_min(info.tiny))[..., None]
    parts[..., 0] += zero * gain
    back = torch.fft.ifft2(torch.view_as_complex(parts))
    m = _filter(back.abs(), _gaussian_kernel(5, 8.0, device=gray.device, dtype=gray.dtype))
    m = m / m.amax(dim=(-2, -1), keepdim=True).clamp_min(info.tiny)  # scaled before squaring: no overflow
    return _resize(m.square(), (h, w)).to(x.dtype)


#: the half-widths of the six centre-surround windows of OpenCV's ``StaticSaliencyFineGrained``
FINE_GRAINED_NEIGHBORHOODS = (12, 24, 48, 28, 56, 112)


def to_bytes(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) 8-bit intensities (integer values 0..255, float64) of images (B, C, H, W) in any range: the
    intensity (:func:`to_gray`) of each image stretched to its own minimum and maximum, rounded. A constant
    image gives 0 everywhere."""
    gray = to_gray(_check_images(x)).to(torch.float64)
    lo = gray.amin(dim=(-2, -1), keepdim=True)
    span = gray.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (gray - lo) / span.clamp_min(torch.finfo(torch.float64).tiny), 0.0).mul(255).round()


def _blur_bytes(img: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``GaussianBlur(img, (3, 3), 0)`` on 8-bit values: the [1, 2, 1] / 4 kernel along both axes,
    reflected border, rounded half up to integers (its fixed-point arithmetic is exact for this kernel)."""
    kernel = (2.0 - (torch.arange(3, device=img.device, dtype=img.dtype) - 1).abs()) / 4  # on the device
    return (_filter(img, kernel) + 0.5).floor()


def fine_grained(x: torch.Tensor, *, neighborhoods=FINE_GRAINED_NEIGHBORHOODS) -> torch.Tensor:
    """Fine-grained saliency maps (B, H, W) in [0, 1] of images (B, C, H, W): OpenCV's
    ``StaticSaliencyFineGrained`` (Montabone and Soto 2010; ``staticSaliencyFineGrained.cpp`` of
    opencv_contrib), the saliency the SaliencyMix authors use, step by step on 8-bit intensities
    (:func:`to_bytes`).

    The intensity is blurred twice by a 3 x 3 Gaussian; at each of six scales ``n`` every pixel's
    surround mean (the window of pixels ``p - n + 1 .. p + n`` in both axes, clipped to the image,
    the pixel itself left out) gives an on map ``max(I - mean, 0)`` and an off map
    ``max(mean - I, 0)``, truncated to integers; the scales are summed, each sum stretched to 255
    by its maximum (truncated), and the on and off maps added and stretched once more by the larger
    of their maxima. OpenCV stores that last value in a byte without saturation, so a sum above
    255 wraps around; this keeps that arithmetic (the maps equal OpenCV's). The result is the byte
    map divided by 255, as OpenCV returns it.
    """
    img = to_bytes(x)
    for _ in range(2):
        img = _blur_bytes(img)
    b, h, w = img.shape
    f32 = torch.float32
    integral = F.pad(img.cumsum(-1).cumsum(-2), (1, 0, 1, 0)).to(f32)  # (B, H+1, W+1), OpenCV's CV_32F integral
    rows = torch.arange(h, device=img.device)
    cols = torch.arange(w, device=img.device)
    on_sum = torch.zeros_like(img)
    off_sum = torch.zeros_like(img)
    centre = img.to(f32)
    for n in neighborhoods:
        y1, y2 = (rows - n + 1).clamp(0, h), (rows + n + 1).clamp(0, h)
        x1, x2 = (cols - n + 1).clamp(0, w), (cols + n + 1).clamp(0, w)
        total = (integral[:, y2][:, :, x2] + integral[:, y1][:, :, x1]) - integral[:, y2][:, :, x1] \
            - integral[:, y1][:, :, x2]
        area = ((y2 - y1)[:, None] * (x2 - x1)[None, :] - 1).to(f32)
        mean = (total - centre) / area
        on_sum += (centre - mean).clamp_min(0).trunc().to(img.dtype)
        off_sum += (mean - centre).clamp_min(0).trunc().to(img.dtype)

    def stretch(v):  # uchar(255 * (v / max)) in float32, truncated; an all-zero map stays zero
        top = v.amax(dim=(-2, -1), keepdim=True).to(f32)
        return torch.where(top > 0, 255.0 * (v.to(f32) / top.clamp_min(1.0)), 0.0).trunc()

    on, off = stretch(on_sum), stretch(off_sum)
    top = torch.maximum(on.amax(dim=(-2, -1), keepdim=True), off.amax(dim=(-2, -1), keepdim=True))
    both = torch.where(top > 0, (255.0 * (on + off)) / top.clamp_min(1.0), 0.0).trunc()
    return (both.long() % 256).to(f32).div(255.0).to(x.dtype)


def saliency_peaks(saliency: torch.Tensor) -> torch.Tensor:
    """(B, 2) ``(row, col)`` of each map's largest value (B, H, W); on ties, the first in raster order."""
    if not isinstance(saliency, torch.Tensor) or saliency.dim() != 3:
        shape = tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__
        raise ValueError(f"saliency must be a batch of maps (B, H, W), got {shape}")
    w = saliency.shape[-1]
    flat = saliency.flatten(1).argmax(dim=1)
    return torch.stack([flat // w, flat % w], dim=1)


def saliency_boxes(lam, peaks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(k, 4) boxes ``(y0, x0, y1, x1)`` of the SaliencyMix authors' ``saliency_bbox``: sides
    ``h = floor(H sqrt(1 - lam))`` and ``w = floor(W sqrt(1 - lam))``, from ``peak - side // 2`` to
    ``peak + side // 2`` (so an odd side loses a pixel), clipped to the image.

    ``lam`` is a float or a (k,) tensor of the kept image's share; ``peaks`` (k, 2) the centres.
    """
    if not isinstance(peaks, torch.Tensor) or peaks.dim() != 2 or peaks.shape[1] != 2:
        shape = tuple(peaks.shape) if isinstance(peaks, torch.Tensor) else type(peaks).__name__
        raise ValueError(f"peaks must be (k, 2) pixel positions (row, col), got {shape}")
    _check_unit("lam", lam)
    k = peaks.shape[0]
    lam = torch.as_tensor(lam, dtype=torch.float64, device=peaks.device).expand(k) if isinstance(lam, torch.Tensor) \
        else torch.full((k,), float(lam), dtype=torch.float64, device=peaks.device)
    ratio = (1.0 - lam).clamp_min(0.0).sqrt()
    half_h = (ratio * height).floor().long() // 2
    half_w = (ratio * width).floor().long() // 2
    cy, cx = peaks[:, 0].long(), peaks[:, 1].long()
    return torch.stack([(cy - half_h).clamp(0, height), (cx - half_w).clamp(0, width),
                        (cy + half_h).clamp(0, height), (cx + half_w).clamp(0, width)], dim=1)


def saliencymix(x: torch.Tensor, targets: torch.Tensor, lam, perm: torch.Tensor, *,
                saliency: torch.Tensor | None = None, size=64):
    """SaliencyMix: paste a box of ``x[perm]`` centred on that image's most salient pixel; labels by area.

    ``lam`` is a float or a (1,) tensor (one box for the batch, centred on the peak of
    ``x[perm[0]]``, as in the authors' code) or a (B,) tensor (one box per sample, each on its
    own partner's peak). ``saliency`` (B, H, W) gives the maps of ``x`` (default:
    :func:`spectral_residual` of the partners that need one, at working ``size``). The label
    weight of ``x`` is ``1 - area / (H W)`` of the clipped box. Returns ``(x_mix, t_mix, weight)``.
    """
    x = _check_images(x)
    b, _, h, w = x.shape
    if not isinstance(perm, torch.Tensor) or perm.shape != (b,):
        raise ValueError(f"perm must be a ({b},) permutation of the batch, got "
                         + (f"shape {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__))
    k = lam.numel() if isinstance(lam, torch.Tensor) else 1
    if k not in (1, b):
        raise ValueError(f"lam must be a float or hold 1 or {b} values (one box per batch or per sample), "
                         f"got {k} values")
    perm = perm.to(device=x.device, dtype=torch.long)
    if saliency is None:
        saliency = spectral_residual(_partner(x, perm[:k]), size=size)
    else:
        if not isinstance(saliency, torch.Tensor) or saliency.shape != (b, h, w):
            shape = tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__
            raise ValueError(f"saliency must hold one {h}x{w} map per image ({b}, {h}, {w}), got {shape}")
        saliency = saliency.to(x.device).index_select(0, perm[:k])
    boxes = saliency_boxes(lam, saliency_peaks(saliency), h, w)
    return cutmix(x, targets, boxes, perm)
