"""Randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019): certified L2 robustness for any classifier.

The smoothed classifier of a base classifier f is g(x) = argmax_c P(f(x + e) = c),
e ~ N(0, sigma^2 I). :meth:`Smooth.certify` returns g's class at x and a radius R such
that, with probability at least 1 - alpha over the noise, g returns that class on the
whole L2 ball of radius R around x: R = sigma * Phi^-1(p_A), p_A a one-sided
Clopper-Pearson lower bound on the probability of the top class (abstain when
p_A <= 1/2). Training f with Gaussian noise (``gaussian(sigma=0.25)``) makes g accurate;
training with MaxUp over Gaussian noise (``maxup(m=4)+gaussian(sigma=0.25)``) adds a
gradient-norm penalty that the MaxUp paper (Gong et al. 2020) reports to enlarge the radii.

>>> smooth = Smooth(model, num_classes=10, sigma=0.25)
>>> gen = torch.Generator().manual_seed(0)                  # on the model's device
>>> label, radius = smooth.certify(x[0], n0=100, n=10_000, alpha=0.001, batch_size=1000, generator=gen)
>>> records = list(certify_many(smooth, x_test[:500], y_test[:500], n0=100, n=10_000, alpha=0.001))  # doctest: +SKIP
>>> certified_accuracy(records, [0.0, 0.25, 0.5])   # fraction certified correct at each radius  # doctest: +SKIP

The pure pieces stand alone: :func:`sample_counts` (class counts under noise),
:func:`predict_from_counts`, :func:`certify_from_counts` and :func:`clopper_pearson_lower`.
Noise is drawn in chunks of :data:`NOISE_CHUNK` samples whatever the batch size, so a
fixed generator gives the same counts, classes and radii for every ``batch_size``.
The binomial bounds need scipy (``pip install scipy``, part of ``maxup[cli]``).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from numbers import Real
from statistics import NormalDist

import numpy as np
import torch
from torch import nn

from .._checks import check_int, check_positive

#: the class returned when the smoothed classifier abstains
ABSTAIN = -1
#: noise is drawn this many samples at a time (the last draw of a call may be shorter)
NOISE_CHUNK = 100

__all__ = [
    "ABSTAIN", "NOISE_CHUNK", "Smooth", "certified_accuracy", "certify_from_counts", "certify_many",
    "clopper_pearson_lower", "point_seed", "predict_from_counts", "sample_counts",
]


def _stats():
    try:
        from scipy import stats
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("maxup.certify needs scipy for its binomial bounds: pip install scipy "
                          "(or pip install 'maxup[cli]')") from err
    return stats


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a probability strictly between 0 and 1 (e.g. 0.001), got {alpha!r}")
    return float(alpha)


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module mapping a batch to logits, got {type(model).__name__}")
    return model


def _check_example(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be one example as a floating-point tensor without the batch dimension, e.g. "
                         f"(C, H, W); got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
    return x


def _placement(model: nn.Module, x: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first parameter or buffer (x's when it has none)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device, (t.dtype if t.is_floating_point() else x.dtype)
    return x.device, x.dtype


# ------------------------------------------------------------------------------------------ statistics


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level ``alpha`` on p from ``k`` successes in ``n`` trials.

    The ``alpha`` quantile of Beta(k, n - k + 1), and 0 when k = 0: the true p lies below
    it with probability at most ``alpha`` (the ``proportion_confint(k, n, alpha=2 * alpha,
    method="beta")[0]`` of Cohen et al.).

    >>> round(clopper_pearson_lower(990, 1000, 0.001), 4)
    0.976
    """
    n = check_int("n", n)
    k = check_int("k", k, minimum=0)
    if k > n:
        raise ValueError(f"k must be at most n, got k={k}, n={n}")
    alpha = _check_alpha(alpha)
    if k == 0:
        return 0.0
    return float(_stats().beta.ppf(alpha, k, n - k + 1))


def _binomial_p_value(k: int, n: int) -> float:
    """Two-sided p-value of k successes in n trials against p = 1/2."""
    return float(_stats().binomtest(k, n, 0.5).pvalue)


def predict_from_counts(counts, alpha: float) -> int:
    """The top class of ``counts``, or :data:`ABSTAIN` when a two-sided binomial test cannot tell
    the top two classes apart at level ``alpha`` (p-value > alpha; a tie always abstains)."""
    alpha = _check_alpha(alpha)
    counts = torch.as_tensor(counts).cpu().long()
    if counts.dim() != 1 or counts.numel() < 2 or int(counts.sum()) < 1:
        raise ValueError(f"counts must be a 1-D tensor of at least 2 class counts summing to >= 1, got {counts}")
    values, order = torch.sort(counts, descending=True, stable=True)
    top, second = int(values[0]), int(values[1])
    if _binomial_p_value(top, top + second) > alpha:
        return ABSTAIN
    return int(order[0])


def certify_from_counts(counts0, counts, sigma: float, alpha: float, n: int | None = None) -> tuple[int, float]:
    """(class, L2 radius) from the selection counts ``counts0`` and the estimation counts ``counts``.

    The class is the top class of ``counts0``; p_A is the Clopper-Pearson lower bound on its
    share of the ``n`` estimation samples (default: ``counts.sum()``; pass the number drawn when
    some samples gave no class, e.g. non-finite outputs, so that they count against p_A); the
    radius is ``sigma * Phi^-1(p_A)``, or ``(ABSTAIN, 0.0)`` when p_A <= 1/2 or ``counts0`` is empty.
    """
    sigma = check_positive("sigma", sigma)
    counts0, counts = torch.as_tensor(counts0).cpu().long(), torch.as_tensor(counts).cpu().long()
    if counts0.shape != counts.shape or counts.dim() != 1:
        raise ValueError(f"counts0 and counts must be 1-D class counts of one shape, got {tuple(counts0.shape)} "
                         f"and {tuple(counts.shape)}")
    n = int(counts.sum()) if n is None else check_int("n", n)
    if n < int(counts.sum()):
        raise ValueError(f"n={n} is smaller than the {int(counts.sum())} samples counted")
    if int(counts0.sum()) == 0 or n == 0:  # no sample gave a class (e.g. every output was NaN)
        return ABSTAIN, 0.0
    top = int(torch.argmax(counts0))
    p_lower = clopper_pearson_lower(int(counts[top]), n, alpha)
    if p_lower <= 0.5:
        return ABSTAIN, 0.0
    return top, sigma * NormalDist().inv_cdf(p_lower)


# ------------------------------------------------------------------------------------------ sampling


def sample_counts(model: nn.Module, x: torch.Tensor, n: int, sigma: float, *, num_classes: int,
                  batch_size: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """How often ``model`` predicts each class on ``n`` noisy copies ``x + sigma * e``, e ~ N(0, I).

    ``x`` is one example without the batch dimension. Returns int64 counts of shape
    ``(num_classes,)`` on the CPU; a sample whose logits are not all finite counts for no class
    (the counts then sum to less than ``n``). The noise is drawn on the generator's device (the model's
    device when ``generator`` is None, from torch's default generator there), in chunks of
    :data:`NOISE_CHUNK` samples, written in place into one buffer, and the counts stay on the
    device until the end. A forward pass holds at most ``batch_size`` rows (whole chunks when
    ``batch_size >= NOISE_CHUNK``), so the counts for a fixed generator do not depend on
    ``batch_size``. The model runs in eval mode under ``torch.inference_mode``; its training
    flag is restored afterwards.
    """
    model = _check_model(model)
    x = _check_example(x)
    n = check_int("n", n)
    sigma = check_positive("sigma", sigma)
    num_classes = check_int("num_classes", num_classes, minimum=2)
    batch_size = check_int("batch_size", batch_size)
    device, dtype = _placement(model, x)
    noise_device = device if generator is None else generator.device
    in_place = noise_device == device
    per_pass = max(1, batch_size // NOISE_CHUNK) * NOISE_CHUNK  # noise rows drawn before each round of forwards
    training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            x = x.to(device=device, dtype=dtype)
            buffer = torch.empty((min(per_pass, n), *x.shape), device=device, dtype=dtype)
            counts = torch.zeros(num_classes, dtype=torch.long, device=device)
            done = 0
            while done < n:
                batch = buffer[:min(per_pass, n - done)]
                for i in range(0, len(batch), NOISE_CHUNK):
                    chunk = batch[i:i + NOISE_CHUNK]
                    if in_place:
                        torch.randn(chunk.shape, generator=generator, out=chunk)
                    else:
                        chunk.copy_(torch.randn(chunk.shape, generator=generator, device=noise_device, dtype=dtype))
                batch.mul_(sigma).add_(x)
                for i in range(0, len(batch), batch_size):
                    logits = model(batch[i:i + batch_size])
                    if done == 0 and i == 0 and (logits.dim() != 2 or logits.shape[1] != num_classes):
                        raise ValueError(f"the model outputs shape {tuple(logits.shape)} for a batch of "
                                         f"{min(batch_size, len(batch))}, but num_classes={num_classes}: pass the "
                                         "number of logits the model outputs (a (B, num_classes) tensor)")
                    finite = torch.isfinite(logits).all(1)  # NaN/inf logits vote for no class
                    counts += torch.bincount(logits.argmax(1), weights=finite.to(torch.float64),
                                             minlength=num_classes).long()
                done += len(batch)
    finally:
        model.train(training)
    return counts.cpu()


class Smooth:
    """The smoothed classifier of ``model`` under N(0, sigma^2 I) noise (Cohen et al. 2019).

    ``sigma`` is in the units of the model's input (for ``maxup train`` runs: the inputs as the
    model saw them in training, standardised unless trained with ``--no-normalize``).
    ``x`` is always one example without the batch dimension. Pass a ``generator`` on the
    model's device for reproducible results; the same generator state gives the same answer
    for every ``batch_size``.

    >>> smooth = Smooth(model, num_classes=10, sigma=0.25)
    >>> label = smooth.predict(x[0], n=1000, alpha=0.001)                  # a class or ABSTAIN (-1)
    >>> label, radius = smooth.certify(x[0], n0=100, n=10_000, alpha=0.001)   # class or ABSTAIN, L2 radius
    """

    def __init__(self, model: nn.Module, num_classes: int, sigma: float):
        self.model = _check_model(model)
        self.num_classes = check_int("num_classes", num_classes, minimum=2)
        self.sigma = check_positive("sigma", sigma)

    @property
    def device(self) -> torch.device:
        return _placement(self.model, torch.empty(0))[0]

    def sample(self, x: torch.Tensor, n: int, batch_size: int = 1000, *,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Class counts of the base model on ``n`` noisy copies of ``x`` (see :func:`sample_counts`)."""
        return sample_counts(self.model, x, n, self.sigma, num_classes=self.num_classes, batch_size=batch_size,
                             generator=generator)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int = 1000, *,
                generator: torch.Generator | None = None) -> int:
        """PREDICT: the top class over ``n`` noisy samples, or ABSTAIN when the top two classes are not
        separated by a two-sided binomial test at level ``alpha`` (wrong with probability <= alpha).
        A non-finite ``x``, or noisy copies on which the model gives no finite output, abstain."""
        alpha = _check_alpha(alpha)
        if not bool(torch.isfinite(_check_example(x)).all()):
            return ABSTAIN
        counts = self.sample(x, n, batch_size, generator=generator)
        if int(counts.sum()) == 0:
            return ABSTAIN
        return predict_from_counts(counts, alpha)

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int = 1000, *,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """CERTIFY: ``n0`` samples pick the class, ``n`` more bound its probability from below at level
        ``alpha``; returns ``(class, sigma * Phi^-1(p_A))`` or ``(ABSTAIN, 0.0)`` when p_A <= 1/2.
        A non-finite ``x`` abstains; noisy copies with non-finite outputs count against p_A."""
        check_int("n0", n0)
        check_int("n", n)
        alpha = _check_alpha(alpha)
        if not bool(torch.isfinite(_check_example(x)).all()):
            return ABSTAIN, 0.0
        counts0 = self.sample(x, n0, batch_size, generator=generator)
        counts = self.sample(x, n, batch_size, generator=generator)
        return certify_from_counts(counts0, counts, self.sigma, alpha, n=n)


# ------------------------------------------------------------------------------------------ many points


def point_seed(seed: int, index: int) -> int:
    """The noise seed of test point ``index``: a well-mixed function of ``(seed, index)``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def certify_many(smooth: Smooth, x: torch.Tensor, y: torch.Tensor, *, n0: int, n: int, alpha: float,
                 batch_size: int = 1000, seed: int = 0, indices: Iterable[int] | None = None) -> Iterator[dict]:
    """Certify ``x[i]`` for each ``i`` in ``indices`` (default: all), yielding one record per point.

    Every point draws its noise from its own generator on the model's device, seeded with
    :func:`point_seed` ``(seed, i)``: a point's result does not depend on which other points
    are certified, in which order, or on ``batch_size``. A record holds ``index``, ``label``,
    ``prediction`` (a class or ABSTAIN), ``radius``, ``correct`` and ``time`` (seconds).
    """
    if not isinstance(smooth, Smooth):
        raise ValueError(f"smooth must be a maxup.certify.Smooth, got {type(smooth).__name__}")
    if len(x) != len(y):
        raise ValueError(f"x holds {len(x)} examples but y holds {len(y)} labels")
    check_int("seed", seed, minimum=0)
    device = smooth.device
    for i in range(len(x)) if indices is None else indices:
        generator = torch.Generator(device=device).manual_seed(point_seed(seed, i))
        start = time.perf_counter()
        prediction, radius = smooth.certify(x[i], n0, n, alpha, batch_size, generator=generator)
        label = int(y[i])
        yield {"index": int(i), "label": label, "prediction": prediction, "radius": radius,
               "correct": prediction == label, "time": time.perf_counter() - start}


def certified_accuracy(results: Iterable[Mapping], radii: Sequence[float]) -> list[float]:
    """The fraction of ``results`` certified correct at each radius in ``radii``.

    A result is a mapping with ``label``, ``prediction`` and ``radius`` (the records of
    :func:`certify_many`); it counts at radius r when ``prediction == label`` and
    ``radius >= r``. Abstentions never count.

    >>> certified_accuracy([{"label": 1, "prediction": 1, "radius": 0.4},
    ...                     {"label": 0, "prediction": -1, "radius": 0.0}], [0.0, 0.25, 0.5])
    [0.5, 0.5, 0.0]
    """
    try:
        rows = [(int(r["label"]), int(r["prediction"]), float(r["radius"])) for r in results]
    except (KeyError, TypeError, ValueError):
        raise ValueError("results must be mappings with 'label', 'prediction' and 'radius' "
                         "(the records of certify_many)") from None
    if not rows:
        raise ValueError("results is empty: certify at least one point")
    radii = [float(r) for r in radii]
    return [sum(p == y and rad >= r for y, p, rad in rows) / len(rows) for r in radii]
