"""Pure operations on token sequences: word dropout, token substitution, embedding noise.

Token ids are integer tensors of shape (B, T). As in :mod:`maxup.functional.mixing`, each
function takes its randomness as arguments (``mask``, ``replacement``, ``noise``) or draws
it from an optional ``torch.Generator``, and returns a new tensor. The perturbations touch
the inputs only; the targets stay the real next tokens.

Embedding noise cannot be written into ids, so :func:`embedding_noise` returns it as a
forward context (:class:`EmbeddingNoise`, see :mod:`maxup.functional.context`): a hook adds
it to the output of the model's ``.embedding`` in every forward of those rows, so a second
pass on the same rows (SAM) looks the ids up at the current weights and adds the same noise.

>>> tokens = torch.tensor([[5, 6, 7, 8]])
>>> word_dropout(tokens, mask=torch.tensor([[False, True, False, True]]))
tensor([[5, 0, 7, 0]])
>>> embedding_noise(tokens, 0.1, 3).noise.shape
torch.Size([1, 4, 3])
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_int, check_positive, check_probability
from . import _random as R
from .context import ForwardContext


def check_tokens(x, *, name: str = "x", vocab_size: int | None = None) -> torch.Tensor:
    """``x`` if it is a non-empty (B, T) integer tensor of ids in ``[0, vocab_size)``; a ValueError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids of shape (B, T), got dtype {x.dtype}"
                        )
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch of token ids of shape (B, T), got shape {tuple(x.shape)}")
    if vocab_size is not None and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise ValueError(f"{name} holds token ids in [{int(x.min())}, {int(x.max())}], outside the vocabulary "
                         f"[0, {vocab_size})")
    return x


def token_mask(shape, p: float, *, generator=None, device=None) -> torch.Tensor:
    """Booleans of ``shape``, each True with probability ``p``: the positions a perturbation replaces."""
    p = check_probability("p", p)
    return R.rand(tuple(shape), generator=generator, device=device) < p


def word_dropout(tokens: torch.Tensor, p: float = 0.1, *, unk_index: int = 0, mask: torch.Tensor | None = None,
                 generator=None) -> torch.Tensor:
    """Replace each token by ``unk_index`` (``<unk>``) with probability ``p``, or where ``mask`` is True.

    Word dropout (Iyyer et al. 2015; Gal and Ghahramani 2016 drop whole word types instead).
    """
    tokens = check_tokens(tokens, name="tokens")
    unk_index = check_int("unk_index", unk_index, minimum=0)
    if mask is None:
        mask = token_mask(tokens.shape, p, generator=generator, device=tokens.device)
    return tokens.masked_fill(mask.to(tokens.device), unk_index)


def token_substitution(tokens: torch.Tensor, p: float, vocab_size: int, *, mask: torch.Tensor | None = None,
                       replacement: torch.Tensor | None = None, generator=None) -> torch.Tensor:
    """Replace each token, with probability ``p`` (or where ``mask`` is True), by a word drawn
    uniformly from the vocabulary (``replacement``, drawn unless given; a draw may equal the
    original word, with probability 1 / ``vocab_size``)."""
    tokens = check_tokens(tokens, name="tokens")
    vocab_size = check_int("vocab_size", vocab_size)
    if mask is None:
        mask = token_mask(tokens.shape, p, generator=generator, device=tokens.device)
    if replacement is None:
        replacement = R.randint(vocab_size, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(mask.to(tokens.device), replacement.to(tokens), tokens)


@dataclass(frozen=True)
class EmbeddingNoise(ForwardContext):
    """A forward context that adds ``noise`` (B, T, dim) to the output of the model's ``.embedding``.

    Every forward of the same rows inside :func:`maxup.functional.context.enter` adds the same
    noise (SAM's second pass looks the ids up at the current weights and adds it again).
    """

    noise: torch.Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]

    def apply(self, model: nn.Module):
        from .._modules import unwrap
        embedding = getattr(unwrap(model), "embedding", None)
        if not isinstance(embedding, nn.Embedding):
            raise ValueError("embedding noise needs a model whose nn.Embedding is its .embedding attribute, such as "
                             "maxup.models.LSTMLanguageModel")
        return _hooked(embedding, self.noise)

    def blank(self, n: int, device=None) -> EmbeddingNoise:
        return EmbeddingNoise(torch.zeros((n, *self.noise.shape[1:]), dtype=self.noise.dtype, device=device))

    @classmethod
    def stack(cls, contexts) -> EmbeddingNoise:
        return cls(torch.cat([c.noise for c in contexts]))

    def rows(self, index: torch.Tensor) -> EmbeddingNoise:
        return EmbeddingNoise(self.noise[index.to(self.noise.device)])


@contextlib.contextmanager
def _hooked(embedding: nn.Embedding, noise: torch.Tensor):
    def hook(module, args, output):
        if output.shape != noise.shape:
            raise ValueError(f"embedding noise of shape {tuple(noise.shape)} does not match the embeddings "
                             f"{tuple(output.shape)}: the noise must come from the same batch")
        return output + noise.to(output.dtype)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def embedding_noise(tokens: torch.Tensor, sigma: float, dim: int, *, noise: torch.Tensor | None = None,
                    generator=None) -> EmbeddingNoise:
    """``sigma * noise`` (noise ~ N(0, I) of shape (B, T, dim), drawn unless given) as a forward context
    that adds it to the embeddings of ``tokens`` (see :class:`EmbeddingNoise`).

    >>> context = embedding_noise(torch.tensor([[5, 6, 7, 8]]), 0.1, 3)
    >>> context.noise.shape
    torch.Size([1, 4, 3])
    """
    tokens = check_tokens(tokens, name="tokens")
    sigma = check_positive("sigma", sigma, allow_zero=True)
    dim = check_int("dim", dim)
    if noise is None:
        noise = R.randn((*tokens.shape, dim), generator=generator, device=tokens.device)
    if noise.shape != (*tokens.shape, dim):
        raise ValueError(f"noise must have shape {(*tokens.shape, dim)}, got {tuple(noise.shape)}")
    return EmbeddingNoise(sigma * noise.float())


__all__ = ["EmbeddingNoise", "check_tokens", "embedding_noise", "token_mask", "token_substitution", "word_dropout"]
