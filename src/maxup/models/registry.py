"""Create models by name: ``create_model("resnet", input_shape=(3, 32, 32))``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from .cnn import CNN1d, MLP, SmallCNN
from .resnet import ResNet, WideResNet
from .vit import ViT

__all__ = ["list_models", "create_model", "model_options"]


@dataclass(frozen=True)
class _Spec:
    cls: type[nn.Module]
    kind: str  # "image" (C, H, W), "signal" (C, L) or "features" (any shape, flattened)
    summary: str


_REGISTRY: dict[str, _Spec] = {
    "cnn": _Spec(SmallCNN, "image", "small 2-D CNN (conv-BN-ReLU blocks, GAP, linear)"),
    "mlp": _Spec(MLP, "features", "MLP on the flattened input (needs input_shape)"),
    "cnn1d": _Spec(CNN1d, "signal", "1-D CNN for (C, L) signals"),
    "resnet": _Spec(ResNet, "image", "CIFAR ResNet, depth 6n+2 (default ResNet-20, width 16)"),
    "wrn": _Spec(WideResNet, "image", "Wide ResNet WRN-d-k, depth 6n+4 (default WRN-16-4)"),
    "vit": _Spec(ViT, "image", "small vision transformer (patch embedding, class token, pre-norm blocks)"),
}

# Arguments that create_model fills in itself from in_channels / input_shape.
_MANAGED = {"in_channels", "num_classes", "in_features", "image_size"}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`.

    >>> list_models()
    ['cnn', 'mlp', 'cnn1d', 'resnet', 'wrn', 'vit']
    """
    return list(_REGISTRY)


def _spec(name: str) -> _Spec:
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name.lower()]


def model_options(name: str) -> dict[str, object]:
    """The extra keyword options of model ``name`` with their defaults.

    >>> model_options("resnet")
    {'depth': 20, 'width': 16, 'zero_init_residual': False}
    """
    params = inspect.signature(_spec(name).cls.__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.name != "self"
        and p.name not in _MANAGED
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def _check_shape(input_shape: object) -> tuple[int, ...]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str) or not input_shape:
        raise ValueError(f"input_shape must be a non-empty tuple of ints, got {input_shape!r}")
    shape = tuple(input_shape)
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"input_shape must contain positive ints, got {input_shape!r}")
    return shape


def create_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_shape: tuple[int, ...] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build model ``name`` (one of :func:`list_models`).

    Args:
        name: ``"cnn"``, ``"mlp"``, ``"cnn1d"``, ``"resnet"`` or ``"wrn"``.
        in_channels: input channels (images, signals); ignored when
            ``input_shape`` is given.
        num_classes: number of output logits.
        input_shape: shape of one sample without the batch dimension:
            ``(C, H, W)`` for ``cnn``/``resnet``/``wrn``, ``(C, L)`` for
            ``cnn1d``, anything for ``mlp`` (flattened; required there). When
            given, ``C`` overrides ``in_channels``.
        **kwargs: model options, see :func:`model_options` (e.g. ``depth``,
            ``width``, ``widen_factor``, ``dropout``, ``hidden``, ``channels``).

    Raises:
        ValueError: unknown name or option, an input_shape of the wrong rank,
            or an invalid option value (e.g. a ResNet depth not of the form 6n+2).

    Every returned model maps a batch ``(B, *input_shape)`` to logits
    ``(B, num_classes)`` and has ``.stages`` (module names after which hidden
    features may be mixed) and ``.classifier`` (the final ``nn.Linear``).

    Example:
        >>> model = create_model("resnet", input_shape=(3, 32, 32), num_classes=100, depth=32)
        >>> model.stages
        ['stem', 'layer1', 'layer2', 'layer3']
    """
    spec = _spec(name)
    key = name.lower()
    options = model_options(key)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        valid = ", ".join(options) if options else "(none)"
        raise ValueError(
            f"unknown argument(s) {', '.join(repr(k) for k in unknown)} for model {key!r}; "
            f"valid options: {valid}"
        )

    shape = None if input_shape is None else _check_shape(input_shape)
    if spec.kind == "features":
        if shape is None:
            raise ValueError(
                f"model {key!r} needs input_shape (the shape of one sample, e.g. (64,) or (1, 28, 28))"
            )
        return spec.cls(in_features=math.prod(shape), num_classes=num_classes, **kwargs)

    rank = {"image": 3, "signal": 2}[spec.kind]
    if shape is not None:
        if len(shape) != rank:
            form = "(C, H, W)" if rank == 3 else "(C, L)"
            raise ValueError(
                f"input_shape for model {key!r} must be {form}, got {tuple(input_shape)!r}"
            )
        in_channels = shape[0]
        if "image_size" in inspect.signature(spec.cls.__init__).parameters:  # the ViT's position embeddings
            kwargs["image_size"] = shape[1:]
    return spec.cls(in_channels=in_channels, num_classes=num_classes, **kwargs)
