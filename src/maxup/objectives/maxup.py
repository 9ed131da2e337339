"""MaxUp (Gong et al., CVPR 2021): the worst loss over m augmented copies of each sample."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .._checks import check_int, check_positive
from .._modules import local
from ..augment import Augmentation, Identity
from ..functional import soft_cross_entropy, soft_targets
from ..functional.context import enter, forward_model
from ..registry import register
from .base import Objective, ObjectiveResult, augmented, frozen_buffers, plain

__all__ = ["MaxUp"]


def _select_coupled(augment) -> str:
    return (f"mode='select' forwards each sample's worst copy alone, but {type(augment).__name__} couples the rows "
            "of a copy (a mixing partner inside the model's forward): use mode='direct' (its default)")


@register("maxup", "MaxUp: the worst loss over m augmented copies per sample (temperature > 0: softmax weights over "
          "the copies, MMEL-style; score='kl': worst fit, not most ambiguous target)")
class MaxUp(Objective):
    """MaxUp (Gong et al. 2020): the mean over samples of the worst loss among ``m`` augmented copies.

    Each copy is drawn independently (its own lambda, box, partner, noise and mixed label)
    and the maximum is taken per sample, over that sample's copies. For sequences (language
    modelling, :mod:`maxup.augment.text`) a sample is a segment and its loss the mean token
    cross-entropy, so MaxUp keeps, per segment, the copy with the highest mean token loss.

    Args:
        augment: the augmentation to draw copies from (any :mod:`maxup.augment` module).
        m: copies per sample (the paper uses 4 on images).
        temperature: 0 takes the hard maximum (the paper); ``tau > 0`` weights the m losses
            by ``softmax(losses / tau)`` (detached, MMEL-style); ``float("inf")`` averages.
        include_clean: the unaugmented sample is one more candidate.
        score: what makes a copy the worst: ``"loss"`` (the paper: its cross-entropy) or
            ``"kl"``: its cross-entropy minus its target's own entropy, KL(t || p). Both train
            the chosen copy on the cross-entropy (the same gradient); they differ in which copy
            is chosen. With soft targets (Mixup, CutMix, Soft Augmentation, label smoothing)
            the entropy term makes ``"loss"`` prefer the most ambiguous copy whatever the model
            predicts; ``"kl"`` picks the copy the model fits worst. Hard labels: the same.
        warmup_steps: calls with plain augmentation (one copy) before MaxUp starts.
        mode: ``"select"`` (default for temperature 0) picks the worst copy in a no-grad
            pass that leaves BatchNorm statistics untouched, then forwards and backwards
            only the chosen copies; ``"direct"`` backpropagates through all copies. They
            give the same gradient on models without batch statistics or dropout. With
            Manifold Mixup (:class:`~maxup.augment.ManifoldMixup`) only ``"direct"`` works
            (and is the default): the m copies run as one batch, each mixed at its own layer
            with partners from the same copy, so a copy cannot be forwarded without its partners.
        select_batch_size: most rows the selection pass forwards at once (bounds its
            memory); default: the batch size, one copy per forward, which measured fastest
            on CPU (see docs/BENCHMARKS.md) and matches the training forward's batch statistics;
            except on a GPU with a model that uses no batch statistics in training (no
            BatchNorm in training mode), where all m copies go in one forward (same losses).
        select_amp: ``"bf16"`` or ``"fp16"``: run the selection pass under autocast in that
            precision while training in full precision (it only needs each sample's argmax;
            see docs/BENCHMARKS.md for how often the choice differs from fp32's). ``None``:
            the step's own precision.

    >>> objective = MaxUp(maxup.augment.CutMix(num_classes=10, per_sample=True), m=4)
    >>> result = objective(model, x, y)          # result.loss.backward()
    """

    #: ``maxup tune`` searches the copies (cost grows with m) and the temperature (0: the paper's hard max)
    search_space = {"m": (2, 8, "int"), "temperature": [0.0, 0.1, 0.5, 2.0]}

    def __init__(self, augment: Augmentation, m: int = 4, *, temperature: float = 0.0, include_clean: bool = False,
                 warmup_steps: int = 0, mode: str | None = None, select_batch_size: int | None = None,
                 score: str = "loss", select_amp: str | None = None):
        if augment is None:
            augment = Identity()
        if not callable(augment):
            raise ValueError("augment must be a maxup.augment.Augmentation")
        self.augment = augment
        self.m = check_int("m", m, minimum=1)
        self.temperature = check_positive("temperature", temperature, allow_zero=True, allow_inf=True)
        self.include_clean = bool(include_clean)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if score not in ("loss", "kl"):
            raise ValueError(f"score must be 'loss' (the cross-entropy, as in the paper) or 'kl' (the cross-entropy "
                             f"minus the target's entropy), got {score!r}")
        self.score = score
        coupled = getattr(augment, "context", None) == "batch"  # a copy cannot be forwarded without its partners
        if mode is None:
            mode = "select" if self.temperature == 0 and not coupled else "direct"
        if mode not in ("select", "direct"):
            raise ValueError(f"mode must be 'select' or 'direct', got {mode!r}")
        if mode == "select" and self.temperature != 0:
            raise ValueError("mode='select' needs temperature=0 (a soft max weights every copy); use mode='direct'")
        if mode == "select" and coupled:
            raise ValueError(_select_coupled(augment))
        self.mode = mode
        self.select_batch_size = (None if select_batch_size is None
                                  else check_int("select_batch_size", select_batch_size))
        if select_amp not in (None, "bf16", "fp16"):
            raise ValueError(f"select_amp must be None, 'bf16' or 'fp16' (the selection pass's autocast precision), "
                             f"got {select_amp!r}")
        if select_amp is not None and mode != "select":
            raise ValueError("select_amp needs mode='select': only the selection pass can run in reduced precision")
        self.select_amp = select_amp
        self.num_steps = 0

    def candidates(self, x, y, generator=None, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (k, B, ...) inputs and (k, B, C) targets ((k, B, T) token ids for sequences) of every
        candidate copy, copy-major."""
        xs, ts, _ = self._draw(x, y, generator, m)
        return xs, ts

    def _draw(self, x, y, generator, m):
        """:meth:`candidates` and the forward context of all copies stacked (None for most augmentations)."""
        copies = [augmented(self.augment, x, y, generator) for _ in range(self.m if m is None else m)]
        if self.include_clean:
            t, context = copies[0][1], copies[0][2]
            if copies[0][0].shape != x.shape:
                raise ValueError(f"include_clean needs copies shaped like the inputs, but {self.augment!r} turns "
                                 f"{tuple(x.shape)} into {tuple(copies[0][0].shape)}: drop include_clean")
            copies.append((x, soft_targets(y, t.shape[-1], check=False).to(x.device) if t.is_floating_point() else y,
                           None if context is None else context.blank(x.shape[0], x.device)))
        context = None if copies[0][2] is None else type(copies[0][2]).stack([c[2] for c in copies])
        return torch.stack([c[0] for c in copies]), torch.stack([c[1] for c in copies]), context

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        m = 1 if self.num_steps < self.warmup_steps else self.m
        self.num_steps += 1
        xs, ts, context = self._draw(x, y, generator, m)
        k, b = ts.shape[:2]
        if k == 1:
            return plain(model, xs[0], ts[0], context)
        if self.mode == "select":
            pick = self._score(self._losses(model, xs, ts, context), ts).argmax(0)
            rows = torch.arange(b, device=pick.device)
            chosen = None if context is None else context.rows(pick * b + rows)
            return plain(model, xs[pick, rows], ts[pick, rows], chosen)
        inputs, targets = xs.flatten(0, 1), ts.flatten(0, 1)
        with enter(model, context):
            logits = forward_model(model, context)(inputs)
        rows = soft_cross_entropy(logits, targets, reduction="none").view(k, b)
        weights = self._weights(self._score(rows.detach(), ts))
        losses = (weights * rows).sum(0)
        return ObjectiveResult(losses.mean(), losses, logits, inputs, targets, (weights / b).flatten(), context)

    def _weights(self, rows: torch.Tensor) -> torch.Tensor:
        """(k, B) weights over each sample's copies, summing to one per sample."""
        if self.temperature == 0:
            return torch.zeros_like(rows).scatter_(0, rows.argmax(0, keepdim=True), 1.0)
        if math.isinf(self.temperature):
            return torch.full_like(rows, 1.0 / rows.shape[0])
        return torch.softmax(rows / self.temperature, dim=0)

    def _score(self, losses: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        """(k, B) badness of each copy: its loss, or with ``score="kl"`` its loss minus its target's entropy."""
        if self.score == "loss" or not ts.is_floating_point():
            return losses
        entropy = -torch.special.xlogy(ts, ts).sum(-1)
        return losses - (entropy.mean(-1) if entropy.dim() > 2 else entropy)  # sequences: mean over tokens

    def _losses(self, model, xs, ts, context=None) -> torch.Tensor:
        """(k, B) losses of every copy from a no-grad pass that leaves the model's buffers untouched.

        The pass runs on the model without its DDP wrapper: it needs no gradient synchronisation, and
        DDP would broadcast the buffers before every one of its forwards."""
        k, b = ts.shape[:2]
        net = local(model)
        rows = self.select_batch_size
        if rows is None:
            fuse = xs.device.type != "cpu" and not _batch_statistics(net)
            rows = k * b if fuse else b
        per = max(1, rows // b)  # whole copies per chunk
        precision = contextlib.nullcontext()
        if self.select_amp is not None:
            dtype = torch.bfloat16 if self.select_amp == "bf16" else torch.float16
            precision = torch.autocast(xs.device.type, dtype=dtype)
        if context is not None:  # one forward of all copies in their context
            per = k
        with torch.no_grad(), frozen_buffers(net), precision, enter(net, context):
            net = forward_model(net, context)
            return torch.cat([
                soft_cross_entropy(net(xs[i:i + per].flatten(0, 1)), ts[i:i + per].flatten(0, 1),
                                   reduction="none").float()
                for i in range(0, k, per)
            ]).view(k, b)

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])

    def __repr__(self) -> str:
        return (f"MaxUp({self.augment!r}, m={self.m}, temperature={self.temperature}, "
                f"include_clean={self.include_clean}, warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
                f"score={self.score!r}" + (f", select_amp={self.select_amp!r})" if self.select_amp else ")"))


def _batch_statistics(model: nn.Module) -> bool:
    """Whether a forward of ``model`` normalises with batch statistics (BatchNorm-like layers in training mode)."""
    return any(isinstance(m, nn.modules.batchnorm._NormBase) and m.training for m in model.modules())


