"""Small plain networks: a 2-D CNN, a 1-D CNN for signals, and an MLP.

All are built from standard torch layers only (so ``maxup.slim`` can convert
them to width-sliceable layers for GradAug); every model has

- ``stages``: names (as in ``named_modules()``) of the modules after which
  hidden features may be mixed (Manifold Mixup), first to last; the first
  is the output of the first block (the stem);
- ``classifier``: the final ``nn.Linear`` (its outputs are never sliced).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._checks import check_dropout, check_int, check_int_tuple
from ._common import init_weights

__all__ = ["SmallCNN", "CNN1d", "MLP"]


def _conv_block(conv: nn.Module, bn: nn.Module, pool: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [conv, bn, nn.ReLU()]
    if pool is not None:
        layers.append(pool)
    return nn.Sequential(*layers)


class _ConvStack(nn.Module):
    """Shared head of the 1-D and 2-D CNNs: blocks, global average pool, dropout, linear classifier."""

    def _head(self, blocks: list[nn.Module], pool: nn.Module, features: int, num_classes: int, dropout: float) -> None:
        self.blocks = nn.Sequential(*blocks)
        self.pool = pool
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(features, num_classes)
        init_weights(self)
        self.stages: list[str] = [f"blocks.{i}" for i in range(len(blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = self.flatten(self.pool(x))
        return self.classifier(self.dropout(x))


class SmallCNN(_ConvStack):
    """A small 2-D CNN: conv-BN-ReLU blocks, 2x2 max-pool after every block but
    the last, global average pool, dropout, linear classifier.

    Works for any image of at least 4x4 pixels (pooling uses ``ceil_mode``);
    with the default three blocks an 8x8 digit ends at 2x2, a 28x28 image at 7x7.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        channels: output channels of each conv block (default ``(32, 64, 128)``).
        dropout: dropout probability before the classifier (default 0).

    Example:
        >>> model = SmallCNN(in_channels=1, num_classes=10)
        >>> model(torch.randn(4, 1, 28, 28)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        channels = check_int_tuple("channels", channels)
        dropout = check_dropout("dropout", dropout)

        blocks = []
        prev = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            pool = None if last else nn.MaxPool2d(2, ceil_mode=True)
            blocks.append(
                _conv_block(nn.Conv2d(prev, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), pool)
            )
            prev = ch
        self._head(blocks, nn.AdaptiveAvgPool2d(1), prev, num_classes, dropout)


class CNN1d(_ConvStack):
    """A 1-D CNN for (C, L) signals: Conv1d-BN-ReLU blocks, max-pool by 2 after
    every block but the last, global average pool, dropout, linear classifier.

    Args:
        in_channels: channels C of the input signals.
        num_classes: number of output logits.
        channels: output channels of each conv block (default ``(32, 64, 128)``).
        kernel_size: odd kernel size of every conv (default 5, "same" padding).
        dropout: dropout probability before the classifier (default 0).

    Example:
        >>> model = CNN1d(in_channels=2, num_classes=5)
        >>> model(torch.randn(4, 2, 100)).shape
        torch.Size([4, 5])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        channels: Sequence[int] = (32, 64, 128),
        kernel_size: int = 5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        channels = check_int_tuple("channels", channels)
        kernel_size = check_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
        dropout = check_dropout("dropout", dropout)

        blocks = []
        prev = in_channels
        for i, ch in enumerate(channels):
            last = i == len(channels) - 1
            pool = None if last else nn.MaxPool1d(2, ceil_mode=True)
            conv = nn.Conv1d(prev, ch, kernel_size, padding=kernel_size // 2, bias=False)
            blocks.append(_conv_block(conv, nn.BatchNorm1d(ch), pool))
            prev = ch
        self._head(blocks, nn.AdaptiveAvgPool1d(1), prev, num_classes, dropout)


class MLP(nn.Module):
    """Flatten -> (Linear-ReLU-Dropout) per hidden layer -> linear classifier.

    Args:
        in_features: size of one flattened sample (``prod(input_shape)``).
        num_classes: number of output logits.
        hidden: widths of the hidden layers (default ``(256, 256)``; may be empty).
        dropout: dropout probability after every hidden layer (default 0).

    Example:
        >>> model = MLP(in_features=64, num_classes=10)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        *,
        in_features: int,
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = check_int("in_features", in_features)
        num_classes = check_int("num_classes", num_classes)
        hidden = check_int_tuple("hidden", hidden, allow_empty=True)
        dropout = check_dropout("dropout", dropout)

        self.flatten = nn.Flatten()
        blocks = []
        prev = in_features
        for h in hidden:
            blocks.append(nn.Sequential(nn.Linear(prev, h), nn.ReLU(), nn.Dropout(dropout)))
            prev = h
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.bias)

        # Mixing points: the output of each hidden layer (the flattened input
        # when there are no hidden layers).
        self.stages: list[str] = [f"blocks.{i}" for i in range(len(hidden))] or ["flatten"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.blocks(self.flatten(x)))
