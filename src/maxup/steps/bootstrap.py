"""Dynamic bootstrapping guided by a Beta mixture (Arazo, Ortego, Albert, O'Connor, McGuinness, ICML 2019).

"Unsupervised label noise modeling and loss correction": after each epoch a two-component Beta mixture
(:mod:`maxup.functional.bmm`) is fitted to the losses of all training samples, computed in eval mode.
During the next epoch each sample's weight ``w`` is the posterior of the high-loss component at its
current loss (eval mode, the BMM read through the authors' lookup table, ``w`` clipped to
``[1e-4, 1 - 1e-4]``), and the sample trains towards

    hard: (1 - w) * y + w * onehot(argmax p)          (DYR-H)
    soft: (1 - w) * y + w * p                          (DYR-S)

with ``p`` the model's own (detached) prediction of the sample. ``mixup=True`` mixes the inputs with
``lam ~ Beta(alpha, alpha)`` (one per batch, the authors' ``alpha = 32``) and the *bootstrapped* targets of
the two samples with the same ``lam`` (M-DYR-H and M-DYR-S). For the first ``warmup_epochs`` epochs the
step trains plain cross-entropy (or plain Mixup) and skips the eval pass.

The step needs the end of each epoch: :meth:`Bootstrap.on_epoch_end` fits the mixture on the training
set. The :class:`~maxup.train.Trainer` calls it after every epoch with the model and the training
inputs and (noisy) labels only; a loop of your own calls ``step.on_epoch_end(model, data, epoch=e)``
with ``e`` the number of epochs done. The posterior of each batch sample is read from its current loss,
so the step needs no sample indices.

Cost per step once bootstrapping runs: one no-grad eval-mode forward of the batch more than ERM (or
Mixup); per epoch, one eval-mode forward of the training set (the fit itself is negligible).
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .._checks import check_int, check_positive
from .._modules import local
from ..data import TensorData
from ..functional import _random as R
from ..functional import soft_cross_entropy, soft_targets
from ..functional.bmm import (
    BetaMixture,
    _check_percentiles,
    fit_bmm,
    loss_posterior,
    normalise_losses,
    posterior_lookup,
)
from ..objectives import ERM, Objective, ObjectiveResult, augmented
from ..registry import register
from .adversarial import eval_mode
from .base import Step

__all__ = ["BOOTSTRAP_MODES", "COLLAPSE_SHARE", "Bootstrap", "bootstrap_targets", "class_balance_penalty",
           "mixed_bootstrap_targets", "training_losses"]

#: ``hard``: the predicted class (DYR-H); ``soft``: the predicted probabilities (DYR-S)
BOOTSTRAP_MODES = ("hard", "soft")
#: without the class-balance term, a fit that judges more than this share of the training labels wrong warns once:
#: the model is training on its own predictions and may be collapsing onto one class
COLLAPSE_SHARE = 0.75


def bootstrap_targets(targets: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor,
                      mode: str = "hard") -> torch.Tensor:
    """``(1 - w) t + w q`` per row: ``q`` the one-hot argmax of ``logits`` (``"hard"``) or their softmax
    (``"soft"``), detached; ``targets`` (B, C) soft targets, ``weight`` (B,) in [0, 1].

    >>> t = torch.tensor([[1.0, 0.0, 0.0]])
    >>> bootstrap_targets(t, torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([0.25]), "hard")
    tensor([[0.7500, 0.2500, 0.0000]])
    """
    if mode not in BOOTSTRAP_MODES:
        raise ValueError(f"mode must be one of {BOOTSTRAP_MODES} ('hard': the predicted class, 'soft': the "
                         f"predicted probabilities), got {mode!r}")
    if targets.shape != logits.shape or targets.dim() != 2:
        raise ValueError(f"targets must be (B, C) soft targets shaped like the logits {tuple(logits.shape)}, "
                         f"got {tuple(targets.shape)}")
    logits = logits.detach().float()
    if mode == "hard":
        q = torch.zeros_like(logits).scatter_(1, logits.argmax(1, keepdim=True), 1.0)
    else:
        q = torch.softmax(logits, dim=1)
    w = weight.detach().to(q.dtype)[:, None]
    return (1 - w) * targets.to(q.dtype) + w * q


def mixed_bootstrap_targets(targets: torch.Tensor, clean_logits: torch.Tensor | None, weight: torch.Tensor | None,
                            mode: str = "hard", lam=None, perm: torch.Tensor | None = None) -> torch.Tensor:
    """The targets a batch trains on: :func:`bootstrap_targets` (skipped when ``weight`` is None: the warm-up),
    then, with ``perm``, mixed as ``lam * u + (1 - lam) * u[perm]`` (M-DYR: each sample's *bootstrapped* target,
    its partner's likewise; ``lam`` a float or a (1,) tensor, one per batch)."""
    t = targets if weight is None else bootstrap_targets(targets, clean_logits, weight, mode)
    if perm is None:
        return t
    lam = torch.as_tensor(lam, dtype=t.dtype, device=t.device).reshape(-1, 1)
    return torch.lerp(t[perm], t, lam)


def class_balance_penalty(logits: torch.Tensor) -> torch.Tensor:
    """``sum_c (1/C) log((1/C) / pbar_c)``, ``pbar`` the batch's mean softmax: KL(uniform || pbar), the authors'
    ``reg_loss_class`` (keeps the model from assigning every sample to one class)."""
    pbar = torch.softmax(logits.float(), dim=-1).mean(0)
    c = pbar.shape[0]
    return ((1.0 / c) * torch.log((1.0 / c) / pbar)).sum()


@torch.no_grad()
def training_losses(model, data: TensorData, *, batch_size: int = 512, autocast=None) -> torch.Tensor:
    """(N,) float32 cross-entropy of every sample of ``data`` against its label ``data.y``, the model in eval mode
    (each module's mode restored after), in batches of ``batch_size``, on the model's device."""
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData (the training inputs and labels), "
                         f"got {type(data).__name__}")
    if data.y.dim() != 1:
        raise ValueError("data.y must hold one class label per sample (N,), not token sequences")
    net = local(model)
    device = next((p.device for p in net.parameters()), data.x.device)
    out = []
    with eval_mode(net):
        for start in range(0, len(data), batch_size):
            xb = data.x[start:start + batch_size].to(device, non_blocking=True)
            yb = data.y[start:start + batch_size].to(device, non_blocking=True)
            with autocast(xb) if autocast is not None else torch.autocast(device.type, enabled=False):
                logits = net(xb)
            out.append(soft_cross_entropy(logits.float(), yb, reduction="none"))
    return torch.cat(out)


@register("bootstrap", "dynamic bootstrapping (Arazo et al.): targets (1-w) y + w * prediction, w the posterior of "
          "the high-loss component of a Beta mixture fitted to the training losses each epoch; mixup=true: "
          "M-DYR-H/S")
class Bootstrap(Step):
    """Dynamic hard or soft bootstrapping guided by a Beta mixture on the training losses (Arazo et al. 2019).

    Args:
        objective: ``maxup.ERM()`` or ``maxup.ERM(augment)`` with an augmentation that keeps the labels
            (crop and flip, Cutout, noise); the step mixes with its own Mixup (``mixup=True``), so mixing
            augmentations and MaxUp are refused.
        optimizer: the optimizer.
        mode: ``"hard"`` (the predicted class, DYR-H) or ``"soft"`` (the predicted probabilities, DYR-S).
        mixup: Mixup of the inputs and of the bootstrapped targets (M-DYR-H / M-DYR-S), also during the warm-up.
        alpha: Mixup's ``Beta(alpha, alpha)`` (the authors' 32: ``lam`` near 0.5), one ``lam`` per batch.
        warmup_epochs: epochs of plain training (plain Mixup with ``mixup``) before bootstrapping; the mixture is
            fitted at the end of epoch ``warmup_epochs`` and of every later one. The authors' 105 (of 300, the
            learning rate divided by 10 at epoch 100). With 0, the first epoch uses ``w = 0.5`` (the authors'
            rule before any fit).
        reg_weight: weight of :func:`class_balance_penalty` on the training batch's predictions (the authors'
            ``--reg-term``; 0 by default, as in their code).
        iters: EM iterations of each fit (the authors' 10).
        percentiles: the losses kept for the fit and their scale (the authors' 5th and 95th percentiles).
        eval_batch_size: batch size of the per-epoch pass over the training set.
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    ``step.last_fit`` is the latest :class:`~maxup.functional.bmm.BetaMixture` (None before the first fit);
    ``step.noisy_share`` the share of the training samples it judges mislabelled (posterior above 0.5). With
    ``reg_weight=0`` a share above :data:`COLLAPSE_SHARE` warns once: on Fashion-MNIST at 40% noise, a warm-up
    too short for the losses to separate gave shares of 0.41, 0.54, 0.64, 0.84 over four epochs and a model
    predicting one class, where ``reg_weight=1.0`` held the share between 0.19 and 0.45.

    >>> step = Bootstrap(maxup.ERM(), opt, mode="hard", mixup=True, warmup_epochs=0)
    >>> result = step(model, x, y)                       # w = 0.5 until the first fit
    >>> step.on_epoch_end(model, maxup.data.TensorData(x_test, y_test), epoch=1)
    >>> step.last_fit is not None
    True
    """

    domain = "tensor"
    mixes_rows = True
    search_space = {"warmup_epochs": (1, 50, "int")}

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, mode: str = "hard",
                 mixup: bool = False, alpha: float = 32.0, warmup_epochs: int = 105, reg_weight: float = 0.0,
                 iters: int = 10, percentiles: tuple[float, float] = (5.0, 95.0), eval_batch_size: int = 512,
                 max_grad_norm: float | None = None, amp: str | None = None):
        if mode not in BOOTSTRAP_MODES:
            raise ValueError(f"mode must be one of {BOOTSTRAP_MODES} ('hard': the predicted class, DYR-H; 'soft': the "
                             f"predicted probabilities, DYR-S), got {mode!r}")
        if not isinstance(mixup, bool):
            raise ValueError(f"mixup must be true or false, got {mixup!r}")
        self.mode = mode
        self.mixup = mixup
        self.alpha = check_positive("alpha", alpha)
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, minimum=0)
        self.reg_weight = check_positive("reg_weight", reg_weight, allow_zero=True)
        self.iters = check_int("iters", iters)
        self.percentiles = _check_percentiles(percentiles)
        self.eval_batch_size = check_int("eval_batch_size", eval_batch_size)
        objective = ERM() if objective is None else objective
        if type(objective) is not ERM:
            raise ValueError(f"bootstrap builds its own targets from one copy of each sample: use it with ERM (no "
                             f"objective term in a spec), not {type(objective).__name__}")
        augment = objective.augment
        if getattr(augment, "mixes_rows", False) or getattr(augment, "context", None):
            raise ValueError(f"bootstrap mixes with its own Mixup (mixup=true), on targets it bootstraps first; "
                             f"{type(augment).__name__} mixes samples (or acts inside the model): drop it, or use "
                             "bootstrap(mixup=true)")
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.epoch = 0  # epochs done, set by on_epoch_end
        self._fit: dict | None = None
        self.noisy_share: float | None = None
        self._warned_collapse = False

    def __repr__(self) -> str:
        return (f"Bootstrap({self.objective!r}, mode={self.mode!r}, mixup={self.mixup}, alpha={self.alpha}, "
                f"warmup_epochs={self.warmup_epochs}, reg_weight={self.reg_weight}, iters={self.iters}, "
                f"percentiles={self.percentiles})")

    @property
    def bootstrapping(self) -> bool:
        """Whether this epoch bootstraps (the warm-up is over)."""
        return self.epoch >= self.warmup_epochs

    @property
    def last_fit(self) -> BetaMixture | None:
        fit = self._fit
        return None if fit is None else BetaMixture(fit["alphas"], fit["betas"], fit["weights"])

    # ------------------------------------------------------------------ the epoch's fit

    def on_epoch_end(self, model, data: TensorData, *, epoch: int) -> None:
        """After epoch ``epoch`` (1-based: the number of epochs done): fit the Beta mixture on the losses of every
        sample of ``data`` (the training inputs and their noisy labels), the model in eval mode, once the
        warm-up is over. A fit that fails (losses all equal: NaN parameters) keeps the previous one, with a
        warning."""
        self.epoch = check_int("epoch", epoch, minimum=0)
        if not self.bootstrapping:
            return
        losses = training_losses(model, data, batch_size=self.eval_batch_size, autocast=self.autocast)
        x, low, high = normalise_losses(losses, percentiles=self.percentiles)
        mixture = fit_bmm(x, iters=self.iters) if x.numel() >= 2 else None
        if mixture is None or not mixture.finite:
            warnings.warn(f"bootstrap: the Beta mixture fitted after epoch {epoch} is degenerate (the training "
                          "losses are nearly all equal); the previous fit is kept", RuntimeWarning, stacklevel=2)
            return
        self._fit = {"lookup": posterior_lookup(mixture), "low": low, "high": high, "alphas": mixture.alphas,
                     "betas": mixture.betas, "weights": mixture.weights}
        self.noisy_share = float((self.weights(losses) > 0.5).float().mean())
        if self.noisy_share > COLLAPSE_SHARE and not self.reg_weight and not self._warned_collapse:
            self._warned_collapse = True
            warnings.warn(f"bootstrap: the Beta mixture fitted after epoch {epoch} judges {self.noisy_share:.0%} of "
                          "the training labels wrong; the model is training on its own predictions and may be "
                          "collapsing onto one class. Set reg_weight=1.0 (the authors' class-balance term) or a "
                          "longer warmup_epochs", RuntimeWarning, stacklevel=2)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """(B,) probability of a wrong label of each loss: the posterior through the latest fit, 0.5 before it."""
        fit = self._fit
        if fit is None:
            return torch.full_like(losses, 0.5, dtype=torch.float32)
        if fit["lookup"].device != losses.device:  # once after a checkpoint load or a device move
            fit.update({k: v.to(losses.device) for k, v in fit.items()})
        return loss_posterior(losses, fit["lookup"], fit["low"], fit["high"])

    # ------------------------------------------------------------------ the loss

    def _rows(self, x, y, generator) -> tuple[torch.Tensor, torch.Tensor]:
        augment = self.objective.augment
        if augment is not None:
            inputs, targets, _ = augmented(augment, x, y, generator)
            return inputs, targets
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
            raise ValueError("x must be a non-empty batch (B, ...) of inputs")
        if not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1] or y.dim() > 2:
            raise ValueError(f"y must hold one label or target row per sample of x ({x.shape[0]})")
        return x, (soft_targets(y) if y.is_floating_point() else y)

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        inputs, targets = self._rows(x, y, generator)
        clean_logits = weight = None
        if self.bootstrapping:  # the batch's loss and prediction in eval mode: the posterior and the bootstrap
            with torch.no_grad(), eval_mode(local(model)) as net:
                clean_logits = net(inputs).float()
            weight = self.weights(soft_cross_entropy(clean_logits, targets, reduction="none"))
        lam = perm = None
        if self.mixup:
            n = inputs.shape[0]
            lam = R.beta(self.alpha, (1,), generator=generator, device=inputs.device)
            perm = R.randperm(n, generator=generator, device=inputs.device)
            shape = (1,) * (inputs.dim() - 1)
            inputs = torch.lerp(inputs[perm], inputs, lam.to(inputs.dtype).view(1, *shape))
        logits = model(inputs)
        t = targets if targets.is_floating_point() else soft_targets(targets, logits.shape[-1], check=False)
        t = mixed_bootstrap_targets(t, clean_logits, weight, self.mode, lam, perm)
        rows = soft_cross_entropy(logits, t, reduction="none")
        weights = torch.full_like(rows, 1.0 / rows.shape[0]).detach()
        return ObjectiveResult(self._regularised(rows.mean(), logits), rows, logits, inputs, t, weights, None, True)

    def reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        again = super().reevaluate(model, result)
        return dataclasses.replace(again, loss=self._regularised(again.loss, again.logits))

    def _regularised(self, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return loss + self.reg_weight * class_balance_penalty(logits) if self.reg_weight else loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        fit = None if self._fit is None else {k: v.detach().cpu().clone() for k, v in self._fit.items()}
        return {**super().state_dict(), "epoch": self.epoch, "fit": fit}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])
        fit = state.get("fit")
        self._fit = None if fit is None else {k: torch.as_tensor(v).clone() for k, v in fit.items()}
