"""A small vision transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", ICLR 2021).

Patch embedding (a conv whose stride is its kernel, the patch), a class token, learned position
embeddings, ``depth`` pre-norm transformer blocks and a linear classifier on the class token,
sized to train on two CPU cores (dim 64, depth 4, 4 heads: 0.14M parameters on 28x28 inputs).

The attention is written out, so the class token's attention over the tokens of the last block
can be read: ``model(x, return_attention=True)`` returns ``(logits, attention)``, ``attention``
of shape (B, heads, 1 + tokens), each row the softmax of the class token's query against every
key (itself first), before attention dropout. TransMix (:mod:`maxup.augment.transmix`) reads it;
:meth:`ViT.activation_maps` gives the classifier applied to every patch token (a TokenMix teacher).

``stages`` are ``["embed", "blocks.0", ...]``: the tokens after the embedding and after every
block, where Manifold Mixup may mix. GradAug's width slicing (:mod:`maxup.slim`) does not apply:
LayerNorm, the class token and the position embeddings keep their full width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_dropout, check_int, check_positive

__all__ = ["ViT"]


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (height, width) of ints, got {value!r}")
        return check_int(name, value[0]), check_int(name, value[1])
    v = check_int(name, value)
    return v, v


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) to tokens (B, 1 + N, dim): patches by a strided conv, the class token first,
    position embeddings added, dropout."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: tuple[int, int], dim: int,
                 dropout: float):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
        tokens = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"the ViT was built for {self.image_size[0]}x{self.image_size[1]} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]}: build it with image_size={tuple(x.shape[-2:])}")
        tokens = self.proj(x).flatten(2).transpose(1, 2)                  # (B, N, dim), row-major over the grid
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, tokens], 1) + self.pos_embed)


class Attention(nn.Module):
    """Multi-head self-attention; on request also the class token's attention row (B, heads, 1 + N)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, N, d/h)
        p = self.attn_dropout if self.training else 0.0
        if not return_attention:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            cls = None
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, N, N)
            cls = attn[:, :, 0].detach()                                      # before dropout, as timm's TransMix
            out = F.dropout(attn, p, self.training) @ v
        out = self.proj_dropout(self.proj(out.transpose(1, 2).reshape(b, n, d)))
        return out if cls is None else (out, cls)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            a, cls = self.attn(self.norm1(x), return_attention=True)
            x = x + a
            return x + self.mlp(self.norm2(x)), cls
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: patch embedding, class token, position embeddings, pre-norm blocks,
    a linear classifier on the class token.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        image_size: ``(H, W)`` or one int for square images; the patch grid must divide it
            (:func:`maxup.models.create_model` fills it in from ``input_shape``).
        patch_size: side of a square patch, or ``(ph, pw)``: 4 or 7 on 28x28 Fashion-MNIST, 2 on 8x8 digits.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of each block's MLP over ``dim``.
        dropout: dropout on the embeddings, the attention weights and each block's outputs.

    ``model(x, return_attention=True)`` returns ``(logits, attention)``: the class token's attention
    in the last block, (B, heads, 1 + N), each row summing to one (see the module notes).

    >>> vit = ViT(in_channels=1, num_classes=10, image_size=28, patch_size=7)
    >>> logits, attention = vit(torch.rand(2, 1, 28, 28), return_attention=True)
    >>> logits.shape, attention.shape
    (torch.Size([2, 10]), torch.Size([2, 4, 17]))
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 28,
        patch_size: int | tuple[int, int] = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels)
        num_classes = check_int("num_classes", num_classes)
        image = _pair("image_size", image_size)
        patch = _pair("patch_size", patch_size)
        dim, depth, heads = check_int("dim", dim), check_int("depth", depth), check_int("heads", heads)
        mlp_ratio = check_positive("mlp_ratio", mlp_ratio)
        dropout = check_dropout("dropout", dropout)
        if image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(f"patch_size {patch[0]}x{patch[1]} does not divide the {image[0]}x{image[1]} images: "
                             "choose a patch_size whose sides divide the image's (e.g. 4 or 7 for 28x28, 2 for 8x8)")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim}): each head gets dim / heads channels")
        self.patch_size = patch
        self.embed = PatchEmbed(in_channels, image, patch, dim, dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self._init_weights()
        self.stages: list[str] = ["embed"] + [f"blocks.{i}" for i in range(depth)]

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (rows, columns): the tokens after the class token, row-major."""
        return self.embed.grid_size

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.embed.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.embed.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor, return_attention: bool = False):
        """The normalised tokens (B, 1 + N, dim) after the last block (and the class token's attention there)."""
        x = self.embed(x)
        cls = None
        for i, block in enumerate(self.blocks):
            if return_attention and i == len(self.blocks) - 1:
                x, cls = block(x, return_attention=True)
            else:
                x = block(x)
        x = self.norm(x)
        return (x, cls) if return_attention else x

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if return_attention:
            tokens, attention = self.features(x, return_attention=True)
            return self.classifier(tokens[:, 0]), attention
        return self.classifier(self.features(x)[:, 0])

    def activation_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes, rows, cols): the classifier applied to every patch token of the last block
        (a content-based activation map per class, as TokenMix's teacher gives)."""
        tokens = self.features(x)[:, 1:]
        logits = self.classifier(tokens)                                   # (B, N, K)
        return logits.transpose(1, 2).reshape(x.shape[0], -1, *self.grid_size)
