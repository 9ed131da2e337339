"""Randomness drawn from an optional ``torch.Generator``.

Every draw happens on the generator's device (the default device when no generator is
given) and is then moved to ``device``, so a CPU generator drives augmentations of a
batch on any device and the same seed gives the same draws everywhere.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

#: rounds of the gamma sampler's rejection loop before it gives up (each round tries 4 candidates per
#: sample and accepts one with probability > 0.95, so 64 rounds fail with probability < 1e-300)
MAX_REJECTION_ROUNDS = 64


def _where(generator: torch.Generator | None, device) -> torch.device | None:
    return generator.device if generator is not None else device


def rand(shape, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform samples in [0, 1)."""
    return torch.rand(shape, generator=generator, device=_where(generator, device), dtype=dtype).to(device)


def randn(shape, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal samples."""
    return torch.randn(shape, generator=generator, device=_where(generator, device), dtype=dtype).to(device)


def randint(high, shape, *, generator=None, device=None) -> torch.Tensor:
    """Integers in [0, high); ``high`` may be a tensor of per-element bounds (all >= 1)."""
    u = rand(shape, generator=generator, device=device, dtype=torch.float64)
    high = torch.as_tensor(high, device=u.device)
    return torch.minimum((u * high).long(), high.long() - 1)


def randperm(n: int, *, generator=None, device=None) -> torch.Tensor:
    """A random permutation of 0..n-1."""
    return torch.randperm(n, generator=generator, device=_where(generator, device)).to(device)


def gamma(concentration: float, shape, *, generator=None, device=None) -> torch.Tensor:
    """Gamma(concentration, 1) samples (Marsaglia and Tsang 2000), float64.

    ``torch.distributions`` takes no generator, so this vectorised rejection sampler
    draws its normals and uniforms from ``generator``; the result is reproducible.
    """
    if isinstance(concentration, bool) or not isinstance(concentration, Real) \
            or not math.isfinite(concentration) or concentration <= 0:
        raise ValueError(f"concentration (the Beta/Gamma alpha) must be a finite number > 0, got {concentration!r}")
    n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    a = float(concentration)
    boost = a < 1.0
    if boost:
        a += 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    for _ in range(MAX_REJECTION_ROUNDS):
        if not todo.numel():
            break
        k = todo.numel()
        z = randn((k, 4), generator=generator, device=device, dtype=torch.float64)
        u = rand((k, 4), generator=generator, device=device, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        first = ok.to(torch.int8).argmax(dim=1)
        accepted = ok.any(dim=1)
        out[todo[accepted]] = (d * v.gather(1, first[:, None]).squeeze(1))[accepted]
        todo = todo[~accepted]
    else:
        if todo.numel():
            raise RuntimeError(f"the gamma sampler rejected every candidate for {todo.numel()} samples in "
                               f"{MAX_REJECTION_ROUNDS} rounds (concentration={concentration!r})")
    if boost:
        u = rand((n,), generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / concentration)
    return out.view(shape)


def beta(alpha: float, shape, *, beta_: float | None = None, generator=None, device=None,
         dtype=torch.float32) -> torch.Tensor:
    """Beta(alpha, beta_) samples (beta_ defaults to alpha), computed in float64."""
    x = gamma(alpha, shape, generator=generator, device=device)
    y = gamma(alpha if beta_ is None else beta_, shape, generator=generator, device=device)
    total = x + y
    out = torch.where(total > 0, x / total.clamp_min(1e-300), torch.full_like(x, 0.5))
    return out.to(dtype)
