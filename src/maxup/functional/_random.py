"""Randomness drawn from an optional ``torch.Generator``.

Every draw happens on the generator's device (the default device when no generator is
given) and is then moved to ``device``, so a CPU generator drives augmentations of a
batch on any device and the same seed gives the same draws everywhere; a generator on
another device than the data is handled this way too, never ignored. On a GPU the move
is a blocking copy: give a generator on the data's device (:class:`DeviceGenerator`,
which the Trainer holds) and nothing leaves the device.

Choices the host must know (a sub-network's width, which augmentation of a
:class:`~maxup.augment.RandomChoice` runs, Manifold Mixup's layer) come from
:func:`host`: the CPU generator a :class:`DeviceGenerator` carries, so drawing them
never waits for the device.
"""
from __future__ import annotations

import contextlib
import math
import threading
from numbers import Real

import torch

#: rounds of the gamma sampler's rejection loop before it gives up (each round tries 4 candidates per
#: sample and accepts one with probability > 0.95, so 64 rounds fail with probability < 1e-300)
MAX_REJECTION_ROUNDS = 64


class DeviceGenerator(torch.Generator):
    """A ``torch.Generator`` on ``device`` that carries a CPU generator, :attr:`host`, for host-side choices.

    It is a ``torch.Generator``: pass it wherever one is taken. Tensors are drawn on
    ``device``; :func:`host` returns :attr:`host` for draws whose values the host reads.

    >>> g = DeviceGenerator("cpu", seed=0, host_seed=1)
    >>> host(g) is g.host
    True
    """

    def __new__(cls, device="cpu", *, seed: int | None = None, host_seed: int | None = None):
        self = super().__new__(cls, torch.device(device))
        self.host = torch.Generator()
        if seed is not None:
            self.manual_seed(int(seed))
        if host_seed is not None:
            self.host.manual_seed(int(host_seed))
        return self


def host(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator for draws the host reads: ``generator.host`` for a :class:`DeviceGenerator`, else ``generator``."""
    return getattr(generator, "host", generator)


_scope = threading.local()


def in_host_draw() -> bool:
    """True while :func:`host_rand` / :func:`host_randint` read values drawn on the CPU (no device waits for
    them; :class:`maxup.train.syncs.HostSyncCounter` does not count these reads)."""
    return getattr(_scope, "depth", 0) > 0


@contextlib.contextmanager
def _reading_host(generator):
    cpu = generator is None or generator.device.type == "cpu"
    _scope.depth = getattr(_scope, "depth", 0) + cpu
    try:
        yield
    finally:
        _scope.depth -= cpu


@contextlib.contextmanager
def host_only():
    """A block whose reads touch host data only (Python numbers, CPU tensors of host-side checks): not counted
    by :class:`maxup.train.syncs.HostSyncCounter`, since no device waits for them."""
    with _reading_host(None):
        yield


def counting_as_device() -> bool:
    """True while a :class:`maxup.train.syncs.HostSyncCounter` runs: CPU tensors stand for device tensors, so
    checks that an accelerator would skip (they would wait for it) are skipped too."""
    return getattr(_scope, "as_device", 0) > 0


def host_rand(n: int, *, generator=None, dtype=torch.float32) -> list[float]:
    """``n`` uniforms in [0, 1) as Python floats, from :func:`host` of ``generator`` (for host-side choices)."""
    g = host(generator)
    with _reading_host(g):
        return rand((n,), generator=g, dtype=dtype).tolist()


def host_randint(high: int, n: int, *, generator=None) -> list[int]:
    """``n`` integers in [0, high) as Python ints, from :func:`host` of ``generator`` (as :func:`randint`)."""
    g = host(generator)
    with _reading_host(g):
        return randint(int(high), (n,), generator=g).tolist()


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
    if isinstance(high, int):  # a Python bound stays a number: no tensor made from host data
        return (u * high).long().clamp_max(high - 1)
    high = torch.as_tensor(high, device=u.device)
    return torch.minimum((u * high).long(), high.long() - 1)


def randperm(n: int, *, generator=None, device=None) -> torch.Tensor:
    """A random permutation of 0..n-1."""
    return torch.randperm(n, generator=generator, device=_where(generator, device)).to(device)


#: candidates per sample and round of the Marsaglia-Tsang sampler
CANDIDATES = 4


def _mt_constants(concentration, shape) -> tuple[int, float, float, bool]:
    """Checked Marsaglia-Tsang constants: (samples, d, c, boosted), boosted for concentration < 1."""
    if isinstance(concentration, bool) or not isinstance(concentration, Real) \
            or not math.isfinite(concentration) or concentration <= 0:
        raise ValueError(f"concentration (the Beta/Gamma alpha) must be a finite number > 0, got {concentration!r}")
    n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    a = float(concentration) + (1.0 if concentration < 1.0 else 0.0)
    d = a - 1.0 / 3.0
    return n, d, 1.0 / math.sqrt(9.0 * d), concentration < 1.0


def _mt_candidates(k: int, d: float, c: float, generator, device):
    """:data:`CANDIDATES` proposals for each of ``k`` samples: the normals ``z``, ``v = (1 + c z)^3`` and
    which proposals are accepted."""
    z = randn((k, CANDIDATES), generator=generator, device=device, dtype=torch.float64)
    u = rand((k, CANDIDATES), generator=generator, device=device, dtype=torch.float64)
    v = (1.0 + c * z) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-300)))
    return z, v, ok


def _unboost(out, concentration, boosted: bool, generator, device):
    if boosted:
        u = rand((out.shape[0],), generator=generator, device=device, dtype=torch.float64)
        out = out * u.pow(1.0 / concentration)
    return out


def gamma(concentration: float, shape, *, generator=None, device=None) -> torch.Tensor:
    """Gamma(concentration, 1) samples (Marsaglia and Tsang 2000), float64, by rejection until every sample
    is accepted (at most :data:`MAX_REJECTION_ROUNDS` rounds): the reference :func:`gamma_fixed` follows.

    ``torch.distributions`` takes no generator, so this vectorised rejection sampler
    draws its normals and uniforms from ``generator``; the result is reproducible.
    """
    n, d, c, boosted = _mt_constants(concentration, shape)
    out = torch.empty(n, dtype=torch.float64, device=device)
    todo = torch.arange(n, device=device)
    for _ in range(MAX_REJECTION_ROUNDS):
        if not todo.numel():
            break
        _, v, ok = _mt_candidates(todo.numel(), d, c, generator, device)
        first = ok.to(torch.int8).argmax(dim=1)
        accepted = ok.any(dim=1)
        out[todo[accepted]] = (d * v.gather(1, first[:, None]).squeeze(1))[accepted]
        todo = todo[~accepted]
    else:
        if todo.numel():
            raise RuntimeError(f"the gamma sampler rejected every candidate for {todo.numel()} samples in "
                               f"{MAX_REJECTION_ROUNDS} rounds (concentration={concentration!r})")
    return _unboost(out, concentration, boosted, generator, device).view(shape)


def gamma_fixed(concentration: float, shape, *, generator=None, device=None) -> torch.Tensor:
    """Gamma(concentration, 1) samples, float64, from one vectorised round of Marsaglia and Tsang (2000).

    Each sample draws :data:`CANDIDATES` proposals ``d (1 + c z)^3`` and keeps the first
    accepted one: a fixed amount of randomness and no host read (no loop over a boolean
    mask), so it runs on a GPU without waiting for it. This is :func:`gamma`'s first
    round, draw for draw, so the two agree whenever :func:`gamma` finishes in one round.
    A proposal is accepted with probability above 0.95 (concentration >= 1, which the
    boost for concentration < 1 ensures), so all four fail with probability below 6e-6;
    such a sample keeps its first proposal with ``1 + c z > 0`` clipped to 1e-3 (the
    Wilson-Hilferty approximation the method corrects), an error far below the sampling noise.
    """
    n, d, c, boosted = _mt_constants(concentration, shape)
    z, v, ok = _mt_candidates(n, d, c, generator, device)
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # 0 when none is accepted: the fallback proposal
    fallback = (1.0 + c * z[:, :1]).clamp_min(1e-3) ** 3
    out = d * torch.where(ok.any(dim=1, keepdim=True), v.gather(1, first), fallback).squeeze(1)
    return _unboost(out, concentration, boosted, generator, device).view(shape)


def beta(alpha: float, shape, *, beta_: float | None = None, generator=None, device=None,
         dtype=torch.float32) -> torch.Tensor:
    """Beta(alpha, beta_) samples (beta_ defaults to alpha), computed in float64 from two :func:`gamma_fixed`
    draws: no host read."""
    x = gamma_fixed(alpha, shape, generator=generator, device=device)
    y = gamma_fixed(alpha if beta_ is None else beta_, shape, generator=generator, device=device)
    total = x + y
    out = torch.where(total > 0, x / total.clamp_min(1e-300), torch.full_like(x, 0.5))
    return out.to(dtype)
