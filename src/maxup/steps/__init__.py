"""Steps own one optimisation step: forward/backward passes and the optimizer update.

A step is called as ``step(model, x, y, generator=None)`` and returns the
:class:`~maxup.objectives.ObjectiveResult` of the pass it trained on.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..objectives import Objective, ObjectiveResult

AMP_MODES = (None, "bf16", "fp16")


class Step:
    """Base class: the objective, the optimizer, gradient clipping and mixed precision.

    Args:
        max_grad_norm: clip the gradient norm of the final gradient to this value.
        amp: ``None`` (full precision), ``"bf16"`` (autocast to bfloat16; CPU or GPU) or
            ``"fp16"`` (autocast to float16 with a GradScaler; overflowing steps are skipped).
    """

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

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast(x):
            result = self.objective(model, x, y, generator)
        self.backward(result.loss)
        self.update()
        return result


from .sam import SAM  # noqa: E402  (after Step, which it subclasses)
from .gmix import BGMix, DGMix, GMix  # noqa: E402
from .gradaug import GradAug  # noqa: E402

__all__ = ["AMP_MODES", "BGMix", "DGMix", "GMix", "GradAug", "SAM", "Standard", "Step"]
