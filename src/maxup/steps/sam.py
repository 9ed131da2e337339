"""SAM and ASAM as training steps: the pitfalls of sharpness-aware training handled in the step.

:class:`SAM` evaluates the objective at ``w``, ascends to ``w + eps`` with
:func:`maxup.optim.sam_perturbation` (the same core as the optimizer wrapper
:class:`maxup.optim.SAM`), re-evaluates the *same* rows there (for MaxUp: the worst
copies chosen at ``w``; for Mixup: the same mixed batch), restores ``w`` from a saved
copy and lets the optimizer apply the second gradient.

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

import contextlib
import dataclasses

import torch
from .._checks import check_int
from .._modules import ddp, unwrap
from ..objectives import Objective, ObjectiveResult, frozen_buffers
from ..optim import SAM as SAMOptimizer
from ..optim import _check_eta, _check_flag, _check_rho, is_weight_name, sam_perturbation
from . import Step

__all__ = ["SAM", "make_asam", "make_sam"]


def _sync(model, sync: bool):
    """``model.no_sync()`` for a DistributedDataParallel model (also inside ``torch.compile``) when ``sync`` is False."""
    wrapper = ddp(model) if not sync else None
    return wrapper.no_sync() if wrapper is not None else contextlib.nullcontext()


def _unwrap(model):
    """The network itself (no DDP or ``torch.compile`` wrapper): for name lookups and width slicing."""
    return unwrap(model)


def _scaled(result: ObjectiveResult, frac: float) -> ObjectiveResult:
    """A micro-batch's result weighted by its share of the batch (so the losses sum to the batch mean)."""
    if frac == 1.0:
        return result
    return dataclasses.replace(result, loss=result.loss * frac, weights=result.weights * frac)


def _merge(results: list[ObjectiveResult]) -> ObjectiveResult:
    if len(results) == 1:
        return results[0]
    cat = lambda name: torch.cat([getattr(r, name).detach() for r in results])  # noqa: E731
    loss = torch.stack([r.loss.detach() for r in results]).sum()
    return ObjectiveResult(loss, cat("losses"), cat("logits"), cat("inputs"), cat("targets"), cat("weights"),
                           dense=all(r.dense for r in results))


class SAM(Step):
    """Sharpness-aware minimization (Foret et al. 2021) around any objective; ASAM with ``adaptive=True``.

    Args:
        objective: what to minimise, e.g. ``maxup.ERM()``, ``maxup.MaxUp(aug, m=4)``.
        optimizer: the base :class:`torch.optim.Optimizer` (not a :class:`maxup.optim.SAM`:
            the step does the ascent itself). A scheduler on it works as usual.
        rho: radius of the ascent (>= 0); ``rho=0`` takes plain steps.
        adaptive: ASAM (Kwon et al. 2021): ``eps = rho T^2 g / ||T g||``, ``T = |w| + eta``.
        eta: ASAM's offset (>= 0).
        weights_only: with ``adaptive``, scale only tensors whose name contains
            ``"weight"`` (ASAM's reference code); biases are perturbed with ``T = 1``.
        interval: a SAM step every ``interval``-th call (the first call is one), plain steps between.
        accumulation_steps: micro-batches per call, for both passes.
        sync_first: under DDP, all-reduce the first gradient too (default: local ascent, ``no_sync``).
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    Returns (per call) the :class:`~maxup.objectives.ObjectiveResult` of the first pass
    (loss and logits at ``w``). ``skipped_steps`` counts fp16 steps skipped on overflow
    in the first pass.

    >>> step = SAM(maxup.MaxUp(maxup.augment.Cutout(8, num_classes=10), m=4),
    ...            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
    >>> result = step(model, x, y)
    """

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, rho: float = 0.05,
                 adaptive: bool = False, eta: float = 0.01, weights_only: bool = False, interval: int = 1,
                 accumulation_steps: int = 1, sync_first: bool = False, max_grad_norm: float | None = None,
                 amp: str | None = None):
        if isinstance(optimizer, SAMOptimizer):
            raise ValueError("optimizer is a maxup.optim.SAM wrapper; the SAM step does the ascent itself: pass the "
                             "base optimizer (e.g. torch.optim.SGD(...)) and rho/adaptive/eta to the step")
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
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

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.objective!r}, rho={self.rho}, adaptive={self.adaptive}, eta={self.eta}, "
                f"interval={self.interval}, accumulation_steps={self.accumulation_steps})")

    # ------------------------------------------------------------------ hooks for subclasses

    def _evaluate(self, model, x, y, generator) -> ObjectiveResult:
        """The first pass on one micro-batch (with grad, under autocast)."""
        return self.objective(model, x, y, generator)

    def _reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        """The second pass: the same rows and weights at the current (perturbed) weights."""
        return self.objective.reevaluate(model, result)

    def _first_pass(self, model, x, y, generator, frac: float, sync: bool) -> ObjectiveResult:
        """Forward and backward of one micro-batch at ``w`` (the last backward synchronised when ``sync``)."""
        with _sync(model, sync):
            with self.autocast(x):
                result = _scaled(self._evaluate(model, x, y, generator), frac)
            self.backward(result.loss)
        return result

    def _second_pass(self, model, result: ObjectiveResult, sync: bool) -> None:
        """Forward and backward of one micro-batch's rows at ``w + eps``."""
        with _sync(model, sync):
            with self.autocast(result.inputs):
                again = self._reevaluate(model, result)
            self.backward(again.loss)

    # ------------------------------------------------------------------ pieces

    def _chunks(self, x, y):
        if self.accumulation_steps == 1:
            return [(x, y, 1.0)]
        b = x.shape[0]
        k = self.accumulation_steps
        return [(xi, yi, xi.shape[0] / b) for xi, yi in zip(torch.tensor_split(x, k), torch.tensor_split(y, k))
                if xi.shape[0]]

    def _adaptive_flags(self, model, params):
        if not (self.adaptive and self.weights_only):
            return self.adaptive
        names = {id(p): n for n, p in _unwrap(model).named_parameters()}
        return [is_weight_name(names.get(id(p), "")) for p in params]

    def _perturbation(self, model, params, grads):
        return sam_perturbation(params, grads, self.rho, adaptive=self._adaptive_flags(model, params), eta=self.eta,
                                return_norm=True)

    def _params_with_grad(self):
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _skip(self) -> None:
        """fp16 overflow in the first pass: no update; the scaler records the overflow and backs off."""
        self.scaler.unscale_(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1

    # ------------------------------------------------------------------ the step

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        sam = self.rho > 0 and self.num_steps % self.interval == 0
        self.num_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        chunks = self._chunks(x, y)
        last = len(chunks) - 1
        results = []
        for i, (xi, yi, frac) in enumerate(chunks):
            results.append(self._first_pass(model, xi, yi, generator, frac, i == last and (self.sync_first or not sam)))
        if not sam:
            self.update()
            return _merge(results)

        params = self._params_with_grad()
        grads = [p.grad for p in params]
        if self.scaler is not None and params:
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())  # unscale before the norm
        eps, norm = self._perturbation(model, params, grads)
        if self.scaler is not None and not bool(torch.isfinite(norm)):
            self._skip()
            return _merge(results)

        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            if params:
                torch._foreach_add_(params, eps)
        del eps
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with frozen_buffers(model):
                for i, result in enumerate(results):
                    self._second_pass(model, result, i == last)
        finally:
            with torch.no_grad():
                if params:
                    torch._foreach_copy_(params, saved)  # exact restore of w
        self.update()  # unscale, clip the final gradient, step (skipped by the scaler on overflow)
        return _merge(results)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_steps": self.num_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.num_steps = int(state.get("num_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))


def make_sam(objective, optimizer, *, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
             weights_only: bool = False, interval: int = 1, accumulation_steps: int = 1, sync_first: bool = False,
             max_grad_norm: float | None = None, amp: str | None = None) -> SAM:
    """Registry factory for ``sam(...)``: SAM (rho 0.05, Foret et al.'s CIFAR default) around the spec's objective."""
    return SAM(objective, optimizer, rho=rho, adaptive=adaptive, eta=eta, weights_only=weights_only, interval=interval,
               accumulation_steps=accumulation_steps, sync_first=sync_first, max_grad_norm=max_grad_norm, amp=amp)


def make_asam(objective, optimizer, *, rho: float = 0.5, eta: float = 0.01, weights_only: bool = False,
              interval: int = 1, accumulation_steps: int = 1, sync_first: bool = False,
              max_grad_norm: float | None = None, amp: str | None = None) -> SAM:
    """Registry factory for ``asam(...)``: ASAM with the reference code's defaults (rho 0.5, eta 0.01;
    the authors' CIFAR-10 setting; they used rho 1.0 on CIFAR-100)."""
    return SAM(objective, optimizer, rho=rho, adaptive=True, eta=eta, weights_only=weights_only, interval=interval,
               accumulation_steps=accumulation_steps, sync_first=sync_first, max_grad_norm=max_grad_norm, amp=amp)
