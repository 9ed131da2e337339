"""Soft targets and the soft-target cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_int, check_probability

_REDUCTIONS = ("none", "mean", "sum")


def soft_targets(y: torch.Tensor, num_classes: int | None = None, smoothing: float = 0.0, *,
                 check: bool = True) -> torch.Tensor:
    """Turn labels into a (B, C) float distribution.

    Integer labels of shape (B,) become one-hot rows; soft targets of shape (B, C) are
    checked (non-negative rows that sum to one) and passed through. ``smoothing`` mixes
    every row with the uniform distribution: ``(1 - smoothing) * t + smoothing / C``.

    ``check=False`` skips the checks of the values (label range, rows summing to one),
    which read them on the host: a GPU waits for them. Callers that checked the data where
    it entered (the Trainer, an augmentation's first call) pass it on every later batch;
    shapes and dtypes are always checked, and a label out of range still fails (an index
    error on CPU, a device-side assertion on a GPU).

    >>> soft_targets(torch.tensor([0, 2]), 3)
    tensor([[1., 0., 0.],
            [0., 0., 1.]])
    """
    smoothing = check_probability("smoothing", smoothing)
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
    if y.is_floating_point():
        if y.dim() != 2:
            raise ValueError(f"soft targets y must have shape (B, num_classes), got {tuple(y.shape)}")
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"soft targets y have {y.shape[1]} classes, expected num_classes={num_classes}")
        if check and (bool((y < 0).any())
                      or not torch.allclose(y.sum(1), torch.ones((), dtype=y.dtype, device=y.device), atol=1e-4)):
            raise ValueError("soft targets y must be non-negative and each row must sum to 1")
        t = y
        num_classes = y.shape[1]
    else:
        if y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"labels y must be integers or float soft targets, got dtype {y.dtype}")
        if num_classes is None:
            raise ValueError("num_classes is required to turn integer labels into soft targets")
        check_int("num_classes", num_classes, minimum=1)
        if y.dim() != 1:
            raise ValueError(f"integer labels y must have shape (B,), got {tuple(y.shape)}")
        if check and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
            )
        # one-hot by scatter: bounds-checked in the kernel, no host read on any device
        t = torch.zeros(y.shape[0], num_classes, device=y.device).scatter_(1, y.long()[:, None], 1.0)
    if smoothing:
        t = t * (1.0 - smoothing) + smoothing / num_classes
    return t


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy ``-sum_c t_c log softmax(logits)_c`` for (B, C) soft targets.

    Integer targets of shape (B,) are accepted as class indices. Sequences work too:
    logits (B, T, C) with targets (B, T) of token ids or (B, T, C) soft targets; the loss
    of a sample is then the mean over its T tokens. ``reduction`` is one of ``"none"``
    (per-sample losses), ``"mean"`` or ``"sum"``.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise ValueError(f"targets of shape {tuple(targets.shape)} do not match logits {tuple(logits.shape)}")
        losses = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    else:
        if targets.shape != logits.shape[:-1]:
            raise ValueError(f"integer targets of shape {tuple(targets.shape)} do not match logits "
                             f"{tuple(logits.shape)}: expected shape {tuple(logits.shape[:-1])}")
        losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").view(targets.shape)
    if losses.dim() > 1:  # sequences: one loss per sample, the mean over its tokens
        losses = losses.flatten(1).mean(1)
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
