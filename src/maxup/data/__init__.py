"""In-memory datasets and a fast batch loader.

>>> from maxup.data import load_dataset, Loader
>>> splits = load_dataset("digits", val_size=0.1)
>>> loader = Loader(splits.train, batch_size=64, seed=0)
>>> x, y = next(iter(loader))
>>> tuple(x.shape), y.dtype
((64, 1, 8, 8), torch.int64)
"""

from .core import DataSplits, TensorData, from_tensors, stratified_split
from .datasets import list_datasets, load_dataset
from .idx import read_idx
from .loader import Loader
from .longtail import class_counts, long_tail_counts, long_tail_indices, shot_accuracy, shot_groups, shot_thresholds
from .noise import (
    NOISE_PRESETS,
    NOISE_TYPES,
    add_label_noise,
    asymmetric_noise,
    pairflip_noise,
    read_label_file,
    symmetric_noise,
    transition_matrix,
)
from .sampling import SAMPLERS, ClassSampler, class_probabilities, sample_indices, sample_probabilities
from .text import Corpus, build_kjv_corpus, kjv_corpus, load_corpus, read_corpus, segments

__all__ = [
    "ClassSampler",
    "Corpus",
    "DataSplits",
    "Loader",
    "NOISE_PRESETS",
    "NOISE_TYPES",
    "SAMPLERS",
    "TensorData",
    "add_label_noise",
    "asymmetric_noise",
    "build_kjv_corpus",
    "class_counts",
    "class_probabilities",
    "from_tensors",
    "kjv_corpus",
    "list_datasets",
    "load_corpus",
    "load_dataset",
    "long_tail_counts",
    "long_tail_indices",
    "pairflip_noise",
    "read_corpus",
    "read_idx",
    "read_label_file",
    "sample_indices",
    "sample_probabilities",
    "segments",
    "shot_accuracy",
    "shot_groups",
    "shot_thresholds",
    "stratified_split",
    "symmetric_noise",
    "transition_matrix",
]
