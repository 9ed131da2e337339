"""Models for ``maxup``: a small CNN, an MLP, a 1-D CNN, a CIFAR ResNet, a
Wide ResNet and a small vision transformer, created by name.

>>> from maxup.models import create_model, list_models
>>> list_models()
['cnn', 'mlp', 'cnn1d', 'resnet', 'wrn', 'vit']
>>> model = create_model("cnn", input_shape=(1, 8, 8), num_classes=10)

All models are built from standard torch layers (Conv1d/2d, Linear,
BatchNorm1d/2d, ReLU, pooling, Dropout, Flatten), so GradAug's width slicing
can convert them (except the ViT: LayerNorm, class token and position
embeddings keep their width); every model exposes ``stages`` (names in
``named_modules()`` after which hidden features can be mixed, stem output
first) and ``classifier`` (the final ``nn.Linear``).

:class:`LSTMLanguageModel` (word-level language modelling, ``maxup lm``) is built
directly, not by name: it maps token ids (B, T) to logits (B, T, vocab_size).
"""

from .cnn import CNN1d, MLP, SmallCNN
from .lstm import LSTMLanguageModel
from .registry import create_model, list_models, model_options
from .resnet import BasicBlock, PreActWideBlock, ResNet, WideResNet
from .vit import ViT

__all__ = [
    "create_model",
    "list_models",
    "model_options",
    "SmallCNN",
    "CNN1d",
    "MLP",
    "ResNet",
    "BasicBlock",
    "WideResNet",
    "PreActWideBlock",
    "ViT",
    "LSTMLanguageModel",
]
