"""Weight averaging: an exponential moving average (EMA) or a stochastic weight average (SWA) of the weights,
kept beside the trained model and evaluated every epoch next to it.

Either is a method spec term that joins any method (``cutmix+ema``, ``adv+cutmix+swa(start=30)``) or an
argument of :class:`maxup.train.Trainer` (``average=EMA(model)``). The trainer calls
:meth:`WeightAverage.after_step` after every optimizer step and :meth:`WeightAverage.after_epoch` after
every epoch, evaluates :meth:`WeightAverage.averaged` on the validation and test sets (metrics
``ema_test_accuracy``, ``swa_val_loss``, ...), and saves the average in its checkpoints.

- :class:`EMA`: ``w_avg <- d w_avg + (1 - d) w`` after every step, with ``d = min(decay, (1 + n) / (warmup
  + n))`` in the first steps when ``warmup > 0`` (TensorFlow's ``ExponentialMovingAverage(num_updates)``
  rule, n the number of updates). BatchNorm running statistics are averaged the same way (the buffers of
  the averaged model are an EMA of the model's; integer buffers are copied). Written with two fused
  ``_foreach`` kernels per step rather than ``torch.optim.swa_utils.AveragedModel``, whose update reads its
  counter on the host (a GPU synchronisation every step).
- :class:`SWA`: the equal average of the weights at the end of epochs ``start, start + 1, ...``
  (``torch.optim.swa_utils.AveragedModel``), its BatchNorm statistics recomputed by one pass over the
  clean training set (``torch.optim.swa_utils.update_bn``) before it is evaluated; ``lr`` sets a constant
  learning rate from epoch ``start`` on (the SWA paper's schedule), otherwise the run's schedule continues.

Under DDP every rank holds the same weights after each step, so every rank holds the same average;
SWA's statistics pass reads the whole training set on every rank.

>>> ema = EMA(torch.nn.Linear(3, 2), decay=0.9)
>>> ema.updates
0
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.optim import swa_utils

from ._checks import check_int
from ._modules import unwrap
from .registry import Traits, register

__all__ = ["EMA", "SWA", "WeightAverage"]


class WeightAverage(Traits):
    """Base class of a weight average (see the module notes). ``prefix`` names its metrics."""

    kind = "average"
    domain = "any"
    filled = ("model",)
    prefix = "avg"

    @classmethod
    def from_spec(cls, model, **options) -> WeightAverage:
        return cls(model, **options)

    def to(self, device) -> WeightAverage:
        """Keep the average on ``device`` (the trainer's)."""
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step."""

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        """Called after epoch ``epoch`` (1-based)."""

    def lr(self, epoch: int) -> float | None:
        """The learning rate to train epoch ``epoch`` (0-based) with, or None to follow the run's schedule."""
        return None

    def averaged(self, train, *, device, batch_size: int) -> nn.Module | None:
        """The averaged model to evaluate (None while there is no average yet)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


def _frozen_copy(model: nn.Module) -> nn.Module:
    average = copy.deepcopy(unwrap(model)).eval()
    for p in average.parameters():
        p.requires_grad_(False)
    return average


def _tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The floating-point parameters and buffers of ``module`` (averaged), and its other buffers (copied)."""
    floats = [t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()]
    others = [b for b in module.buffers() if not b.is_floating_point()]
    return floats, others


@register("ema", "EMA: an exponential moving average of the weights (and BatchNorm statistics), evaluated beside "
          "the model (metrics ema_*)")
class EMA(WeightAverage):
    """Exponential moving average of the weights and buffers (see the module notes).

    Args:
        model: the network whose weights are averaged (a copy is kept on its device).
        decay: in (0, 1); the weight of the past per step (0.999: a memory of about 1,000 steps).
        warmup: steps of TensorFlow's warm-up rule ``d = min(decay, (1 + n) / (warmup + n))`` (0: none).
    """

    prefix = "ema"
    #: a decay per step: the memory 1 / (1 - decay) should be a fraction of the run's steps
    search_space = {"decay": [0.9, 0.95, 0.98, 0.99, 0.995, 0.999]}

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: int = 0):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1) (the weight of the past average per step, e.g. 0.999), "
                             f"got {decay!r}")
        self.decay = float(decay)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.module = _frozen_copy(model)
        self.updates = 0

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, warmup={self.warmup})"

    def rate(self) -> float:
        """The decay of the next update."""
        n = self.updates + 1
        return self.decay if self.warmup == 0 else min(self.decay, (1 + n) / (self.warmup + n))

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        floats, others = _tensors(self.module)
        new_floats, new_others = _tensors(unwrap(model))
        if len(floats) != len(new_floats) or len(others) != len(new_others):
            raise ValueError("the model's parameters or buffers changed since the EMA was created")
        torch._foreach_lerp_(floats, new_floats, 1.0 - self.rate())
        if others:
            torch._foreach_copy_(others, new_others)
        self.updates += 1

    def averaged(self, train, *, device, batch_size: int) -> nn.Module:
        return self.module

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@register("swa", "SWA: the average of the weights at the end of each epoch from epoch start on, BatchNorm "
          "statistics recomputed (metrics swa_*)")
class SWA(WeightAverage):
    """Stochastic weight averaging (Izmailov et al. 2018) with ``torch.optim.swa_utils`` (see the module notes).

    Args:
        model: the network whose weights are averaged.
        start: the first epoch (1-based) whose final weights enter the average.
        lr: a constant learning rate from epoch ``start`` on (None: keep the run's schedule).
    """

    prefix = "swa"

    def __init__(self, model: nn.Module, start: int = 1, lr: float | None = None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.start = check_int("start", start, minimum=1)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
            raise ValueError(f"lr must be a finite number > 0 (SWA's constant learning rate) or None, got {lr!r}")
        self.swa_lr = None if lr is None else float(lr)
        self.model = swa_utils.AveragedModel(_frozen_copy(model))
        self.updates = 0
        self._stale = True  # BatchNorm statistics not yet recomputed for the current average

    def __repr__(self) -> str:
        return f"SWA(start={self.start}, lr={self.swa_lr})"

    def lr(self, epoch: int) -> float | None:
        return self.swa_lr if self.swa_lr is not None and epoch + 1 >= self.start else None

    @torch.no_grad()
    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        if epoch >= self.start:
            self.model.update_parameters(unwrap(model))
            self.updates += 1
            self._stale = True

    def averaged(self, train, *, device, batch_size: int) -> nn.Module | None:
        if self.updates == 0:
            return None
        if self._stale and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
            x = train.x
            batches = (x[i:i + batch_size].to(device) for i in range(0, x.shape[0], batch_size))
            swa_utils.update_bn(batches, self.model, device=device)
        self._stale = False
        return self.model.module.eval()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
        self._stale = True
