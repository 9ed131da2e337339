"""Amplitude and phase of feature maps, each of which can stop passing gradients (PADDLES, Huang et al., ICCV 2023).

:func:`spectral_detach` splits features by a discrete Fourier transform into the amplitude spectrum
``A = |F|`` and the phase spectrum ``phi = angle(F)``, detaches either from the autograd graph, and
recombines them, ``Re(iDFT(A e^{i phi}))``. The forward value is the input (up to rounding); the
gradient reaching the input flows only through the parts not detached. With both detached the layers
before the split receive no gradient at all (their "early stop"); the result is then ``x.detach()``
(the exact value, no transform).

>>> x = torch.randn(2, 3, 8, 8, requires_grad=True)
>>> y = spectral_detach(x, amplitude=True)                 # the gradient flows through the phase only
>>> bool(torch.allclose(y, x, atol=1e-5)), y.requires_grad
(True, True)
"""
from __future__ import annotations

import torch

__all__ = ["SPECTRAL_DIMS", "spectral_detach", "spectral_dims"]

#: ``"spatial"``: the DFT of each feature map over the dims after the channel dim (2-D for (B, C, H, W));
#: ``"all"``: one DFT over the whole tensor, batch and channels included (``torch.fft.fftn(x)`` as the PADDLES
#: authors' code calls it)
SPECTRAL_DIMS = ("spatial", "all")


def spectral_dims(x: torch.Tensor, dims: str = "spatial") -> tuple[int, ...]:
    """The dims the DFT runs over: ``(2, ..., x.dim() - 1)`` for ``"spatial"``, every dim for ``"all"``."""
    if dims not in SPECTRAL_DIMS:
        raise ValueError(f"dims must be one of {SPECTRAL_DIMS} ('spatial': each feature map, the paper's DFT; "
                         f"'all': one DFT over the whole tensor, as the authors' code), got {dims!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3:
        raise ValueError("the features to split must be a float tensor (B, C, ...) with at least one dim after the "
                         f"channels (feature maps (B, C, H, W) or signals (B, C, L)), got "
                         f"{getattr(x, 'shape', type(x).__name__)}: choose a layer with spatial outputs")
    return tuple(range(x.dim())) if dims == "all" else tuple(range(2, x.dim()))


def spectral_detach(x: torch.Tensor, *, amplitude: bool = False, phase: bool = False,
                    dims: str = "spatial") -> torch.Tensor:
    """``Re(iDFT(A e^{i phi}))`` with ``A = |DFT(x)|`` detached when ``amplitude`` and ``phi = angle(DFT(x))``
    detached when ``phase``; ``x`` itself (no transform) when neither is, ``x.detach()`` when both are.

    The DFT runs in float32 (or float64 for a float64 ``x``) over :func:`spectral_dims`; the result has
    ``x``'s dtype. At a frequency whose coefficient is 0 the phase has no gradient (torch's ``angle``)."""
    fft_dims = spectral_dims(x, dims)
    if not amplitude and not phase:
        return x
    if amplitude and phase:
        return x.detach()
    z = x if x.dtype in (torch.float32, torch.float64) else x.float()
    spectrum = torch.fft.fftn(z, dim=fft_dims)
    amp, ph = spectrum.abs(), spectrum.angle()
    amp = amp.detach() if amplitude else amp
    ph = ph.detach() if phase else ph
    return torch.fft.ifftn(torch.polar(amp, ph), dim=fft_dims).real.to(x.dtype)
