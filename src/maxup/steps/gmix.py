"""G-Mix, BG-Mix and DG-Mix (Li and Tang, 2023): sharpness-aware training of the Mixup loss.

G-Mix is SAM applied to the Mixup loss, ``min_w max_{||eps|| <= rho} L_mix(w + eps)``:
the mixed batch is drawn once per step and used in both SAM passes.

BG-Mix and DG-Mix split the training examples by their sharpness-sensitivity, to
counter Mixup's manifold intrusion. **The published rules were not available to
us; what follows is this project's reading**, with its knobs:

- sensitivity of example i: ``s_i = l_i(w + eps) - l_i(w)`` on the unmixed example,
  ``eps`` the SAM ascent (same ``rho``, ``adaptive``, ``eta`` as the step) along the
  gradient of the unmixed batch's mean loss; the ``w + eps`` evaluation is a no-grad
  pass, and neither pass touches BatchNorm statistics;
- BG-Mix (binary): the top ``gamma`` fraction by ``s_i`` (``round(gamma * B)``
  examples, ties to the lower index) is "sensitive" and trained on its unmixed
  originals; the rest are mixed among themselves (Mixup); both parts under SAM;
- DG-Mix (decomposed): example i's loss is ``(1 - q_i) l_mix,i + q_i l_orig,i``
  with ``q_i = rank_i / (B - 1)`` (rank 0 = least sensitive, ties share their mean
  rank), under SAM.

"Unmixed" means what the objective trains on at ``w``: the augmented batch for
``ERM(augment)``, the worst copies for ``MaxUp`` (select mode). For G-Mix the Mixup
is appended to the objective's augmentation instead, so ``MaxUp`` takes the worst
of m independently mixed copies.

Cost, in units of one ERM step (a forward-backward; a forward is ~1/3 of it):
G-Mix ~2 (SAM's floor); BG-Mix ~3.3 (the sensitivity pass adds one
forward-backward for the unmixed gradient -- a different gradient from SAM's own
ascent -- and one no-grad forward); DG-Mix ~5.3 (the sensitivity pass, and both SAM
passes run the mixed and the original rows: 2B rows, less the rows of weight 0).
Measured (benchmarks/sam_overhead.py, ResNet-20, batch 128, CPU): G-Mix 2.0x,
BG-Mix 3.4x, DG-Mix 6.0x the ERM step.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch

from .. import functional as MF
from .._modules import local
from ..augment import Compose, Mixup
from ..functional import _random as R
from ..functional import soft_cross_entropy
from ..objectives import ERM, Objective, ObjectiveResult, frozen_buffers
from ..optim import sam_perturbation
from ..registry import register
from .base import Standard, Step, check_rows_objective
from .sam import SharpnessAware, perturbation

__all__ = ["BGMix", "DGMix", "GMix", "SAMMixup", "SensitivityMixing", "bgmix", "bgmix_partition", "dgmix_weights",
           "sharpness_sensitivity"]

SPLITS = (None, "binary", "decomposed")


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be a fraction in [0, 1] (the share of examples kept unmixed), got {gamma!r}")
    return float(gamma)


def _check_sensitivity(sensitivity) -> torch.Tensor:
    if not isinstance(sensitivity, torch.Tensor) or sensitivity.dim() != 1 or sensitivity.shape[0] == 0:
        raise ValueError("sensitivity must be a non-empty 1-D tensor (one value per example), got "
                         + (f"shape {tuple(sensitivity.shape)}" if isinstance(sensitivity, torch.Tensor)
                            else type(sensitivity).__name__))
    return sensitivity


# ---------------------------------------------------------------------------- pure functions


def bgmix_partition(sensitivity: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """BG-Mix's split: a (B,) bool mask, True for the ``round(gamma * B)`` most sensitive examples.

    Ties are broken towards the lower index. (This project's reading of BG-Mix.)

    >>> bgmix_partition(torch.tensor([0.1, 0.9, -0.2, 0.5]), gamma=0.5)
    tensor([False,  True, False,  True])
    """
    s = _check_sensitivity(sensitivity)
    gamma = _check_gamma(gamma)
    b = s.shape[0]
    k = int(math.floor(gamma * b + 0.5))
    order = torch.argsort(s, descending=True, stable=True)
    mask = torch.zeros(b, dtype=torch.bool, device=s.device)
    mask[order[:k]] = True
    return mask


def dgmix_weights(sensitivity: torch.Tensor) -> torch.Tensor:
    """DG-Mix's weights ``q_i = rank_i / (B - 1)`` in [0, 1]: 0 for the least, 1 for the most sensitive.

    Tied sensitivities share their mean rank; a batch of one gets ``q = 1``. Example i's
    loss is ``(1 - q_i) l_mix,i + q_i l_orig,i``. (This project's reading of DG-Mix.)

    >>> dgmix_weights(torch.tensor([0.3, -1.0, 2.0, 0.5]))
    tensor([0.3333, 0.0000, 1.0000, 0.6667])
    """
    s = _check_sensitivity(sensitivity)
    b = s.shape[0]
    dtype = s.dtype if s.is_floating_point() else torch.float32
    if b == 1:
        return torch.ones(1, dtype=dtype, device=s.device)
    order = torch.argsort(s, stable=True)
    _, inverse, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0) - 1
    mean_rank = (ends - (counts - 1) / 2.0).to(dtype)  # mean of the ranks a tie group occupies
    ranks = torch.empty(b, dtype=dtype, device=s.device)
    ranks[order] = mean_rank[inverse]
    return ranks / (b - 1)


def bgmix(x: torch.Tensor, targets: torch.Tensor, sensitive: torch.Tensor, lam, perm: torch.Tensor):
    """BG-Mix's batch: sensitive rows unchanged; the others mixed among themselves.

    Args:
        x, targets: the unmixed batch, (B, ...) and (B, C) soft targets.
        sensitive: (B,) bool mask (see :func:`bgmix_partition`).
        lam: Mixup weight, a float or one per non-sensitive example (in their order).
        perm: a permutation of ``range(n)``, n = number of non-sensitive examples: the
            j-th of them is mixed with the ``perm[j]``-th of them.

    Returns ``(x_mix, t_mix)``; rows of sensitive examples are exact copies of the input.
    """
    if sensitive.dtype != torch.bool or sensitive.shape != (x.shape[0],):
        raise ValueError(f"sensitive must be a ({x.shape[0]},) bool tensor, "
                         f"got {sensitive.dtype} {tuple(sensitive.shape)}")
    rest = (~sensitive).nonzero().squeeze(1)
    n = rest.shape[0]
    if perm.shape != (n,):
        raise ValueError(f"perm must be a permutation of the {n} non-sensitive examples, got shape {tuple(perm.shape)}")
    full_perm = torch.arange(x.shape[0], device=x.device)
    full_perm[rest] = rest[perm.to(x.device)]
    lam_full = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    if n:
        lam_full[rest] = torch.as_tensor(lam, dtype=x.dtype, device=x.device).expand(n)
    return MF.mixup(x, targets, lam_full, full_perm)


@torch.no_grad()
def _losses_at(model, inputs, targets, params, eps) -> torch.Tensor:
    """Per-row losses at ``w + eps`` (no grad, buffers untouched), ``w`` restored exactly afterwards."""
    saved = [p.detach().clone() for p in params]
    torch._foreach_add_(params, eps)
    try:
        with frozen_buffers(model):
            return soft_cross_entropy(model(inputs), targets, reduction="none")
    finally:
        torch._foreach_copy_(params, saved)


def sharpness_sensitivity(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, rho: float = 0.05,
                          adaptive: bool = False, eta: float = 0.01, params=None) -> torch.Tensor:
    """``s_i = l_i(w + eps) - l_i(w)`` per example, ``eps`` the SAM ascent along the batch's mean-loss gradient.

    Leaves the weights, their ``.grad`` and the model's buffers as they were. Costs one
    forward-backward and one no-grad forward.

    >>> s = sharpness_sensitivity(model, x, torch.nn.functional.one_hot(y, 10).float(), rho=0.05)
    """
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    with frozen_buffers(model):
        rows = soft_cross_entropy(model(inputs), targets, reduction="none")
        grads = torch.autograd.grad(rows.mean(), params, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        ps, gs = [p for p, _ in used], [g for _, g in used]
        eps = sam_perturbation(ps, gs, rho, adaptive=adaptive, eta=eta)
        return (_losses_at(model, inputs, targets, ps, eps) - rows.detach()).float()


# ---------------------------------------------------------------------------- the steps

def _with_mixup(objective: Objective, mixup: Mixup) -> Objective:
    """A copy of ``objective`` whose augmentation is followed by ``mixup`` (the caller's is left as it was)."""
    if not hasattr(objective, "augment"):
        raise ValueError("G-Mix appends Mixup to the objective's augmentation: the objective must be "
                         f"maxup.ERM or maxup.MaxUp, got {type(objective).__name__}")
    aug = objective.augment
    if isinstance(aug, torch.nn.Module) and any(getattr(m, "reweight", False) for m in aug.modules()):
        raise ValueError("soft_augment(reweight=true) does not compose with sam_mixup (G-Mix), which mixes after it: "
                         "pass soft_augment(reweight=false) or use sam+mixup")
    if getattr(aug, "context", None):
        raise ValueError(f"{type(aug).__name__} acts inside the model's forward and must come last; G-Mix (sam_mixup) "
                         "mixes after it: use it alone or under sam")
    objective = copy.copy(objective)
    objective.augment = mixup if aug is None else Compose([aug, mixup])
    return objective


class _MixingUnderSAM(SharpnessAware):
    """A step term that mixes the rows itself and runs SAM's two passes: the traits G-Mix, BG-Mix and DG-Mix share."""

    kind = "step"
    domain = "tensor"
    random = True
    mixes_rows = True
    sharpness_aware = True
    filled = Step.filled
    from_spec = classmethod(Step.from_spec.__func__)


@register("sam_mixup", "G-Mix (Li and Tang): SAM on the Mixup loss, Mixup after the spec's augmentations (for GMix, "
          "the Gaussian-mask augmentation of Park et al., see gmix)")
class SAMMixup(_MixingUnderSAM):
    """G-Mix (Li and Tang 2023): SAM on the Mixup loss, the mixed batch drawn once for both passes.

    Args:
        objective: the objective before mixing (default ``maxup.ERM()``): its augmentation runs
            first, then Mixup; ``MaxUp`` takes the worst of m independently mixed copies.
        optimizer: the base optimizer.
        alpha: Mixup's ``Beta(alpha, alpha)``.
        num_classes: needed for integer labels when nothing else turns them into soft targets.
        per_sample: one lambda per example (default) or one per batch.
        rho, adaptive, eta, weights_only, interval, accumulation_steps, sync_first, max_grad_norm,
        amp: as for :class:`maxup.steps.SharpnessAware`.

    >>> step = SAMMixup(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), alpha=1.0, num_classes=10)
    >>> result = step(model, x, y)
    """

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, alpha: float = 1.0,
                 num_classes: int | None = None, per_sample: bool = True, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.01, weights_only: bool = False, interval: int = 1, accumulation_steps: int = 1,
                 sync_first: bool = False, max_grad_norm: float | None = None, amp: str | None = None):
        self.mixup = Mixup(alpha, per_sample=per_sample, num_classes=num_classes)  # checks alpha, num_classes
        objective = _with_mixup(ERM() if objective is None else objective, self.mixup)
        super().__init__(Standard(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp), rho=rho,
                         adaptive=adaptive, eta=eta, weights_only=weights_only, interval=interval,
                         accumulation_steps=accumulation_steps, sync_first=sync_first)

    def __repr__(self) -> str:
        return f"SAMMixup({self.objective!r}, alpha={self.mixup.alpha}, rho={self.rho}, adaptive={self.adaptive})"


class SensitivityMixing(Step):
    """The pass of BG-Mix and DG-Mix: rank the examples by sharpness-sensitivity, mix by rank.

    Its :meth:`evaluate` trains on the rows the objective gives at ``w``, each example's
    sensitivity ``s_i = l_i(w + eps) - l_i(w)`` (``eps`` from ``rho``, ``adaptive``, ``eta``)
    deciding how it is mixed (``split="binary"``: BG-Mix, ``"decomposed"``: DG-Mix; module
    notes); :meth:`reevaluate` replays those rows. :class:`BGMix` and :class:`DGMix` run it
    under SAM.
    """

    domain = "tensor"

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, split: str,
                 alpha: float = 1.0, num_classes: int | None = None, per_sample: bool = True, gamma: float = 0.5,
                 rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, weights_only: bool = False,
                 max_grad_norm: float | None = None, amp: str | None = None):
        if split not in SPLITS[1:]:
            raise ValueError(f"split must be one of {SPLITS[1:]} (BG-Mix, DG-Mix), got {split!r}")
        self.gamma = _check_gamma(gamma)
        self.mixup = Mixup(alpha, per_sample=per_sample, num_classes=num_classes)  # checks alpha, num_classes
        objective = check_rows_objective(objective, "BG-Mix and DG-Mix", "mix")
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.split = split
        self.rho, self.adaptive, self.eta, self.weights_only = rho, adaptive, eta, weights_only

    def sensitivity(self, model, result: ObjectiveResult) -> torch.Tensor:
        """``s_i = l_i(w + eps) - l_i(w)`` for the rows of ``result`` (computed at ``w`` with grad)."""
        if self.rho == 0:
            return torch.zeros_like(result.losses, dtype=torch.float32).detach()
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        loss = result.loss.float() * scale if scale != 1.0 else result.loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None]
        ps, gs = [p for p, _ in used], [g for _, g in used]
        if scale != 1.0 and gs:
            torch._foreach_mul_(gs, 1.0 / scale)
        eps, norm = perturbation(model, ps, gs, self.rho, adaptive=self.adaptive, eta=self.eta,
                                 weights_only=self.weights_only)
        if self.scaler is not None and not bool(torch.isfinite(norm)):
            return torch.zeros_like(result.losses, dtype=torch.float32).detach()  # fp16 overflow: no ranking
        return (_losses_at(model, result.inputs, result.targets, ps, eps) - result.losses.detach()).float()

    def _draw(self, n: int, generator, device):
        lam = R.beta(self.mixup.alpha, (n if self.mixup.per_sample else 1,), generator=generator, device=device)
        return lam, R.randperm(n, generator=generator, device=device)

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        net = local(model)  # the sensitivity pass is local: no DDP hooks (a compiled net stays compiled)
        with frozen_buffers(net):  # open until the backward: BatchNorm's backward reads the buffers' versions
            plain = self.objective(net, x, y, generator)
            b = plain.inputs.shape[0]
            if b != x.shape[0] or plain.losses.shape[0] != b:
                raise ValueError("BG-Mix and DG-Mix need an objective that trains on one row per example "
                                 f"(ERM, or MaxUp in select mode); got {b} rows for {x.shape[0]} examples")
            s = self.sensitivity(net, plain)
        x0, t0 = plain.inputs.detach(), plain.targets.detach()
        if self.split == "binary":
            sensitive = bgmix_partition(s, self.gamma)
            lam, perm = self._draw(int((~sensitive).sum()), generator, x0.device)
            inputs, targets = bgmix(x0, t0, sensitive, lam, perm)
            logits = model(inputs)
            rows = soft_cross_entropy(logits, targets, reduction="none")
            weights = torch.full_like(rows, 1.0 / b).detach()
            return ObjectiveResult(rows.mean(), rows, logits, inputs, targets, weights, dense=True)
        q = dgmix_weights(s).to(x0.dtype)
        lam, perm = self._draw(b, generator, x0.device)
        x_mix, t_mix = MF.mixup(x0, t0, lam, perm)
        weights = torch.cat([1.0 - q, q]) / b
        keep = weights > 0
        inputs, targets, weights = torch.cat([x_mix, x0])[keep], torch.cat([t_mix, t0])[keep], weights[keep]
        logits = model(inputs)
        rows = soft_cross_entropy(logits, targets, reduction="none")
        full = torch.zeros(2 * b, dtype=rows.dtype, device=rows.device)
        full[keep] = rows.detach()
        losses = (1.0 - q) * full[:b] + q * full[b:]
        return ObjectiveResult((weights * rows).sum(), losses, logits, inputs, targets, weights)

    def reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        return Objective.reevaluate(model, result)  # the rows built in evaluate


class _SensitivitySAM(_MixingUnderSAM):
    """BG-Mix / DG-Mix: :class:`SensitivityMixing` under SAM (the sensitivity uses SAM's own rho)."""

    split = ""

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, gamma: float = 0.5,
                 alpha: float = 1.0, num_classes: int | None = None, per_sample: bool = True, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, weights_only: bool = False, interval: int = 1,
                 accumulation_steps: int = 1, sync_first: bool = False, max_grad_norm: float | None = None,
                 amp: str | None = None):
        inner = SensitivityMixing(objective, optimizer, split=self.split, alpha=alpha, num_classes=num_classes,
                                  per_sample=per_sample, gamma=gamma, rho=rho, adaptive=adaptive, eta=eta,
                                  weights_only=weights_only, max_grad_norm=max_grad_norm, amp=amp)
        super().__init__(inner, rho=rho, adaptive=adaptive, eta=eta, weights_only=weights_only, interval=interval,
                         accumulation_steps=accumulation_steps, sync_first=sync_first)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.objective!r}, alpha={self.step.mixup.alpha}, gamma={self.step.gamma}, "
                f"rho={self.rho}, adaptive={self.adaptive})")


@register("bgmix", "BG-Mix: the gamma most sharpness-sensitive examples unmixed, the rest mixed, under SAM "
          "(this project's reading)")
class BGMix(_SensitivitySAM):
    """BG-Mix: the ``gamma`` most sensitive examples trained unmixed, the rest mixed, under SAM
    (this project's reading; see the module notes).

    >>> step = BGMix(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.5, num_classes=10)
    """

    split = "binary"


@register("dgmix", "DG-Mix: each example's loss blends mixed and unmixed by its sensitivity rank, under SAM "
          "(this project's reading)", hidden=("gamma",))
class DGMix(_SensitivitySAM):
    """DG-Mix: each example's loss ``(1 - q_i) l_mix + q_i l_orig`` by sensitivity rank, under SAM
    (this project's reading; see the module notes)."""

    split = "decomposed"


def GMix(objective: Objective | None, optimizer: torch.optim.Optimizer, *, split: str | None = None, **kwargs):
    """Deprecated: the G-Mix step is :class:`SAMMixup` (``split="binary"``: :class:`BGMix`,
    ``"decomposed"``: :class:`DGMix`); ``maxup.augment.GMix`` is the Gaussian-mask augmentation."""
    warnings.warn("maxup.steps.GMix is renamed maxup.steps.SAMMixup (BGMix, DGMix for the splits); "
                  "maxup.augment.GMix is the Gaussian-mask augmentation. The old name goes in the next release",
                  DeprecationWarning, stacklevel=2)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (G-Mix, BG-Mix, DG-Mix), got {split!r}")
    cls = {None: SAMMixup, "binary": BGMix, "decomposed": DGMix}[split]
    return cls(objective, optimizer, **kwargs)
