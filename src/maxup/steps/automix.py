"""AutoMix (Liu et al., ECCV 2022) and SAMix (Li et al., 2022): a learned Mix Block makes the mixing mask.

Liu, Li, Wu, Liu, Chen, Wu, Li, "AutoMix: Unveiling the Power of Mixup for Stronger Classifiers",
ECCV 2022, arXiv:2103.13027; Li, Liu, Wang, Wu, Liu, Li, "Boosting Discriminative Visual
Representation Learning with Scenario-Agnostic Mixup", arXiv:2111.15454. The reference is
OpenMixup (github.com/Westlake-AI/openmixup): ``openmixup/models/classifiers/automix.py``
(``AutoMixup``, both methods), ``openmixup/models/heads/pmix_block.py`` (``PixelMixBlock``) and the
configs ``configs/classification/cifar100/{automix,samix}/basic/r18_*.py``.

One training step (:meth:`AutoMix.forward_backward`), on the rows the objective trains on (the
batch, its augmentation, or MaxUp's worst copies):

1. two mixing ratios ``lam_mb, lam_bb ~ Beta(alpha, alpha)`` (one per batch each: the Mix
   Block's and the classifier's) and two partner permutations;
2. the **momentum encoder** (an exponential moving average of the classifier's weights, a copy
   inside the step) gives the clean batch's feature map at ``layer`` (a forward hook; default the
   last stage, ``model.stages[-1]``), without gradient;
3. the **Mix Block** turns the features of each sample and its partner, with ``lam``, into a
   mask ``M`` of the input's size: a cross-attention between the two feature maps, a per-pixel
   value, upsampled, a sigmoid (:class:`MixBlock`); ``M[:, 0]`` weighs the sample, ``M[:, 1] = 1 -
   M[:, 0]`` its partner; the mixed image is ``x * M[:, 0] + x[perm] * M[:, 1]``, its target
   ``lam t + (1 - lam) t[perm]``;
4. the **Mix Block trains** on ``lam_mb``'s mixture through the momentum encoder (frozen weights,
   gradient to the mask only): the mixup cross-entropy (SAMix: the eta-balanced loss,
   :func:`eta_balanced_loss`) plus ``mask_weight`` times the mask loss that keeps the mask's
   mean within ``mask_margin`` of ``lam`` (:func:`mask_loss`), with its own optimizer;
5. the **classifier trains** on ``lam_bb``'s mixture with the mask **detached** (so no gradient
   reaches the Mix Block from here), plus ``clean_weight`` times its cross-entropy on the clean
   rows; when ``lam_bb`` or ``1 - lam_bb`` is at most ``lam_margin`` the mask is the constant
   ``lam_bb`` (plain Mixup);
6. after the optimizer step: the Mix Block's optimizer steps, and the momentum encoder moves
   towards the classifier, ``w_k <- m w_k + (1 - m) w_q`` (its own BatchNorm statistics come from
   its own forwards, as in OpenMixup).

The momentum encoder, the Mix Block and its optimizer are the step's state (:meth:`AutoMix.state_dict`):
a checkpoint resumes exactly. The Mix Block is built on the first call, when the feature map's
channels are known (a state loaded before that is applied then). ``sam+automix`` runs SAM on the
classifier's loss (step 5; its second pass replays the same mixed and clean rows); the Mix Block
learns from the first pass only.

Cost per step, in forward-backward units of the classifier on B rows: the classifier's mixed and
clean passes (2), the momentum encoder's partial forward for the features and its forward-backward
of the mixed rows (the backward to the input only, no weight gradients), two Mix Block forwards and
one backward (small beside the network): about 3.5; docs/methods/automix.md gives the measured ratio.
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_finite, check_positive, check_probability
from .._modules import unwrap
from ..functional import _random as R
from ..functional import soft_cross_entropy
from ..objectives import Objective, ObjectiveResult
from ..registry import register
from .base import Step, check_rows_objective, no_sync, scaled
from .mixupe import training_rows

__all__ = ["UPSAMPLING", "AutoMix", "AutoMixResult", "MixBlock", "SAMix", "adjust_mask", "eta_balanced_loss",
           "mask_loss", "mix_with_mask", "rescale_lam"]

#: how the Mix Block's mask is upsampled from the feature map to the input (AutoMix: nearest; SAMix: bilinear)
UPSAMPLING = ("nearest", "bilinear")
VARIANTS = ("automix", "samix")


# ---------------------------------------------------------------------------- pure functions

def rescale_lam(lam: torch.Tensor, k: float = 0.25) -> torch.Tensor:
    """SAMix's lambda rescaling before it scales the features: ``(4/3 lam^3 - 2 lam^2 + (k+1) lam) / (k + 1/3)``.

    Fixes 0, 1/2 and 1 (OpenMixup ``PixelMixBlock.rescale_lam_mult``).

    >>> rescale_lam(torch.tensor([0.0, 0.25, 0.5, 1.0]), 0.25)
    tensor([0.0000, 0.3571, 0.5000, 1.0000])
    """
    k = k + 1.0
    return (4.0 / 3.0 * lam ** 3 - 2.0 * lam ** 2 + k * lam) / (k - 2.0 / 3.0)


def mix_with_mask(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x * mask[:, 0] + x[perm] * mask[:, 1]`` for images (B, C, H, W) and a (B, 2, H, W) mask."""
    return x * mask[:, 0:1] + x[perm.to(x.device)] * mask[:, 1:2]


def mask_loss(mask: torch.Tensor, lam, *, margin: float = 0.1, variance: bool = False) -> torch.Tensor:
    """The Mix Block's mask loss: ``max(|mean(M[:, 0]) - lam| - margin, 0)``, the L1 distance of the mask's mean
    from ``lam`` beyond a margin (AutoMix); ``variance=True`` subtracts twice the mask's variance over the
    batch's pixels (SAMix's ``"L1+Variance"``: it rewards masks that are not flat).

    The mean and variance are those of the partner's weight ``M[:, 1]`` over the whole batch,
    as in OpenMixup's ``PixelMixBlock.mask_loss`` (``1 - mean(M[:, 1]) = mean(M[:, 0])``).
    """
    partner = mask[:, 1]
    mean = partner.mean()
    loss = torch.clamp((1.0 - mean - lam).abs() - margin, min=0.0)
    if variance:
        loss = loss - 2.0 * torch.clamp(((partner - mean) ** 2).mean(), min=0.0)
    return loss.reshape(())


def adjust_mask(mask: torch.Tensor, lam, *, eps: float = 1e-8) -> torch.Tensor:
    """The mask rescaled so that each sample's mean weight is ``lam`` (OpenMixup's ``mask_adjust``).

    A sample whose own weight ``m`` (clamped to [eps, 1 - eps]) has mean ``mu > lam`` gets
    ``m lam / mu``; one with ``mu < lam`` gets its partner's weight ``(1 - m)(1 - lam)/(1 - mu)``;
    the other channel is one minus that; samples within ``eps`` of ``lam`` are unchanged.
    """
    own = mask[:, 0].clamp(eps, 1.0 - eps)
    mu = own.mean(dim=(1, 2))[:, None, None]
    lam = torch.as_tensor(lam, dtype=mask.dtype, device=mask.device)
    larger, smaller = mu > lam + eps, mu < lam - eps
    own_large = own * (lam / mu)
    partner_small = (1.0 - own) * ((1.0 - lam) / (1.0 - mu))
    new_own = torch.where(larger, own_large, torch.where(smaller, 1.0 - partner_small, mask[:, 0]))
    new_partner = torch.where(larger, 1.0 - own_large, torch.where(smaller, partner_small, mask[:, 1]))
    return torch.stack([new_own, new_partner], dim=1)


def eta_balanced_loss(logits: torch.Tensor, targets: torch.Tensor, eta: float = 0.5,
                      reduction: str = "mean") -> torch.Tensor:
    """SAMix's eta-balanced mixup loss, **this project's reading**: ``local + eta * global``.

    With ``M`` the classes a row's target holds (``t_c > 0``: the two mixed classes),
    ``log p_c = log softmax(logits)_c`` splits into ``log softmax_M(logits)_c + log P(M)``, so the
    mixup cross-entropy is exactly ``local + global`` with

    - ``local = -sum_c t_c log softmax_M(logits)_c``: the smoothness between the mixed classes
      (two classes: the binary cross-entropy of ``sigmoid(z_a - z_b)`` against ``lam``);
    - ``global = -(sum_c t_c) log P(M)``: the mixed classes against all the others.

    ``eta = 1`` is the mixup cross-entropy; ``eta < 1`` weighs the discrimination from the other
    classes less. Targets without zeros (label smoothing) have ``global = 0``.
    """
    if logits.shape != targets.shape or logits.dim() != 2:
        raise ValueError(f"logits and targets must both be (B, C); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    logits = logits.float()
    log_total = torch.logsumexp(logits, dim=-1)
    log_mixed = torch.logsumexp(logits.masked_fill(targets <= 0, float("-inf")), dim=-1)
    ce = soft_cross_entropy(logits, targets, reduction="none")
    global_ = -targets.sum(-1) * (log_mixed - log_total)
    rows = ce + (eta - 1.0) * global_
    return rows if reduction == "none" else rows.mean() if reduction == "mean" else rows.sum()


# ---------------------------------------------------------------------------- the Mix Block

class MixBlock(nn.Module):
    """The Mix Block: a mixing mask from two feature maps and ``lam`` (OpenMixup's ``PixelMixBlock``).

    For a feature map ``f`` (B, C, h, w), partners ``perm`` and ``lam``:

    - ``variant="automix"`` (the ``lam_cat`` configs): ``a = [f, lam]``, ``b = [f[perm], 1 - lam]``
      (lambda concatenated as a channel); ``q = Wq a``, ``k = Wq b`` (one 1x1 conv), ``v = Wv b``
      (a 1x1 conv to one channel);
    - ``variant="samix"``: ``a = f (1 + lam')``, ``b = f[perm] (1 + 1 - lam')`` with
      ``lam' = rescale_lam(lam, lam_mul_k)``; ``q = Wq [a, b]``, ``k = Wk [a, b]`` (two 1x1 convs on
      both maps), ``v`` a two-layer 1x1 conv net on ``b`` (conv, BatchNorm, ELU, conv);

    then ``P = softmax(q^T k / sqrt(C / reduction))`` over the partner's pixels (h w x h w),
    ``s = sigmoid(upsample(P v))`` at the input's size, and the mask ``[1 - s, s]`` (B, 2, H, W).
    Weights start normal(0, 0.01), biases 0, drawn from a generator seeded with ``init_seed``.
    """

    def __init__(self, channels: int, *, variant: str = "automix", reduction: int = 2, lam_mul_k: float = 0.25,
                 upsample: str = "nearest", init_seed: int = 0):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if upsample not in UPSAMPLING:
            raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")
        self.channels, self.variant, self.upsample = int(channels), variant, upsample
        self.inter = max(self.channels // int(reduction), 1)
        self.lam_mul_k = float(lam_mul_k)
        if variant == "automix":
            self.query = nn.Conv2d(self.channels + 1, self.inter, 1)
            self.key = None
            self.value = nn.Conv2d(self.channels + 1, 1, 1)
        else:
            self.query = nn.Conv2d(2 * self.channels, self.inter, 1)
            self.key = nn.Conv2d(2 * self.channels, self.inter, 1)
            hidden = max(self.channels // 2, 1)
            self.value = nn.Sequential(nn.Conv2d(self.channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                       nn.ELU(), nn.Conv2d(hidden, 1, 1, bias=False))
        g = torch.Generator().manual_seed(int(init_seed))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01, generator=g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feature: torch.Tensor, lam, perm: torch.Tensor, size) -> torch.Tensor:
        if feature.dim() != 4 or feature.shape[1] != self.channels:
            raise ValueError(f"the Mix Block takes (B, {self.channels}, h, w) feature maps, got "
                             f"{tuple(feature.shape)}")
        n, _, h, w = feature.shape
        feature = feature.float()
        lam = torch.as_tensor(lam, dtype=feature.dtype, device=feature.device).reshape(())
        a, b = feature, feature[perm.to(feature.device)]
        if self.variant == "automix":
            ones = feature.new_ones(n, 1, h, w)
            a, b = torch.cat([a, ones * lam], 1), torch.cat([b, ones * (1.0 - lam)], 1)
            q, k = self.query(a), self.query(b)
        else:
            scaled_lam = rescale_lam(lam, self.lam_mul_k)
            a, b = a * (1.0 + scaled_lam), b * (1.0 + (1.0 - scaled_lam))
            both = torch.cat([a, b], 1)
            q, k = self.query(both), self.key(both)
        v = self.value(b).reshape(n, 1, h * w).permute(0, 2, 1)  # (B, hw, 1)
        q = q.reshape(n, self.inter, h * w).permute(0, 2, 1)  # (B, hw, C')
        attention = torch.softmax(torch.matmul(q, k.reshape(n, self.inter, h * w)) / math.sqrt(self.inter), -1)
        partner = torch.matmul(attention, v).reshape(n, 1, h, w)
        partner = torch.sigmoid(F.interpolate(partner, size=tuple(size), mode=self.upsample))
        return torch.cat([1.0 - partner, partner], 1)


# ---------------------------------------------------------------------------- the step

class _Captured(Exception):
    """Raised by the feature hook: the rest of the momentum encoder's forward is not needed."""


@dataclasses.dataclass
class AutoMixResult(ObjectiveResult):
    """The classifier's mixed rows (``inputs``, mixed with the detached mask) and, for a second pass, its
    clean rows (``clean``, ``clean_targets``; None when ``clean_weight`` is 0)."""

    clean: torch.Tensor | None = None
    clean_targets: torch.Tensor | None = None


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


@register("automix", "AutoMix: a learned Mix Block makes the mixing mask from the momentum encoder's features and "
          "lambda; the classifier trains on the mixed batch (mask detached) and the clean one")
class AutoMix(Step):
    """AutoMix (Liu et al., ECCV 2022): Mixup with a mask from a learned Mix Block, trained jointly.

    See the module notes for the step. The momentum encoder is a copy of ``model`` made here.

    Args:
        objective: the rows to mix: ``maxup.ERM(augment)`` or ``maxup.MaxUp(...)`` in select mode.
        optimizer: the classifier's optimizer (the Mix Block has its own, see ``mixer_lr``).
        model: the classifier (required: the momentum encoder is its copy, the features come from ``layer``).
        num_classes: to turn integer labels into targets (a method spec fills it in).
        alpha: ``lam ~ Beta(alpha, alpha)`` (OpenMixup: 2.0).
        momentum: of the momentum encoder, ``w_k <- m w_k + (1 - m) w_q`` (OpenMixup: 0.999, raised to
            0.999999 by a cosine schedule; here constant).
        layer: the module whose output is the Mix Block's feature map (a name in ``named_modules()``);
            default ``model.stages[-1]``, the last stage.
        mask_weight: weight of the mask loss (0.1).
        mask_margin: the mask loss's margin around ``lam`` (0.1).
        lam_margin: the classifier trains on plain Mixup when ``lam`` or ``1 - lam`` is at most this (0.08).
        mask_adjust: probability of rescaling the classifier's mask to mean ``lam`` (0: never).
        clean_weight: weight of the classifier's cross-entropy on the clean rows (OpenMixup's ``head_one``: 1).
        upsample: ``"nearest"`` or ``"bilinear"``: the mask's upsampling to the input size.
        mixer_lr, mixer_momentum, mixer_weight_decay: the Mix Block's SGD.
        init_seed: seeds the Mix Block's initial weights.
        max_grad_norm, amp: see :class:`maxup.steps.Step` (they apply to the classifier; the Mix Block's
            pass runs in full precision).

    >>> step = AutoMix(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), model=model, num_classes=10)
    >>> result = step(model, x, y)                # step.last["mask_mean"]: the Mix Block's mean weight
    """

    domain = "image"
    mixes_rows = True
    variant = "automix"
    #: the mixer's classification loss: the mixup cross-entropy (AutoMix); SAMix weighs its global part by eta
    eta = 1.0
    lam_mul_k = 0.25
    mask_variance = False

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, model: nn.Module | None = None,
                 num_classes: int | None = None, alpha: float = 2.0, momentum: float = 0.999, layer: str | None = None,
                 mask_weight: float = 0.1, mask_margin: float = 0.1, lam_margin: float = 0.08,
                 mask_adjust: float = 0.0, clean_weight: float = 1.0, upsample: str = "nearest",
                 mixer_lr: float = 0.1, mixer_momentum: float = 0.9, mixer_weight_decay: float = 1e-4,
                 init_seed: int = 0, max_grad_norm: float | None = None, amp: str | None = None):
        name = type(self).__name__.lower()
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} needs model=<the classifier>: its momentum encoder is a copy of it and its mask "
                             "comes from the model's features")
        self.alpha = check_positive("alpha", alpha)
        self.momentum = check_probability("momentum", momentum)
        self.mask_weight = check_positive("mask_weight", mask_weight, allow_zero=True)
        self.mask_margin = check_probability("mask_margin", mask_margin)
        if isinstance(lam_margin, bool) or not isinstance(lam_margin, (int, float)) or not 0 <= lam_margin < 0.5:
            raise ValueError(f"lam_margin must be in [0, 0.5) (plain Mixup when lam or 1 - lam is at most it), "
                             f"got {lam_margin!r}")
        self.lam_margin = float(lam_margin)
        self.mask_adjust = check_probability("mask_adjust", mask_adjust)
        self.clean_weight = check_positive("clean_weight", clean_weight, allow_zero=True)
        self.upsample = _check_choice("upsample", upsample, UPSAMPLING)
        self.mixer_lr = check_positive("mixer_lr", mixer_lr)
        self.mixer_momentum = check_probability("mixer_momentum", mixer_momentum)
        self.mixer_weight_decay = check_positive("mixer_weight_decay", mixer_weight_decay, allow_zero=True)
        if isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0:
            raise ValueError(f"init_seed must be an integer >= 0, got {init_seed!r}")
        self.init_seed = init_seed
        self.num_classes = num_classes
        super().__init__(check_rows_objective(objective, name), optimizer, max_grad_norm=max_grad_norm, amp=amp)

        self._net = unwrap(model)
        self.layer = self._resolve_layer(self._net, layer)
        self.encoder = copy.deepcopy(self._net)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._encoder_layer = dict(self.encoder.named_modules())[self.layer]
        encoder_params = dict(self.encoder.named_parameters())
        self._pairs = [(p, encoder_params[n]) for n, p in self._net.named_parameters()]
        self.mixer: MixBlock | None = None
        self.mixer_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self.last: dict[str, torch.Tensor] = {}

    @staticmethod
    def _resolve_layer(net: nn.Module, layer: str | None) -> str:
        modules = dict(net.named_modules())
        if layer is None:
            stages = getattr(net, "stages", None)
            if not stages:
                raise ValueError(f"layer: {type(net).__name__} has no .stages; name the module whose output feeds the "
                                 f"Mix Block, e.g. layer={next((n for n in modules if n), 'features')!r}")
            layer = stages[-1]
        if not isinstance(layer, str) or layer not in modules or layer == "":
            valid = [n for n in modules if n][:12]
            raise ValueError(f"layer must name a module of the model as in model.named_modules() (e.g. "
                             f"{', '.join(valid)}), got {layer!r}")
        return layer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.objective!r}, alpha={self.alpha}, momentum={self.momentum}, "
                f"layer={self.layer!r}, mask_weight={self.mask_weight}, clean_weight={self.clean_weight})")

    # ------------------------------------------------------------------ parts

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's feature map of ``inputs`` at :attr:`layer` (no gradient; the forward stops there)."""
        store = {}

        def hook(module, args, output):
            store["out"] = output
            raise _Captured

        handle = self._encoder_layer.register_forward_hook(hook)
        try:
            with torch.no_grad():
                self.encoder(inputs)
        except _Captured:
            pass
        finally:
            handle.remove()
        feature = store.get("out")
        if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
            got = "nothing (it did not run)" if feature is None else (
                f"shape {tuple(feature.shape)}" if isinstance(feature, torch.Tensor) else type(feature).__name__)
            raise ValueError(f"layer {self.layer!r} must output a (B, C, h, w) feature map, got {got}; name a "
                             "convolutional stage")
        return feature

    def _build_mixer(self, channels: int, device) -> None:
        self.mixer = MixBlock(channels, variant=self.variant, lam_mul_k=self.lam_mul_k, upsample=self.upsample,
                              init_seed=self.init_seed).to(device)
        self.mixer.train(self._net.training)
        self.mixer_optimizer = torch.optim.SGD(self.mixer.parameters(), lr=self.mixer_lr,
                                               momentum=self.mixer_momentum, weight_decay=self.mixer_weight_decay)
        if self._pending is not None:
            self.mixer.load_state_dict(self._pending["mixer"])
            self.mixer_optimizer.load_state_dict(self._pending["mixer_optimizer"])
            self._pending = None

    def mixer_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, lam) -> torch.Tensor:
        """The Mix Block's loss: its classification loss through the momentum encoder plus the mask loss."""
        if self.eta == 1.0:
            cls = soft_cross_entropy(logits.float(), targets)
        else:
            cls = eta_balanced_loss(logits, targets, self.eta)
        return cls + self.mask_weight * mask_loss(mask, lam, margin=self.mask_margin, variance=self.mask_variance)

    def classifier_mask(self, mask: torch.Tensor, lam: torch.Tensor, coin: torch.Tensor | None) -> torch.Tensor:
        """The classifier's (detached) mask: rescaled to mean ``lam`` with probability ``mask_adjust``, the constant
        ``lam`` when ``lam`` or ``1 - lam`` is at most ``lam_margin``."""
        if coin is not None:
            mask = torch.where(coin < self.mask_adjust, adjust_mask(mask, lam), mask)
        if self.lam_margin > 0:
            flat = torch.stack([lam.expand_as(mask[:, 0]), (1.0 - lam).expand_as(mask[:, 0])], 1)
            plain = (lam <= self.lam_margin) | (1.0 - lam <= self.lam_margin)
            mask = torch.where(plain, flat, mask)
        return mask

    # ------------------------------------------------------------------ the passes

    def prepare(self, model) -> None:
        net = unwrap(model)
        if net is not self._net:
            raise ValueError(f"{type(self).__name__} was built for another model: build the step with the model it "
                             "trains (model=...)")
        device = next(net.parameters()).device
        if next(self.encoder.parameters()).device != device:
            self.encoder.to(device)
        self.encoder.train(net.training)
        if self.mixer is not None:
            if next(self.mixer.parameters()).device != device:
                self.mixer.to(device)
            self.mixer.train(net.training)
            self.mixer_optimizer.zero_grad(set_to_none=True)

    def draw(self, n: int, generator=None, device=None):
        """``(lam, perm_mb, perm_bb, coin)``: (2,) ratios (the Mix Block's, the classifier's), two partner
        permutations, and the (1,) uniform draw of ``mask_adjust`` (None when it is 0)."""
        if self.alpha == 1.0:
            lam = R.rand((2,), generator=generator, device=device)
        else:
            lam = R.beta(self.alpha, (2,), generator=generator, device=device)
        perm_mb = R.randperm(n, generator=generator, device=device)
        perm_bb = R.randperm(n, generator=generator, device=device)
        coin = R.rand((1,), generator=generator, device=device) if self.mask_adjust > 0 else None
        return lam, perm_mb, perm_bb, coin

    def forward_backward(self, model, x, y, generator=None, *, sync: bool = True, scale: float = 1.0):
        inputs, targets = training_rows(self.objective, model, x, y, generator, self.num_classes)
        if inputs.dim() != 4:
            raise ValueError(f"{type(self).__name__} mixes images (B, C, H, W), got inputs of shape "
                             f"{tuple(inputs.shape)}")
        lam, perm_mb, perm_bb, coin = self.draw(inputs.shape[0], generator, inputs.device)
        feature = self.features(inputs)
        if self.mixer is None:
            self._build_mixer(feature.shape[1], inputs.device)
        size = inputs.shape[-2:]
        mask_mb = self.mixer(feature, lam[0], perm_mb, size)
        with torch.no_grad():
            mask_bb = self.classifier_mask(self.mixer(feature, lam[1], perm_bb, size), lam[1], coin)
        mask_mb, mask_bb = mask_mb.to(inputs.dtype), mask_bb.to(inputs.dtype)

        # the Mix Block: its mixture through the momentum encoder (frozen weights), its own backward
        t_mb = lam[0] * targets + (1.0 - lam[0]) * targets[perm_mb]
        logits_k = self.encoder(mix_with_mask(inputs, mask_mb, perm_mb))
        loss_k = self.mixer_loss(logits_k, t_mb, mask_mb, lam[0])
        (loss_k * scale).backward()

        # the classifier: its mixture with the detached mask, and the clean rows
        mixed = mix_with_mask(inputs, mask_bb, perm_bb)
        t_bb = lam[1] * targets + (1.0 - lam[1]) * targets[perm_bb]
        with no_sync(model, not sync):
            with self.autocast(inputs):
                result = scaled(self._classifier(model, mixed, t_bb, inputs, targets), scale)
            self.backward(result.loss)
        self.last = {"lam": lam.detach(), "mask_mean": mask_mb[:, 0].mean().detach(),
                     "classifier_mask_mean": mask_bb[:, 0].mean().detach(), "mixer_loss": loss_k.detach()}
        return result

    def reevaluate(self, model, result: AutoMixResult) -> AutoMixResult:
        """The classifier's loss on the same mixed and clean rows at the current weights (SAM's second pass)."""
        return self._classifier(model, result.inputs, result.targets, result.clean, result.clean_targets)

    def _classifier(self, model, mixed, t_mixed, clean, t_clean) -> AutoMixResult:
        extra = 0.0
        if self.clean_weight > 0:  # OpenMixup's order: the clean rows, then the mixed ones (BatchNorm statistics)
            extra = self.clean_weight * soft_cross_entropy(model(clean), t_clean)
        else:
            clean = t_clean = None
        logits = model(mixed)
        rows = soft_cross_entropy(logits, t_mixed, reduction="none")
        weights = torch.full_like(rows, 1.0 / rows.shape[0]).detach()
        return AutoMixResult(rows.mean() + extra, rows, logits, mixed, t_mixed, weights, None, True, clean=clean,
                             clean_targets=t_clean)

    def update(self) -> None:
        """The classifier's update, the Mix Block's, then the momentum encoder's moving average."""
        super().update()
        if self.mixer is not None:
            _all_reduce_grads(self.mixer)
            self.mixer_optimizer.step()
        self.momentum_update()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``w_k <- m w_k + (1 - m) w_q`` for every weight of the momentum encoder (OpenMixup's ``momentum_update``)."""
        if self.momentum >= 1.0:
            return
        q = [p.detach() for p, _ in self._pairs]
        k = [pk for _, pk in self._pairs]
        torch._foreach_mul_(k, self.momentum)
        torch._foreach_add_(k, torch._foreach_mul(q, 1.0 - self.momentum))  # two products, then the sum

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["automix"] = {
            "encoder": self.encoder.state_dict(),
            "mixer": None if self.mixer is None else self.mixer.state_dict(),
            "mixer_optimizer": None if self.mixer_optimizer is None else self.mixer_optimizer.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        own = state.get("automix")
        if own is None:
            raise ValueError(f"the state holds no AutoMix part (momentum encoder, Mix Block): it was not saved by "
                             f"{type(self).__name__}")
        self.encoder.load_state_dict(own["encoder"])
        if own["mixer"] is None:
            return
        if self.mixer is None:
            self._pending = own  # the Mix Block is built on the first call (its channels come from the features)
        else:
            self.mixer.load_state_dict(own["mixer"])
            self.mixer_optimizer.load_state_dict(own["mixer_optimizer"])


def _all_reduce_grads(module: nn.Module) -> None:
    """Average the module's gradients over the processes of a distributed run (nothing otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    for g in grads:
        dist.all_reduce(g)
    if grads:
        torch._foreach_div_(grads, dist.get_world_size())


@register("samix", "SAMix: AutoMix with SAMix's Mix Block (lambda-scaled features, both maps in the attention, a "
          "non-linear value, bilinear mask), a variance-rewarding mask loss and the eta-balanced mixer loss")
class SAMix(AutoMix):
    """SAMix (Li et al. 2022), supervised: AutoMix's scheme with SAMix's Mix Block and losses.

    Differences from :class:`AutoMix`: the Mix Block's ``variant="samix"`` (see :class:`MixBlock`),
    bilinear upsampling, the mask loss with SAMix's variance term, and the Mix Block's
    classification loss :func:`eta_balanced_loss` with ``eta`` (this project's reading; 0.5 for
    CIFAR in OpenMixup's configs). The self-supervised, label-free Mixer of the paper is not
    implemented.

    Args (beyond :class:`AutoMix`'s):
        eta: weight of the global term of the Mix Block's loss (1: the mixup cross-entropy).
        lam_mul_k: the ``k`` of :func:`rescale_lam` (OpenMixup CIFAR: 0.25).
    """

    variant = "samix"
    mask_variance = True

    def __init__(self, objective: Objective | None, optimizer: torch.optim.Optimizer, *, model: nn.Module | None = None,
                 num_classes: int | None = None, alpha: float = 2.0, eta: float = 0.5, lam_mul_k: float = 0.25,
                 momentum: float = 0.999, layer: str | None = None, mask_weight: float = 0.1,
                 mask_margin: float = 0.1, lam_margin: float = 0.08, mask_adjust: float = 0.0,
                 clean_weight: float = 1.0, upsample: str = "bilinear", mixer_lr: float = 0.1,
                 mixer_momentum: float = 0.9, mixer_weight_decay: float = 1e-4, init_seed: int = 0,
                 max_grad_norm: float | None = None, amp: str | None = None):
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.lam_mul_k = check_finite("lam_mul_k", lam_mul_k)
        if self.lam_mul_k < 0:
            raise ValueError(f"lam_mul_k must be >= 0 (OpenMixup caps it at 10), got {lam_mul_k!r}")
        super().__init__(objective, optimizer, model=model, num_classes=num_classes, alpha=alpha, momentum=momentum,
                         layer=layer, mask_weight=mask_weight, mask_margin=mask_margin, lam_margin=lam_margin,
                         mask_adjust=mask_adjust, clean_weight=clean_weight, upsample=upsample, mixer_lr=mixer_lr,
                         mixer_momentum=mixer_momentum, mixer_weight_decay=mixer_weight_decay, init_seed=init_seed,
                         max_grad_norm=max_grad_norm, amp=amp)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", eta={self.eta}, lam_mul_k={self.lam_mul_k})"
