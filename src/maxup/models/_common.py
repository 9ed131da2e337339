"""Shared helpers for the model zoo: argument checks and weight init."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


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


def check_probability(name: str, value: object) -> float:
    """Return ``value`` as a float in [0, 1), or raise a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) for convs, unit/zero BatchNorm, zero Linear bias.

    Linear weights keep PyTorch's default init (as torchvision's ResNet does).
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)
