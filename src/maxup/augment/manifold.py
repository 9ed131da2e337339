"""Manifold Mixup as an augmentation: it draws the mixing, the model's forward applies it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..functional import _random as R
from ..functional.manifold import INPUT, HiddenMix
from ..functional.mixing import _mix_targets, _per_sample
from ..registry import register
from .mixing import _Mixing

__all__ = ["ManifoldMixup", "default_layers"]


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """``("input", *model.stages)``: the input and every stage of the bundled models (:mod:`maxup.models`)."""
    stages = getattr(model, "stages", None)
    if not stages:
        raise ValueError(f"{type(model).__name__} has no .stages: pass layers=[...], the names (as in "
                         "model.named_modules()) of the modules whose outputs may be mixed, and 'input' for the inputs")
    return (INPUT, *stages)


@register("manifold_mixup", "Manifold Mixup: hidden features mixed at a layer drawn from layers (default: the input "
          "and every stage); last in a spec", per_sample=True)
class ManifoldMixup(_Mixing):
    """Manifold Mixup (Verma et al., "Manifold Mixup: Better Representations by Interpolating Hidden
    States", ICML 2019): mix hidden features at a layer drawn at random.

    Each call draws one mixing point uniformly from ``layers`` (module names as in
    ``model.named_modules()``, ``"input"`` for the inputs), ``lam ~ Beta(alpha, alpha)`` (one per
    batch or per sample) and a partner permutation. :meth:`draw` returns the inputs
    **unchanged**, the mixed targets ``lam t + (1 - lam) t[perm]`` and the draw as a forward
    context (a :class:`maxup.functional.HiddenMix`): forwards inside
    ``maxup.functional.enter(model, context)`` mix ``h -> lam h + (1 - lam) h[perm]`` at the
    output of the chosen module through a forward hook, removed afterwards.
    :class:`maxup.ERM` and :class:`maxup.MaxUp` do this themselves, so
    ``maxup.MaxUp(ManifoldMixup(...), m=4)`` draws its own point, lambda and partner for each
    copy. Since the mixing happens inside the network, it must be the last augmentation of a
    :class:`~maxup.augment.Compose`.

    Args:
        alpha: ``Beta(alpha, alpha)`` (the paper uses 2.0 on CIFAR).
        layers: the mixing points; default ``("input", *model.stages)`` of ``model``.
        model: only read, for the default ``layers``.
        per_sample: one lambda per sample instead of one per batch.
        num_classes: for integer labels.
        p: probability that a sample is mixed at all.

    >>> aug = ManifoldMixup(model=model, num_classes=10)
    >>> x_same, t, context = aug.draw(x, y)
    >>> with maxup.functional.enter(model, context):
    ...     loss = maxup.functional.soft_cross_entropy(model(x_same), t)
    """

    context = "batch"

    last = ("it mixes hidden features, after the inputs are augmented: write e.g. "
            "'maxup(m=4)+cropflip+manifold_mixup'")

    def __init__(self, alpha: float = 2.0, *, layers: Sequence[str] | None = None, model: nn.Module | None = None,
                 per_sample: bool = False, num_classes: int | None = None, p: float = 1.0):
        super().__init__(alpha, per_sample=per_sample, num_classes=num_classes, p=p)
        if layers is None:
            if model is None:
                raise ValueError("ManifoldMixup needs layers=[...] (module names, 'input' for the inputs) or model= "
                                 "(a model with .stages, such as those of maxup.models)")
            layers = default_layers(model)
        if isinstance(layers, str) or not all(isinstance(n, str) and n for n in layers) or not layers:
            raise ValueError(f"layers must be a non-empty list of module names (and 'input'), got {layers!r}")
        self.layers = tuple(layers)
        if model is not None:
            names = {n for n, _ in model.named_modules()}
            missing = [n for n in self.layers if n != INPUT and n not in names]
            if missing:
                raise ValueError(f"{type(model).__name__} has no module named {missing[0]!r}; valid layers are "
                                 "'input' and names from model.named_modules()")

    def apply(self, x, t, generator):
        return self.apply_context(x, t, generator)[:2]

    def apply_context(self, x, t, generator):
        lam, perm = self._draw(x, generator)
        index = R.host_randint(len(self.layers), 1, generator=generator)[0]  # a host choice
        lam = _per_sample(lam, x.shape[0], t)
        plan = HiddenMix(self.layers, torch.full((x.shape[0],), index, dtype=torch.long, device=x.device),
                         lam.float().contiguous(), perm, (index,))
        return x, _mix_targets(t, perm, lam), plan

    def _options(self):
        return {"layers": self.layers, **super()._options()}
