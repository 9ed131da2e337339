"""SAM and ASAM as a wrapper around any step: the pitfalls of sharpness-aware training handled once.

:class:`SharpnessAware` runs the wrapped step's passes at ``w``
(:meth:`~maxup.steps.Step.forward_backward`), ascends to ``w + eps`` with
:func:`maxup.optim.sam_perturbation` (the same core as the optimizer wrapper
:class:`maxup.optim.SAM`), replays the *same* rows there (:meth:`~maxup.steps.Step.replay`:
for MaxUp the worst copies chosen at ``w``, for Mixup the same mixed batch, for GradAug the
same sub-networks), restores ``w`` from a saved copy and lets the wrapped step apply the
second gradient. So ``sam+X`` works for every step X; ``maxup.steps.SAM`` is the old name.

What the step does so that callers need not remember it:

- BatchNorm running statistics come from the first pass only (the second pass runs
  inside :func:`maxup.objectives.frozen_buffers`);
- under DistributedDataParallel the first backward runs inside ``model.no_sync()``
  (each rank ascends along its own gradient, as in the SAM paper's m-sharpness);
  ``sync_first=True`` all-reduces it instead; the second backward is synchronised;
- ``max_grad_norm`` clips the final gradient (the one at ``w + eps``);
- ``accumulation_steps=k`` splits the batch into k micro-batches for both passes;
- ``amp="fp16"``: the first gradient is unscaled before its norm is taken; on overflow
  the whole step is skipped and the scale backed off; ``amp="bf16"``: autocast only;
- ``interval=k``: a SAM step every k-th call, a plain step otherwise (the counter is
  in :meth:`state_dict`, so a resumed run keeps the cycle).

Cost: two forward-backward passes per SAM step (the floor), plus one copy of the
weights and a few foreach kernels (about 1 ms on ResNet-20): 1.99x the ERM step in
benchmarks/sam_overhead.py (ResNet-20, batch 128, CPU). Dropout draws new masks in
the second pass, as in the SAM paper's code.
"""
from __future__ import annotations

import warnings

import torch

from .._checks import check_int
from .._modules import unwrap
from ..objectives import Objective, ObjectiveResult, frozen_buffers
from ..optim import SAM as SAMOptimizer
from ..optim import _check_eta, _check_flag, _check_rho, is_weight_name, sam_perturbation
from ..registry import register
from .base import Standard, Step

__all__ = ["SAM", "SharpnessAware", "merge", "perturbation"]


def perturbation(model, params, grads, rho: float, *, adaptive: bool = False, eta: float = 0.01,
                 weights_only: bool = False):
    """``(eps, ||g||)``: SAM's (or with ``adaptive``, ASAM's) ascent; ``weights_only`` scales only the tensors
    whose name contains ``"weight"`` (ASAM's reference code), biases with ``T = 1``."""
    flags = adaptive
    if adaptive and weights_only:
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        flags = [is_weight_name(names.get(id(p), "")) for p in params]
    return sam_perturbation(params, grads, rho, adaptive=flags, eta=eta, return_norm=True)


def merge(results: list[ObjectiveResult]) -> ObjectiveResult:
    """The micro-batches' results of one step as one (detached) result."""
    if len(results) == 1:
        return results[0]
    cat = lambda name: torch.cat([getattr(r, name).detach() for r in results])  # noqa: E731
    loss = torch.stack([r.loss.detach() for r in results]).sum()
    return ObjectiveResult(loss, cat("losses"), cat("logits"), cat("inputs"), cat("targets"), cat("weights"),
                           dense=all(r.dense for r in results))


def _chunks(x, y, k: int):
    if k == 1:
        return [(x, y, 1.0)]
    b = x.shape[0]
    return [(xi, yi, xi.shape[0] / b) for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k))
            if xi.shape[0]]


@register("sam", "SAM: the gradient at w + rho g/||g||, applied at w (two passes per step); wraps any step "
          "('sam+gradaug': SAM on the GradAug loss)")
@register("asam", "ASAM: SAM in the scale-invariant ball T = |w| + eta (rho 0.5)", rho=0.5, adaptive=True,
          search_space={"rho": (0.1, 2.0, "log")},
          hidden=("adaptive",))
class SharpnessAware(Step):
    """Sharpness-aware minimization (Foret et al. 2021) around any step; ASAM with ``adaptive=True``.

    Args:
        step: the step to wrap (e.g. :class:`~maxup.steps.GradAug`), or an objective such as
            ``maxup.ERM()`` or ``maxup.MaxUp(aug, m=4)``, which is wrapped in
            :class:`~maxup.steps.Standard` with ``optimizer``, ``max_grad_norm`` and ``amp``.
        optimizer: the base :class:`torch.optim.Optimizer` when ``step`` is an objective (not a
            :class:`maxup.optim.SAM`: the step does the ascent itself). A scheduler on it works as usual.
        rho: radius of the ascent (>= 0); ``rho=0`` takes plain steps.
        adaptive: ASAM (Kwon et al. 2021): ``eps = rho T^2 g / ||T g||``, ``T = |w| + eta``.
        eta: ASAM's offset (>= 0).
        weights_only: with ``adaptive``, scale only tensors whose name contains
            ``"weight"`` (ASAM's reference code); biases are perturbed with ``T = 1``.
        interval: a SAM step every ``interval``-th call (the first call is one), plain steps between.
        accumulation_steps: micro-batches per call, for both passes.
        sync_first: under DDP, all-reduce the first gradient too (default: local ascent, ``no_sync``).
        max_grad_norm, amp: see :class:`maxup.steps.Step` (only with an objective; a wrapped step has its own).

    What the wrapper does so that callers need not remember it: BatchNorm running
    statistics come from the first pass only (the second runs inside
    :func:`maxup.objectives.frozen_buffers`); under DDP the first backward runs in
    ``no_sync`` unless ``sync_first``; the wrapped step clips the final gradient (at
    ``w + eps``); under fp16 the first gradient is unscaled before its norm, and an
    overflow skips the whole step; ``interval`` is kept in :meth:`state_dict`.

    Returns (per call) the result of the first pass (loss and logits at ``w``).
    ``skipped_steps`` counts fp16 steps skipped on overflow in the first pass.

    >>> step = SharpnessAware(maxup.MaxUp(maxup.augment.Cutout(8, num_classes=10), m=4),
    ...                       torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    >>> result = step(model, x, y)
    """

    kind = "wrapper"
    filled = ("step", "optimizer", "model", "num_classes", "max_grad_norm", "amp")
    search_space = {"rho": (0.01, 0.5, "log")}  # SAM's; asam registers its own (rho 0.1..2)

    def __init__(self, step: Step | Objective, optimizer: torch.optim.Optimizer | None = None, *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, weights_only: bool = False, interval: int = 1,
                 accumulation_steps: int = 1, sync_first: bool = False, max_grad_norm: float | None = None,
                 amp: str | None = None):
        if isinstance(optimizer, SAMOptimizer):
            raise ValueError("optimizer is a maxup.optim.SAM wrapper; the SAM step does the ascent itself: pass the "
                             "base optimizer (e.g. torch.optim.SGD(...)) and rho/adaptive/eta to the step")
        if isinstance(step, Step):
            if step.sharpness_aware or isinstance(step, SharpnessAware):
                raise ValueError(f"{type(step).__name__} already runs SAM's two passes: set its rho instead of "
                                 "wrapping it in SAM again")
            if optimizer is not None and optimizer is not step.optimizer:
                raise ValueError("optimizer differs from the wrapped step's optimizer: leave it out")
            if max_grad_norm is not None or amp is not None:
                raise ValueError("max_grad_norm and amp belong to the wrapped step: set them there")
        else:
            if optimizer is None:
                raise ValueError("optimizer is needed when step is an objective (SharpnessAware(objective, optimizer))")
            step = Standard(step, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.step = step
        self.rho = _check_rho(rho)
        self.eta = _check_eta(eta)
        self.adaptive = _check_flag("adaptive", adaptive)
        self.weights_only = _check_flag("weights_only", weights_only)
        if self.weights_only and not self.adaptive:
            raise ValueError("weights_only=True only changes ASAM's scaling: it needs adaptive=True")
        self.interval = check_int("interval", interval)
        self.accumulation_steps = check_int("accumulation_steps", accumulation_steps)
        self.sync_first = _check_flag("sync_first", sync_first)
        self.num_steps = 0
        self.skipped_steps = 0

    @classmethod
    def from_spec(cls, step, **options) -> SharpnessAware:
        return cls(step, **options)

    # the wrapped step's parts
    objective = property(lambda self: self.step.objective)
    optimizer = property(lambda self: self.step.optimizer)
    scaler = property(lambda self: self.step.scaler)
    max_grad_norm = property(lambda self: self.step.max_grad_norm)
    amp = property(lambda self: self.step.amp)
    fixed_shapes = property(lambda self: getattr(self.step, "fixed_shapes", True))
    unused_parameters = property(lambda self: getattr(self.step, "unused_parameters", False))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.step!r}, rho={self.rho}, adaptive={self.adaptive}, eta={self.eta}, "
                f"interval={self.interval}, accumulation_steps={self.accumulation_steps})")

    def _skip(self) -> None:
        """fp16 overflow in the first pass: no update; the scaler records the overflow and backs off."""
        self.scaler.unscale_(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1

    def prepare(self, model) -> None:
        self.step.prepare(model)

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        inner = self.step
        sam = self.rho > 0 and self.num_steps % self.interval == 0
        self.num_steps += 1
        inner.prepare(model)
        self.optimizer.zero_grad(set_to_none=True)
        chunks = _chunks(x, y, self.accumulation_steps)
        last = len(chunks) - 1
        results = [inner.forward_backward(model, xi, yi, generator, scale=frac,
                                          sync=i == last and (self.sync_first or not sam))
                   for i, (xi, yi, frac) in enumerate(chunks)]
        if not sam:
            inner.update()
            return merge(results)

        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self.scaler is not None and params:
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())  # unscale before the norm
        eps, norm = perturbation(model, params, grads, self.rho, adaptive=self.adaptive, eta=self.eta,
                                 weights_only=self.weights_only)
        if self.scaler is not None and not bool(torch.isfinite(norm)):
            self._skip()
            return merge(results)

        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            if params:
                torch._foreach_add_(params, eps)
        del eps
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with frozen_buffers(model):
                for i, result in enumerate(results):
                    inner.replay(model, result, sync=i == last)
        finally:
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, saved)  # exact restore of w
        inner.update()  # unscale, clip the final gradient, step (skipped by the scaler on overflow)
        return merge(results)

    def state_dict(self) -> dict:
        return {**self.step.state_dict(), "num_steps": self.num_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state)
        self.num_steps = int(state.get("num_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


class SAM(SharpnessAware):
    """Deprecated name of :class:`SharpnessAware` (``maxup.optim.SAM`` is the optimizer wrapper)."""

    def __init__(self, *args, **kwargs):
        warnings.warn("maxup.steps.SAM is renamed maxup.steps.SharpnessAware (maxup.optim.SAM is the optimizer "
                      "wrapper); the old name goes in the next release", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
