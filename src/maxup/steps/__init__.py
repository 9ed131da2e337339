"""Steps own one optimisation step: forward/backward passes and the optimizer update.

A step is called as ``step(model, x, y, generator=None)`` and returns the
:class:`~maxup.objectives.ObjectiveResult` of the pass it trained on.
"""
from __future__ import annotations

import torch

from ..objectives import Objective, ObjectiveResult


class Step:
    """Base class: holds the objective and the optimizer; ``state_dict`` carries the objective's state."""

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None):
        if not callable(objective):
            raise ValueError("objective must be a maxup objective such as maxup.ERM() or maxup.MaxUp(...)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        self.objective = objective
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm

    def _clip(self) -> None:
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)

    def state_dict(self) -> dict:
        return {"objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])


class Standard(Step):
    """One evaluation of the objective, backward, (optional clipping,) optimizer update.

    >>> step = Standard(maxup.MaxUp(maxup.augment.Cutout(8, num_classes=10), m=4),
    ...                 torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    >>> result = step(model, x, y)
    """

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        self.optimizer.zero_grad(set_to_none=True)
        result = self.objective(model, x, y, generator)
        result.loss.backward()
        self._clip()
        self.optimizer.step()
        return result


__all__ = ["Standard", "Step"]
