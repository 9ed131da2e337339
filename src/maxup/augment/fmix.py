"""FMix (Harris et al. 2020): another sample pasted through a thresholded low-frequency Fourier mask.

The worked example of CONTRIBUTING.md: one file holds the registered class, over the pure
ops of :mod:`maxup.functional.fmix`; ``maxup.augment`` imports it, and the registry makes
``fmix`` a method spec term (``maxup(m=4)+fmix``).
"""
from __future__ import annotations

from ..functional.fmix import _check_decay, _check_soft, fmix, fmix_mask, fmix_spectrum
from ..registry import register
from .mixing import _Mixing

__all__ = ["FMix"]


@register("fmix", "FMix: another sample pasted through a thresholded low-frequency Fourier mask, label by mask area",
          per_sample=True)
class FMix(_Mixing):
    """FMix (Harris et al. 2020, arXiv:2002.12047): keep the top ``round(lam H W)`` pixels of a low-frequency image.

    Per mask: lam ~ Beta(alpha, alpha); a complex Gaussian spectrum scaled by
    ``1 / f ** decay_power`` goes through an inverse FFT; the ``round(lam H W)`` largest pixels
    of that image keep ``x``, the rest take the partner ``x[perm]``; the label weight of ``x``
    is the mask's mean. ``max_soft > 0`` ramps the mask's edge (the authors' soft masks).
    ``per_sample=True``: one lam and mask per sample; False: one for the batch.

    >>> aug = FMix(num_classes=10, per_sample=True)
    >>> x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    >>> x_mix, t_mix = aug(x, y, generator=torch.Generator().manual_seed(0))
    """

    domain = "image"
    mixes_rows = True

    def __init__(self, alpha: float = 1.0, *, decay_power: float = 3.0, max_soft: float = 0.0,
                 per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        self.decay_power = _check_decay(decay_power)
        self.max_soft = _check_soft(max_soft)

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        h, w = x.shape[-2:]
        spectrum = fmix_spectrum(lam.shape[0], h, w, generator=generator, device=x.device)
        mask = fmix_mask(lam, (h, w), self.decay_power, self.max_soft, spectrum=spectrum)
        out, targets, _ = fmix(x, t, mask, perm)
        return out, targets

    def _options(self):
        return {"decay_power": self.decay_power, "max_soft": self.max_soft, **super()._options()}
