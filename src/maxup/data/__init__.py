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
from .text import Corpus, build_kjv_corpus, kjv_corpus, load_corpus, read_corpus, segments

__all__ = [
    "Corpus",
    "DataSplits",
    "Loader",
    "TensorData",
    "build_kjv_corpus",
    "from_tensors",
    "kjv_corpus",
    "list_datasets",
    "load_corpus",
    "load_dataset",
    "read_corpus",
    "read_idx",
    "segments",
    "stratified_split",
]
