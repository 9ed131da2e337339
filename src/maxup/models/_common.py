"""Weight initialisation shared by the model zoo."""

from __future__ import annotations

from torch import nn


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
