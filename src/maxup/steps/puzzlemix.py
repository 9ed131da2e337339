"""Puzzle Mix (Kim, Choo, Song, ICML 2020) as a training step: the mixing needs the model's input gradients.

Per step (:meth:`PuzzleMix.evaluate`):

1. the objective gives the rows it trains on (as for :class:`~maxup.steps.Adversarial`): the
   augmented batch for ``ERM(augment)``; for ``MaxUp`` (select mode) the worst of m augmented
   copies, chosen in a no-grad pass with the buffers untouched;
2. one forward and backward of those rows *to the input*, with the model in eval mode
   (BatchNorm normalises with its running statistics and leaves them alone, as in the authors'
   ``main.py``), gives each pixel's saliency ``sqrt(mean_c g^2)``; the parameters' gradients
   are not touched;
3. one ``lam ~ Beta(alpha, alpha)`` per batch (or per sample), a partner permutation and a
   block grid drawn from ``blocks`` (only grids that divide the image); the block mask that
   keeps the most saliency under the prior and smoothness terms, the optional transport of
   salient blocks, the mixed rows and their labels by mask area
   (:func:`maxup.functional.puzzle.puzzle_mix`);
4. the step trains on the mixed rows (their soft cross-entropy).

The mixed rows are what the step returns (``result.inputs``), so under SAM (``sam+puzzlemix``)
the second pass at ``w + eps`` re-evaluates the same mixed rows: no new saliency, mask or draw.

Cost, in units of one ERM step: the saliency pass is one forward and one backward to the input
(about one ERM step), so about 2x, plus the mask solver and the transport (vectorised over the
batch; small at CIFAR scale); docs/methods/puzzlemix.md gives the measured ratio.

It cannot run in a DataLoader's ``collate_fn`` or as an augmentation of ``maxup.ERM`` /
``maxup.MaxUp``: it needs the model. Called like an augmentation, it says so.
"""
from __future__ import annotations

import dataclasses

import torch

from .._checks import check_int, check_int_tuple, check_positive
from .._modules import local
from ..functional import _random as R
from ..functional import soft_targets
from ..functional.puzzle import check_labels, gradient_saliency, puzzle_mix, valid_grids
from ..objectives import ERM, Objective, ObjectiveResult, augmented, frozen_buffers, plain
from ..registry import register
from .adversarial import eval_mode
from .base import Step, check_rows_objective

__all__ = ["NOT_AN_AUGMENTATION", "PuzzleDraw", "PuzzleMix"]

NOT_AN_AUGMENTATION = (
    "PuzzleMix is a training step, not a batch augmentation: its mask comes from the model's input gradients, so "
    "it cannot run where no model is (a DataLoader collate_fn, maxup.augment.Compose, the augment of maxup.ERM or "
    "maxup.MaxUp). Build it as maxup.steps.PuzzleMix(maxup.ERM(), optimizer) and call step(model, x, y), or use "
    "the method spec 'puzzlemix'; for a saliency-guided augmentation without a model, use SaliencyMix "
    "(maxup.augment.SaliencyMix, spec 'saliencymix')")


@dataclasses.dataclass
class PuzzleDraw:
    """The randomness of one call: the prior's ``lam`` ((1,) or (B,)), the partner ``perm`` and the ``grid``."""

    lam: torch.Tensor
    perm: torch.Tensor
    grid: int


@register("puzzlemix", "Puzzle Mix: a block mask from both images' gradient saliency and a smoothness term, salient "
          "blocks transported into place, label by mask area (needs the model: a step)", per_sample=True)
class PuzzleMix(Step):
    """Puzzle Mix (Kim, Choo, Song, ICML 2020, arXiv:2009.06962) around any objective.

    Args:
        objective: the rows to mix: ``maxup.ERM()`` (default), ``maxup.ERM(augment)``, or
            ``maxup.MaxUp(augment, m)`` in select mode (the worst copies are mixed).
        optimizer: the optimizer (required).
        alpha: the prior's ``lam ~ Beta(alpha, alpha)``, the expected share of each image.
        blocks: the grid sizes (blocks per side) drawn from uniformly each step, among those that
            divide the image's sides (the authors': 2, 4, 8, 16 on 32 x 32 images).
        n_labels: mask levels per block, ``{0, 1/(n-1), ..., 1}`` (the authors' CIFAR setting: 3).
        beta: weight of the label smoothness (the authors divide it by ``16 grid``).
        gamma: weight of the data smoothness (how badly the pixels meet at block borders).
        eta: weight of the binomial prior around ``lam``.
        neigh_size: side of the cells whose means are compared across block borders.
        transport: move each image's salient blocks into the region its mask keeps.
        t_eps: the transport's distance cost.
        t_size: the transport's block side in pixels (its grid is at least the mask's); None: the mask's grid.
        sweeps: sweeps of exact row and column updates of the mask solver (grids too large to enumerate).
        per_sample: one ``lam`` per sample (True) or per batch (False, the authors').
        num_classes: turns integer labels into soft targets (else read from the model's output).
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    >>> step = PuzzleMix(maxup.ERM(), opt, blocks=(2, 4, 8))
    >>> result = step(model, x, y)                   # result.inputs: the mixed rows it trained on
    >>> result.inputs.shape, step.last_draw.grid in (2, 4, 8)
    (torch.Size([8, 3, 32, 32]), True)
    """

    domain = "image"
    mixes_rows = True
    #: ``maxup tune`` searches the prior's alpha, as for the other mixing methods
    search_space = {"alpha": (0.1, 2.0, "log")}

    def __init__(self, objective: Objective | None = None, optimizer: torch.optim.Optimizer | None = None, *,
                 alpha: float = 1.0, blocks=(2, 4, 8, 16), n_labels: int = 3, beta: float = 1.2, gamma: float = 0.5,
                 eta: float = 0.2, neigh_size: int = 4, transport: bool = True, t_eps: float = 0.8,
                 t_size: int | None = 4, sweeps: int = 2, per_sample: bool = False, num_classes: int | None = None,
                 max_grad_norm: float | None = None, amp: str | None = None):
        if isinstance(objective, torch.nn.Module) and getattr(objective, "kind", None) == "augment":
            raise ValueError(f"objective is an augmentation ({type(objective).__name__}); PuzzleMix takes an "
                             f"objective: PuzzleMix(maxup.ERM({type(objective).__name__}(...)), optimizer)")
        if optimizer is None:
            raise ValueError("optimizer is required: " + NOT_AN_AUGMENTATION)
        self.alpha = check_positive("alpha", alpha)
        self.blocks = check_int_tuple("blocks", blocks)
        self.n_labels = check_labels(n_labels)
        self.beta = check_positive("beta", beta, allow_zero=True)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.eta = check_positive("eta", eta, allow_zero=True)
        self.neigh_size = check_int("neigh_size", neigh_size)
        if not isinstance(transport, bool):
            raise ValueError(f"transport must be true or false, got {transport!r}")
        self.transport = transport
        self.t_eps = check_positive("t_eps", t_eps, allow_zero=True)
        self.t_size = None if t_size is None else check_int("t_size", t_size)
        self.sweeps = check_int("sweeps", sweeps, minimum=0)
        if not isinstance(per_sample, bool):
            raise ValueError(f"per_sample must be true or false, got {per_sample!r}")
        self.per_sample = per_sample
        self.num_classes = None if num_classes is None else check_int("num_classes", num_classes)
        objective = check_rows_objective(objective, "puzzlemix")
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.last_draw: PuzzleDraw | None = None

    def __repr__(self) -> str:
        return (f"PuzzleMix({self.objective!r}, alpha={self.alpha}, blocks={self.blocks}, n_labels={self.n_labels}, "
                f"beta={self.beta}, gamma={self.gamma}, eta={self.eta}, neigh_size={self.neigh_size}, "
                f"transport={self.transport}, t_eps={self.t_eps}, t_size={self.t_size}, per_sample={self.per_sample})")

    def __call__(self, model, x, y, generator=None) -> ObjectiveResult:
        if not isinstance(model, torch.nn.Module):  # called as aug(x, y, generator): a collate_fn, ERM(augment)
            raise ValueError(NOT_AN_AUGMENTATION)
        return super().__call__(model, x, y, generator)

    # ------------------------------------------------------------------ the rows, the draw

    def rows(self, model, x, y, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``: the rows the objective trains on (ERM: its augmentation's draw, no forward;
        any other objective: one no-grad evaluation with the buffers untouched, whose rows are kept)."""
        objective = self.objective
        if type(objective) is ERM:
            if objective.augment is not None:
                inputs, targets, _ = augmented(objective.augment, x, y, generator)
                return inputs, targets
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"x must be a batch of images (B, C, H, W), got {type(x).__name__}")
            if not isinstance(y, torch.Tensor) or y.dim() < 1 or x.dim() < 1 or y.shape[0] != x.shape[0]:
                raise ValueError("y must hold one label or target row per image of x")
            return x, (soft_targets(y) if y.is_floating_point() else y)
        net = local(model)
        with torch.no_grad(), frozen_buffers(net):
            result = objective(net, x, y, generator)
        return result.inputs, result.targets

    def sample(self, inputs: torch.Tensor, generator=None) -> PuzzleDraw:
        """This call's randomness for a batch of ``inputs``: the grid (a host choice among the grids of
        ``blocks`` that divide the images), then ``lam`` and the permutation on the inputs' device."""
        h, w = inputs.shape[-2:]
        grids = valid_grids(self.blocks, h, w)
        if not grids:
            divisors = [g for g in range(2, min(h, w) + 1) if h % g == 0 and w % g == 0]
            raise ValueError(f"blocks={self.blocks} has no grid that divides the {h}x{w} images into equal blocks; "
                             f"pass blocks from {divisors or [1]}")
        grid = grids[R.host_randint(len(grids), 1, generator=generator)[0]]
        b = inputs.shape[0]
        k = b if self.per_sample else 1
        if self.alpha == 1.0:  # Beta(1, 1) is U(0, 1)
            lam = R.rand((k,), generator=generator, device=inputs.device)
        else:
            lam = R.beta(self.alpha, (k,), generator=generator, device=inputs.device)
        return PuzzleDraw(lam, R.randperm(b, generator=generator, device=inputs.device), grid)

    # ------------------------------------------------------------------ the loss

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        inputs, targets = self.rows(model, x, y, generator)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or not inputs.is_floating_point():
            what = (f"{inputs.dtype} {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor)
                    else type(inputs).__name__)
            raise ValueError(f"puzzlemix mixes images: x must be a floating-point batch (B, C, H, W), got {what}")
        net = local(model)  # the saliency pass needs no gradient synchronisation
        with eval_mode(net):
            saliency, logits = gradient_saliency(net, inputs.detach(), targets)
        if not targets.is_floating_point():
            targets = soft_targets(targets, self.num_classes or logits.shape[-1], check=False)
        draw = self.sample(inputs, generator)
        self.last_draw = draw
        with torch.autocast(inputs.device.type, enabled=False):  # the energy and the mixing in full precision
            mixed, mixed_targets, _, _ = puzzle_mix(
                inputs.detach(), targets.detach().float(), saliency, draw.lam, draw.perm, draw.grid,
                n_labels=self.n_labels, beta=self.beta, gamma=self.gamma, eta=self.eta, neigh_size=self.neigh_size,
                transport=self.transport, t_eps=self.t_eps, t_size=self.t_size, sweeps=self.sweeps)
        return plain(model, mixed, mixed_targets)
