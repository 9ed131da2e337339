"""Optimizers and learning-rate schedules used by the trainer.

>>> model = torch.nn.Linear(4, 2)
>>> opt = make_optimizer(model, "sgd", lr=0.1)
>>> sched = make_scheduler(opt, epochs=10, steps_per_epoch=50, warmup_epochs=1)
"""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import nn

from .._checks import check_int, check_positive

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")

_NORM_TYPES: tuple[type, ...] = tuple(
    t for t in (
        getattr(nn.modules.batchnorm, "_NormBase", None),  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two parameter groups: weights with ``weight_decay`` and biases/norm parameters without.

    A parameter gets no decay when it has at most one dimension (biases, BatchNorm and
    LayerNorm scales and shifts) or belongs to a normalisation layer. Frozen parameters
    (``requires_grad=False``) and repeats of shared parameters are left out; empty groups
    are dropped.
    """
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 or id(p) in no_decay_ids else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, name: str = "sgd", *, lr: float = 0.05, momentum: float = 0.9,
                   nesterov: bool = True, weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum by default) or AdamW, with no weight decay on biases and norm parameters.

    Args:
        name: ``"sgd"`` or ``"adamw"``. AdamW uses its default betas (``momentum`` and
            ``nesterov`` apply to SGD only).
        lr: the base learning rate (a scheduler from :func:`make_scheduler` scales it).
        momentum: SGD momentum in [0, 1); Nesterov needs momentum > 0 and is turned off at 0.
        weight_decay: decoupled for AdamW, L2 for SGD; applied to weights only.

    >>> opt = make_optimizer(torch.nn.Linear(4, 2), "adamw", lr=1e-3, weight_decay=0.05)
    >>> [g["weight_decay"] for g in opt.param_groups]
    [0.05, 0.0]
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
    lr = check_positive("lr", lr)
    weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
    momentum = check_positive("momentum", momentum, allow_zero=True)
    if momentum >= 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    groups = parameter_groups(model, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(nesterov) and momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


class WarmupCosine:
    """The multiplier of the base learning rate after ``step`` optimizer steps.

    ``(step + 1) / warmup_steps`` during warm-up, then ``0.5 * (1 + cos(pi * p))`` with
    ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]
    (``schedule="cosine"``), or 1 (``schedule="constant"``).
    """

    def __init__(self, total_steps: int, warmup_steps: int, schedule: str = "cosine"):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"WarmupCosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"schedule={self.schedule!r})")


def make_scheduler(optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                   schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step schedule: linear warm-up, then cosine decay to 0 (or constant).

    Call ``scheduler.step()`` after every optimizer step. Step ``s`` (0-based) trains at
    ``lr * f(s)`` with ``W = round(warmup_epochs * steps_per_epoch)`` warm-up steps and
    ``T = epochs * steps_per_epoch`` steps in all:

    - ``f(s) = (s + 1) / W`` for ``s < W``;
    - ``f(s) = 0.5 * (1 + cos(pi * (s - W) / (T - W)))`` afterwards (``1`` for ``"constant"``).

    >>> sched = make_scheduler(opt, epochs=2, steps_per_epoch=5, warmup_epochs=0.4)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    epochs = check_int("epochs", epochs)
    steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, Real):
        raise ValueError(f"warmup_epochs must be a number >= 0, got {warmup_epochs!r}")
    warmup_epochs = check_positive("warmup_epochs", warmup_epochs, allow_zero=True)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if warmup > total:
        raise ValueError(f"warmup_epochs={warmup_epochs} is longer than the run (epochs={epochs})")
    factor = WarmupCosine(total, warmup, schedule)

    def lr_lambda(step: int) -> float:  # a plain function: LambdaLR.state_dict() then saves the step count only,
        return factor(step)             # so a resumed run follows the schedule of its own (e.g. longer) config

    lr_lambda.schedule = factor
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


__all__ = ["OPTIMIZERS", "SCHEDULES", "WarmupCosine", "make_optimizer", "make_scheduler", "parameter_groups"]
