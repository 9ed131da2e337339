"""SaliencyMix (Uddin et al., ICLR 2021): a CutMix box centred on the partner image's most salient pixel.

The saliency is the spectral residual (Hou and Zhang 2007) computed in torch as OpenCV's
``StaticSaliencySpectralResidual`` computes it (:func:`maxup.functional.saliency.spectral_residual`), or
with ``saliency='fine_grained'`` the authors' choice, OpenCV's ``StaticSaliencyFineGrained``
(:func:`maxup.functional.saliency.fine_grained`): no model and no gradient, so this is a batch
augmentation and runs in a DataLoader's ``collate_fn`` too. For the gradient-saliency mixing of
Puzzle Mix, which needs the model, see the step :class:`maxup.steps.PuzzleMix`.
"""
from __future__ import annotations

from ..functional.mixing import _partner, cutmix
from ..functional.saliency import _check_size, fine_grained, saliency_boxes, saliency_peaks, spectral_residual
from ..registry import register
from .mixing import _Mixing

__all__ = ["SALIENCY", "SaliencyMix"]

#: the saliency maps SaliencyMix can centre its boxes on
SALIENCY = ("spectral_residual", "fine_grained")


@register("saliencymix", "SaliencyMix: a CutMix box centred on the partner's most salient pixel (spectral-residual "
          "saliency), label by area", per_sample=True)
class SaliencyMix(_Mixing):
    """SaliencyMix (Uddin et al. 2021, arXiv:2006.01791): paste the partner's most salient box, label by area.

    Per box: lam ~ Beta(alpha, alpha); the partner ``x[perm]``'s spectral-residual saliency
    map (computed at ``saliency_size``, OpenCV's 64 x 64; or with ``saliency='fine_grained'`` the
    authors' fine-grained saliency, at the image's own size) gives its most salient pixel; a box of
    sides ``floor(sqrt(1 - lam) H)`` and ``floor(sqrt(1 - lam) W)`` centred there (the authors'
    ``saliency_bbox``, clipped to the image) is pasted from the partner into the same place;
    the label weight of ``x`` is ``1 - area / (H W)``. ``per_sample=True``: one lam and box per
    sample, each on its own partner's peak; False: one for the batch, on the peak of
    ``x[perm[0]]`` (the authors' draw).

    >>> aug = SaliencyMix(num_classes=10, per_sample=True)
    >>> x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    >>> x_mix, t_mix = aug(x, y, generator=torch.Generator().manual_seed(0))
    """

    domain = "image"
    mixes_rows = True

    def __init__(self, alpha: float = 1.0, *, saliency: str = "spectral_residual", saliency_size: int = 64,
                 per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        if saliency not in SALIENCY:
            raise ValueError(f"saliency must be one of {SALIENCY} ('fine_grained': the SaliencyMix authors' OpenCV "
                             f"StaticSaliencyFineGrained), got {saliency!r}")
        _check_size(saliency_size, "saliency_size")
        self.saliency = saliency
        self.saliency_size = saliency_size

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        partners = _partner(x, perm[:lam.shape[0]])  # one map per box: the partner of each box's first row
        maps = fine_grained(partners) if self.saliency == "fine_grained" else \
            spectral_residual(partners, size=self.saliency_size)
        peaks = saliency_peaks(maps)
        boxes = saliency_boxes(lam, peaks, *x.shape[-2:])
        out, targets, _ = cutmix(x, t, boxes, perm)
        return out, targets

    def _options(self):
        return {"saliency": self.saliency, "saliency_size": self.saliency_size, **super()._options()}
