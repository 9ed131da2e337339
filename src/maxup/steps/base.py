"""The step interface: :class:`Step` (passes, optimizer update, clipping, mixed precision) and :class:`Standard`."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math

import torch

from .._modules import ddp
from ..objectives import ERM, MaxUp, Objective, ObjectiveResult
from ..registry import Traits

__all__ = ["AMP_MODES", "Standard", "Step", "check_rows_objective", "no_sync", "scaled"]

AMP_MODES = (None, "bf16", "fp16")


class Step(Traits):
    """Base class: the objective, the optimizer, gradient clipping and mixed precision, and the passes.

    A step trains on a batch in passes that a wrapper can repeat (:class:`~maxup.steps.SharpnessAware`
    runs them at ``w`` and again at ``w + eps``):

    - :meth:`forward_backward` evaluates the loss on a batch and backpropagates (gradients
      accumulate; a step that adds losses, such as GradAug, backpropagates each in turn);
    - :meth:`replay` evaluates the same rows again (the same copies, mixing, sub-networks) at the
      current weights and backpropagates;
    - :meth:`update` clips the final gradient and takes the optimizer step.

    ``step(model, x, y, generator)`` is ``zero_grad``, :meth:`forward_backward`, :meth:`update`.
    A new step overrides :meth:`evaluate` (one loss) or :meth:`forward_backward` and :meth:`replay`
    (several), declares its traits (:class:`maxup.registry.Traits`) and registers itself with
    :func:`maxup.registry.register`.

    Args:
        max_grad_norm: clip the gradient norm of the final gradient to this value.
        amp: ``None`` (full precision), ``"bf16"`` (autocast to bfloat16; CPU or GPU) or
            ``"fp16"`` (autocast to float16 with a GradScaler; overflowing steps are skipped).
    """

    kind = "step"
    domain = "any"
    filled = ("objective", "optimizer", "model", "num_classes", "max_grad_norm", "amp")

    @classmethod
    def from_spec(cls, objective, optimizer, *, model=None, num_classes=None, **options) -> Step:
        """Build from a method spec: the objective, the optimizer, this term's options and the step options
        (``max_grad_norm``, ``amp``); ``model`` and ``num_classes`` go to classes that take them."""
        params = inspect.signature(cls).parameters
        extra = {k: v for k, v in (("model", model), ("num_classes", num_classes)) if k in params}
        return cls(objective, optimizer, **extra, **options)

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None,
                 amp: str | None = None):
        if not callable(objective):
            raise ValueError("objective must be a maxup objective such as maxup.ERM() or maxup.MaxUp(...)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        self.objective = objective
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.amp = amp
        self.scaler = None
        if amp == "fp16":
            device = next((p.device.type for g in optimizer.param_groups for p in g["params"]), "cpu")
            self.scaler = torch.amp.GradScaler(device)

    def autocast(self, x: torch.Tensor):
        """The autocast context for the forward passes (a no-op without ``amp``)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self) -> None:
        """Bring fp16-scaled gradients back to their true size (before any norm is taken)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def update(self) -> None:
        """Clip the final gradient and take the optimizer step (skipped by the scaler on overflow)."""
        self.unscale()
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    # ------------------------------------------------------------------ the passes

    def prepare(self, model) -> None:
        """Called once per training step, before its passes (a step that draws per call resets here)."""

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        """The loss of one batch (with grad, under autocast): the objective's."""
        return self.objective(model, x, y, generator)

    def reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        """The loss of the same rows at the current weights."""
        return self.objective.reevaluate(model, result)

    def forward_backward(self, model, x, y, generator=None, *, sync: bool = True,
                         scale: float = 1.0) -> ObjectiveResult:
        """Evaluate a batch and backpropagate (the backward synchronised under DDP when ``sync``);
        ``scale`` weights a micro-batch's loss by its share of the batch."""
        with no_sync(model, not sync):
            with self.autocast(x):
                result = scaled(self.evaluate(model, x, y, generator), scale)
            self.backward(result.loss)
        return result

    def replay(self, model, result: ObjectiveResult, *, sync: bool = True) -> ObjectiveResult:
        """Evaluate ``result``'s rows again at the current weights and backpropagate."""
        with no_sync(model, not sync):
            with self.autocast(result.inputs):
                again = self.reevaluate(model, result)
            self.backward(again.loss)
        return again

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        self.prepare(model)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.forward_backward(model, x, y, generator)
        self.update()
        return result

    def state_dict(self) -> dict:
        state = {"objective": self.objective.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class Standard(Step):
    """One evaluation of the objective, backward, optimizer update.

    >>> step = Standard(maxup.MaxUp(maxup.augment.Cutout(8, num_classes=10), m=4),
    ...                 torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> result = step(model, x, y)
    """


def check_rows_objective(objective: Objective | None, name: str, verb: str = "mixes") -> Objective:
    """``objective`` (``ERM()`` when None) if the rows it trains on can be taken one per sample, without a
    forward context: what a step that mixes or attacks those rows again needs; a ValueError naming ``name``
    (the step) otherwise."""
    objective = ERM() if objective is None else objective
    augment = getattr(objective, "augment", None)
    if getattr(augment, "context", None):
        raise ValueError(f"{type(augment).__name__} acts inside the model's forward; {name} {verb} the rows the "
                         "objective trains on without it: use it alone or under sam")
    if isinstance(objective, MaxUp) and objective.mode != "select":
        raise ValueError(f"{name} {verb} the rows the objective trains on, one per sample: use MaxUp in select mode "
                         "(temperature 0) or ERM")
    if not isinstance(objective, (ERM, MaxUp)):
        raise ValueError(f"objective must be maxup.ERM or maxup.MaxUp for {name}, got {type(objective).__name__}")
    return objective


def no_sync(model, skip: bool):
    """``model.no_sync()`` for a DistributedDataParallel model (also inside ``torch.compile``) when ``skip``."""
    wrapper = ddp(model) if skip else None
    return wrapper.no_sync() if wrapper is not None else contextlib.nullcontext()


def scaled(result: ObjectiveResult, frac: float) -> ObjectiveResult:
    """A micro-batch's result weighted by its share of the batch (so the losses sum to the batch mean)."""
    if frac == 1.0:
        return result
    return dataclasses.replace(result, loss=result.loss * frac, weights=result.weights * frac)
