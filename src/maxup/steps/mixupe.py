"""MixupE (Zou et al., UAI 2023): Mixup plus a first-order term on the clean rows.

Zou, Verma, Mittal, Tang, Pham, Kannala, Bengio, Solin, Kawaguchi, "MixupE: Understanding and
Improving Mixup from Directional Derivative Perspective", UAI 2023, arXiv:2212.13381. The paper
shows that the Mixup loss equals the standard loss plus terms in directional derivatives of all
orders, and proposes to strengthen the first-order one. What this step computes is the rule of the
authors' released code (github.com/oneHuster/MixupE, ``mixup.py``, ``training_method``,
``mixupe_version == 3``, the "faster version" the README's command runs):

1. Mixup on the rows the objective trains on: ``x~ = lam x + (1 - lam) x[perm]``, the targets
   alike, ``lam ~ Beta(alpha, alpha)``; ``L_mix`` the mean cross-entropy of ``f(x~)``;
2. a second forward of the *clean* rows ``f_i = f(x_i)``, and per row
   ``r_i = (t_i - softmax(f_i))^T f_i``: for a positively homogeneous network (ReLU, no biases)
   and centred data this is the first-order directional-derivative term
   ``(softmax(f_i) - t_i)^T J_f(x_i) (x_mean - x_i)`` (the authors' version 1), since then
   ``J_f(x) x = f(x)``; rows with ``r_i >= threshold`` are left out;
3. ``R = (1 - E[lam']) / B * sum_i 1[r_i < threshold] r_i`` with ``lam' ~ Beta(alpha + 1, alpha)``,
   ``E[lam'] = (alpha + 1) / (2 alpha + 1)`` (the distribution of the Mixup expansion);
4. ``L = L_mix - eta R``, rescaled to the size of the Mixup loss:
   ``L <- (|L_mix| / |L|).detach() * L`` (``rescale=True``, as released).

The gradient flows through ``softmax(f_i)`` as well (version 3 does not detach it). The term
needs the model on other rows than the ones trained on (a second forward), so MixupE is a step,
not an augmentation or an objective; it is a step with one loss (:meth:`MixupE.evaluate`), so
``sam+mixupe`` runs SAM on the MixupE loss, both SAM passes on the same mixed and clean rows.

Cost, in units of one ERM step: one more forward-backward of the clean batch, about 2x.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import functional as MF
from .._checks import check_finite, check_positive
from .._modules import local
from ..functional import _random as R
from ..functional import soft_cross_entropy, soft_targets
from ..objectives import ERM, Objective, ObjectiveResult, augmented, frozen_buffers
from ..registry import register
from .base import Step, check_rows_objective

__all__ = ["MixupE", "MixupEResult", "combine_mixupe", "lam_prime_mean", "mixupe_term",
           "training_rows"]


# ---------------------------------------------------------------------------- pure functions

def lam_prime_mean(alpha: float) -> float:
    """``E[lam']`` for ``lam' ~ Beta(alpha + 1, alpha)``: ``(alpha + 1) / (2 alpha + 1)``.

    >>> lam_prime_mean(1.0)
    0.6666666666666666
    """
    alpha = check_positive("alpha", alpha)
    return (alpha + 1.0) / (2.0 * alpha + 1.0)


def mixupe_term(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 1.0,
                threshold: float | None = 1.0) -> torch.Tensor:
    """MixupE's term ``R = (1 - E[lam']) / B * sum_i 1[r_i < threshold] r_i``, ``r_i = (t_i - softmax(f_i))^T f_i``.

    ``logits`` (B, C) are the clean rows' ``f_i``, ``targets`` their (B, C) soft targets;
    ``threshold=None`` keeps every row. The row mask is detached; the gradient flows through
    both factors of ``r_i`` (the authors' version 3).

    >>> f = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    >>> t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> mixupe_term(f, t, alpha=1.0, threshold=None)          # (1 - 2/3) / 2 * (0.238 + 0)
    tensor(0.0397)
    """
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits and targets must both be (B, C); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    rows = ((targets - torch.softmax(logits.float(), dim=-1)) * logits.float()).sum(-1)
    if threshold is not None:
        rows = torch.where(rows.detach() < threshold, rows, torch.zeros_like(rows))
    return (1.0 - lam_prime_mean(alpha)) * rows.sum() / logits.shape[0]


def combine_mixupe(mix_loss: torch.Tensor, term: torch.Tensor, eta: float, *, rescale: bool = True) -> torch.Tensor:
    """``L = L_mix - eta R``; with ``rescale``, ``L * (|L_mix| / |L|)``, the factor detached (the authors'
    rule; a total of exactly 0, where their factor is 0/0, keeps the factor 1: a finite loss and gradient)."""
    total = mix_loss - eta * term
    if not rescale:
        return total
    size = total.detach().abs()
    factor = torch.where(size > 0, mix_loss.detach().abs() / size.clamp_min(torch.finfo(size.dtype).tiny),
                         torch.ones_like(size))
    return factor * total


# ---------------------------------------------------------------------------- the rows

def training_rows(objective: Objective, model, x, y, generator=None,
                  num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, soft targets)``: the rows the objective trains on, one per sample, before any mixing.

    ``ERM``: its augmentation's draw (no forward); no augmentation: the batch and its one-hot
    targets. ``MaxUp`` (select mode): one no-grad evaluation with the buffers untouched, whose
    chosen copies are kept (the rule of :meth:`maxup.steps.Adversarial.rows`).
    """
    if type(objective) is ERM:
        if objective.augment is not None:
            inputs, targets, _ = augmented(objective.augment, x, y, generator)
        else:
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
                raise ValueError("x must be a non-empty batch (B, ...) of inputs")
            if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must hold one label or target row per sample of x ({x.shape[0]})")
            inputs, targets = x, y
    else:
        net = local(model)
        with torch.no_grad(), frozen_buffers(net):
            result = objective(net, x, y, generator)
        inputs, targets = result.inputs, result.targets
    if not targets.is_floating_point():
        if num_classes is None:
            raise ValueError("integer labels need num_classes to become soft targets: pass num_classes=... to the "
                             "step (a method spec fills it in)")
        targets = soft_targets(targets, num_classes, check=False)
    return inputs, targets.to(inputs.device)


# ---------------------------------------------------------------------------- the step

@dataclasses.dataclass
class MixupEResult(ObjectiveResult):
    """The mixed rows' :class:`~maxup.objectives.ObjectiveResult` (``loss`` is MixupE's), with the clean rows
    (``clean``, ``clean_targets``) for a second pass and the detached parts ``mix_loss`` and ``term``."""

    clean: torch.Tensor | None = None
    clean_targets: torch.Tensor | None = None
    mix_loss: torch.Tensor | None = None
    term: torch.Tensor | None = None


@register("mixupe", "MixupE: Mixup minus eta times the authors' first-order logit term on the clean rows (a "
          "second forward); after the spec's augmentations")
class MixupE(Step):
    """MixupE (Zou et al., UAI 2023): the Mixup loss minus ``eta`` times a first-order term on the clean rows.

    See the module notes for the formula (the authors' released version 3). The objective gives
    the rows (``ERM(augment)``: the augmented batch; ``MaxUp``: the worst copies), the step mixes
    them and adds the term of the same rows unmixed.

    Args:
        objective: ``maxup.ERM(...)`` or ``maxup.MaxUp(...)`` in select mode (default ``ERM()``).
        optimizer: the optimizer.
        alpha: Mixup's ``Beta(alpha, alpha)`` (the README's CIFAR-100 command: 2.0).
        eta: weight of the term (the README's command: 0.001).
        threshold: rows with ``r_i >= threshold`` are left out of the term (README: 1.0); None keeps all.
        per_sample: one ``lam`` per sample (False: one per batch, as released).
        rescale: rescale the total to the size of the Mixup loss, as released.
        num_classes: to turn integer labels into targets (a method spec fills it in).
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    >>> step = MixupE(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), eta=0.001, num_classes=10)
    >>> result = step(model, x, y)                  # result.term: the detached R of this step
    """

    domain = "tensor"
    mixes_rows = True

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, alpha: float = 1.0,
                 eta: float = 0.001, threshold: float | None = 1.0, per_sample: bool = False, rescale: bool = True,
                 num_classes: int | None = None, max_grad_norm: float | None = None, amp: str | None = None):
        self.alpha = check_positive("alpha", alpha)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.threshold = None if threshold is None else check_finite("threshold", threshold)
        for name, flag in (("per_sample", per_sample), ("rescale", rescale)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.per_sample, self.rescale = per_sample, rescale
        self.num_classes = num_classes
        super().__init__(check_rows_objective(objective, "mixupe"), optimizer, max_grad_norm=max_grad_norm, amp=amp)

    def __repr__(self) -> str:
        return (f"MixupE({self.objective!r}, alpha={self.alpha}, eta={self.eta}, threshold={self.threshold}, "
                f"per_sample={self.per_sample}, rescale={self.rescale})")

    def draw(self, n: int, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lam, perm)``: (B,) or (1,) weights ``Beta(alpha, alpha)`` and a partner permutation."""
        k = n if self.per_sample else 1
        if self.alpha == 1.0:
            lam = R.rand((k,), generator=generator, device=device)
        else:
            lam = R.beta(self.alpha, (k,), generator=generator, device=device)
        return lam, R.randperm(n, generator=generator, device=device)

    def evaluate(self, model, x, y, generator) -> MixupEResult:
        inputs, targets = training_rows(self.objective, model, x, y, generator, self.num_classes)
        lam, perm = self.draw(inputs.shape[0], generator, inputs.device)
        mixed, mixed_targets = MF.mixup(inputs, targets, lam, perm)
        return self._loss(model, mixed, mixed_targets, inputs, targets)

    def reevaluate(self, model, result: MixupEResult) -> MixupEResult:
        """The same mixed and clean rows at the current weights (SAM's second pass)."""
        return self._loss(model, result.inputs, result.targets, result.clean, result.clean_targets)

    def _loss(self, model, mixed, mixed_targets, clean, clean_targets) -> MixupEResult:
        logits = model(mixed)  # the authors' order: the mixed batch, then the clean one (BatchNorm statistics)
        rows = soft_cross_entropy(logits, mixed_targets, reduction="none")
        mix_loss = rows.mean()
        term = mixupe_term(model(clean), clean_targets, alpha=self.alpha, threshold=self.threshold)
        loss = combine_mixupe(mix_loss, term, self.eta, rescale=self.rescale)
        weights = torch.full_like(rows, 1.0 / rows.shape[0]).detach()
        return MixupEResult(loss, rows, logits, mixed, mixed_targets, weights, None, True, clean=clean,
                            clean_targets=clean_targets, mix_loss=mix_loss.detach(), term=term.detach())
