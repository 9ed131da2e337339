"""An LSTM language model: embedding, stacked LSTM with dropout, output layer tied to the embedding."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_dropout, check_int

__all__ = ["LSTMLanguageModel"]


class LSTMLanguageModel(nn.Module):
    """Word-level LSTM language model (Zaremba et al. 2014; tied weights: Press and Wolf 2017).

    Maps token ids ``(B, T)`` to next-token logits ``(B, T, vocab_size)``, every segment
    starting from a zero state. Embedding noise (:class:`maxup.augment.EmbeddingNoise`) reaches
    it through a forward hook on its ``.embedding`` (a forward context). Dropout ``dropout``
    applies to the embeddings, between LSTM layers and before the output layer, whose
    weight is the embedding matrix (``tie_weights``).

    Sized for CPUs: with the defaults, one epoch of the KJV corpus (``maxup lm``: 740,000
    tokens, 6,629 words, batch 32) takes about 2.5 minutes on one CPU thread, about 6 with
    MaxUp over 4 copies; the tied output layer over the vocabulary is most of the cost.

    Args:
        vocab_size: number of words (the logits).
        dim: embedding and hidden size (one size, so the output layer can be tied).
        layers: stacked LSTM layers.
        dropout: dropout probability in [0, 1).
        tie_weights: share the embedding matrix with the output layer.

    >>> model = LSTMLanguageModel(100, dim=32)
    >>> model(torch.randint(0, 100, (4, 35))).shape
    torch.Size([4, 35, 100])
    """

    def __init__(self, vocab_size: int, *, dim: int = 200, layers: int = 2, dropout: float = 0.2,
                 tie_weights: bool = True):
        super().__init__()
        vocab_size = check_int("vocab_size", vocab_size, minimum=2)
        dim = check_int("dim", dim)
        layers = check_int("layers", layers)
        dropout = check_dropout("dropout", dropout)
        self.embedding = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.classifier = nn.Linear(dim, vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)
        if tie_weights:
            self.classifier.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.classifier.weight, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() and x.dim() != 2:
            raise ValueError(f"token ids must have shape (B, T), got {tuple(x.shape)}")
        out, _ = self.lstm(self.drop(self.embedding(x)))
        return self.classifier(self.drop(out))
