"""The augmentation base class and the combinators: small modules that draw randomness and call :mod:`maxup.functional`.

Every augmentation is called as ``aug(x, y, generator=None) -> (x_aug, y_soft)``.
Integer labels need ``num_classes`` at construction; soft (B, C) targets pass through.
Inputs are never edited in place; any device works, and so does a DataLoader
``collate_fn`` (see :func:`collate`).

>>> aug = maxup.augment.CutMix(alpha=1.0, num_classes=10, per_sample=True)
>>> x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
>>> xa, ya = aug(x, y, generator=torch.Generator().manual_seed(0))
>>> xa.shape, ya.shape
(torch.Size([8, 3, 32, 32]), torch.Size([8, 10]))
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from .. import functional as MF
from .._checks import check_inputs, check_int, check_probability
from ..functional import _random as R
from ..registry import Traits

__all__ = ["Augmentation", "Compose", "Identity", "RandomChoice", "collate"]


class Augmentation(Traits, nn.Module):
    """Base class: checks the batch, turns labels into soft targets, calls :meth:`apply`.

    A subclass describes itself with the traits of :class:`maxup.registry.Traits` (``domain``,
    ``random``, ``mixes_rows``, ``last``, ``context``) and becomes a method spec term with
    :func:`maxup.registry.register`. One that acts inside the model's forward overrides
    :meth:`draw` to return a :class:`~maxup.functional.context.ForwardContext` too.
    """

    kind = "augment"
    domain = "tensor"
    random = True
    filled = ("num_classes", "model")
    #: the label values were checked (on the first call; later calls check shapes only: no host read)
    _values_checked = False

    @classmethod
    def from_spec(cls, *, model=None, num_classes=None, **options) -> Augmentation:
        """Build from a method spec's options; ``model`` is offered to classes that take it."""
        extra = {"model": model} if "model" in inspect.signature(cls).parameters else {}
        return cls(**options, **extra, num_classes=num_classes)

    @property
    def image_only(self) -> bool:
        return self.domain == "image"

    @property
    def sequence(self) -> bool:
        return self.domain == "sequence"

    def __init__(self, *, num_classes: int | None = None, p: float = 1.0):
        super().__init__()
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes, minimum=1)
        self.p = check_probability("p", p)

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """``(x_aug, targets)``; a forward context, if the augmentation makes one, is left out (see :meth:`draw`)."""
        x, t, _ = self.draw(x, y, generator)
        return x, t

    def draw(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """``(x_aug, targets, context)``: the augmented batch and its forward context (None for most)."""
        x, t = self.check(x, y)
        return self.apply_context(x, t, generator)

    def check(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The checked batch and its soft targets."""
        x = check_inputs(x, exact_dim=4 if self.domain == "image" else None)
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"y must be a torch.Tensor of labels, got {type(y).__name__}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y holds {y.shape[0]} labels but x holds {x.shape[0]} samples; they must match")
        targets = MF.soft_targets(y, self.num_classes, check=not self._values_checked)
        self._values_checked = True
        return x, targets.to(x.device)

    def apply_context(self, x: torch.Tensor, t: torch.Tensor, generator):
        """:meth:`apply` and the forward context; override this (not :meth:`apply`) to return a context."""
        x, t = self.apply(x, t, generator)
        return x, t, None

    def apply(self, x: torch.Tensor, t: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _applied(self, n: int, generator, device) -> torch.Tensor:
        """(n,) booleans: which samples the augmentation touches (probability ``p``)."""
        if self.p >= 1.0:
            return torch.ones(n, dtype=torch.bool, device=device)
        return R.rand((n,), generator=generator, device=device) < self.p

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())

    def _options(self) -> dict:
        return {"num_classes": self.num_classes, "p": self.p}


class Identity(Augmentation):
    """Leaves the inputs as they are; only turns labels into soft targets."""

    def apply(self, x, t, generator):
        return x, t


class Compose(Augmentation):
    """Apply augmentations one after the other; the first turns labels into soft targets."""

    def __init__(self, augmentations: Sequence[Augmentation], *, num_classes: int | None = None):
        augmentations = list(augmentations)
        if not augmentations or not all(isinstance(a, Augmentation) for a in augmentations):
            raise ValueError("augmentations must be a non-empty list of maxup.augment.Augmentation modules")
        early = next((a for a in augmentations[:-1] if a.last), None)
        if early is not None:
            raise ValueError(f"{type(early).__name__} must be the last augmentation: {early.last}")
        super().__init__(num_classes=num_classes or _common_classes(augmentations))
        self.augmentations = nn.ModuleList(augmentations)
        _combine_traits(self, augmentations)
        self.last = augmentations[-1].last  # a Compose inside a Compose keeps its last member's constraint

    def check(self, x, y):
        return (x, y) if self.domain == "sequence" else super().check(x, y)  # members check token ids

    def apply_context(self, x, t, generator):
        context = None  # at most one member makes one (checked when composed)
        for aug in self.augmentations:
            x, t, made = aug.draw(x, t, generator)
            context = made if made is not None else context
        return x, t, context

    def _options(self):
        return {}


class RandomChoice(Augmentation):
    """Apply one of ``augmentations`` to the whole batch, chosen with probabilities ``weights``."""

    def __init__(self, augmentations: Sequence[Augmentation], *, weights: Sequence[float] | None = None,
                 num_classes: int | None = None):
        augmentations = list(augmentations)
        if not augmentations or not all(isinstance(a, Augmentation) for a in augmentations):
            raise ValueError("augmentations must be a non-empty list of maxup.augment.Augmentation modules")
        super().__init__(num_classes=num_classes or _common_classes(augmentations))
        self.augmentations = nn.ModuleList(augmentations)
        self.last = next((a.last for a in augmentations if a.last), None)  # the drawn member may need it
        w = torch.ones(len(augmentations)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (len(augmentations),) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {len(augmentations)} non-negative numbers with a positive sum, "
                             f"got {weights!r}")
        self.register_buffer("weights", (w / w.sum()).float(), persistent=False)
        _combine_traits(self, augmentations)

    def check(self, x, y):
        return (x, y) if self.domain == "sequence" else super().check(x, y)  # members check token ids

    def apply_context(self, x, t, generator):
        u = R.host_rand(1, generator=generator)[0]  # a host choice: from the host generator
        i = int(torch.searchsorted(self.weights.cumsum(0).cpu(), torch.tensor([u]), right=True))
        i = min(i, len(self.weights) - 1)
        return self.augmentations[i].draw(x, t, generator)

    def _options(self):
        return {"weights": [round(float(w), 4) for w in self.weights]}


def _common_classes(augmentations) -> int | None:
    found = {a.num_classes for a in augmentations if a.num_classes is not None}
    if len(found) > 1:
        raise ValueError(f"augmentations disagree on num_classes: {sorted(found)}")
    return found.pop() if found else None


def _combine_traits(combined: Augmentation, augmentations) -> None:
    """The traits of a combination of augmentations (set on the instance)."""
    domains = {a.domain for a in augmentations}
    if "sequence" in domains and len(domains) > 1:
        raise ValueError("token-sequence augmentations (embed_noise, word_dropout, token_sub) cannot be combined "
                         "with image or feature augmentations")
    combined.domain = next((d for d in ("sequence", "image", "tensor") if d in domains), "any")
    combined.random = any(a.random for a in augmentations)
    combined.mixes_rows = any(a.mixes_rows for a in augmentations)
    contexts = [a for a in augmentations if a.context]
    if len(contexts) > 1:
        raise ValueError(f"{type(contexts[0]).__name__} and {type(contexts[1]).__name__} both act inside the "
                         "model's forward; a method may hold one such augmentation")
    combined.context = contexts[0].context if contexts else None


def collate(augment: Augmentation, generator: torch.Generator | None = None):
    """A DataLoader ``collate_fn`` that stacks (x, y) samples and augments the batch.

    >>> mixup = maxup.augment.Mixup(num_classes=10)
    >>> loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=collate(mixup))

    An augmentation that acts inside the model's forward (Manifold Mixup, embedding noise) is
    refused: a loader cannot reach the model; so are steps that need the model's gradients (Puzzle Mix).
    """
    if getattr(augment, "kind", "augment") != "augment":
        raise ValueError(f"collate takes a maxup.augment.Augmentation, but {type(augment).__name__} is a training "
                         f"{augment.kind}: it needs the model (Puzzle Mix needs its input gradients), which a "
                         "DataLoader cannot reach; call it as step(model, x, y) in the training loop, or use a "
                         "model-free augmentation here (e.g. maxup.augment.SaliencyMix)")
    if augment.context:
        inside = next(m for m in augment.modules() if getattr(type(m), "context", None))
        raise ValueError(f"collate cannot apply {type(inside).__name__}: it acts inside the model's forward pass "
                         "(a forward context); pass it to maxup.ERM / maxup.MaxUp instead of the DataLoader")

    def fn(batch):
        xs, ys = zip(*batch)
        labels = torch.as_tensor(ys) if not torch.is_tensor(ys[0]) else torch.stack(ys)
        return augment(torch.stack(xs), labels, generator)

    return fn


