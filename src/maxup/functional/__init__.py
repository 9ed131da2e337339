"""Pure tensor operations with injectable randomness (see :mod:`maxup.augment` for the classes)."""
from ._random import beta as sample_beta
from .context import ForwardContext, enter
from .manifold import HiddenMix, manifold_mixup, mix_hidden
from .mixing import (
    box_area,
    box_mask,
    crop_flip,
    cutmix,
    cutout,
    gaussian_mask,
    gaussian_noise,
    gmix,
    hmix,
    mixup,
    resizemix,
    sample_boxes,
    sample_cutout_boxes,
    sample_inner_boxes,
)
from .soft import lumix, occlude, perturb_ratio, shift_crop, soften_targets, softening_curve
from .targets import soft_cross_entropy, soft_targets
from .text import EmbeddingNoise, embedding_noise, token_mask, token_substitution, word_dropout

__all__ = [
    "box_area", "box_mask", "crop_flip", "cutmix", "cutout", "gaussian_mask", "gaussian_noise", "gmix",
    "hmix", "mixup", "resizemix", "sample_beta", "sample_boxes", "sample_cutout_boxes", "sample_inner_boxes",
    "soft_cross_entropy", "soft_targets", "EmbeddingNoise", "ForwardContext", "enter", "embedding_noise", "token_mask",
    "token_substitution",
    "word_dropout", "HiddenMix", "manifold_mixup", "mix_hidden", "lumix", "occlude", "perturb_ratio", "shift_crop",
    "soften_targets", "softening_curve",
]
