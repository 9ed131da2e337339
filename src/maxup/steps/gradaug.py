"""GradAug (Yang, Zhu, Chen, NeurIPS 2020): random-width sub-networks distilled towards the full network.

Per step:

1. the full network trains on the objective (ERM, CutMix, MaxUp: any objective, so
   GradAug + CutMix composes) and backpropagates;
2. ``n_subnets`` sub-networks, widths drawn uniformly in ``width_range`` with the
   smallest always included, each see the rows the full network trained on (the mixed
   batch for CutMix, the worst copies for MaxUp), resized to a random resolution from
   ``resolutions`` (none: as they are), and learn ``KL(p_full.detach() || p_sub)``,
   weighted like the objective's rows; each backpropagates in turn (one sub-network's
   graph in memory at a time);
3. the gradients are summed and the optimizer steps once.

Width slicing comes from :mod:`maxup.slim`: on its first call (or when built from a
method spec) the step converts the model in place with :func:`maxup.slim.slimmable`
(the same parameters; outputs at full width unchanged), so every bundled model and any
plain ``torch.nn`` CNN/MLP works. BatchNorm running statistics come from the full
network's pass only; sub-networks normalise with batch statistics.

The sub-networks are drawn once per call from the step's generator, after the
objective's own draws (:func:`draw_subnets`); ``step.last_subnets`` holds them.

GradAug is a step that adds losses: its :meth:`~GradAug.forward_backward` backpropagates the
full network's loss, then each sub-network's. Wrapped in SAM
(``SharpnessAware(GradAug(...), rho=0.05)``; ``sam(rho=0.05)+gradaug`` as a method spec)
the full pass and the sub-network passes run at ``w``, then again at ``w + eps`` on the same
rows, widths and resolutions (:meth:`~GradAug.replay`: the teacher is the full network at
``w + eps``), with SAM's pitfalls handled by the wrapper (statistics from the first pass
only, exact restore of ``w``, clipping of the final gradient, DDP ``no_sync``, fp16,
accumulation).

Cost, in units of one ERM step: ``1 + sum_i w_i^2 (r_i / R)^2`` for the convolutions (a
sub-network of width w has about w^2 of the multiply-adds, at resolution r of R about
(r/R)^2 of them); 3.6 on average with the defaults (three sub-networks in [0.9, 1.0], no
resizing), twice that under SAM. See benchmarks/gradaug_overhead.py.

Paper settings (CIFAR): widths [0.8, 1.0], 3 sub-networks, resolutions 32/28/24.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_int_tuple, check_positive
from .._modules import uncompiled, unwrap
from ..functional import _random as R
from ..functional.context import enter
from ..objectives import Objective, ObjectiveResult, live_rows
from ..registry import register
from ..slim import is_slimmable, set_width, slimmable
from .base import Step, no_sync

__all__ = ["GradAug", "check_width_range", "distillation_loss", "draw_subnets", "resize"]


def check_width_range(width_range) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low <= high <= 1``, or a ValueError saying how to fix it."""
    try:
        lo, hi = (float(v) for v in width_range)
    except (TypeError, ValueError):
        raise ValueError(f"width_range must be a pair (low, high) such as (0.9, 1.0), got {width_range!r}") from None
    if not (0.0 < lo <= 1.0 and 0.0 < hi <= 1.0):
        raise ValueError(f"width_range must lie in (0, 1] (widths are fractions of the full network), "
                         f"got {width_range!r}")
    if lo > hi:
        raise ValueError(f"width_range is reversed: write (low, high) with low <= high, e.g. ({hi}, {lo}); "
                         f"got {width_range!r}")
    return lo, hi


def _check_resolutions(resolutions) -> tuple[int, ...] | None:
    if resolutions is None:
        return None
    return check_int_tuple("resolutions", resolutions)


def check_fits(resolutions, inputs: torch.Tensor) -> None:
    """Resolutions only shrink (B, C, L) signals or (B, C, H, W) images; a ValueError otherwise."""
    if resolutions is None:
        return
    if inputs.dim() not in (3, 4):
        raise ValueError("resolutions resize (B, C, L) signals or (B, C, H, W) images, but the inputs have shape "
                         f"{tuple(inputs.shape)}: use resolutions=None")
    size = min(inputs.shape[2:])
    if max(resolutions) > size:
        raise ValueError(f"resolutions must not exceed the input size {size} (sub-networks see the input shrunk), "
                         f"got {resolutions}")


def draw_subnets(n_subnets: int = 3, width_range=(0.9, 1.0), resolutions=None, *,
                 generator: torch.Generator | None = None) -> list[tuple[float, int | None]]:
    """The ``(width, resolution)`` of each sub-network: the smallest width first, the others uniform in the range.

    Resolutions are drawn uniformly (with replacement) from ``resolutions``; ``None``
    keeps the input as it is. Widths first, then resolutions, from ``generator`` (its
    host generator for a :class:`maxup.functional._random.DeviceGenerator`: the host needs them).

    >>> draw_subnets(3, (0.8, 1.0), (32, 28, 24), generator=torch.Generator().manual_seed(0))
    [(0.8, 28), (0.994..., 24), (0.941..., 28)]
    """
    n = check_int("n_subnets", n_subnets)
    lo, hi = check_width_range(width_range)
    res = _check_resolutions(resolutions)
    u = R.host_rand(n - 1, generator=generator, dtype=torch.float64)  # host choices: from the host generator
    widths = [lo] + [lo + (hi - lo) * v for v in u]
    if res is None:
        return [(w, None) for w in widths]
    pick = R.host_randint(len(res), n, generator=generator)
    return [(w, res[i]) for w, i in zip(widths, pick)]


def resize(x: torch.Tensor, resolution: int | None, *, align_corners: bool = True) -> torch.Tensor:
    """``x`` resized to ``resolution`` (bilinear to r x r for images, linear to length r for signals);
    ``align_corners=True`` as in the GradAug authors' training scripts."""
    if resolution is None or tuple(x.shape[2:]) == (resolution,) * (x.dim() - 2):
        return x
    if x.dim() not in (3, 4):
        raise ValueError(f"resize takes (B, C, L) or (B, C, H, W) inputs, got shape {tuple(x.shape)}")
    mode = "bilinear" if x.dim() == 4 else "linear"
    return F.interpolate(x, size=(resolution,) * (x.dim() - 2), mode=mode, align_corners=align_corners)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(softmax(teacher).detach() || softmax(logits))`` per row, averaged (or ``(weights * rows).sum()``)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    rows = F.kl_div(log_p, log_t, reduction="none", log_target=True).sum(-1)
    return rows.mean() if weights is None else (weights * rows).sum()


@contextlib.contextmanager
def _batch_statistics(model: nn.Module):
    """BatchNorm layers in training mode normalise with batch statistics and leave their buffers alone."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@register("gradaug", "GradAug: random-width sub-networks on resized inputs, distilled towards the full network "
          "(with sam/asam: SAM on that loss)")
class GradAug(Step):
    """GradAug (Yang, Zhu, Chen, NeurIPS 2020) around any objective.

    Args:
        objective: the full network's loss, e.g. ``maxup.ERM()``, ``maxup.ERM(CutMix(...))``,
            ``maxup.MaxUp(aug, m=4)``.
        optimizer: the base optimizer.
        n_subnets: sub-networks per step (>= 1); the first has the smallest width.
        width_range: ``(low, high)`` in (0, 1]: the widths of the sub-networks (paper: (0.8, 1.0)).
        resolutions: sizes the sub-networks' inputs are resized to (each drawn at random),
            at most the input size; ``None`` keeps the input as it is (paper, CIFAR: (32, 28, 24)).
        kd_weight: weight of the sub-networks' distillation losses (>= 0).
        align_corners: of the bilinear resize (True: the authors' scripts; False: torchvision's).
        model: converted to width-sliceable layers at once (errors early); otherwise on the first call.
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    Returns (per call) the full network's :class:`~maxup.objectives.ObjectiveResult`.
    SAM on the GradAug loss: ``SharpnessAware(GradAug(...), rho=0.05)``. Accumulation:
    ``SharpnessAware(GradAug(...), rho=0, accumulation_steps=k)``.

    >>> step = GradAug(maxup.ERM(maxup.augment.CutMix(num_classes=10)),
    ...                torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    ...                n_subnets=3, width_range=(0.8, 1.0), resolutions=(32, 28, 24))
    >>> result = step(model, x, y)
    """

    domain = "tensor"
    #: random widths and resolutions give every step new layer shapes: cuDNN autotuning would re-run each step
    fixed_shapes = False

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, n_subnets: int = 3,
                 width_range: tuple[float, float] = (0.9, 1.0), resolutions=None, kd_weight: float = 1.0,
                 align_corners: bool = True, model: nn.Module | None = None, max_grad_norm: float | None = None,
                 amp: str | None = None):
        self.n_subnets = check_int("n_subnets", n_subnets)
        self.width_range = check_width_range(width_range)
        self.resolutions = _check_resolutions(resolutions)
        self.kd_weight = check_positive("kd_weight", kd_weight, allow_zero=True)
        if not isinstance(align_corners, bool):
            raise ValueError(f"align_corners must be true or false, got {align_corners!r}")
        self.align_corners = align_corners
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.last_subnets: list[tuple[float, int | None]] = []
        self._drawn = False
        if model is not None:
            slimmable(unwrap(model))

    def __repr__(self) -> str:
        return (f"GradAug({self.objective!r}, n_subnets={self.n_subnets}, width_range={self.width_range}, "
                f"resolutions={self.resolutions}, kd_weight={self.kd_weight})")

    def draw(self, inputs: torch.Tensor, generator=None) -> list[tuple[float, int | None]]:
        """This step's sub-networks for a batch of ``inputs`` (see :func:`draw_subnets`)."""
        check_fits(self.resolutions, inputs)
        return draw_subnets(self.n_subnets, self.width_range, self.resolutions, generator=generator)

    def prepare(self, model) -> None:
        net = unwrap(model)
        if not is_slimmable(net):
            slimmable(net)
        self._drawn = False  # once per call: every micro-batch (and SAM's second pass) trains the same sub-networks

    # ------------------------------------------------------------------ the passes

    def forward_backward(self, model, x, y, generator=None, *, sync: bool = True, scale: float = 1.0):
        distill = self.kd_weight > 0
        result = super().forward_backward(model, x, y, generator, sync=sync and not distill, scale=scale)
        if not self._drawn:
            self.last_subnets = self.draw(result.inputs, generator)
            self._drawn = True
        if distill:
            self._distill(model, result, sync)
        return result

    def replay(self, model, result: ObjectiveResult, *, sync: bool = True) -> ObjectiveResult:
        distill = self.kd_weight > 0
        again = super().replay(model, result, sync=sync and not distill)  # the teacher at the current weights
        if distill:
            self._distill(model, again, sync)
        return again

    def _distill(self, model, result: ObjectiveResult, sync: bool) -> None:
        """Forward and backward of every sub-network on ``result``'s rows, distilled towards its logits."""
        inputs, teacher, weights, context = live_rows(dataclasses.replace(result, targets=result.logits.detach(),
                                                                           weights=result.weights.detach()))
        net = unwrap(model)
        last = len(self.last_subnets) - 1
        for i, (width, resolution) in enumerate(self.last_subnets):
            with no_sync(model, not (sync and i == last)), set_width(net, width), _batch_statistics(net), \
                    enter(net, context):
                with self.autocast(inputs):  # sliced widths change the forward's structure: never compiled
                    logits = uncompiled(model)(resize(inputs, resolution, align_corners=self.align_corners))
                if logits.shape != teacher.shape:
                    raise ValueError(f"a sub-network's output has shape {tuple(logits.shape)} but the full network's "
                                     f"{tuple(teacher.shape)}: its classifier was sliced; name the classifier with "
                                     "maxup.slim.slimmable(model, keep=['name'])")
                self.backward(self.kd_weight * distillation_loss(logits, teacher, weights))
