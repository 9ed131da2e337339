"""Projected gradient descent (PGD) attacks in an l-inf or l2 ball: a pure function with injectable randomness.

:func:`pgd` maximises a loss over perturbations ``delta`` with ``||delta|| <= eps``, keeping
``x + delta`` inside the valid input range ``bounds``: from a start drawn uniformly in the ball
(or an injected one), ``steps`` times: a step of size ``step_size`` along the loss gradient's
steepest-ascent direction for the norm (its sign for l-inf, the gradient over its l2 norm
for l2), then the projection onto the ball and the clamp into ``bounds``. It works on any
model and input shape (images, signals, feature vectors), one batch at a time, every row
attacked independently.

The model runs in its current mode: the caller puts it in eval mode (BatchNorm with its
running statistics, no dropout) or train mode. The parameters receive no gradient (the
gradient is taken with respect to the input only) and the model's buffers are left as they
were (:func:`maxup.objectives.frozen_buffers`), whatever the mode.

>>> g = torch.Generator().manual_seed(0)
>>> x_adv = pgd(model.eval(), x, y, eps=8 / 255, steps=3, generator=g)
>>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6), bool(x_adv.min() >= 0), bool(x_adv.max() <= 1)
(True, True, True)

Reference: Madry, Makelov, Schmidt, Tsipras and Vladu, "Towards Deep Learning Models Resistant
to Adversarial Attacks", ICLR 2018, arXiv:1706.06083; the update rule is the one of the
MadryLab ``robustness`` library (``attack_steps.LinfStep`` / ``L2Step``) and of Rice et al.'s
``attack_pgd`` (locuslab/robust_overfitting); docs/methods/adv.md compares them.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from numbers import Real

import torch

from . import _random as R
from .mixing import _checkable
from .targets import soft_cross_entropy

__all__ = ["NORMS", "check_attack", "check_bounds", "pgd", "project", "sample_ball", "steepest_ascent"]

#: the threat models: the l-inf ball (each input value moves by at most eps) and the l2 ball
NORMS = ("linf", "l2")


# ---------------------------------------------------------------------------- checks


def check_bounds(bounds) -> tuple[float, float] | None:
    """``bounds`` as a ``(low, high)`` pair of finite numbers with ``low < high``, or None (unbounded)."""
    if bounds is None:
        return None
    try:
        lo, hi = bounds
    except (TypeError, ValueError):
        raise ValueError(f"bounds must be the valid input range (low, high), such as (0.0, 1.0) for images in "
                         f"[0, 1], or None for unbounded inputs; got {bounds!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"bounds must hold two finite numbers (low, high), got {bounds!r}")
    if not lo < hi:
        raise ValueError(f"bounds must satisfy low < high, got {bounds!r}")
    return float(lo), float(hi)


def check_attack(eps, norm: str = "linf", steps: int = 10, step_size=None, random_start: bool = True,
                 bounds=(0.0, 1.0)) -> tuple[float, str, int, float, bool, tuple[float, float] | None]:
    """The attack's options checked, with ``step_size`` filled in: ``(eps, norm, steps, step_size, random_start,
    bounds)``; a ValueError naming the bad option otherwise.

    ``step_size=None`` is ``2.5 * eps / steps`` (at most ``eps`` without a random start). A step
    larger than ``eps`` is refused without a random start (the first step would leave the ball
    and be projected back onto its surface at once: ask for ``step_size=eps`` to mean that).

    >>> check_attack(0.1, steps=10)
    (0.1, 'linf', 10, 0.025, True, (0.0, 1.0))
    """
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (the radius of the attack's ball, in input units), "
                         f"got {eps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (the threat model), got {norm!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the attack's gradient steps), got {steps!r}")
    if not isinstance(random_start, bool):
        raise ValueError(f"random_start must be true or false, got {random_start!r}")
    bounds = check_bounds(bounds)
    if step_size is None:
        step_size = 2.5 * float(eps) / steps if random_start else min(2.5 * float(eps) / steps, float(eps))
    elif isinstance(step_size, bool) or not isinstance(step_size, Real) or not math.isfinite(step_size) \
            or step_size <= 0:
        raise ValueError(f"step_size must be a finite number > 0 (or None for 2.5 * eps / steps), got {step_size!r}")
    if step_size > eps and not random_start and eps > 0:
        raise ValueError(f"step_size={step_size!r} is larger than eps={eps!r} without a random start: the first "
                         f"step leaves the ball and is projected back onto it; use step_size <= eps "
                         f"(step_size=eps with steps=1 is FGSM) or random_start=True")
    return float(eps), norm, steps, float(step_size), random_start, bounds


def _check_inside(x: torch.Tensor, bounds) -> None:
    """Inputs outside ``bounds`` are a clear error (checked on CPU; on an accelerator the read would stall the step,
    so inputs there are trusted, and the clamp after each step moves them into the range)."""
    if bounds is None or not _checkable(x):
        return
    with R.host_only():  # a CPU tensor: no device waits for this read
        lo, hi = float(x.min()), float(x.max())
    if lo < bounds[0] or hi > bounds[1] or math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"x has values in [{lo:.4g}, {hi:.4g}], outside bounds={bounds}: pass the range the inputs "
                         "are valid in as bounds (bounds=None for unbounded or standardised inputs), or attack the "
                         "unnormalised inputs (e.g. pixels in [0, 1]: maxup train --no-normalize)")


# ---------------------------------------------------------------------------- the pieces


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast over the rows of ``like``."""
    return v.view((-1,) + (1,) * (like.dim() - 1))


def _row_norms(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).norm(dim=1)


def sample_ball(x: torch.Tensor, eps: float, norm: str = "linf", *, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """A perturbation for every row of ``x``, uniform in the ball of radius ``eps``.

    l-inf: each value uniform in [-eps, eps]. l2: a Gaussian direction normalised to unit
    length, times the radius ``eps * U^(1/d)`` (d = values per row): uniform in the ball's
    volume. Drawn from ``generator`` (the l2 directions first, then the radii) on its device.

    >>> d = sample_ball(torch.zeros(4, 3, 8, 8), 0.5, "l2", generator=torch.Generator().manual_seed(0))
    >>> bool((d.flatten(1).norm(dim=1) <= 0.5).all())
    True
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS} (the threat model), got {norm!r}")
    if norm == "linf":
        u = R.rand(x.shape, generator=generator, device=x.device)
        return ((2.0 * u - 1.0) * eps).to(x.dtype)
    b, d = x.shape[0], x[0].numel()
    z = R.randn(x.shape, generator=generator, device=x.device)
    radius = eps * R.rand((b,), generator=generator, device=x.device).pow(1.0 / d)
    z = z / _per_row(_row_norms(z).clamp_min(1e-12), z)
    return (z * _per_row(radius, z)).to(x.dtype)


def steepest_ascent(grad: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """The direction of a step: ``sign(grad)`` for l-inf, ``grad / ||grad||_2`` per row for l2 (0 for a zero
    gradient)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_row(_row_norms(grad).clamp_min(1e-12), grad)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf", bounds=(0.0, 1.0)) -> torch.Tensor:
    """``x_adv`` moved into the ball of radius ``eps`` around ``x`` (l-inf: clamped; l2: ``delta`` scaled to norm at
    most ``eps``), then clamped into ``bounds``. For ``x`` inside ``bounds`` the clamp keeps the result in the ball."""
    if norm == "linf":
        out = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        scale = (eps / _row_norms(delta).clamp_min(1e-12)).clamp_max(1.0)
        out = x + delta * _per_row(scale, delta)
    return out if bounds is None else out.clamp(bounds[0], bounds[1])


def _row_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default attack loss: cross-entropy per row, on integer labels (B,) or soft targets (B, C)."""
    return soft_cross_entropy(logits.float(), y, reduction="none")


# ---------------------------------------------------------------------------- the attack


def pgd(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *, eps: float,
        norm: str = "linf", steps: int = 10, step_size: float | None = None, random_start: bool = True,
        bounds=(0.0, 1.0), loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        init: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD (Madry et al. 2018): adversarial inputs within ``eps`` of ``x`` that maximise the loss.

    Args:
        model: maps a batch of inputs to logits (B, C); run in its current mode (the caller
            puts it in eval or train mode), its parameters get no ``.grad`` and its buffers
            (BatchNorm statistics) are restored after the attack.
        x: the inputs (B, ...), any float shape; not modified.
        y: what the loss compares the logits with: integer labels (B,) or soft targets
            (B, C) (Mixup/CutMix targets, or the clean prediction for TRADES).
        eps: the radius of the ball (>= 0, in the units of ``x``); 0 returns a copy of ``x``.
        norm: ``"linf"`` (every input value moves by at most eps) or ``"l2"``.
        steps: gradient steps (>= 1).
        step_size: the length of each step (l-inf: of every value's move); None: ``2.5 * eps / steps``
            (at most ``eps`` without a random start).
        random_start: start from a point drawn uniformly in the ball (:func:`sample_ball`);
            False: from ``x`` (then ``step_size <= eps``).
        bounds: the range the inputs are valid in, ``(0.0, 1.0)`` for images in [0, 1];
            every iterate is clamped into it; inputs outside it are an error (checked on
            CPU). None: unbounded (standardised inputs, features).
        loss: ``loss(logits, y) -> (B,)`` per-row losses to maximise; default the
            cross-entropy on integer labels or soft targets. Rows are independent: the
            gradient of their sum moves each row by its own loss only.
        init: a starting perturbation of ``x``'s shape (the injected randomness; it
            overrides ``random_start``), projected into the ball and ``bounds`` first.
        generator: the ``torch.Generator`` the random start is drawn from.

    Returns the adversarial inputs (B, ...), detached, ``||x_adv - x|| <= eps`` and inside ``bounds``.
    """
    eps, norm, steps, step_size, random_start, bounds = check_attack(eps, norm, steps, step_size, random_start,
                                                                     bounds)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty floating-point batch (B, ...) of inputs, got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if not isinstance(y, torch.Tensor) or y.dim() < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must hold one label or target row per row of x ({x.shape[0]}), got "
                         + (f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__))
    if init is not None and (not isinstance(init, torch.Tensor) or init.shape != x.shape):
        raise ValueError(f"init must be a starting perturbation of x's shape {tuple(x.shape)}, got "
                         + (f"shape {tuple(init.shape)}" if isinstance(init, torch.Tensor) else type(init).__name__))
    if loss is not None and not callable(loss):
        raise ValueError(f"loss must be a callable loss(logits, y) -> (B,) per-row losses, got {type(loss).__name__}")
    _check_inside(x, bounds)
    x = x.detach()
    if eps == 0:
        return x.clone()
    loss = _row_losses if loss is None else loss
    if init is not None:
        start = init.detach().to(device=x.device, dtype=x.dtype)
    elif random_start:
        start = sample_ball(x, eps, norm, generator=generator)
    else:
        start = torch.zeros_like(x)
    x_adv = project(x + start, x, eps, norm, bounds)

    from ..objectives import frozen_buffers  # the objectives package imports functional: import at call time

    buffers = frozen_buffers(model) if isinstance(model, torch.nn.Module) else contextlib.nullcontext()
    with buffers, torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            rows = loss(model(x_adv), y)
            if rows.shape != (x.shape[0],):
                raise ValueError(f"loss must return one value per row of x ({x.shape[0]},), got shape "
                                 f"{tuple(rows.shape)}")
            grad, = torch.autograd.grad(rows.sum(), [x_adv])
            x_adv = project(x_adv.detach() + step_size * steepest_ascent(grad, norm), x, eps, norm, bounds)
    return x_adv.detach()

