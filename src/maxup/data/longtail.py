"""Long-tailed training sets: the exponential profile of CIFAR-10/100-LT, class counts, and the
many/medium/few-shot groups of the reports.

The profile (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples"; Cao et al.
2019, LDAM) keeps ``n_c = floor(n_max * ratio ** (-c / (C - 1)))`` samples of class ``c``: class 0 is
the head with ``n_max``, class ``C - 1`` the tail with ``floor(n_max / ratio)``, so largest / smallest
is ``ratio`` up to the floor. ``floor`` is the authors' ``int(...)`` (computed with a 1e-9 tolerance, so
that ``5000 * 0.01`` is 50, not 49). ``n_max`` is the size of the smallest class of the data the subset
is drawn from (every class must be able to supply its count; for balanced data it is the class size).

>>> long_tail_counts(500, 10, 100)
[500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "SHOT_THRESHOLDS",
    "class_counts",
    "check_imbalance",
    "long_tail_counts",
    "long_tail_indices",
    "shot_accuracy",
    "shot_groups",
    "shot_thresholds",
]

#: many-shot classes have more than 100 training samples, few-shot classes fewer than 20, medium-shot the
#: rest (Liu et al. 2019, OLTR; Kang et al. 2020), set for a head class of :data:`SHOT_REFERENCE_HEAD`
SHOT_THRESHOLDS = (100, 20)
#: the head-class size the standard thresholds were set for (CIFAR-100-LT: 500 images in the largest class)
SHOT_REFERENCE_HEAD = 500


def check_imbalance(ratio, name: str = "imbalance") -> float:
    """``ratio`` as a finite float >= 1 (largest class / smallest class)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"{name} must be an imbalance ratio >= 1 (the largest class over the smallest, e.g. 100 "
                         f"for CIFAR-10-LT), got {ratio!r}")
    return float(ratio)


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """``floor(n_max * ratio ** (-c / (C - 1)))`` for ``c = 0 .. C - 1`` (see the module docstring)."""
    ratio = check_imbalance(ratio, "ratio")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2 for a long-tailed profile, got {num_classes!r}")
    if isinstance(n_max, bool) or not isinstance(n_max, numbers.Integral) or n_max < 1:
        raise ValueError(f"n_max must be a positive integer, got {n_max!r}")
    return [int(math.floor(n_max * ratio ** (-c / (num_classes - 1)) + 1e-9)) for c in range(num_classes)]


def class_counts(labels, num_classes: int) -> torch.Tensor:
    """Samples per class, (num_classes,) int64."""
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
    return torch.bincount(labels, minlength=int(num_classes))[: int(num_classes)]


def long_tail_indices(labels, ratio: float, num_classes: int, *, generator: torch.Generator | None = None,
                      name: str = "imbalance") -> torch.Tensor:
    """Sorted indices of a long-tailed subset of ``labels``: :func:`long_tail_counts` samples of each class, drawn
    at random within the class (a pure function of ``generator``'s state).

    Raises a ValueError naming ``name`` when the ratio is below 1, a class has no sample, or the tail class would
    be left empty.

    >>> idx = long_tail_indices(torch.arange(3).repeat(100), 4, 3, generator=torch.Generator().manual_seed(0))
    >>> class_counts(torch.arange(3).repeat(100)[idx], 3).tolist()
    [100, 50, 25]
    """
    ratio = check_imbalance(ratio, name)
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if labels.ndim != 1:
        raise ValueError(f"{name}: the labels must have shape (N,), got {tuple(labels.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"{name} needs at least 2 classes, got num_classes={num_classes!r}")
    counts = class_counts(labels, num_classes)
    n_max = int(counts.min())
    if n_max == 0:
        empty = int(torch.argmin(counts))
        raise ValueError(f"{name}: class {empty} has no training sample, so no long-tailed profile can be drawn")
    want = long_tail_counts(n_max, num_classes, ratio)
    if want[-1] < 1:
        raise ValueError(f"{name} {ratio:g} leaves class {num_classes - 1} with no training sample (the head class "
                         f"has {n_max}, the tail would get {n_max}/{ratio:g} < 1): use a ratio of at most {n_max}")
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return torch.nonzero(rank < torch.tensor(want)[labels]).flatten()


def shot_thresholds(n_max: int) -> tuple[float, float]:
    """(many, few): many-shot classes have more than ``many`` training samples, few-shot fewer than ``few``.

    The standard 100 and 20 (:data:`SHOT_THRESHOLDS`) when the head class has at least 500 samples (CIFAR-100-LT,
    ImageNet-LT); below that they are scaled by ``n_max / 500`` -- the same fractions of the head class, 1/5 and
    1/25, as on CIFAR-100-LT -- so that a small data set (the bundled digits, ~134 per class) still has three
    groups instead of no many-shot class at all.

    >>> shot_thresholds(5000), shot_thresholds(250)
    ((100.0, 20.0), (50.0, 10.0))
    """
    many, few = SHOT_THRESHOLDS
    scale = min(1.0, int(n_max) / SHOT_REFERENCE_HEAD)
    return float(many * scale), float(few * scale)


def shot_groups(counts, thresholds: tuple[float, float] | None = None) -> list[str]:
    """``"many"``, ``"medium"`` or ``"few"`` for each class by its training count ``counts[c]`` (thresholds default
    to :func:`shot_thresholds` of the largest count).

    >>> shot_groups([500, 100, 19])
    ['many', 'medium', 'few']
    """
    counts = [int(c) for c in torch.as_tensor(counts).reshape(-1).tolist()]
    many, few = thresholds if thresholds is not None else shot_thresholds(max(counts))
    return ["many" if n > many else "few" if n < few else "medium" for n in counts]


def shot_accuracy(correct, total, train_counts, thresholds: tuple[float, float] | None = None) -> dict[str, float]:
    """Per-class accuracy and the accuracy of each shot group, from per-class test sums.

    ``correct[c]`` and ``total[c]``: correct predictions and samples of class ``c`` in the evaluated set;
    ``train_counts[c]``: its training samples. Returns ``class_accuracy`` (a list; None for a class without
    samples) and ``many_accuracy``, ``medium_accuracy``, ``few_accuracy`` (correct over samples of the classes
    of the group; a group without classes or samples is left out).

    >>> shot_accuracy([9, 5, 1], [10, 10, 10], [500, 50, 5])
    {'class_accuracy': [0.9, 0.5, 0.1], 'many_accuracy': 0.9, 'medium_accuracy': 0.5, 'few_accuracy': 0.1}
    """
    correct = np.asarray(correct, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    groups = np.asarray(shot_groups(train_counts, thresholds))
    out: dict = {"class_accuracy": [float(c / t) if t > 0 else None for c, t in zip(correct, total)]}
    for group in ("many", "medium", "few"):
        mask = groups == group
        if mask.any() and total[mask].sum() > 0:
            out[f"{group}_accuracy"] = float(correct[mask].sum() / total[mask].sum())
    return out
