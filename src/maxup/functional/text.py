"""Pure operations on token sequences: word dropout, token substitution, embedding noise.

Token ids are integer tensors of shape (B, T). As in :mod:`maxup.functional.mixing`, each
function takes its randomness as arguments (``mask``, ``replacement``, ``noise``) or draws
it from an optional ``torch.Generator``, and returns a new tensor. The perturbations touch
the inputs only; the targets stay the real next tokens.

Embedding noise cannot be written into ids, so :func:`embedding_noise` returns the ids and
the noise together as one float tensor (B, T, 1 + dim): channel 0 holds the ids (exact in
float32 below 2**24 words), channels 1.. the noise to add to each token's embedding.
:func:`embed` turns ids or that packed form into embeddings; a model that calls it in place
of ``embedding(x)`` accepts both (:class:`maxup.models.LSTMLanguageModel` does). The packed
inputs stay plain data, so a second pass on the same rows (SAM) looks the ids up at the
current weights and adds the same noise.

>>> tokens = torch.tensor([[5, 6, 7, 8]])
>>> word_dropout(tokens, mask=torch.tensor([[False, True, False, True]]))
tensor([[5, 0, 7, 0]])
>>> embedding_noise(tokens, 0.1, 3).shape
torch.Size([1, 4, 4])
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import check_int, check_positive, check_probability
from . import _random as R


def check_tokens(x, *, name: str = "x", vocab_size: int | None = None) -> torch.Tensor:
    """``x`` if it is a non-empty (B, T) integer tensor of ids in ``[0, vocab_size)``; a ValueError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids of shape (B, T), got dtype {x.dtype}"
                         + (" (embed_noise output: put embed_noise last in a method spec)" if x.dim() == 3 else ""))
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


def embedding_noise(tokens: torch.Tensor, sigma: float, dim: int, *, noise: torch.Tensor | None = None,
                    generator=None) -> torch.Tensor:
    """The ids and ``sigma * noise`` (noise ~ N(0, I) of shape (B, T, dim), drawn unless given),
    packed as a float tensor (B, T, 1 + dim) for :func:`embed` (see the module notes)."""
    tokens = check_tokens(tokens, name="tokens")
    sigma = check_positive("sigma", sigma, allow_zero=True)
    dim = check_int("dim", dim)
    if noise is None:
        noise = R.randn((*tokens.shape, dim), generator=generator, device=tokens.device)
    if noise.shape != (*tokens.shape, dim):
        raise ValueError(f"noise must have shape {(*tokens.shape, dim)}, got {tuple(noise.shape)}")
    if tokens.numel() and int(tokens.max()) >= 2 ** 24:
        raise ValueError("token ids must be below 2**24 to be packed exactly into float32")
    return torch.cat([tokens.unsqueeze(-1).float(), sigma * noise.float()], dim=-1)


def embed(embedding: nn.Embedding, x: torch.Tensor) -> torch.Tensor:
    """Embeddings (B, T, dim) of token ids (B, T), or of the ids plus the noise packed by :func:`embedding_noise`."""
    if not x.is_floating_point():
        return embedding(x)
    dim = embedding.embedding_dim
    if x.dim() != 3 or x.shape[-1] != dim + 1:
        raise ValueError(f"float inputs must be token ids packed with embedding noise, shape (B, T, {dim + 1}) "
                         f"(see maxup.functional.embedding_noise), got {tuple(x.shape)}")
    return embedding(x[..., 0].long()) + x[..., 1:]


__all__ = ["check_tokens", "embed", "embedding_noise", "token_mask", "token_substitution", "word_dropout"]
