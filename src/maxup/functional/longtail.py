"""Pure operations of the long-tail methods: logit adjustment and Balanced Softmax, CMO's paste, bilateral mixup's
class-wise temperatures, and class distances from class-probability statistics.

Every function takes its randomness as arguments or draws it from a ``torch.Generator`` on the generator's
device; none edits its inputs or reads a device value back to the host. The classes that draw the randomness
and hold the training set are in :mod:`maxup.augment.longtail`.

- :func:`log_prior` and :class:`LogitTransform`: the loss-form logit adjustment of Menon et al. (ICLR 2021),
  ``logits + tau * log(pi)`` during training, which with ``tau = 1`` is Balanced Softmax (Ren et al.,
  NeurIPS 2020); and DBN-Mix's class-wise temperature ``logits / phi`` (Baik et al. 2024).
- :func:`paste_boxes`: CMO (Park et al., CVPR 2022) pastes a box of a second batch onto the first, label by area.
- :func:`class_probability_matrix`, :func:`class_distances`, :func:`partner_weights`: the class distances of
  class-distance partner selection (after Fujii et al. 2022; this project's reading, see the card).

>>> log_prior(torch.tensor([90, 10]))
tensor([-0.1054, -2.3026])
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from . import _random as R
from .context import ForwardContext
from .mixing import _bcast, _box_weight, _check_boxes, box_area

__all__ = [
    "LogitTransform",
    "bilateral_mix",
    "class_distances",
    "class_probability_matrix",
    "class_temperatures",
    "check_counts",
    "draw_indices",
    "log_prior",
    "partner_weights",
    "paste_boxes",
    "uniform_within_class",
]

#: added to ``pi ** tau`` inside the log, as the logit-adjustment authors do: a class without training samples
#: gets a large negative but finite bias (a soft target of 0 times it is 0, not NaN)
PRIOR_EPS = 1e-12


def check_counts(class_counts, num_classes: int | None = None, name: str = "class_counts") -> torch.Tensor:
    """``class_counts`` as a (C,) float64 CPU tensor of non-negative finite numbers with a positive sum (and
    ``num_classes`` entries when given); a ValueError naming ``name`` otherwise."""
    try:
        counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be the training samples per class, a list or tensor of C numbers, got "
                         f"{class_counts!r}") from None
    if counts.numel() < 2 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()) \
            or float(counts.sum()) <= 0:
        raise ValueError(f"{name} must hold at least 2 non-negative finite numbers with a positive sum (samples per "
                         f"class), got {counts.tolist()}")
    if num_classes is not None and counts.numel() != int(num_classes):
        raise ValueError(f"{name} has {counts.numel()} entries but num_classes is {num_classes}: give one count per "
                         "class")
    return counts


def log_prior(class_counts, tau: float = 1.0) -> torch.Tensor:
    """``log(pi ** tau + 1e-12)``, ``pi = n / sum(n)``: the logit-adjusted loss's additive bias (Menon et al.,
    the authors' ``build_loss_fn``), float32 (C,).

    With ``tau = 1`` adding it to the logits is Balanced Softmax (Ren et al.), whose code adds ``log(n)``: the
    same up to a constant per row, which the softmax ignores. ``tau = 0`` is plain cross-entropy.
    """
    tau = _check_tau(tau)
    counts = check_counts(class_counts)
    prior = counts / counts.sum()
    return torch.log(prior ** tau + PRIOR_EPS).float()


def class_temperatures(class_counts, epsilon: float = 0.6, eta: float = 7.0) -> torch.Tensor:
    """DBN-Mix's class-wise temperatures ``phi`` (float32 (C,)): the logits train as ``logits / phi``.

    ``g_c = epsilon * C * n_c / n_max + (1 - epsilon)``, ``phi_c = (max_k g_k / g_c) ** (1 / eta)``: 1 for the
    largest class, larger for smaller classes (their logits are shrunk, so the loss pushes them up). This is the
    authors' ``MixLoss`` (github.com/soony1213/DBN-Mix, ``losses.py``). ``epsilon = 0`` gives 1 everywhere.

    >>> class_temperatures([100, 10], epsilon=0.5, eta=1.0)
    tensor([1.0000, 2.5000])
    """
    epsilon = _check_number("epsilon", epsilon, low=0.0, high=1.0)
    eta = _check_number("eta", eta, low=0.0, open_low=True)
    counts = check_counts(class_counts)
    g = epsilon * counts.numel() * (counts / counts.max()) + (1.0 - epsilon)
    if bool((g <= 0).any()):  # epsilon = 1 and an empty class
        raise ValueError("class_temperatures: epsilon=1 with a class of no training samples gives it an infinite "
                         "temperature; use epsilon < 1 or drop the empty class")
    return ((g.max() / g) ** (1.0 / eta)).float()


class LogitTransform(ForwardContext):
    """A forward context that trains on ``model(x) / scale + bias`` (per-class (C,) tensors; None: 1 or 0).

    Logit adjustment and Balanced Softmax add a bias, DBN-Mix's temperatures divide. Every row gets the same
    transform, so the context does not couple rows; :meth:`rows`, :meth:`blank` (MaxUp's clean copy trains under
    the same loss) and :meth:`stack` return it as it is. It hooks the output of the module it is entered on,
    after that module's own forward (and its ``torch.compile`` wrapper, which it does not recompile). The model
    must return a tensor whose last dimension holds the classes.
    """

    recompiles = False

    def __init__(self, *, scale: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        self.scale = scale
        self.bias = bias

    @property
    def num_classes(self) -> int | None:
        ref = self.bias if self.bias is not None else self.scale
        return None if ref is None else ref.shape[-1]

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits / scale + bias`` (a new tensor)."""
        if not isinstance(logits, torch.Tensor):
            raise ValueError(f"a logit transform (logit_adjust, balanced_softmax, bilateral_mixup) needs a model that "
                             f"returns a logits tensor, got {type(logits).__name__}")
        classes = self.num_classes
        if classes is not None and logits.shape[-1] != classes:
            raise ValueError(f"the model returns {logits.shape[-1]} logits per sample but the class counts hold "
                             f"{classes} classes: give num_classes / class_counts of the model's output")
        out = logits if self.scale is None else logits / self.scale.to(logits.dtype)
        return out if self.bias is None else out + self.bias

    @contextlib.contextmanager
    def apply(self, model: nn.Module):
        handle = model.register_forward_hook(lambda _module, _inputs, output: self.transform(output))
        try:
            yield
        finally:
            handle.remove()

    def blank(self, n: int, device=None) -> LogitTransform:
        return self

    @classmethod
    def stack(cls, contexts: Sequence[LogitTransform]) -> LogitTransform:
        return contexts[0]

    def rows(self, index: torch.Tensor) -> LogitTransform:
        return self

    def __repr__(self) -> str:
        return f"LogitTransform(scale={self.scale is not None}, bias={self.bias is not None})"


def paste_boxes(x: torch.Tensor, targets: torch.Tensor, source: torch.Tensor, source_targets: torch.Tensor,
                boxes: torch.Tensor):
    """CMO's paste: ``source`` inside each box, ``x`` (the background) elsewhere; labels by area.

    ``lam = 1 - area(box) / (H W)`` (the clipped box, as CutMix and the authors' ``cifar_train.py``) and
    ``t = lam * targets + (1 - lam) * source_targets``. Returns ``(x_mix, t_mix, lam)``; nothing is edited.
    """
    if source.shape != x.shape:
        raise ValueError(f"source must have the batch's shape {tuple(x.shape)}, got {tuple(source.shape)}")
    if source_targets.shape != targets.shape:
        raise ValueError(f"source_targets must have the targets' shape {tuple(targets.shape)}, got "
                         f"{tuple(source_targets.shape)}")
    h, w = x.shape[-2:]
    _check_boxes(boxes, h, w)
    boxes = boxes.to(x.device)
    lam = 1.0 - box_area(boxes).expand(x.shape[0]) / (h * w)
    mask = _box_weight(boxes, h, w, x.dtype)[:, None]
    out = x.clone().lerp_(source.to(x.dtype), mask)
    weight = lam.to(targets.dtype)[:, None]
    return out, torch.lerp(source_targets.to(targets.dtype), targets, weight), lam


def bilateral_mix(x: torch.Tensor, targets: torch.Tensor, x_b: torch.Tensor, targets_b: torch.Tensor, lam):
    """Bilateral mixup: ``lam * x + (1 - lam) * x_b`` and the targets alike (``x`` from the uniform sampler,
    ``x_b`` from the re-balanced one; ``lam`` a float or (B,)). Returns ``(x_mix, t_mix)``."""
    if x_b.shape != x.shape or targets_b.shape != targets.shape:
        raise ValueError(f"the re-balanced batch must match the batch: inputs {tuple(x.shape)} and targets "
                         f"{tuple(targets.shape)}, got {tuple(x_b.shape)} and {tuple(targets_b.shape)}")
    if isinstance(lam, numbers.Real):
        lam = torch.full((x.shape[0],), float(lam), dtype=x.dtype, device=x.device)
    lam = lam.to(device=x.device, dtype=x.dtype).expand(x.shape[0])
    mixed = torch.lerp(x_b.to(x.dtype), x, _bcast(lam, x))
    return mixed, torch.lerp(targets_b.to(targets.dtype), targets, lam.to(targets.dtype)[:, None])


def draw_indices(probabilities: torch.Tensor, n: int, *, generator=None, device=None) -> torch.Tensor:
    """``n`` indices drawn with replacement from ``probabilities`` ((N,); or (B, K): one per row, ``n`` ignored),
    on the generator's device (``probabilities`` must be there), then moved to ``device``."""
    if probabilities.dim() == 2:
        return torch.multinomial(probabilities, 1, replacement=True, generator=generator).squeeze(1).to(device)
    return torch.multinomial(probabilities, int(n), replacement=True, generator=generator).to(device)


def class_probability_matrix(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """``(P, n)``: ``P[c]`` the mean of the rows of ``probs`` ((N, C) class probabilities) whose label is ``c``, and
    ``n[c]`` how many there were; a class without rows keeps a row of zeros. Float64."""
    if probs.dim() != 2 or probs.shape[1] != num_classes or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be (N, {num_classes}) and labels (N,), got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device)
    sums.index_add_(0, labels.long(), probs.double())
    n = torch.bincount(labels.long(), minlength=num_classes)[:num_classes].double()
    return sums / n.clamp_min(1.0)[:, None], n


def class_distances(matrix: torch.Tensor) -> torch.Tensor:
    """``D[a, b] = || P[a] - P[b] ||_2``: the Euclidean distance between two classes' mean probability vectors
    (0 on the diagonal; at most sqrt(2))."""
    diff = matrix[:, None, :] - matrix[None, :, :]
    return diff.pow(2).sum(-1).sqrt()


def partner_weights(distances: torch.Tensor, prior: torch.Tensor, *, temperature: float, prefer: str = "near"
                    ) -> torch.Tensor:
    """(C, C) partner-class probabilities, row ``a`` for a sample of class ``a``:
    ``w[a, b] ∝ prior[b] exp(-D[a, b] / T)`` (``prefer="near"``; ``"far"``: ``exp(+D / T)``), ``b != a``, and 0
    where ``prior`` is 0 (a class without training samples). A class with no other class to pair with keeps
    itself."""
    temperature = _check_number("temperature", temperature, low=0.0, open_low=True)
    if prefer not in ("near", "far"):
        raise ValueError(f"prefer must be 'near' (partners from the closest classes) or 'far', got {prefer!r}")
    sign = -1.0 if prefer == "near" else 1.0
    logits = sign * distances.double() / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values  # exp never overflows
    weights = torch.exp(logits) * prior.double()[None, :]
    eye = torch.eye(weights.shape[0], dtype=torch.bool, device=weights.device)
    others = weights.masked_fill(eye, 0.0)
    alone = others.sum(1, keepdim=True) <= 0
    weights = torch.where(alone, weights, others)
    return weights / weights.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _check_tau(tau) -> float:
    return _check_number("tau", tau, low=0.0)


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                  open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (open_low and value == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high:g}, got {value!r}")
    return value


def uniform_within_class(classes: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, *,
                         generator=None) -> torch.Tensor:
    """For each entry of ``classes`` ((B,) long), a training-sample index drawn uniformly among that class's
    samples: ``order[starts[c] + floor(u * counts[c])]``, ``order`` the sample indices sorted by class (all on
    one device). Every class in ``classes`` must have samples."""
    u = R.rand(classes.shape, generator=generator, device=classes.device, dtype=torch.float64)
    n = counts[classes]
    offset = torch.minimum((u * n).long(), (n - 1).clamp_min(0).long())
    return order[starts[classes] + offset]
