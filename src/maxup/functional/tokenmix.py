"""TokenMix (Liu et al., ECCV 2022): two images mixed token by token through a mask of separated blocks.

The mask lives on the patch grid (rows x cols tokens of ``patch`` pixels each). It is drawn as the
authors' ``generate_mask`` draws it (BEiT's block-wise masking): until ``count`` tokens are
masked, propose a block of ``U(min_block, remaining)`` tokens with aspect ratio
``exp(U(log a, -log a))`` (a = ``min_aspect``), sides rounded, strictly smaller than the grid,
at a uniform position; keep it if it masks between 1 and ``remaining`` new tokens; give up
after ``attempts`` proposals in a row that add nothing. The masked tokens take the partner::

    x~_i = x_i outside M_i, x_perm(i) inside M_i                  (M_i upsampled to pixels)

Labels: by area (the fallback), ``lam_i = 1 - |M_i| / N``; or from content maps ``S`` (a teacher's
class activation map of each image for its own label, non-negative, summing to one over the
tokens), the weight each image keeps on the tokens it keeps::

    a_i = sum_{not M_i} S_i,   b_i = sum_{M_i} S_perm(i),   lam_i = a_i / (a_i + b_i)   (area if both are 0)
    t~_i = lam_i t_i + (1 - lam_i) t_perm(i)

The mask is drawn on the host (its loop is sequential), vectorised over the masks: every
unfinished mask takes one proposal per round, so mask i's k-th proposal uses the k-th round's
uniforms, whatever the other masks do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _random as R
from .mixing import _mix_targets, _partner

__all__ = ["activation_maps", "content_maps", "token_block_masks", "token_grid", "token_pixels", "tokenmix",
           "tokenmix_weight"]


def token_grid(image_size: tuple[int, int], patch: tuple[int, int]) -> tuple[int, int]:
    """The (rows, cols) token grid of ``image_size`` in patches of ``patch``; a ValueError when it does not divide."""
    (h, w), (ph, pw) = image_size, patch
    if h % ph or w % pw:
        raise ValueError(f"tokenmix: patch_size {ph}x{pw} does not divide the {h}x{w} images into whole tokens: "
                         f"choose a patch_size whose sides divide the image's (the model's patch for a ViT)")
    return h // ph, w // pw


def token_block_masks(counts, grid: tuple[int, int], *, min_aspect: float = 0.3, attempts: int = 10,
                      min_block: int = 1, uniforms: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(k, rows, cols) bool block masks, on the CPU, one per entry of ``counts`` (tokens to mask).

    ``uniforms`` (rounds, k, 4) injects the randomness: round r's row i is mask i's r-th proposal
    (block size, aspect, top, left); otherwise each round draws its (k, 4) uniforms from ``generator``
    (the host generator of a :class:`~maxup.functional._random.DeviceGenerator`). A mask may hold
    fewer than its count when ``attempts`` proposals in a row fail (as in the authors' code).

    >>> m = token_block_masks([8, 0], (4, 4), generator=torch.Generator().manual_seed(0))
    >>> m.shape, m.sum((1, 2)).tolist()
    (torch.Size([2, 4, 4]), [8, 0])
    """
    rows, cols = grid
    if not 0.0 < min_aspect <= 1.0:
        raise ValueError(f"min_aspect must be in (0, 1] (blocks have aspect ratios in [min_aspect, 1 / min_aspect]), "
                         f"got {min_aspect!r}")
    counts = torch.as_tensor(counts, dtype=torch.long).reshape(-1).cpu()
    k = counts.numel()
    mask = torch.zeros(k, rows, cols, dtype=torch.bool)
    done = torch.zeros(k, dtype=torch.long)
    fails = torch.zeros(k, dtype=torch.long)
    lo, hi = math.log(min_aspect), -math.log(min_aspect)
    r_idx, c_idx = torch.arange(rows), torch.arange(cols)
    with R.host_only():
        active = counts > 0
        step = 0
        while bool(active.any()):
            if uniforms is not None:
                if step >= uniforms.shape[0]:
                    raise ValueError(f"uniforms holds {uniforms.shape[0]} rounds but the masks need more: pass more")
                u = uniforms[step].to(torch.float64).cpu()
            else:
                u = R.rand((k, 4), generator=R.host(generator), device="cpu", dtype=torch.float64)
            step += 1
            remaining = counts - done
            area = min_block + (remaining - min_block).to(torch.float64) * u[:, 0]      # random.uniform(min, left)
            aspect = torch.exp(lo + (hi - lo) * u[:, 1])
            h = torch.round(torch.sqrt(area * aspect)).long()                           # int(round(.)): half to even
            w = torch.round(torch.sqrt(area / aspect)).long()
            valid = (h < rows) & (w < cols)
            top = (u[:, 2] * (rows - h + 1).clamp_min(1)).long()                        # random.randint(0, rows - h)
            left = (u[:, 3] * (cols - w + 1).clamp_min(1)).long()
            in_r = (r_idx[None] >= top[:, None]) & (r_idx[None] < (top + h)[:, None])
            in_c = (c_idx[None] >= left[:, None]) & (c_idx[None] < (left + w)[:, None])
            block = in_r[:, :, None] & in_c[:, None, :]
            new = (block & ~mask).sum((1, 2))
            accept = active & valid & (new > 0) & (new <= remaining)
            mask |= block & accept[:, None, None]
            done += torch.where(accept, new, 0)
            fails = torch.where(accept, 0, fails + 1)
            active = active & (done < counts) & (fails < attempts)
    return mask


def token_pixels(mask: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(k, rows * ph, cols * pw): a token mask spread over the pixels of each token."""
    k, rows, cols = mask.shape
    ph, pw = patch
    return mask[:, :, None, :, None].expand(k, rows, ph, cols, pw).reshape(k, rows * ph, cols * pw)


def activation_maps(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) class activation maps of ``teacher`` on ``x`` (one forward, no gradient).

    A teacher with an ``activation_maps`` method (:class:`maxup.models.ViT`: the classifier on every
    patch token) gives its own; a network that ends in global average pooling and a linear
    ``classifier`` (the CNNs and ResNets of :mod:`maxup.models`) gives CAMs (Zhou et al. 2016): the
    classifier applied at every position of the pooled feature map, whose mean is the logits.
    """
    own = getattr(teacher, "activation_maps", None)
    if callable(own):
        with torch.no_grad():
            return own(x).float()
    classifier = getattr(teacher, "classifier", None)
    pools = [m for m in teacher.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    if not isinstance(classifier, nn.Linear) or not pools:
        raise ValueError(f"the teacher ({type(teacher).__name__}) gives no activation maps: it must end in global "
                         "average pooling (nn.AdaptiveAvgPool2d) and a linear .classifier, as the CNN, ResNet and WRN "
                         "of maxup.models do, or have an activation_maps(x) method, as maxup.models.ViT does")
    seen = []
    handle = pools[-1].register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            teacher(x)
    finally:
        handle.remove()
    features = seen[-1].float()                                                   # (B, C, h, w)
    weight, bias = classifier.weight.float(), classifier.bias
    maps = torch.einsum("bchw,kc->bkhw", features, weight)
    return maps if bias is None else maps + bias.float()[None, :, None, None]


def content_maps(maps: torch.Tensor, targets: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, rows, cols): each image's activation map for its own label (``maps`` weighted by ``targets``),
    negative values cut to zero, resized to the token grid, summing to one (uniform where all are zero)."""
    s = torch.einsum("bkhw,bk->bhw", maps.float(), targets.float()).clamp_min(0)[:, None]
    if tuple(s.shape[-2:]) != tuple(grid):
        larger = s.shape[-2] >= grid[0] and s.shape[-1] >= grid[1]
        s = F.interpolate(s, size=tuple(grid), mode="area") if larger else \
            F.interpolate(s, size=tuple(grid), mode="bilinear", align_corners=False).clamp_min(0)
    s = s[:, 0]
    total = s.sum((1, 2), keepdim=True)
    uniform = torch.full_like(s, 1.0 / (grid[0] * grid[1]))
    return torch.where(total > 0, s / total.clamp_min(1e-30), uniform)


def tokenmix_weight(mask: torch.Tensor, perm: torch.Tensor, content: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) weight of each image's own label: the area it keeps, or (``content`` (B, rows, cols)) the
    share of its content map it keeps against the partner's content on the masked tokens."""
    m = mask.reshape(mask.shape[0], -1).float()
    area = 1.0 - m.mean(1)
    if content is None:
        return area.expand(perm.shape[0])
    s = content.reshape(content.shape[0], -1).float()
    kept = (s * (1.0 - m)).sum(1)
    taken = (_partner(s, perm) * m).sum(1)
    total = kept + taken
    return torch.where(total > 1e-12, kept / total.clamp_min(1e-12), area.expand_as(total))


def tokenmix(x: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor,
             patch: tuple[int, int], content: torch.Tensor | None = None):
    """TokenMix with a given token mask (k, rows, cols), k = B or 1, partners ``perm`` and optional content maps.

    Returns ``(x_mix, t_mix, lam)``, ``lam`` (B,) the weight of each image's own label.

    >>> mask = torch.zeros(1, 2, 2, dtype=torch.bool); mask[0, 0, 1] = True
    >>> x_mix, t, lam = tokenmix(torch.rand(4, 1, 8, 8), torch.eye(4), mask, torch.tensor([1, 0, 3, 2]), (4, 4))
    >>> lam
    tensor([0.7500, 0.7500, 0.7500, 0.7500])
    """
    h, w = x.shape[-2:]
    token_grid((h, w), patch)
    if tuple(mask.shape[-2:]) != (h // patch[0], w // patch[1]):
        raise ValueError(f"mask covers a {mask.shape[-2]}x{mask.shape[-1]} token grid, but the images hold "
                         f"{h // patch[0]}x{w // patch[1]} tokens of {patch[0]}x{patch[1]} pixels")
    mask = mask.to(x.device)
    perm = perm.to(x.device)
    pixels = token_pixels(mask, patch)[:, None].to(x.dtype)
    out = torch.lerp(x, _partner(x, perm), pixels)
    lam = tokenmix_weight(mask, perm, content)
    return out, _mix_targets(targets, perm, lam), lam
