"""The objective interface: :class:`Objective`, the :class:`ObjectiveResult` it returns, and helpers.

An objective returns an :class:`ObjectiveResult` whose ``inputs``, ``targets``, ``weights``
and ``context`` say exactly what was trained on, so a step that needs a second pass on the
same batch (SAM, GradAug) can call :meth:`Objective.reevaluate` instead of drawing new copies.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..functional import soft_cross_entropy, soft_targets
from ..functional.context import ForwardContext, enter, forward_model
from ..registry import Traits

__all__ = ["Objective", "ObjectiveResult", "augmented", "frozen_buffers", "live_rows", "plain"]


@dataclass
class ObjectiveResult:
    """What one evaluation of an objective produced.

    ``loss`` is the scalar to backpropagate and equals ``(weights * row_losses).sum()``
    over the rows of ``inputs``; ``losses`` holds one training loss per original sample;
    ``logits``, ``inputs`` and ``targets`` are row-aligned (the chosen copies for MaxUp).
    ``context`` is the forward context the rows were forwarded with (an augmentation that acts
    inside the model, see :mod:`maxup.functional.context`), or None; every later forward of
    these rows (SAM's second pass, GradAug's sub-networks) enters it too.
    ``dense`` says, without reading ``weights``, that every row has a positive weight (so a second
    pass keeps them all and never has to look: a host read on a GPU); False: it may hold zeros.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    logits: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    context: ForwardContext | None = None
    dense: bool = False


class Objective(Traits):
    """Base class. Subclasses implement ``__call__(model, x, y, generator=None)``."""

    kind = "objective"
    domain = "any"
    filled = ("augment",)

    @classmethod
    def from_spec(cls, augment=None, **options) -> Objective:
        """Build from a method spec: the spec's augmentations and this term's options."""
        return cls(augment, **options)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator=None) -> ObjectiveResult:
        raise NotImplementedError

    @staticmethod
    def reevaluate(model: nn.Module, result: ObjectiveResult) -> ObjectiveResult:
        """The same loss on the same rows, at the model's current weights (rows of weight 0 skipped,
        except under a forward context that couples rows, where they may be partners), in the same
        forward context."""
        inputs, targets, weights, context = live_rows(result)
        with enter(model, context):
            logits = forward_model(model, context)(inputs)
        rows = soft_cross_entropy(logits, targets, reduction="none")
        return ObjectiveResult((weights * rows).sum(), rows, logits, inputs, targets, weights, context, True)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def live_rows(result: ObjectiveResult):
    """``(inputs, targets, weights, context)`` of the rows a second pass needs: rows of weight 0 dropped
    (a host read, unless ``result.dense``), all kept when the context couples rows (they may be partners)."""
    inputs, targets, weights, context = result.inputs, result.targets, result.weights, result.context
    if result.dense or (context is not None and context.couples_rows):
        return inputs, targets, weights, context
    keep = weights > 0
    if bool(keep.all()):
        return inputs, targets, weights, context
    index = keep.nonzero().squeeze(1)
    return inputs[index], targets[index], weights[index], None if context is None else context.rows(index)


def augmented(augment, x, y, generator):
    """``(x_aug, targets, context)`` from a maxup augmentation (its :meth:`draw`) or any callable
    ``augment(x, y, generator) -> (x_aug, targets)`` (no context)."""
    draw = getattr(augment, "draw", None)
    return draw(x, y, generator) if draw is not None else (*augment(x, y, generator), None)


def plain(model, inputs, targets, context: ForwardContext | None = None) -> ObjectiveResult:
    """The mean loss of one forward of ``inputs`` (in ``context``) against ``targets``."""
    with enter(model, context):
        logits = forward_model(model, context)(inputs)
    if not targets.is_floating_point() and targets.dim() == 1:  # class labels; token ids (B, T) stay ids
        targets = soft_targets(targets, logits.shape[-1], check=False)  # checked where the data entered
    losses = soft_cross_entropy(logits, targets, reduction="none")
    weights = torch.full_like(losses, 1.0 / losses.shape[0]).detach()
    return ObjectiveResult(losses.mean(), losses, logits, inputs, targets, weights, context, dense=True)


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


