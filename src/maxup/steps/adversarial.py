"""Adversarial training: PGD-AT (Madry et al. 2018) and TRADES (Zhang et al. 2019) around any objective.

Per step (:meth:`Adversarial.evaluate`):

1. the objective gives the rows it trains on: the augmented batch for ``ERM(augment)``
   (the CutMix or Mixup batch with its soft targets), and for ``MaxUp`` the worst of m
   augmented copies chosen by its selection pass (at the clean copies). So
   ``adv+maxup(m=4)+cutmix`` takes the worst of m augmented copies, then the attack;
2. PGD (:func:`maxup.functional.attacks.pgd`) attacks those rows within ``eps`` of them,
   against their targets (soft targets: the soft cross-entropy), with the model in
   **eval mode** (BatchNorm normalises with its running statistics, dropout is off; the
   buffers are untouched), as the MadryLab ``robustness`` library (``AttackerModel``) and
   TRADES' ``trades_loss`` do; Rice et al.'s ``train_cifar.py`` attacks in train mode;
3. the step trains on the attacked rows: ``loss="pgd"``, the cross-entropy of the attacked
   rows (PGD-AT); ``loss="trades"``, ``CE(f(x), t) + beta * KL(p(x) || p(x_adv))``, the
   attack maximising that KL term (TRADES).

The attacked rows are what the step returns (``result.inputs``; for TRADES the rows before the
attack ride along in ``result.clean``), so under SAM (``sam+adv``) the second pass at
``w + eps`` re-evaluates the same attacked rows (:meth:`Adversarial.reevaluate`): no new attack.

Cost, in units of one ERM step (a forward-backward): ``steps + 1`` forward-backward passes
for PGD-AT (each attack step is a forward and a backward to the input; the weights' gradients
are not computed there, so an attack step is a little cheaper than a training step);
TRADES adds a no-grad forward of the clean rows (their prediction, the attack's target) and a
forward of the clean rows in training. MaxUp's selection adds its m no-grad forwards and one
more of the chosen rows. docs/methods/adv.md gives the measured ratio.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .._checks import check_positive
from .._modules import local
from ..functional import soft_cross_entropy, soft_targets
from ..functional.attacks import check_attack, pgd
from ..objectives import ERM, Objective, ObjectiveResult, augmented, frozen_buffers, plain
from ..registry import register
from .base import Step, check_rows_objective

__all__ = ["LOSSES", "Adversarial", "AdversarialResult", "eval_mode", "trades_rows"]

#: ``pgd``: the cross-entropy of the attacked rows (Madry et al.); ``trades``: TRADES' clean CE + beta KL
LOSSES = ("pgd", "trades")


@dataclasses.dataclass
class AdversarialResult(ObjectiveResult):
    """An :class:`~maxup.objectives.ObjectiveResult` whose ``inputs`` are the attacked rows; ``clean`` holds the
    rows before the attack (TRADES' natural rows; None for PGD-AT, which trains on the attacked rows only)."""

    clean: torch.Tensor | None = None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Every module of ``model`` in eval mode for the block, each one's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def trades_rows(logits: torch.Tensor, adv_logits: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """TRADES' loss per row: ``CE(logits, targets) + beta * KL(softmax(logits) || softmax(adv_logits))``.

    The gradient flows through both logits (the clean prediction is not detached), as in the
    authors' ``trades_loss``.
    """
    ce = soft_cross_entropy(logits, targets, reduction="none")
    kl = F.kl_div(F.log_softmax(adv_logits.float(), dim=-1), F.log_softmax(logits.float(), dim=-1),
                  reduction="none", log_target=True).sum(-1)
    return ce + beta * kl


@register("adv", "adversarial training: PGD-AT (Madry et al.) on the objective's rows (for MaxUp: the worst of m "
          "augmented copies, then the attack); loss='trades': TRADES")
class Adversarial(Step):
    """Adversarial training (PGD-AT, Madry et al. 2018; TRADES, Zhang et al. 2019) around any objective.

    The objective first gives the rows it trains on (for MaxUp: the worst of m augmented
    copies, then the attack), PGD attacks them with the model in eval mode, and the step
    trains on the attacked rows (module notes). Costs ``steps + 1`` forward-backward passes.

    Args:
        objective: ``maxup.ERM(augment)`` or ``maxup.MaxUp(augment, m)`` in select mode (one
            row per sample); augmentations that act inside the forward are refused.
        optimizer: the optimizer.
        eps: the radius of the attack's ball, in input units (default 0.1: Fashion-MNIST pixels in [0, 1]).
        norm: ``"linf"`` or ``"l2"``.
        steps: PGD steps (>= 1).
        step_size: each step's length; None: ``2.5 * eps / steps``.
        random_start: start each attack uniformly in the ball (required for TRADES, whose
            KL term has a zero gradient at the clean input).
        bounds: the valid input range, ``(0.0, 1.0)`` for unnormalised images; None for
            standardised inputs or features (attacked rows are clamped into it; inputs
            outside it are an error).
        loss: ``"pgd"`` (train on the attacked rows' cross-entropy) or ``"trades"``.
        beta: TRADES' weight of the KL term (ignored for ``"pgd"``; the authors used 6.0 on CIFAR-10).
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    >>> step = Adversarial(maxup.ERM(maxup.augment.CutMix(num_classes=10)), opt, eps=8 / 255, steps=3)
    >>> result = step(model, x, y)                   # result.inputs: the attacked CutMix rows
    >>> result.inputs.shape
    torch.Size([8, 3, 32, 32])
    """

    domain = "tensor"

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, eps: float = 0.1,
                 norm: str = "linf", steps: int = 10, step_size: float | None = None, random_start: bool = True,
                 bounds=(0.0, 1.0), loss: str = "pgd", beta: float = 6.0, max_grad_norm: float | None = None,
                 amp: str | None = None):
        self.eps, self.norm, self.steps, self.step_size, self.random_start, self.bounds = check_attack(
            eps, norm, steps, step_size, random_start, bounds)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES} ('pgd': Madry et al.'s PGD-AT, 'trades': TRADES), "
                             f"got {loss!r}")
        if loss == "trades" and not random_start:
            raise ValueError("loss='trades' needs random_start=True: the attack maximises KL(p(x) || p(x_adv)), whose "
                             "gradient is zero at x_adv = x, so an attack started at x never moves")
        self.loss = loss
        self.beta = check_positive("beta", beta, allow_zero=True)
        objective = check_rows_objective(objective, "adv", "attacks")
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)

    def __repr__(self) -> str:
        return (f"Adversarial({self.objective!r}, eps={self.eps}, norm={self.norm!r}, steps={self.steps}, "
                f"step_size={self.step_size}, random_start={self.random_start}, bounds={self.bounds}, "
                f"loss={self.loss!r}" + (f", beta={self.beta})" if self.loss == "trades" else ")"))

    # ------------------------------------------------------------------ the rows, the attack

    def rows(self, model, x, y, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``: the rows the objective trains on, before the attack.

        ERM: its augmentation's draw (no forward). Any other objective (MaxUp): one no-grad
        evaluation with the buffers untouched, whose rows are kept (MaxUp's worst copies).
        """
        objective = self.objective
        if type(objective) is ERM:
            if objective.augment is not None:
                inputs, targets, _ = augmented(objective.augment, x, y, generator)
                return inputs, targets
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
                raise ValueError("x must be a non-empty batch (B, ...) of inputs")
            if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must hold one label or target row per sample of x ({x.shape[0]})")
            return x, (soft_targets(y) if y.is_floating_point() else y)
        net = local(model)
        with torch.no_grad(), frozen_buffers(net):
            result = objective(net, x, y, generator)
        return result.inputs, result.targets

    def attack(self, model, inputs: torch.Tensor, targets: torch.Tensor, generator=None) -> torch.Tensor:
        """The attacked rows: PGD on ``inputs`` in eval mode (buffers untouched, no weight gradient), against
        ``targets`` (``"pgd"``) or against the clean prediction (``"trades"``)."""
        net = local(model)  # no DDP synchronisation: the attack's gradient is the input's only
        with eval_mode(net):
            if self.loss == "trades":
                with torch.no_grad():
                    targets = torch.softmax(net(inputs).float(), dim=-1)  # KL(p || q) has the gradient of CE(p, q)
            return pgd(net, inputs, targets, eps=self.eps, norm=self.norm, steps=self.steps,
                       step_size=self.step_size, random_start=self.random_start, bounds=self.bounds,
                       generator=generator)

    # ------------------------------------------------------------------ the losses

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        inputs, targets = self.rows(model, x, y, generator)
        attacked = self.attack(model, inputs, targets, generator)
        if self.loss == "pgd":
            return plain(model, attacked, targets)
        weights = torch.full((inputs.shape[0],), 1.0 / inputs.shape[0], device=inputs.device)
        return self._trades(model, inputs, attacked, targets, weights)

    def reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        """The same attacked rows at the current weights (SAM's second pass): no new attack."""
        if self.loss == "pgd":
            return super().reevaluate(model, result)
        return self._trades(model, result.clean, result.inputs, result.targets, result.weights)

    def _trades(self, model, inputs, attacked, targets, weights) -> AdversarialResult:
        logits = model(inputs)
        adv_logits = model(attacked)
        if not targets.is_floating_point():
            targets = soft_targets(targets, logits.shape[-1], check=False)  # checked where the data entered
        rows = trades_rows(logits, adv_logits, targets, self.beta)
        weights = weights.to(rows.dtype).detach()
        return AdversarialResult((weights * rows).sum(), rows, adv_logits, attacked, targets, weights, None, True,
                                 clean=inputs)
