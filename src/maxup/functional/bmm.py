"""A two-component Beta mixture model of per-sample training losses (Arazo et al., ICML 2019).

Clean samples are fitted early and have small losses; mislabelled ones keep large losses for a long
time. Arazo, Ortego, Albert, O'Connor and McGuinness ("Unsupervised label noise modeling and loss
correction") fit a mixture of two Beta distributions to the losses of all training samples, scaled to
(0, 1), and read each sample's probability of being mislabelled as its posterior under the high-loss
component. This module is that model, as pure tensor functions (float64, deterministic, no numpy):

1. :func:`normalise_losses`: the authors' outlier clipping: keep the losses between their 5th and 95th
   percentiles, scale them by those percentiles to (0, 1), values at or beyond the ends set to 0.001 and 0.999;
2. :func:`fit_bmm`: ``iters`` EM iterations from the authors' start (``alpha = (1, 2)``,
   ``beta = (2, 1)``, equal weights); the M-step fits each component by the *weighted method of moments*
   (not maximum likelihood), as the authors do;
3. :func:`posterior_lookup`: the posterior of the high-loss component on a grid of 100 points, made flat
   after its maximum (the authors' ``create_lookup``), and :func:`loss_posterior`, which reads a batch's
   losses through it on their device (no host read).

>>> clean = -0.3 * torch.log(torch.rand(160))              # small losses, most near zero
>>> noisy = (2.5 + 0.6 * torch.randn(40)).clamp_min(0)      # 40 large ones
>>> losses = torch.cat([clean, noisy])
>>> x, low, high = normalise_losses(losses)
>>> mixture = fit_bmm(x, iters=10)
>>> w = loss_posterior(losses, posterior_lookup(mixture), low, high)
>>> bool((w[losses.argsort()].diff() >= 0).all()), round(float((w[160:] > 0.5).float().mean()), 1)
(True, 1.0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int

__all__ = ["BetaMixture", "beta_pdf", "fit_bmm", "loss_posterior", "normalise_losses", "posterior_lookup"]

#: the authors' EM start: component 0 leans to small losses (Beta(1, 2)), component 1 to large ones (Beta(2, 1))
INIT_ALPHAS = (1.0, 2.0)
INIT_BETAS = (2.0, 1.0)
INIT_WEIGHTS = (0.5, 0.5)
#: the authors' constants: responsibilities floored at EPS_NAN (and the posterior's denominator shifted by
#: it), losses clipped to [EPS_FIT, 1 - EPS_FIT] before EM, normalised losses clipped to [CLIP, 1 - CLIP]
EPS_NAN = 1e-12
EPS_FIT = 1e-4
CLIP = 1e-3


def _losses(losses, name: str = "losses") -> torch.Tensor:
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
        raise ValueError(f"{name} must be a 1-D float tensor of per-sample losses, got "
                         f"{getattr(losses, 'shape', type(losses).__name__)}")
    return losses


def beta_pdf(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The Beta(alpha, beta) density at ``x`` in (0, 1) (broadcast), from its logarithm in float64."""
    x = x.double()
    alpha, beta = torch.as_tensor(alpha, dtype=torch.float64), torch.as_tensor(beta, dtype=torch.float64)
    log_norm = torch.lgamma(alpha) + torch.lgamma(beta) - torch.lgamma(alpha + beta)
    return torch.exp((alpha - 1) * torch.log(x) + (beta - 1) * torch.log1p(-x) - log_norm)


@dataclass(frozen=True)
class BetaMixture:
    """Two Beta components: ``alphas``, ``betas`` and mixing ``weights``, each (2,) float64."""

    alphas: torch.Tensor
    betas: torch.Tensor
    weights: torch.Tensor

    def weighted_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """(2, N): ``weight_k * Beta(x; alpha_k, beta_k)``."""
        return self.weights[:, None] * beta_pdf(x.double()[None, :], self.alphas[:, None], self.betas[:, None])

    def posterior(self, x: torch.Tensor, component: int) -> torch.Tensor:
        """P(component | x), with the authors' ``1e-12`` added to the denominator."""
        joint = self.weighted_likelihood(x)
        return joint[component] / (joint.sum(0) + EPS_NAN)

    @property
    def means(self) -> torch.Tensor:
        return self.alphas / (self.alphas + self.betas)

    @property
    def noisy(self) -> int:
        """The high-loss component (larger mean): the one whose posterior is the probability of a wrong label."""
        return int(torch.argmax(self.means))

    @property
    def finite(self) -> bool:
        """All parameters finite and positive (EM on losses that are all equal gives NaN)."""
        params = torch.cat([self.alphas, self.betas, self.weights])
        return bool(torch.isfinite(params).all() and (self.alphas > 0).all() and (self.betas > 0).all())


def normalise_losses(losses: torch.Tensor, *, percentiles: tuple[float, float] = (5.0, 95.0)):
    """``(x, low, high)``: the losses between the ``percentiles`` (linear interpolation, as numpy's
    ``percentile``) scaled to ``(l - low) / (high - low + 1e-6)`` in float32, values ``>= 1`` set to 0.999 and
    ``<= 0`` to 0.001; ``low``
    is the lower percentile plus ``1e-5`` and ``high`` the upper one (the authors' ``track_training_loss``).
    ``low`` and ``high`` are float32 scalars, as the authors keep them; ``x`` is returned in float64."""
    losses = _losses(losses).detach()
    lo_pct, hi_pct = _check_percentiles(percentiles)
    if losses.numel() < 2:
        raise ValueError(f"losses must hold at least 2 samples to fit a mixture, got {losses.numel()}")
    q = torch.quantile(losses.double(), torch.tensor([lo_pct / 100, hi_pct / 100], dtype=torch.float64,
                                                     device=losses.device))
    p_low, p_high = q[0].float(), q[1].float()
    kept = losses.float()
    kept = kept[(kept <= p_high) & (kept >= p_low)]
    low, high = p_low + 1e-5, p_high
    return _clip((kept - low) / (high - low + 1e-6)).double(), low, high


def _clip(x: torch.Tensor) -> torch.Tensor:
    """The authors' clipping of normalised losses: ``>= 1`` to 0.999, ``<= 0`` to 0.001 (values between stay)."""
    x = torch.where(x >= 1, torch.full_like(x, 1 - CLIP), x)
    return torch.where(x <= 0, torch.full_like(x, CLIP), x)


def _check_percentiles(percentiles) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in percentiles)
    except (TypeError, ValueError):
        raise ValueError(f"percentiles must be a pair (low, high) such as (5, 95), got {percentiles!r}") from None
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles!r}")
    return lo, hi


def _moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) alphas and betas of Beta distributions with the weighted mean and variance of ``x`` ((K, N) weights)."""
    total = w.sum(1)
    mean = (w * x).sum(1) / total
    var = (w * (x - mean[:, None]) ** 2).sum(1) / total
    alpha = mean * (mean * (1 - mean) / var - 1)
    return alpha, alpha * (1 - mean) / mean


def fit_bmm(x: torch.Tensor, *, iters: int = 10) -> BetaMixture:
    """A two-component Beta mixture fitted to ``x`` (values in (0, 1), e.g. from :func:`normalise_losses`) by
    ``iters`` EM iterations from the authors' start. E-step: responsibilities ``w_k Beta(x; a_k, b_k)``,
    floored at ``1e-12`` and normalised; M-step: each component's weighted mean and variance give
    ``alpha = m (m (1 - m) / v - 1)``, ``beta = alpha (1 - m) / m`` (the method of moments), the weights the
    mean responsibilities. ``x`` is clipped to ``[1e-4, 1 - 1e-4]`` first (the authors' ``fit``)."""
    x = _losses(x, "x").detach().double().clamp(EPS_FIT, 1 - EPS_FIT)
    iters = check_int("iters", iters)
    opts = {"dtype": torch.float64, "device": x.device}
    mixture = BetaMixture(torch.tensor(INIT_ALPHAS, **opts), torch.tensor(INIT_BETAS, **opts),
                          torch.tensor(INIT_WEIGHTS, **opts))
    for _ in range(iters):
        r = mixture.weighted_likelihood(x).clamp_min(EPS_NAN)
        r = r / r.sum(0)
        alphas, betas = _moments(x, r)
        weights = r.sum(1)
        mixture = BetaMixture(alphas, betas, weights / weights.sum())
    return mixture


def posterior_lookup(mixture: BetaMixture, component: int | None = None, *, resolution: int = 100) -> torch.Tensor:
    """(resolution,) float64: the posterior of ``component`` (default: the high-loss one, :attr:`BetaMixture.noisy`)
    at ``resolution`` points from ``1e-12`` to ``1 - 1e-12``, held at its maximum from the maximum on (so that
    it never falls for larger losses: the authors' ``create_lookup``)."""
    resolution = check_int("resolution", resolution, minimum=2)
    component = mixture.noisy if component is None else component
    if component not in (0, 1):
        raise ValueError(f"component must be 0 or 1 (or None: the high-loss one), got {component!r}")
    grid = torch.linspace(EPS_NAN, 1 - EPS_NAN, resolution, dtype=torch.float64, device=mixture.alphas.device)
    table = mixture.posterior(grid, component)
    peak = int(torch.argmax(table))
    table[peak:] = table[peak]
    return table


def loss_posterior(losses: torch.Tensor, lookup: torch.Tensor, low, high, *, clip: float = 1e-4) -> torch.Tensor:
    """Each loss's probability of a wrong label: ``(l - low) / (high - low + 1e-6)`` (``>= 1`` set to 0.999,
    ``<= 0`` to 0.001), the ``lookup`` entry at ``floor(resolution * that)``, clipped to ``[clip, 1 - clip]``
    (the authors' ``compute_probabilities_batch`` and ``look_lookup``). Float32 on ``losses``' device; no host read.
    """
    _losses(losses)
    if not 0 <= clip < 0.5:
        raise ValueError(f"clip must lie in [0, 0.5), got {clip!r}")
    res = lookup.shape[0]
    low = torch.as_tensor(low, dtype=torch.float32, device=losses.device)
    high = torch.as_tensor(high, dtype=torch.float32, device=losses.device)
    x = _clip((losses.detach().float() - low) / (high - low + 1e-6))
    index = (res * x).long().clamp(0, res - 1)
    w = lookup.to(losses.device)[index].float()
    return w.clamp(clip, 1 - clip) if clip > 0 else w
