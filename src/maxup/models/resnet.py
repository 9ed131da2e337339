"""CIFAR-style residual networks: ResNet (He et al. 2016) and Wide ResNet
(Zagoruyko & Komodakis 2016).

Built from standard torch layers only (functional ops are used just for the
parameter-free ReLU and residual add), so ``maxup.slim`` can convert them to
width-sliceable layers for GradAug. Channel counts always come from the layers
(global average pooling, then ``flatten``), never from a hard-coded reshape.

Both take any number of input channels and any image size (global average
pooling); an 8x8 input ends at 2x2 after the two stride-2 stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_dropout, check_int
from ._common import init_weights

__all__ = ["BasicBlock", "ResNet", "PreActWideBlock", "WideResNet"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv + BN when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet (He et al., "Deep Residual Learning for Image Recognition",
    CVPR 2016, section 4.2): a 3x3 stem conv, then three stages of ``n``
    BasicBlocks with ``(width, 2*width, 4*width)`` channels and strides
    ``1, 2, 2``, global average pooling and a linear classifier;
    ``depth = 6n + 2``. Shortcuts that change shape use a 1x1 conv + BN
    (option B), so ResNet-20 (width 16, 10 classes) has 272,474 parameters
    on 3-channel input (0.27M, as in the paper).

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        depth: ``6n + 2`` with ``n >= 1`` (8, 14, 20, 32, 44, 56, 110, ...);
            default 20.
        width: channels of the stem and first stage (default 16).
        zero_init_residual: start every block's last BN gamma at zero, so each
            block begins as the identity (default False).

    Attributes:
        stages: ``["stem", "layer1", "layer2", "layer3"]``, the mixing points.
        classifier: the final ``nn.Linear``.

    Example:
        >>> model = ResNet(in_channels=3, num_classes=10, depth=20)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        depth: int = 20,
        width: int = 16,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        width = check_int("width", width)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"depth must be of the form 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                f"got {depth!r}"
            )
        n = (depth - 2) // 6
        self.depth = depth

        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
        chans = (width, 2 * width, 4 * width)
        prev = width
        for i, (ch, stride) in enumerate(zip(chans, (1, 2, 2)), start=1):
            blocks = [BasicBlock(prev, ch, stride)] + [BasicBlock(ch, ch) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            prev = ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(prev, num_classes)

        init_weights(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

        self.stages: list[str] = ["stem", "layer1", "layer2", "layer3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.flatten(self.pool(x)))


class PreActWideBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3, plus
    the shortcut. When the shape changes the shortcut is a 1x1 conv applied to
    the pre-activated input, as in the reference WRN code."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _conv1x1(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """Wide ResNet WRN-d-k (Zagoruyko & Komodakis, "Wide Residual Networks",
    BMVC 2016): a 3x3 stem conv with 16 channels, three stages of ``n``
    pre-activation blocks with ``(16k, 32k, 64k)`` channels and strides
    ``1, 2, 2``, a final BN-ReLU, global average pooling and a linear
    classifier; ``depth = 6n + 4``.

    Defaults are WRN-16-4 (2.7M parameters), sized for small data on a CPU;
    the papers' CIFAR settings are WRN-28-10 (36.5M; GradAug) with
    ``dropout=0.3`` in the WRN paper.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        depth: ``6n + 4`` with ``n >= 1`` (10, 16, 22, 28, 40, ...); default 16.
        widen_factor: ``k`` (default 4).
        dropout: dropout probability between the two convs of each block
            (default 0).

    Attributes:
        stages: ``["stem", "layer1", "layer2", "layer3"]``, the mixing points.
        classifier: the final ``nn.Linear``.

    Example:
        >>> model = WideResNet(in_channels=3, num_classes=100, depth=16, widen_factor=4)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        depth: int = 16,
        widen_factor: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        widen_factor = check_int("widen_factor", widen_factor)
        dropout = check_dropout("dropout", dropout)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"depth must be of the form 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}"
            )
        n = (depth - 4) // 6
        self.depth = depth
        self.widen_factor = widen_factor

        self.stem = _conv3x3(in_channels, 16)
        chans = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        prev = 16
        for i, (ch, stride) in enumerate(zip(chans, (1, 2, 2)), start=1):
            blocks = [PreActWideBlock(prev, ch, stride, dropout)]
            blocks += [PreActWideBlock(ch, ch, 1, dropout) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            prev = ch
        self.bn = nn.BatchNorm2d(prev)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self)

        self.stages: list[str] = ["stem", "layer1", "layer2", "layer3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.classifier(self.flatten(self.pool(x)))
