"""Class-aware sampling: instance-balanced, class-balanced, square-root and reversed samplers.

A sampler sets the probability of drawing class ``c`` to ``p_c = n_c ** q / sum_k n_k ** q`` (Kang et al. 2020,
"Decoupling Representation and Classifier for Long-Tailed Recognition"), the sample within the class uniform:

============  =====  ==========================================================================
sampler       q      class probability
============  =====  ==========================================================================
instance      1      proportional to the class size (every sample once per epoch, shuffled)
sqrt          1/2    proportional to the square root of the class size
class         0      uniform over the classes (class-balanced)
reversed      -1     inversely proportional to the class size (BBN's reversed sampler, Zhou et al. 2020)
============  =====  ==========================================================================

A number ``q`` may be given instead of a name. ``instance`` is a permutation (the :class:`~maxup.data.Loader`'s
usual shuffle); the others draw with replacement. Classes without samples are never drawn.

Two places use them: ``Loader(data, batch_size, sampler="class")`` (the epoch's order, seeded by
``(seed, epoch)`` and sharded under DDP like the shuffle), and a second, differently sampled batch beside
the usual one -- :meth:`maxup.data.Loader.paired` in a loop, or :class:`ClassSampler` inside a step (CMO
pastes minority-class images drawn by the reversed sampler onto an instance-balanced batch; bilateral mixup
pairs the two batches).

>>> labels = torch.tensor([0] * 90 + [1] * 10)
>>> [round(p, 6) for p in class_probabilities(class_counts(labels, 2), "reversed").tolist()]
[0.1, 0.9]
"""
from __future__ import annotations

import numbers

import torch

from .longtail import class_counts

__all__ = ["SAMPLERS", "ClassSampler", "class_counts", "class_probabilities", "sample_indices",
           "sample_probabilities", "sampler_exponent"]

#: the named samplers and their exponent ``q``
SAMPLERS: dict[str, float] = {"instance": 1.0, "sqrt": 0.5, "class": 0.0, "reversed": -1.0}


def sampler_exponent(sampler, name: str = "sampler") -> float:
    """The exponent ``q`` of a sampler name of :data:`SAMPLERS` or a number."""
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]
    if isinstance(sampler, numbers.Real) and not isinstance(sampler, bool) and abs(float(sampler)) < float("inf"):
        return float(sampler)
    raise ValueError(f"{name} must be one of {', '.join(SAMPLERS)} or an exponent q (class probability proportional "
                     f"to n_c ** q), got {sampler!r}")


def class_probabilities(counts, sampler) -> torch.Tensor:
    """``p_c`` proportional to ``counts[c] ** q`` (0 for empty classes), float64, summing to 1."""
    q = sampler_exponent(sampler)
    counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError(f"class counts must be non-negative with at least one sample, got {counts.tolist()}")
    present = counts > 0
    weights = torch.where(present, counts.clamp(min=1.0) ** q, torch.zeros_like(counts))
    return weights / weights.sum()


def sample_probabilities(labels, sampler, num_classes: int | None = None) -> torch.Tensor:
    """The probability of each sample, (N,) float64: ``p_c / n_c`` for a sample of class ``c``."""
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"a sampler needs class labels of shape (N,) with N >= 1, got {tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be 0..num_classes-1, found {int(labels.min())}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    counts = class_counts(labels, num_classes)
    probs = class_probabilities(counts, sampler)
    return (probs / counts.clamp(min=1).double())[labels]


def sample_indices(labels, num_samples: int, sampler, *, generator: torch.Generator | None = None,
                   num_classes: int | None = None) -> torch.Tensor:
    """``num_samples`` sample indices drawn by ``sampler``: ``instance`` concatenates random permutations (each
    sample once per ``len(labels)`` draws); the others draw with replacement from
    :func:`sample_probabilities`.

    >>> g = torch.Generator().manual_seed(0)
    >>> idx = sample_indices(torch.tensor([0] * 90 + [1] * 10), 1000, "class", generator=g)
    >>> 400 < int((idx >= 90).sum()) < 600
    True
    """
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 0:
        raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
    if sampler == "instance":
        n = labels.numel()
        if n == 0:
            raise ValueError("sample_indices: no labels to sample from")
        reps = -(-int(num_samples) // n)
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)] or
                         [torch.zeros(0, dtype=torch.long)])[:num_samples]
    probs = sample_probabilities(labels, sampler, num_classes)
    return torch.multinomial(probs, int(num_samples), replacement=True, generator=generator)


class ClassSampler:
    """Draw sample indices by a sampler, e.g. a minority-weighted batch beside the loader's.

    Holds the per-sample probabilities of ``labels`` (computed once); :meth:`draw` takes the generator, so the
    randomness stays where the caller keeps it (a step's ``generator.host``, checkpointed by the Trainer).

    >>> sampler = ClassSampler(torch.tensor([0] * 90 + [1] * 10), "reversed")
    >>> sampler.draw(4, torch.Generator().manual_seed(0)).shape
    torch.Size([4])
    """

    def __init__(self, labels, sampler="reversed", *, num_classes: int | None = None):
        self.sampler = sampler
        self.probabilities = sample_probabilities(labels, sampler, num_classes)

    def draw(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` indices, with replacement (CPU int64; move them to the data's device)."""
        return torch.multinomial(self.probabilities, int(num_samples), replacement=True, generator=generator)

    def __repr__(self) -> str:
        return f"ClassSampler(sampler={self.sampler!r}, samples={self.probabilities.numel()})"
