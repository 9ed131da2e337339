"""Perturbations of token sequences for language modelling, built on :mod:`maxup.functional.text`.

Called like every augmentation, ``aug(x, y, generator=None) -> (x_aug, y)``, on token ids
``x`` (B, T) and next-token targets ``y`` (B, T), which pass through unchanged (integer
ids, not soft targets: a (B, T, vocab) one-hot would be large). Each segment is one sample,
so ``maxup.MaxUp(WordDropout(0.1), m=4)`` keeps, per segment, the copy whose mean token
loss is highest.

:class:`EmbeddingNoise` returns the ids packed with their embedding noise (see
:func:`maxup.functional.embed`), so it comes last when augmentations are composed.

>>> aug = WordDropout(0.1)
>>> x = torch.randint(2, 100, (8, 35))
>>> xa, ya = aug(x, x, generator=torch.Generator().manual_seed(0))
>>> xa.shape, bool((xa == 0).any())
(torch.Size([8, 35]), True)
"""
from __future__ import annotations

import torch

from .. import functional as MF
from .._checks import check_int, check_positive
from ..functional.text import check_tokens
from . import Augmentation


class TokenAugmentation(Augmentation):
    """Base class: checks ids (B, T) and targets (B, T), calls :meth:`apply` with the targets unchanged.

    ``num_classes`` is the vocabulary size (optional; when given, ids are checked against it).
    """

    sequence = True

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        x = check_tokens(x, name="x", vocab_size=self.num_classes)
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.shape != x.shape:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must hold the next-token ids of x, an integer tensor of shape {tuple(x.shape)}, "
                             f"got {shape}")
        return self.apply(x, y, generator)

    def _options(self) -> dict:
        return {"num_classes": self.num_classes}


class WordDropout(TokenAugmentation):
    """Replace each input token by ``<unk>`` (index ``unk_index``) with probability ``p``.

    Args:
        p: the replacement rate per token (not, as elsewhere, a probability per sample).
        unk_index: the id of ``<unk>``; 0 in :func:`maxup.data.text.read_corpus` vocabularies.
    """

    def __init__(self, p: float = 0.1, *, unk_index: int = 0, num_classes: int | None = None):
        super().__init__(num_classes=num_classes, p=p)
        self.unk_index = check_int("unk_index", unk_index, minimum=0)
        if num_classes is not None and self.unk_index >= num_classes:
            raise ValueError(f"unk_index={unk_index} is outside the vocabulary of {num_classes} words: "
                             "pass the id of <unk>")

    def apply(self, x, y, generator):
        return MF.word_dropout(x, self.p, unk_index=self.unk_index, generator=generator), y

    def _options(self):
        return {"p": self.p, "unk_index": self.unk_index, **super()._options()}


class TokenSubstitution(TokenAugmentation):
    """Replace each input token, with probability ``p``, by a word drawn uniformly from the vocabulary.

    Needs ``num_classes``, the vocabulary size (the method registry passes it).
    """

    def __init__(self, p: float = 0.1, *, num_classes: int | None = None):
        if num_classes is None:
            raise ValueError("TokenSubstitution needs num_classes, the vocabulary size, to draw replacement words")
        super().__init__(num_classes=num_classes, p=p)

    def apply(self, x, y, generator):
        return MF.token_substitution(x, self.p, self.num_classes, generator=generator), y

    def _options(self):
        return {"p": self.p, **super()._options()}


class EmbeddingNoise(TokenAugmentation):
    """Gaussian noise N(0, sigma^2) on every input token's embedding, of size ``dim``.

    Returns a float tensor (B, T, 1 + dim): the ids packed with the noise, which
    :class:`maxup.models.LSTMLanguageModel` (or any model that embeds with
    :func:`maxup.functional.embed`) adds to the looked-up embeddings.
    """

    last = "it packs the noise with the token ids; put embed_noise last in a method spec"

    def __init__(self, sigma: float = 0.1, *, dim: int, num_classes: int | None = None):
        super().__init__(num_classes=num_classes)
        self.sigma = check_positive("sigma", sigma, allow_zero=True)
        self.dim = check_int("dim", dim)

    def apply(self, x, y, generator):
        return MF.embedding_noise(x, self.sigma, self.dim, generator=generator), y

    def _options(self):
        return {"sigma": self.sigma, "dim": self.dim, **super()._options()}


__all__ = ["EmbeddingNoise", "TokenAugmentation", "TokenSubstitution", "WordDropout"]
