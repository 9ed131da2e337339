"""Perturbations of token sequences for language modelling, built on :mod:`maxup.functional.text`.

Called like every augmentation, ``aug(x, y, generator=None) -> (x_aug, y)``, on token ids
``x`` (B, T) and next-token targets ``y`` (B, T), which pass through unchanged (integer
ids, not soft targets: a (B, T, vocab) one-hot would be large). Each segment is one sample,
so ``maxup.MaxUp(WordDropout(0.1), m=4)`` keeps, per segment, the copy whose mean token
loss is highest.

:class:`EmbeddingNoise` leaves the ids as they are and returns the noise as a forward
context (:class:`maxup.functional.EmbeddingNoise`) that the objectives apply to the model's
embeddings in every forward of the batch.

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
from .._modules import unwrap
from ..functional.text import check_tokens
from ..registry import register
from .base import Augmentation


class TokenAugmentation(Augmentation):
    """Base class: checks ids (B, T) and targets (B, T), calls :meth:`apply` with the targets unchanged.

    ``num_classes`` is the vocabulary size (optional; when given, ids are checked against it).
    """

    domain = "sequence"

    def check(self, x: torch.Tensor, y: torch.Tensor):
        x = check_tokens(x, name="x", vocab_size=self.num_classes)
        if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.shape != x.shape:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must hold the next-token ids of x, an integer tensor of shape {tuple(x.shape)}, "
                             f"got {shape}")
        return x, y

    def _options(self) -> dict:
        return {"num_classes": self.num_classes}


@register("word_dropout", "word dropout: each input token becomes <unk> with probability p (language models)")
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


@register("token_sub", "each input token replaced by a random word with probability p (language models)")
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


@register("embed_noise", "Gaussian noise N(0, sigma^2) on the word embeddings (language models)", hidden=("dim",))
class EmbeddingNoise(TokenAugmentation):
    """Gaussian noise N(0, sigma^2) on every input token's embedding, of size ``dim``.

    The ids pass through unchanged; :meth:`draw` returns the noise as a forward context
    (:class:`maxup.functional.EmbeddingNoise`) that adds it to the output of the model's
    ``.embedding`` (an ``nn.Embedding``, as in :class:`maxup.models.LSTMLanguageModel`).
    The objectives (:class:`maxup.ERM`, :class:`maxup.MaxUp`) enter it around every forward.
    """

    context = "rows"

    def __init__(self, sigma: float = 0.1, *, dim: int, num_classes: int | None = None):
        super().__init__(num_classes=num_classes)
        self.sigma = check_positive("sigma", sigma, allow_zero=True)
        self.dim = check_int("dim", dim)

    @classmethod
    def from_spec(cls, *, model=None, num_classes=None, **options) -> EmbeddingNoise:
        embedding = getattr(unwrap(model), "embedding", None) if model is not None else None
        if not isinstance(embedding, torch.nn.Embedding):
            raise ValueError("embed_noise needs a model whose nn.Embedding is its .embedding attribute, such as "
                             "maxup.models.LSTMLanguageModel (maxup lm)")
        return cls(**options, dim=embedding.embedding_dim, num_classes=num_classes)

    def apply(self, x, y, generator):
        return self.apply_context(x, y, generator)[:2]

    def apply_context(self, x, y, generator):
        return x, y, MF.embedding_noise(x, self.sigma, self.dim, generator=generator)

    def _options(self):
        return {"sigma": self.sigma, "dim": self.dim, **super()._options()}


__all__ = ["EmbeddingNoise", "TokenAugmentation", "TokenSubstitution", "WordDropout"]
