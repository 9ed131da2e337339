"""Argument checks shared by the package: each raises a ValueError naming the argument."""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch


def check_positive(name: str, value, *, allow_zero: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a float > 0 (>= 0 with ``allow_zero``), finite unless ``allow_inf``."""
    if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def check_finite(name: str, value) -> float:
    """``value`` as a finite float (not NaN, not infinite)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_range(name: str, value, *, low: float, high: float) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi <= high."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return lo, hi


def check_inputs(x, *, name: str = "x", min_dim: int = 2, exact_dim: int | None = None) -> torch.Tensor:
    """A floating batch tensor of the expected rank."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (e.g. images scaled to [0, 1]), got dtype {x.dtype}; "
            f"convert with {name}.float() / 255"
        )
    if exact_dim is not None and x.dim() != exact_dim:
        raise ValueError(f"{name} must be a batch of images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have a batch dimension and at least {min_dim} dims, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    return x


def check_int_tuple(name: str, value: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``value`` as a tuple of positive ints, or raise a ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}")
    out = tuple(value)
    if not allow_empty and not out:
        raise ValueError(f"{name} must not be empty")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must contain positive ints only, got {value!r}")
    return out


def check_dropout(name: str, value: object) -> float:
    """Return ``value`` as a float in [0, 1), or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)
