"""Methods for long-tailed classes: logit adjustment and Balanced Softmax, CMO, bilateral mixup with class-wise
temperatures (DBN-Mix), and class-distance partner selection.

They read the training set: the class counts (``class_counts``, for the losses) or the samples themselves
(``train``, for the terms that draw a second, re-weighted batch). Both are filled in by the builder
(:meth:`maxup.methods.Spec.build_step` with ``train=``, which :func:`maxup.fit` and ``maxup train`` pass), so a
spec names none of them: ``maxup(m=4)+cmo+balanced_softmax``.

- ``logit_adjust(tau)`` / ``balanced_softmax``: the loss adds ``tau * log(pi_c)`` to the logits during training
  (a forward context: every forward of the batch, MaxUp's selection and SAM's second pass included, sees the
  adjusted logits; evaluation does not). They compose with the mixing augmentations (soft targets) and with MaxUp
  (the worst of m copies under the adjusted loss).
- ``cmo``: a CutMix box of a minority-weighted draw of the training set pasted onto the batch (Park et al. 2022).
- ``bilateral_mixup``: each sample blended with one drawn by the reversed sampler, and the logits divided by
  class-wise temperatures in training (DBN-Mix, Baik et al. 2024, single branch).
- ``class_distance_mix``: each sample mixed with a training sample of a class drawn by class distance, the
  distances from the model's mean class probabilities, recomputed at the start of every epoch (after Fujii et
  al. 2022; this project's reading).

The draws come from the generator the Trainer holds, on the data's device; the training set is copied to that
device once. Terms that follow the epoch define ``on_epoch_start(epoch, epochs, model)``, which the Trainer
calls at the start of every epoch (:func:`maxup.train.trainer.epoch_hooks`); in your own loop call it yourself.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as MF
from .._checks import check_int, check_positive
from ..data.sampling import class_probabilities, sample_probabilities, sampler_exponent
from ..functional import _random as R
from ..functional.longtail import (
    LogitTransform,
    _check_tau,
    bilateral_mix,
    check_counts,
    class_distances,
    class_probability_matrix,
    class_temperatures,
    draw_indices,
    log_prior,
    partner_weights,
    paste_boxes,
    uniform_within_class,
)
from ..registry import register
from .base import Augmentation

__all__ = ["BalancedSoftmax", "BilateralMixup", "CMO", "ClassDistanceMix", "LogitAdjust", "TrainingSet"]


class TrainingSet:
    """The training set a term draws from: ``(x, y)`` kept on the CPU and copied to a device once, the samples
    sorted by class, and the per-sample probabilities of each sampler (:mod:`maxup.data.sampling`).

    ``train`` is a :class:`maxup.data.TensorData` or an ``(x, y)`` pair; ``name`` is the term, for errors.
    """

    def __init__(self, train, num_classes: int | None, name: str):
        if train is None:
            raise ValueError(f"{name} draws from the training set: pass train=(x, y) (a maxup.data.TensorData or a "
                             "pair of tensors); maxup.fit and maxup train fill it in, and so does "
                             "maxup.methods.build_step(spec, ..., train=data)")
        x, y = (train.x, train.y) if hasattr(train, "x") and hasattr(train, "y") else _pair(train, name)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or y.dim() != 1 or x.dim() < 2 \
                or x.shape[0] != y.shape[0] or x.shape[0] == 0 or not x.is_floating_point() \
                or y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"{name}: train must hold float inputs (N, ...) and integer class labels (N,), N >= 1")
        self.x = x.detach().cpu()
        self.y = y.detach().cpu().long()
        if int(self.y.min()) < 0:
            raise ValueError(f"{name}: the training labels must be 0..num_classes-1, found {int(self.y.min())}")
        largest = int(self.y.max()) + 1
        self.num_classes = largest if num_classes is None else int(num_classes)
        if largest > self.num_classes:
            raise ValueError(f"{name}: the training set holds label {largest - 1}, out of range for "
                             f"num_classes={self.num_classes}")
        self.counts = torch.bincount(self.y, minlength=self.num_classes)
        self.order = torch.argsort(self.y, stable=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self._devices: dict[str, tuple] = {}
        self._probs: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def on(self, device) -> tuple[torch.Tensor, ...]:
        """``(x, y, order, starts, counts)`` on ``device`` (copied on the first call only)."""
        key = str(torch.device(device))
        if key not in self._devices:
            self._devices[key] = tuple(t.to(device) for t in (self.x, self.y, self.order, self.starts, self.counts))
        return self._devices[key]

    def probabilities(self, sampler, device) -> torch.Tensor:
        """The (N,) float64 probability of each sample under ``sampler`` on ``device``."""
        key = (repr(sampler), str(torch.device(device)))
        if key not in self._probs:
            self._probs[key] = sample_probabilities(self.y, sampler, self.num_classes).to(device)
        return self._probs[key]

    def draw(self, n: int, sampler, generator, device) -> torch.Tensor:
        """``n`` sample indices drawn by ``sampler`` (with replacement) from ``generator``, on ``device``."""
        where = generator.device if generator is not None else torch.device(device)
        return draw_indices(self.probabilities(sampler, where), n, generator=generator, device=device)

    def batch(self, index: torch.Tensor, like: torch.Tensor, targets: torch.Tensor, name: str):
        """The samples ``index`` as a batch shaped like ``like`` and their one-hot targets like ``targets``."""
        x, y = self.on(like.device)[:2]
        if x.shape[1:] != like.shape[1:]:
            raise ValueError(f"{name}: the training samples have shape {tuple(x.shape[1:])} but the batch "
                             f"{tuple(like.shape[1:])}; an augmentation before {name} must keep the input shape")
        if targets.shape[-1] != self.num_classes:
            raise ValueError(f"{name}: the targets have {targets.shape[-1]} classes but the training set "
                             f"{self.num_classes}")
        source = x.index_select(0, index).to(like.dtype)
        labels = y.index_select(0, index)  # one-hot by scatter: F.one_hot would check the labels on the host
        onehot = torch.zeros(labels.shape[0], self.num_classes, dtype=targets.dtype, device=targets.device)
        return source, onehot.scatter_(1, labels[:, None].to(targets.device), 1.0)


def _pair(train, name: str):
    if isinstance(train, (tuple, list)) and len(train) == 2:
        return tuple(torch.as_tensor(v) for v in train)
    raise ValueError(f"{name}: train must be a maxup.data.TensorData or an (x, y) pair of tensors, got "
                     f"{type(train).__name__}")


def _check_sampler(sampler) -> str | float:
    sampler_exponent(sampler, "sampler")
    return sampler


def _lambdas(alpha: float, k: int, p: float, applied, generator, device) -> torch.Tensor:
    """(k,) ``lam ~ Beta(alpha, alpha)`` (U(0, 1) for alpha = 1), 1 where ``applied`` is False."""
    lam = R.rand((k,), generator=generator, device=device) if alpha == 1.0 else \
        R.beta(alpha, (k,), generator=generator, device=device)
    return lam if p >= 1.0 else torch.where(applied, lam, torch.ones_like(lam))


# ---------------------------------------------------------------------------------------- the losses


@register("logit_adjust", "logit-adjusted loss (Menon et al.): tau * log of the training class prior added to the "
          "logits in training (tau=1: Balanced Softmax); with mixing and under MaxUp",
          search_space={"tau": (0.5, 2.0)})
class LogitAdjust(Augmentation):
    """The logit-adjusted loss (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021, loss form):
    training minimises the cross-entropy of ``logits + tau * log(pi)`` (``log(pi ** tau + 1e-12)`` exactly, as the
    authors' ``build_loss_fn``), ``pi`` the training class prior; prediction uses the plain logits.

    It changes no input: :meth:`draw` returns the batch, its targets and a :class:`LogitTransform` context that
    every forward of the batch enters (:mod:`maxup.functional.context`), so it composes with the mixing
    augmentations (any soft targets) and with MaxUp (copies compared under the adjusted loss). A spec holds at
    most one term that acts in the forward: not with ``manifold_mixup`` or ``bilateral_mixup``.

    Args:
        tau: the prior's exponent (the paper's 1.0; 0 is plain cross-entropy).
        class_counts: training samples per class (filled in from the training labels by the builder).
        num_classes: the number of classes (defaults to ``len(class_counts)``).

    >>> aug = LogitAdjust(class_counts=[90, 10])
    >>> x_same, t, context = aug.draw(torch.zeros(2, 3), torch.tensor([0, 1]))
    >>> context.transform(torch.zeros(2, 2))
    tensor([[-0.1054, -2.3026],
            [-0.1054, -2.3026]])
    """

    domain = "tensor"
    random = False
    context = "rows"
    filled = ("num_classes", "model", "class_counts")

    def __init__(self, tau: float = 1.0, *, class_counts=None, num_classes: int | None = None):
        super().__init__(num_classes=num_classes)
        if class_counts is None:
            raise ValueError(f"{type(self).__name__} needs the training class counts: class_counts=[n_0, ..., "
                             "n_{C-1}]; maxup.fit and maxup train fill them in from the training labels, and so does "
                             "maxup.methods.build_step(spec, ..., train=data)")
        self.class_counts = check_counts(class_counts, num_classes)
        self.num_classes = self.num_classes or self.class_counts.numel()
        self.tau = _check_tau(tau)
        self.bias = log_prior(self.class_counts, self.tau)
        self._on: dict[str, torch.Tensor] = {}

    def _bias(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._on:
            self._on[key] = self.bias.to(device)
        return self._on[key]

    def apply(self, x, t, generator):
        return x, t

    def apply_context(self, x, t, generator):
        return x, t, LogitTransform(bias=self._bias(x.device))

    def _options(self):
        return {"tau": self.tau, "classes": self.num_classes}


@register("balanced_softmax", "Balanced Softmax (Ren et al.): log of the training class counts added to the logits "
          "in training (logit_adjust with tau=1); with mixing and under MaxUp")
class BalancedSoftmax(LogitAdjust):
    """Balanced Softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition", NeurIPS 2020):
    the cross-entropy of ``logits + log(n_c)``. The authors' code adds ``log(n_c)``; we add
    ``log(n_c / N + 1e-12)``, the same up to a constant per row (the softmax ignores it) and 1e-12: this is
    :class:`LogitAdjust` with ``tau = 1``.

    >>> BalancedSoftmax(class_counts=[90, 10]).bias
    tensor([-0.1054, -2.3026])
    """

    def __init__(self, *, class_counts=None, num_classes: int | None = None):
        super().__init__(1.0, class_counts=class_counts, num_classes=num_classes)

    def _options(self):
        return {"classes": self.num_classes}


# ---------------------------------------------------------------------------------------- CMO


@register("cmo", "CMO: a CutMix box from a minority-weighted draw of the training set (class-balanced, as the "
          "authors' code) pasted onto the batch, label by area; on from epoch start_epoch (0-based) to the last "
          "end_epochs", per_sample=True)
class CMO(Augmentation):
    """CMO (Park et al., "The Majority Can Help the Minority: Context-rich Minority Oversampling for Long-tailed
    Classification", CVPR 2022): paste a CutMix box cut from a minority-weighted sample onto each image of the
    batch (the instance-balanced background), labels by area.

    For each sample (``per_sample``; the authors: one draw per batch) with probability ``p``: ``lam ~ Beta(alpha,
    alpha)``, a box of area ``1 - lam`` (CutMix's, clipped, ``lam`` recomputed), a source sample drawn from the
    training set by ``sampler`` (with replacement), ``x~ = source`` inside the box, ``x`` outside, ``t~ = lam t +
    (1 - lam) onehot(y_source)``. The authors' sampler weights each sample by ``1 / n_c ** r`` with ``r = 1``, so
    every class is equally likely: ``sampler="class"``; ``"reversed"`` makes a class's chance inversely
    proportional to its size.

    The authors apply CMO only in epochs ``start < e < E - end`` (0-based, ``start = end = 3``): here
    ``start_epoch <= e < epochs - end_epochs`` with ``start_epoch = 4``. The epoch comes from
    :meth:`on_epoch_start`, which the Trainer calls; an instance never told the epoch applies CMO always.

    Args:
        alpha: ``Beta(alpha, alpha)`` for ``lam`` (the authors' 1.0: uniform).
        sampler: how the pasted sources are drawn (:mod:`maxup.data.sampling`): ``"class"`` (the authors'),
            ``"reversed"``, ``"sqrt"``, ``"instance"`` or an exponent ``q`` (class chance ``∝ n_c ** q``).
        start_epoch: the first epoch (0-based) with CMO.
        end_epochs: the last this many epochs train without CMO.
        per_sample: one ``lam``, box and coin per sample; False (the class default, the authors'): per batch.
        train: the training set (filled in by the builder).
        num_classes: for integer labels.
        p: probability that a sample (or the batch) gets a box (the authors' ``mixup_prob`` 0.5).

    >>> data = (torch.rand(20, 1, 8, 8), torch.tensor([0] * 18 + [1] * 2))
    >>> aug = CMO(train=data, num_classes=2, p=1.0)
    >>> x_mix, t_mix = aug(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    >>> t_mix.shape
    torch.Size([4, 2])
    """

    domain = "image"
    mixes_rows = True
    filled = ("num_classes", "model", "train")
    search_space = {"alpha": (0.1, 2.0, "log"), "p": (0.2, 1.0)}

    def __init__(self, alpha: float = 1.0, *, sampler="class", start_epoch: int = 4, end_epochs: int = 3,
                 per_sample: bool = False, train=None, num_classes: int | None = None, p: float = 0.5):
        super().__init__(num_classes=num_classes, p=p)
        self.alpha = check_positive("alpha", alpha)
        self.sampler = _check_sampler(sampler)
        self.start_epoch = check_int("start_epoch", start_epoch, minimum=0)
        self.end_epochs = check_int("end_epochs", end_epochs, minimum=0)
        self.per_sample = bool(per_sample)
        self.data = TrainingSet(train, num_classes, "cmo")
        self.num_classes = self.num_classes or self.data.num_classes
        self.epoch: int | None = None
        self.epochs: int | None = None

    def on_epoch_start(self, epoch: int, epochs: int, model: nn.Module | None = None) -> None:
        """The Trainer's call at the start of each epoch (0-based ``epoch`` of ``epochs``): sets the schedule."""
        self.epoch, self.epochs = int(epoch), int(epochs)

    @property
    def active(self) -> bool:
        """Whether CMO applies in the current epoch (always, when no epoch was given)."""
        if self.epoch is None:
            return True
        return self.start_epoch <= self.epoch < self.epochs - self.end_epochs

    def apply(self, x, t, generator):
        if not self.active:
            return x, t
        n, (h, w) = x.shape[0], x.shape[-2:]
        k = n if self.per_sample else 1
        lam = _lambdas(self.alpha, k, self.p, self._applied(k, generator, x.device), generator, x.device)
        boxes = MF.sample_boxes(1.0 - lam, h, w, generator=generator, device=x.device).expand(n, 4)
        index = self.data.draw(n, self.sampler, generator, x.device)
        source, source_targets = self.data.batch(index, x, t, "cmo")
        out, targets, _ = paste_boxes(x, t, source, source_targets, boxes)
        return out, targets

    def _options(self):
        return {"alpha": self.alpha, "sampler": self.sampler, "start_epoch": self.start_epoch,
                "end_epochs": self.end_epochs, "per_sample": self.per_sample, "p": self.p}


# ---------------------------------------------------------------------------------------- bilateral mixup


@register("bilateral_mixup", "bilateral mixup with class-wise temperatures (DBN-Mix, single branch): each sample "
          "blended with one drawn by the reversed sampler, and the logits divided by per-class temperatures in "
          "training", per_sample=True)
class BilateralMixup(Augmentation):
    """Bilateral mixup with class-conditional temperature scaling (Baik, Yoon, Choi, "DBN-Mix: Training Dual Branch
    Network Using Bilateral Mixup Augmentation for Long-Tailed Visual Recognition", Pattern Recognition 2024,
    arXiv:2207.02173; the dual-branch set-up of BBN, Zhou et al., CVPR 2020), on one branch and without BBN's
    cumulative-learning schedule.

    Each sample of the batch (the loader's uniform, instance-balanced order) is blended with a sample drawn from
    the training set by the re-balanced ``sampler``: ``x~ = lam x + (1 - lam) x_b``, ``t~ = lam t + (1 - lam)
    onehot(y_b)``, ``lam ~ Beta(alpha, alpha)``; and in training the logits are divided by the class-wise
    temperatures ``phi`` of :func:`maxup.functional.longtail.class_temperatures` (a forward context, like
    :class:`LogitAdjust`; ``epsilon = 0`` turns it off).

    Args:
        alpha: ``Beta(alpha, alpha)`` (the authors' 1.0).
        sampler: the re-balanced sampler: ``"reversed"`` (class chance ``∝ 1 / n_c``, BBN's; the default),
            ``"class"`` (the authors' released CIFAR scripts), ``"sqrt"`` or an exponent.
        epsilon, eta: the temperatures' shape (the authors' CIFAR settings: 0.6, and 7 on CIFAR-100, 3 on
            CIFAR-10).
        per_sample: one ``lam`` per sample; False (the class default, the authors'): one per batch.
        train: the training set (filled in by the builder).
        num_classes: for integer labels.
        p: probability that a sample (or the batch) is blended.

    >>> data = (torch.rand(20, 3), torch.tensor([0] * 18 + [1] * 2))
    >>> aug = BilateralMixup(train=data, num_classes=2)
    >>> x_mix, t_mix, context = aug.draw(torch.rand(4, 3), torch.zeros(4, dtype=torch.long))
    >>> context.scale
    tensor([1.0000, 1.1699])
    """

    domain = "tensor"
    mixes_rows = True
    context = "rows"
    filled = ("num_classes", "model", "train")
    search_space = {"alpha": (0.1, 2.0, "log"), "eta": (1.0, 10.0, "log")}

    def __init__(self, alpha: float = 1.0, *, sampler="reversed", epsilon: float = 0.6, eta: float = 7.0,
                 per_sample: bool = False, train=None, num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.alpha = check_positive("alpha", alpha)
        self.sampler = _check_sampler(sampler)
        self.per_sample = bool(per_sample)
        self.data = TrainingSet(train, num_classes, "bilateral_mixup")
        self.num_classes = self.num_classes or self.data.num_classes
        self.temperatures = class_temperatures(self.data.counts, epsilon, eta)
        self.epsilon, self.eta = float(epsilon), float(eta)
        self._on: dict[str, torch.Tensor] = {}

    def _scale(self, device) -> torch.Tensor | None:
        if self.epsilon == 0.0:
            return None
        key = str(device)
        if key not in self._on:
            self._on[key] = self.temperatures.to(device)
        return self._on[key]

    def apply(self, x, t, generator):
        return self.apply_context(x, t, generator)[:2]

    def apply_context(self, x, t, generator):
        n = x.shape[0]
        k = n if self.per_sample else 1
        lam = _lambdas(self.alpha, k, self.p, self._applied(k, generator, x.device), generator, x.device)
        index = self.data.draw(n, self.sampler, generator, x.device)
        x_b, t_b = self.data.batch(index, x, t, "bilateral_mixup")
        mixed, targets = bilateral_mix(x, t, x_b, t_b, lam)
        scale = self._scale(x.device)
        return mixed, targets, None if scale is None else LogitTransform(scale=scale)

    def _options(self):
        return {"alpha": self.alpha, "sampler": self.sampler, "epsilon": self.epsilon, "eta": self.eta,
                "per_sample": self.per_sample, "p": self.p}


# ---------------------------------------------------------------------------------------- class distances


@register("class_distance_mix", "class-distance partner selection: each sample mixed (Mixup or CutMix) with a "
          "training sample of a class drawn by distance between the classes' mean predicted probabilities, "
          "recomputed every epoch (this project's reading of Fujii et al.)", per_sample=True)
class ClassDistanceMix(Augmentation):
    """Mixing partners chosen by class distance (after Fujii, Ishii, Kozuka, Hirakawa, Yamashita, Fujiyoshi,
    "Data Augmentation by Selecting Mixed Classes Considering Distance Between Classes", arXiv:2209.05122, 2022).
    Their exact rule was not available to us; this is this project's reading of the abstract.

    Statistics (at the start of every epoch, :meth:`on_epoch_start`, or :meth:`update_statistics`): the model in
    eval mode predicts class probabilities for the training samples (``stat_per_class`` of each class, or all);
    ``P[c]`` is the mean probability vector of the samples of class ``c`` and ``D[a, b] = ||P[a] - P[b]||_2``.
    Before the first update every distance is 0 (partners uniform over the other classes).

    Per call: a sample's class ``a`` is its target's largest entry; its partner class ``b != a`` is drawn with
    probability ``∝ prior_b exp(-D[a, b] / temperature)`` (``prefer="near"``: confusable classes; ``"far"``:
    ``exp(+D / T)``), ``prior`` the class chances of ``sampler`` (``"class"``: uniform); the partner is a
    uniformly drawn training sample of class ``b``; then Mixup (``lam x + (1 - lam) x_p``) or CutMix (a box of the
    partner), ``lam ~ Beta(alpha, alpha)``, labels alike.

    Args:
        alpha: ``Beta(alpha, alpha)``.
        base: ``"mixup"`` (any float input) or ``"cutmix"`` (images).
        prefer: ``"near"`` or ``"far"`` partner classes.
        temperature: how sharply the distance decides (distances lie in [0, sqrt(2)]).
        sampler: the prior over partner classes (:mod:`maxup.data.sampling`).
        stat_per_class: samples of each class the statistics use (the first in data order); None: all.
        per_sample: one ``lam`` (and box) per sample; False: one per batch.
        train: the training set (filled in by the builder).
        num_classes: for integer labels.
        p: probability that a sample is mixed.
    """

    domain = "tensor"
    mixes_rows = True
    filled = ("num_classes", "model", "train")
    search_space = {"alpha": (0.1, 2.0, "log"), "temperature": (0.02, 1.0, "log")}

    def __init__(self, alpha: float = 1.0, *, base: str = "mixup", prefer: str = "near", temperature: float = 0.2,
                 sampler="class", stat_per_class: int | None = None, per_sample: bool = False, train=None,
                 num_classes: int | None = None, p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        self.alpha = check_positive("alpha", alpha)
        if base not in ("mixup", "cutmix"):
            raise ValueError(f"base must be 'mixup' (any float input) or 'cutmix' (images), got {base!r}")
        self.base = base
        if base == "cutmix":
            self.domain = "image"
        if prefer not in ("near", "far"):
            raise ValueError(f"prefer must be 'near' (partners from the closest classes) or 'far', got {prefer!r}")
        self.prefer = prefer
        self.temperature = check_positive("temperature", temperature)
        self.sampler = _check_sampler(sampler)
        if stat_per_class is not None:
            check_int("stat_per_class", stat_per_class)
        self.stat_per_class = stat_per_class
        self.per_sample = bool(per_sample)
        self.data = TrainingSet(train, num_classes, "class_distance_mix")
        self.num_classes = c = self.num_classes or self.data.num_classes
        self.prior = class_probabilities(self.data.counts, self.sampler)
        self.matrix = torch.zeros(c, c, dtype=torch.float64)
        self.distances = torch.zeros(c, c, dtype=torch.float64)
        self.stat_index = self._stat_index()
        self._weights: dict[str, torch.Tensor] = {}

    def _stat_index(self) -> torch.Tensor:
        if self.stat_per_class is None:
            return torch.arange(len(self.data))
        rank = torch.empty_like(self.data.order)
        rank[self.data.order] = torch.arange(len(self.data)) - self.data.starts[self.data.y[self.data.order]]
        return torch.nonzero(rank < self.stat_per_class).flatten()

    def on_epoch_start(self, epoch: int, epochs: int, model: nn.Module | None = None) -> None:
        """The Trainer's call at the start of each epoch: recompute the class distances from ``model``."""
        if model is not None:
            self.update_statistics(model)

    @torch.no_grad()
    def update_statistics(self, model: nn.Module, batch_size: int = 512) -> torch.Tensor:
        """Recompute ``matrix`` (P) and ``distances`` (D) from ``model``'s predictions (eval mode, no gradient;
        the model's mode is restored) and return D."""
        check_int("batch_size", batch_size)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x, y = self.data.on(device)[:2]
        index = self.stat_index.to(device)
        was = model.training
        model.eval()
        try:
            probs = torch.cat([torch.softmax(model(x.index_select(0, index[i:i + batch_size])).float(), -1)
                               for i in range(0, index.shape[0], batch_size)])
        finally:
            model.train(was)
        self.matrix, _ = class_probability_matrix(probs, y.index_select(0, index), self.num_classes)
        self.distances = class_distances(self.matrix)
        self._weights = {}
        return self.distances

    def partner_weights(self, device=None) -> torch.Tensor:
        """(C, C) partner-class probabilities from the current distances (row: the sample's class)."""
        device = self.distances.device if device is None else torch.device(device)
        key = str(device)
        if key not in self._weights:
            self._weights[key] = partner_weights(self.distances, self.prior.to(self.distances.device),
                                                 temperature=self.temperature, prefer=self.prefer).to(device)
        return self._weights[key]

    def apply(self, x, t, generator):
        n = x.shape[0]
        where = generator.device if generator is not None else x.device
        weights = self.partner_weights(where)
        classes = draw_indices(weights.index_select(0, t.argmax(-1).to(where)), n, generator=generator,
                               device=x.device)
        order, starts, counts = self.data.on(x.device)[2:]
        index = uniform_within_class(classes, order, starts, counts, generator=generator)
        partner, partner_targets = self.data.batch(index, x, t, "class_distance_mix")
        k = n if self.per_sample else 1
        lam = _lambdas(self.alpha, k, self.p, self._applied(k, generator, x.device), generator, x.device)
        if self.base == "mixup":
            return bilateral_mix(x, t, partner, partner_targets, lam)
        boxes = MF.sample_boxes(1.0 - lam, *x.shape[-2:], generator=generator, device=x.device).expand(n, 4)
        out, targets, _ = paste_boxes(x, t, partner, partner_targets, boxes)
        return out, targets

    def _options(self):
        return {"alpha": self.alpha, "base": self.base, "prefer": self.prefer, "temperature": self.temperature,
                "sampler": self.sampler, "stat_per_class": self.stat_per_class, "per_sample": self.per_sample,
                "p": self.p}
