"""TransMix (Chen et al., CVPR 2022): CutMix whose label weights come from a vision transformer's attention.

The inputs are mixed as by CutMix (:func:`maxup.functional.cutmix`). The partner's label weight
is then the share of the class token's attention (last block, averaged over the heads) that
falls on the pasted patches, averaged with the pasted area as in the authors' code
(``area_weight = 0.5``; 0 is the attention share alone)::

    share_i   = sum_{pasted tokens} a_i / sum_{all patch tokens} a_i     a_i = mean over heads of the
                                                                         class token's attention row
    w_i       = area_weight * area_i + (1 - area_weight) * share_i       area_i = pasted area / (H W)
    t~_i      = (1 - w_i) t_i + w_i t_perm(i)

A patch counts as pasted when the box holds its top-left pixel (the box's pixel mask
downsampled to the patch grid by nearest neighbour, as the authors' ``nn.Upsample``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .mixing import _mix_targets, box_mask

__all__ = ["check_area_weight", "pasted_tokens", "transmix_targets", "transmix_weight"]


def check_area_weight(area_weight) -> float:
    """``area_weight`` as a float in [0, 1], or a ValueError naming it."""
    if isinstance(area_weight, bool) or not isinstance(area_weight, (int, float)) or not 0.0 <= area_weight <= 1.0:
        raise ValueError(f"area_weight must be a number in [0, 1] (0.5: the authors' code, 0: the attention share "
                         f"alone, 1: CutMix's area label), got {area_weight!r}")
    return float(area_weight)


def pasted_tokens(boxes: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(k, rows, cols) bool: the patches whose top-left pixel lies in the box (``boxes`` (k, 4) as
    ``y0, x0, y1, x1``): the pixel mask downsampled to the patch grid by nearest neighbour."""
    h, w = image_size
    pixels = box_mask(boxes, h, w)[:, None].to(torch.float32)
    return F.interpolate(pixels, size=tuple(grid), mode="nearest")[:, 0] > 0.5


def transmix_weight(attention: torch.Tensor, pasted: torch.Tensor, area: torch.Tensor,
                    area_weight: float = 0.5) -> torch.Tensor:
    """(B,) label weight of the partner: ``area_weight * area + (1 - area_weight) * share``.

    Args:
        attention: the class token's attention over the patch tokens, (B, N) (averaged over heads),
            or (B, heads, 1 + N), the full row with the class token first (averaged here, the class
            token's own entry dropped).
        pasted: (k, rows, cols) or (k, N) bool, the pasted patches; k = B or 1 (one mask for the batch).
        area: (B,) or (k,) pasted area share (1 - the CutMix lambda).
        area_weight: weight of the area in the label (0.5: the authors' code; 0: the attention alone).

    >>> attention = torch.tensor([[0.1, 0.2, 0.3, 0.4]])               # 2x2 patches
    >>> pasted = torch.tensor([[[True, False], [False, True]]])       # patches 0 and 3
    >>> transmix_weight(attention, pasted, torch.tensor([0.5]), area_weight=0.0)
    tensor([0.5000])
    """
    area_weight = check_area_weight(area_weight)
    if attention.dim() == 3:
        attention = attention[:, :, 1:].float().mean(1)
    if attention.dim() != 2:
        raise ValueError(f"attention must be (B, N) patch attention or (B, heads, 1 + N), got {tuple(attention.shape)}")
    mask = pasted.reshape(pasted.shape[0], -1).to(attention.dtype)
    if mask.shape[1] != attention.shape[1]:
        raise ValueError(f"the pasted mask covers {mask.shape[1]} patches but the attention {attention.shape[1]}: "
                         "the patch grid must be the model's")
    attention = attention.float()
    on = (attention * mask).sum(1)
    share = on / attention.sum(1).clamp_min(1e-12)
    return area_weight * area.to(share) + (1.0 - area_weight) * share


def transmix_targets(targets: torch.Tensor, perm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 - weight) t + weight t[perm]``: the partner's label gets ``weight`` (B,)."""
    return _mix_targets(targets, perm, 1.0 - weight)
