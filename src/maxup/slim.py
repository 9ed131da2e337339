"""Width-sliceable layers for GradAug: run any network at a fraction of its width.

:func:`slimmable` converts the ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm1d`` and ``nn.BatchNorm2d`` layers of a model into the subclasses
below by swapping their class: the same parameters, buffers, hooks and
``state_dict`` keys, so an optimizer built on the model keeps working, and at full
width every layer runs its parent's ``forward`` unchanged (same output, bit for bit).
Under ``with set_width(model, w):`` the model is the sub-network of width ``w``:

- a conv or linear layer with ``C`` outputs keeps the first ``round(w * C)`` of them
  (half up, at least one); the outputs of the model's last conv or linear layer (the
  classifier) are never sliced;
- every layer takes as many input channels as it receives, using the first columns
  of its weight, so the input of the first layer stays whole and residual additions
  stay shape-consistent (every layer with ``C`` channels keeps ``round(w * C)``);
- grouped convs run whole groups: the input is zero-padded up to the next whole
  group, which equals using the first input channels of the weight; a depthwise conv
  keeps one group per remaining channel;
- BatchNorm normalises with the statistics of the batch and its first affine
  parameters; its running statistics update only at full width.

The weights are shared by every width, so the gradient of a sub-network's loss lands
in the first channels of the full weights. Layers that mix channels in other ways
(concatenation as in DenseNet, attention, LayerNorm/GroupNorm over channels) are not
sliced correctly; only exact ``torch.nn`` classes are converted (not their subclasses).

>>> model = slimmable(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
...                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)))
>>> with set_width(model, 0.5):
...     logits = model(torch.rand(2, 3, 8, 8))     # 8 of 16 channels, 10 logits

Reference: Yang, Zhu, Chen, "GradAug: A New Regularization Method for Deep Neural
Networks", NeurIPS 2020 (slicing as in Yu et al., "Slimmable Neural Networks", ICLR 2019).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SlimBatchNorm1d", "SlimBatchNorm2d", "SlimConv1d", "SlimConv2d", "SlimLinear", "check_width",
           "is_slimmable", "kept_channels", "set_width", "slimmable"]


def check_width(width) -> float:
    """``width`` as a float in (0, 1], or a ValueError naming it."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0.0 < width <= 1.0:
        raise ValueError(f"width must be a number in (0, 1] (1.0 is the full network), got {width!r}")
    return float(width)


def kept_channels(channels: int, width: float) -> int:
    """``round(width * channels)`` (half up), at least 1: the channels a layer keeps at ``width``."""
    return max(1, math.floor(width * channels + 0.5))


class _Slim:
    """Mixin of the width-sliceable layers. ``width`` 1.0 is the full layer."""

    width: float = 1.0
    slice_out: bool = True  # False for the classifier

    def _out(self, full: int) -> int:
        return kept_channels(full, self.width) if self.slice_out else full


class _SlimConv(_Slim):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in = x.shape[1]
        if self.width >= 1.0 and c_in == self.in_channels:
            return super().forward(x)
        c_out = self._out(self.out_channels)
        groups = self.groups
        if groups == 1:
            weight = self.weight[:c_out, :c_in]
        else:  # whole groups: enough for the outputs kept and the channels received
            per_in, per_out = self.in_channels // groups, self.out_channels // groups
            groups = min(groups, max(-(-c_in // per_in), -(-c_out // per_out)))
            if c_in < groups * per_in:
                x = torch.cat([x, x.new_zeros(x.shape[0], groups * per_in - c_in, *x.shape[2:])], 1)
            weight = self.weight[:groups * per_out]
        bias = None if self.bias is None else self.bias[:weight.shape[0]]
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = self._fn(x, weight, bias, self.stride, padding, self.dilation, groups)
        return out if out.shape[1] == c_out else out[:, :c_out]


class SlimConv1d(_SlimConv, nn.Conv1d):
    """``nn.Conv1d`` that runs its first channels under :func:`set_width`."""

    _fn = staticmethod(F.conv1d)


class SlimConv2d(_SlimConv, nn.Conv2d):
    """``nn.Conv2d`` that runs its first channels under :func:`set_width`."""

    _fn = staticmethod(F.conv2d)


class SlimLinear(_Slim, nn.Linear):
    """``nn.Linear`` that runs its first features under :func:`set_width` (inputs: the last dimension)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c_in = x.shape[-1]
        if self.width >= 1.0 and c_in == self.in_features:
            return super().forward(x)
        c_out = self._out(self.out_features)
        return F.linear(x, self.weight[:c_out, :c_in], None if self.bias is None else self.bias[:c_out])


class _SlimBatchNorm(_Slim):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.width >= 1.0:
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        weight = self.weight[:c] if self.affine else None
        bias = self.bias[:c] if self.affine else None
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)  # batch statistics, buffers untouched


class SlimBatchNorm1d(_SlimBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d``; below full width: batch statistics of the first channels, running statistics untouched."""


class SlimBatchNorm2d(_SlimBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d``; below full width: batch statistics of the first channels, running statistics untouched."""


_SLIM = {nn.Conv1d: SlimConv1d, nn.Conv2d: SlimConv2d, nn.Linear: SlimLinear, nn.BatchNorm1d: SlimBatchNorm1d,
         nn.BatchNorm2d: SlimBatchNorm2d}
_SLICED = (nn.Conv1d, nn.Conv2d, nn.Linear)  # layers whose outputs are sliced (all but the classifier)


def is_slimmable(model: nn.Module) -> bool:
    """Whether ``model`` holds any width-sliceable layer."""
    return any(isinstance(m, _Slim) for m in model.modules())


def slimmable(model: nn.Module, *, inplace: bool = True, keep: Iterable[str] | None = None) -> nn.Module:
    """Make ``model`` width-sliceable (see the module notes); returns the converted model.

    Args:
        model: any ``nn.Module`` built from ``nn.Conv1d``/``Conv2d``/``Linear``/``BatchNorm1d``/``BatchNorm2d``
            (and parameter-free layers, pooling, residual additions).
        inplace: convert ``model`` itself (default: its parameters stay the same objects, so
            an optimizer built on it keeps working) or a deep copy.
        keep: names (as in ``named_modules()``) of the layers whose outputs are never sliced;
            default: the last conv or linear layer in ``named_modules()`` order (the classifier).

    Converting twice is harmless. Raises ValueError when the model has no conv or linear
    layer to slice, a parameter outside those layers (a transformer's attention, LayerNorm, tokens), or
    ``keep`` names a layer it does not have.

    >>> model = slimmable(maxup.models.create_model("resnet", input_shape=(3, 32, 32)))
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    layers = [(name, m) for name, m in model.named_modules() if type(m) in _SLIM or isinstance(m, _Slim)]
    sliced = [name for name, m in layers if isinstance(m, _SLICED)]
    if not sliced:
        raise ValueError(f"model ({type(model).__name__}) has no width-sliceable layer: GradAug needs "
                         "nn.Conv1d, nn.Conv2d or nn.Linear layers (exact torch.nn classes)")
    convertible = {id(m) for _, m in layers}
    other = [f"{name + '.' if name else ''}{p}" for name, m in model.named_modules() if id(m) not in convertible
             for p, _ in m.named_parameters(recurse=False)]
    if other:  # attention, LayerNorm, embeddings, tokens: a slice of their width would not be a sub-network
        raise ValueError(f"GradAug cannot slice {type(model).__name__}: its parameter {other[0]!r} is not in an "
                         "nn.Conv1d/Conv2d/Linear/BatchNorm1d/BatchNorm2d layer (attention, LayerNorm, embeddings "
                         "and tokens are not width-sliceable); use a convolutional model such as cnn or resnet")
    keep = {sliced[-1]} if keep is None else {keep} if isinstance(keep, str) else set(keep)
    missing = sorted(keep - set(sliced))
    if missing:
        raise ValueError(f"keep names {missing}, which are not conv or linear layers of the model; "
                         f"its layers: {sliced}")
    for name, m in layers:
        if not isinstance(m, _Slim):
            m.__class__ = _SLIM[type(m)]
        if isinstance(m, _SLICED):
            m.slice_out = name not in keep
    return model


class set_width:
    """Run ``model`` as its sub-network of width ``w`` in (0, 1]; as a context manager, restore the widths on exit.

    Sets the width of every width-sliceable layer at once; used as a plain call, the
    width stays until the next call. The model must have been through :func:`slimmable`.

    >>> model = slimmable(model)
    >>> with set_width(model, 0.75):
    ...     sub_logits = model(x)
    """

    def __init__(self, model: nn.Module, width: float):
        width = check_width(width)
        self.layers = [m for m in model.modules() if isinstance(m, _Slim)]
        if not self.layers:
            raise ValueError(f"model ({type(model).__name__}) has no width-sliceable layer: "
                             "convert it first with maxup.slim.slimmable(model)")
        self.model = model
        self.saved = [m.width for m in self.layers]
        for m in self.layers:
            m.width = width

    def __enter__(self) -> nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        for m, w in zip(self.layers, self.saved):
            m.width = w
