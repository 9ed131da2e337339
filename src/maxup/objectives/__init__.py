"""Objectives map ``(model, x, y)`` to a loss: :class:`ERM` and :class:`MaxUp`.

An objective returns an :class:`ObjectiveResult` whose ``inputs``, ``targets`` and
``weights`` say exactly what was trained on, so a step that needs a second pass on the
same batch (SAM) can call :meth:`Objective.reevaluate` instead of drawing new copies.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_int, check_positive
from .._modules import local, uncompiled
from ..augment import Augmentation, Identity, ManifoldMixup
from ..functional import soft_cross_entropy, soft_targets
from ..functional.manifold import HiddenMix, mix_hidden


@dataclass
class ObjectiveResult:
    """What one evaluation of an objective produced.

    ``loss`` is the scalar to backpropagate and equals ``(weights * row_losses).sum()``
    over the rows of ``inputs``; ``losses`` holds one training loss per original sample;
    ``logits``, ``inputs`` and ``targets`` are row-aligned (the chosen copies for MaxUp).
    ``mixing`` is the hidden-feature mixing the rows were forwarded with (Manifold Mixup), or None.
    ``dense`` says, without reading ``weights``, that every row has a positive weight (so a second
    pass keeps them all and never has to look: a host read on a GPU); False: it may hold zeros.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    logits: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    mixing: HiddenMix | None = None
    dense: bool = False


class Objective:
    """Base class. Subclasses implement ``__call__(model, x, y, generator=None)``."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> ObjectiveResult:
        raise NotImplementedError

    @staticmethod
    def reevaluate(model: nn.Module, result: ObjectiveResult) -> ObjectiveResult:
        """The same loss on the same rows, at the model's current weights (rows of weight 0 skipped,
        except under hidden mixing, where they may be partners), with the same hidden mixing."""
        inputs, targets, weights = result.inputs, result.targets, result.weights
        dense = result.dense or result.mixing is not None
        if not dense:
            keep = weights > 0
            if not bool(keep.all()):
                inputs, targets, weights = inputs[keep], targets[keep], weights[keep]
        with mix_hidden(model, result.mixing):
            logits = _forward_model(model, result.mixing)(inputs)
        rows = soft_cross_entropy(logits, targets, reduction="none")
        return ObjectiveResult((weights * rows).sum(), rows, logits, inputs, targets, weights, result.mixing, dense)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _forward_model(model, mixing: HiddenMix | None):
    """The model to call: under hidden mixing the uncompiled one (hooks that change every step would
    make ``torch.compile`` recompile every time)."""
    return model if mixing is None else uncompiled(model)


def _plain(model, inputs, targets, mixing: HiddenMix | None = None) -> ObjectiveResult:
    with mix_hidden(model, mixing):
        logits = _forward_model(model, mixing)(inputs)
    if not targets.is_floating_point() and targets.dim() == 1:  # class labels; token ids (B, T) stay ids
        targets = soft_targets(targets, logits.shape[-1], check=False)  # checked where the data entered
    losses = soft_cross_entropy(logits, targets, reduction="none")
    weights = torch.full_like(losses, 1.0 / losses.shape[0]).detach()
    return ObjectiveResult(losses.mean(), losses, logits, inputs, targets, weights, mixing, dense=True)


def hidden_mixer(augment) -> ManifoldMixup | None:
    """The :class:`~maxup.augment.ManifoldMixup` inside ``augment`` (None if there is none); a
    :class:`~maxup.augment.Compose` has already checked that it comes last."""
    if not isinstance(augment, torch.nn.Module):
        return None
    found = [m for m in augment.modules() if isinstance(m, ManifoldMixup)]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError("a method may hold one manifold_mixup term only")
    return found[0]


def _augment(augment, x, y, generator) -> tuple[torch.Tensor, torch.Tensor, HiddenMix | None]:
    """One augmented copy, and its hidden mixing (None without Manifold Mixup; no mixing when it was not drawn)."""
    mixer = hidden_mixer(augment)
    if mixer is not None:
        mixer.plan = None
    x, y = augment(x, y, generator)
    if mixer is None:
        return x, y, None
    return x, y, mixer.plan if mixer.plan is not None else HiddenMix.identity(mixer.layers, x.shape[0], x.device)


class ERM(Objective):
    """Empirical risk: the mean cross-entropy on one (optionally augmented) copy of the batch.

    >>> objective = ERM(maxup.augment.Cutout(8, num_classes=10))
    >>> result = objective(model, x, y)          # result.loss.backward()
    """

    def __init__(self, augment: Augmentation | None = None):
        if augment is not None and not callable(augment):
            raise ValueError("augment must be a maxup.augment.Augmentation (or None for no augmentation)")
        self.augment = augment

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        if self.augment is None:  # the augmentations check their batch; without one, check it here
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
                raise ValueError("x must be a non-empty batch (B, ...) of inputs")
            if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must hold one label or target row per sample of x ({x.shape[0]})")
            if y.is_floating_point():
                y = soft_targets(y)  # soft targets: non-negative rows that sum to one
            return _plain(model, x, y)
        return _plain(model, *_augment(self.augment, x, y, generator))

    def __repr__(self) -> str:
        return f"ERM({self.augment!r})" if self.augment is not None else "ERM()"


@contextlib.contextmanager
def frozen_buffers(model: nn.Module):
    """Run a forward pass without changing the model's buffers (BatchNorm running statistics).

    The snapshot and the restore are one fused ``_foreach_copy_`` each (not a kernel per buffer)."""
    buffers = [b for b in model.buffers()]
    saved = [torch.empty_like(b) for b in buffers]
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(saved, buffers)
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)


_SELECT_HIDDEN = ("mode='select' forwards each sample's worst copy alone, but manifold_mixup mixes a copy's hidden "
                  "features with partners from the same copy: use mode='direct' (the default with manifold_mixup)")


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
        hidden = hidden_mixer(augment) is not None
        if mode is None:
            mode = "select" if self.temperature == 0 and not hidden else "direct"
        if mode not in ("select", "direct"):
            raise ValueError(f"mode must be 'select' or 'direct', got {mode!r}")
        if mode == "select" and self.temperature != 0:
            raise ValueError("mode='select' needs temperature=0 (a soft max weights every copy); use mode='direct'")
        if mode == "select" and hidden:
            raise ValueError(_SELECT_HIDDEN)
        self.mode = mode
        self.select_batch_size = None if select_batch_size is None else check_int("select_batch_size", select_batch_size)
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
        """:meth:`candidates` and the hidden mixing of all copies stacked (None without Manifold Mixup)."""
        copies = [_augment(self.augment, x, y, generator) for _ in range(self.m if m is None else m)]
        if self.include_clean:
            t, plan = copies[0][1], copies[0][2]
            if copies[0][0].shape != x.shape:
                raise ValueError(f"include_clean needs copies shaped like the inputs, but {self.augment!r} turns "
                                 f"{tuple(x.shape)} into {tuple(copies[0][0].shape)}: drop include_clean")
            copies.append((x, soft_targets(y, t.shape[-1], check=False).to(x.device) if t.is_floating_point() else y,
                           None if plan is None else HiddenMix.identity(plan.points, x.shape[0], x.device)))
        plan = None if copies[0][2] is None else HiddenMix.stack([c[2] for c in copies])
        return torch.stack([c[0] for c in copies]), torch.stack([c[1] for c in copies]), plan

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        m = 1 if self.num_steps < self.warmup_steps else self.m
        self.num_steps += 1
        xs, ts, plan = self._draw(x, y, generator, m)
        k, b = ts.shape[:2]
        if k == 1:
            return _plain(model, xs[0], ts[0], plan)
        if plan is not None and self.mode == "select":
            raise ValueError(_SELECT_HIDDEN)
        if self.mode == "select":
            pick = self._score(self._losses(model, xs, ts), ts).argmax(0)
            rows = torch.arange(b, device=pick.device)
            return _plain(model, xs[pick, rows], ts[pick, rows])
        inputs, targets = xs.flatten(0, 1), ts.flatten(0, 1)
        with mix_hidden(model, plan):
            logits = _forward_model(model, plan)(inputs)
        rows = soft_cross_entropy(logits, targets, reduction="none").view(k, b)
        weights = self._weights(self._score(rows.detach(), ts))
        losses = (weights * rows).sum(0)
        return ObjectiveResult(losses.mean(), losses, logits, inputs, targets, (weights / b).flatten(), plan)

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

    def _losses(self, model, xs, ts) -> torch.Tensor:
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
            precision = torch.autocast(xs.device.type, dtype=torch.bfloat16 if self.select_amp == "bf16" else torch.float16)
        with torch.no_grad(), frozen_buffers(net), precision:
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


__all__ = ["ERM", "MaxUp", "Objective", "ObjectiveResult", "frozen_buffers", "hidden_mixer"]
