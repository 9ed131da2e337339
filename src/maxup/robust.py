"""Robust accuracy under PGD: the share of test examples a model still classifies correctly when attacked.

:func:`robust_accuracy` attacks every example of a :class:`maxup.data.TensorData` with
:func:`maxup.functional.attacks.pgd` at each radius of ``eps_list``, the model in eval mode,
and counts an example as robust when the model is right both on it and on its attacked copy
(the clean input lies in the ball too, so robust accuracy never exceeds clean accuracy).
Each radius draws its random starts from its own generator seeded with ``seed``, so a radius
gives the same result whichever other radii are evaluated with it, and in whichever order.

Models trained on standardised inputs are attacked in pixel units through
:class:`Standardized` (the normalisation as the model's first layer) and :func:`to_pixels`,
so ``eps`` is always a distance between images in [0, 1].

>>> data = maxup.data.TensorData(x_test, y_test)
>>> rows = robust_accuracy(model, data, eps_list=[0.0, 8 / 255], steps=3, batch_size=8)
>>> [r["eps"] for r in rows], rows[1]["robust_accuracy"] <= rows[1]["clean_accuracy"]
([0.0, 0.03137254901960784], True)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real

import torch
from torch import nn

from ._checks import check_int
from .data import TensorData
from .functional.attacks import check_attack, pgd
from .steps.adversarial import eval_mode

__all__ = ["RobustEval", "Standardized", "robust_accuracy", "to_pixels"]


class Standardized(nn.Module):
    """``model`` behind its input normalisation: ``forward(x) = model((x - mean) / std)``, per channel (dim 1).

    Attacks on it take place in the units of ``x`` (pixels in [0, 1]), not the standardised units.
    """

    def __init__(self, model: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).detach().clone(), persistent=False)
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.model((x - self.mean.view(shape)) / self.std.view(shape))


def to_pixels(data: TensorData, mean: torch.Tensor, std: torch.Tensor, bounds=(0.0, 1.0)) -> TensorData:
    """Standardised ``data`` back in the units it was normalised from (``x * std + mean``), clamped into ``bounds``
    (which only removes rounding error for data that was in that range)."""
    shape = (1, -1) + (1,) * (data.x.dim() - 2)
    x = data.x * std.view(shape).to(data.x) + mean.view(shape).to(data.x)
    return TensorData(x if bounds is None else x.clamp(*bounds), data.y)


def _check_eps_list(eps_list) -> list[float]:
    if isinstance(eps_list, Real):
        eps_list = [eps_list]
    if not isinstance(eps_list, Sequence) or isinstance(eps_list, str) or not eps_list:
        raise ValueError(f"eps_list must be a non-empty list of radii such as [0.05, 0.1], got {eps_list!r}")
    for e in eps_list:
        if isinstance(e, bool) or not isinstance(e, Real) or not math.isfinite(e) or e < 0:
            raise ValueError(f"eps_list must hold finite radii >= 0, got {eps_list!r}")
    return [float(e) for e in eps_list]


def robust_accuracy(model: nn.Module, data: TensorData, *, eps_list, norm: str = "linf", steps: int = 10,
                    step_size: float | None = None, random_start: bool = True, bounds=(0.0, 1.0),
                    batch_size: int = 256, device=None, seed: int = 0,
                    progress: Callable[[int], None] | None = None) -> list[dict]:
    """Clean and PGD robust accuracy of ``model`` on ``data`` at each radius of ``eps_list``.

    Args:
        model: a classifier of ``data.x``'s rows; evaluated in eval mode (its modes are
            restored after), its parameters and buffers untouched.
        data: the examples (:class:`maxup.data.TensorData`), in the units ``eps`` and ``bounds`` refer to.
        eps_list: radii (>= 0); 0 gives the clean accuracy.
        norm, steps, step_size, random_start, bounds: the attack's (:func:`~maxup.functional.attacks.pgd`);
            ``step_size=None`` is ``2.5 * eps / steps`` at every radius.
        batch_size: examples attacked at once (the draws, and so the result, depend on it).
        device: where to run (default: the model's).
        seed: seeds each radius's generator of random starts.
        progress: called with the number of examples of each finished batch.

    Returns one dict per radius: ``eps``, ``clean_accuracy``, ``robust_accuracy``, ``n`` (examples),
    ``robust`` (examples robust).
    """
    eps_list = _check_eps_list(eps_list)
    for e in eps_list:  # every radius's options checked before any is evaluated
        check_attack(e, norm, steps, step_size, random_start, bounds)
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData, got {type(data).__name__}")
    if not data.x.is_floating_point() or data.y.dim() != 1:
        raise ValueError("data must hold float inputs and integer class labels (N,): robust accuracy is for "
                         "classifiers of images or features")
    if len(data) == 0:
        raise ValueError("data is empty")
    batch_size = check_int("batch_size", batch_size)
    seed = check_int("seed", seed, minimum=0)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)

    clean, robust = [], {e: [] for e in eps_list}
    with eval_mode(model):
        batches = [(data.x[i:i + batch_size].to(device), data.y[i:i + batch_size].to(device))
                   for i in range(0, len(data), batch_size)]
        with torch.no_grad():
            for x, y in batches:
                clean.append(model(x).argmax(-1) == y)
        for e in eps_list:
            generator = torch.Generator(device).manual_seed(seed)
            for (x, y), right in zip(batches, clean):
                if e == 0:
                    robust[e].append(right)
                else:
                    x_adv = pgd(model, x, y, eps=e, norm=norm, steps=steps, step_size=step_size,
                                random_start=random_start, bounds=bounds, generator=generator)
                    with torch.no_grad():
                        robust[e].append(right & (model(x_adv).argmax(-1) == y))
                if progress is not None:
                    progress(x.shape[0])
    n = len(data)
    clean_correct = int(torch.cat(clean).sum())
    out = []
    for e in eps_list:
        k = int(torch.cat(robust[e]).sum())
        out.append({"eps": e, "clean_accuracy": clean_correct / n, "robust_accuracy": k / n, "n": n, "robust": k})
    return out


class RobustEval:
    """PGD robust accuracy at one radius on the first ``limit`` examples of a split: what the
    :class:`maxup.train.Trainer` records as ``test_robust_accuracy`` (``val_*``, ``ema_*``) at every evaluation,
    so the epoch of best robust accuracy and robust overfitting show in the history.

    ``eps`` is in [0, 1] pixel units; with the data's normalisation ``mean`` and ``std`` the model is attacked
    through it (:class:`Standardized`). The attack's random starts are seeded with ``seed`` at every call, so
    two evaluations of the same weights agree.

    >>> check = RobustEval(0.1, steps=3, limit=8)
    >>> 0.0 <= check(model, maxup.data.TensorData(x_test, y_test)) <= 1.0
    True
    """

    def __init__(self, eps: float, *, norm: str = "linf", steps: int = 10, limit: int = 1000, mean=None, std=None,
                 batch_size: int = 500, seed: int = 0):
        if not isinstance(eps, Real) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a radius > 0 in [0, 1] pixel units (e.g. 0.1), got {eps!r}")
        check_attack(float(eps), norm, steps)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (the data's normalisation), or neither")
        self.eps, self.norm, self.steps = float(eps), norm, steps
        self.limit = check_int("limit", limit)
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_int("seed", seed, minimum=0)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"RobustEval(eps={self.eps}, norm={self.norm!r}, steps={self.steps}, limit={self.limit})"

    def __call__(self, model: nn.Module, data: TensorData) -> float:
        n = min(self.limit, len(data))
        data = TensorData(data.x[:n], data.y[:n])
        if self.std is not None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model = Standardized(model, self.mean, self.std).to(device)
            data = to_pixels(data, self.mean, self.std)
        return robust_accuracy(model, data, eps_list=[self.eps], norm=self.norm, steps=self.steps,
                               batch_size=self.batch_size, seed=self.seed)[0]["robust_accuracy"]
