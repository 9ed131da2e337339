"""TransMix (Chen et al., CVPR 2022): CutMix relabelled by the vision transformer's own class attention.

An augmentation whose labels need the model: it mixes the batch as CutMix does, runs the model
once without gradient on the mixed batch to read the class token's attention in the last block
(``model(x, return_attention=True)``, as :class:`maxup.models.ViT` offers), and gives the
partner the share of that attention falling on the pasted patches (averaged with the pasted
area). The labels are therefore fixed before the training forward, so every objective and step
takes them as they take CutMix's: ``maxup(m=4)+transmix`` relabels each copy by its own attention
and keeps the worst, ``sam+transmix`` reuses the labels at ``w + eps``.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import functional as MF
from .._modules import unwrap
from ..functional.transmix import check_area_weight, pasted_tokens, transmix_targets, transmix_weight
from ..registry import register
from .mixing import _Mixing

__all__ = ["TransMix", "class_attention"]


def _attention_model(model) -> nn.Module:
    """The network under the wrappers, if it returns the class token's attention on request; else a ValueError."""
    if model is None:
        raise ValueError("TransMix needs model=: the vision transformer being trained, whose class-token attention "
                         "relabels each mixed batch (maxup train passes it; in Python, TransMix(model=vit, ...))")
    net = unwrap(model)
    forward = getattr(net, "forward", None)
    takes = forward is not None and "return_attention" in inspect.signature(forward).parameters
    if not takes or not hasattr(net, "grid_size"):
        raise ValueError(f"transmix reads the class token's attention in the last block, which {type(net).__name__} "
                         "does not give: the model must accept model(x, return_attention=True) -> (logits, (B, heads, "
                         "1 + N)) and have .grid_size, as maxup.models.ViT does (maxup train --model vit)")
    return net


def class_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, 1 + N): the class token's attention in the last block, from a forward without gradient
    that leaves the model's buffers (and its mode) as they were."""
    from ..objectives.base import frozen_buffers  # objectives import augment: import it when first used

    net = _attention_model(model)
    with torch.no_grad(), frozen_buffers(net):
        _, attention = net(x, return_attention=True)
    return attention


@register("transmix", "TransMix: CutMix whose labels follow the vision transformer's class attention on the pasted "
          "patches (needs --model vit; last in a spec)", per_sample=True)
class TransMix(_Mixing):
    """TransMix (Chen, Sun, He, Torr, Yuille, Bai, "TransMix: Attend to Mix for Vision Transformers", CVPR 2022).

    Per call: CutMix boxes and partners (``lam ~ Beta(alpha, alpha)``, a box of area ``1 - lam``,
    clipped), then one forward of ``model`` without gradient on the mixed batch; the partner's
    label weight is ``area_weight * area + (1 - area_weight) * share`` where ``share`` is the
    fraction of the class token's attention (last block, mean over heads, over the patch tokens)
    on the patches whose top-left pixel the box holds (:mod:`maxup.functional.transmix`).

    Args:
        alpha: ``Beta(alpha, alpha)`` for the CutMix lambda (the authors' cutmix_alpha is 1.0).
        area_weight: weight of the pasted area in the label: 0.5 averages it with the attention
            share, as the authors' code does; 0 uses the attention share alone.
        model: the vision transformer being trained (:class:`maxup.models.ViT`), read, never changed.
        per_sample: one box per sample instead of one per batch (the authors': per batch).
        num_classes: for integer labels.
        p: probability that a sample (or the batch) is mixed.

    >>> vit = maxup.models.ViT(in_channels=1, num_classes=10, image_size=8, patch_size=2)
    >>> aug = TransMix(model=vit, num_classes=10, per_sample=True)
    >>> x_mix, t_mix = aug(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0))
    >>> torch.allclose(t_mix.sum(1), torch.ones(4))
    True
    """

    domain = "image"
    mixes_rows = True
    last = ("its labels come from the model's attention on the final inputs: write e.g. "
            "'maxup(m=4)+cropflip+transmix'")

    def __init__(self, alpha: float = 1.0, *, area_weight: float = 0.5, model: nn.Module | None = None,
                 per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        self.area_weight = check_area_weight(area_weight)
        _attention_model(model)
        object.__setattr__(self, "_model", model)  # read only: not a submodule (not moved, saved or trained here)

    def apply(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        h, w = x.shape[-2:]
        boxes = MF.sample_boxes(1.0 - lam, h, w, generator=generator, device=x.device)
        out, _, kept = MF.cutmix(x, t, boxes, perm)
        net = _attention_model(self._model)
        pasted = pasted_tokens(boxes, (h, w), net.grid_size)
        weight = transmix_weight(class_attention(net, out), pasted, 1.0 - kept, self.area_weight)
        return out, transmix_targets(t, perm, weight)

    def _options(self):
        return {"area_weight": self.area_weight, **super()._options()}

