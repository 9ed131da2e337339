"""``load_dataset``: the named datasets, read into memory as :class:`DataSplits`."""

from __future__ import annotations

import os

import numpy as np
import torch

from .cifar import load_cifar_arrays
from .core import DataSplits, TensorData, finish_splits, split_off_test
from .folder import load_folder_arrays
from .idx import load_idx_arrays
from .longtail import check_imbalance
from .noise import check_noise_options

__all__ = ["list_datasets", "load_dataset"]

_NAMES = ("cifar10", "cifar100", "digits", "fashion-mnist", "folder", "mnist")
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "cifar_10": "cifar10", "cifar_100": "cifar100"}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_NAMES)


def _u8(x: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]."""
    return torch.from_numpy(x.astype(np.float32) / np.float32(255.0))


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn (or maxup[cli])") from err
    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0))[:, None]  # (1797, 1, 8, 8), values 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    # Fixed stratified 25% test split, independent of the run's seed.
    xtr, ytr, xte, yte = split_off_test(x, y, 0.25)
    return torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte), 10, \
        [str(i) for i in range(10)]


def _idx(name: str, data_dir):
    xtr, ytr, xte, yte = load_idx_arrays(name, data_dir)
    for split, labels in (("train", ytr), ("test", yte)):
        if len(labels) and labels.max() >= 10:
            raise ValueError(f"{name}: {split} labels must lie in 0..9, found {int(labels.max())}")
    classes = _FASHION_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    return (_u8(xtr[:, None]), torch.from_numpy(ytr.astype(np.int64)), _u8(xte[:, None]),
            torch.from_numpy(yte.astype(np.int64)), 10, classes)


def _cifar(name: str, data_dir):
    xtr, ytr, xte, yte, k, classes = load_cifar_arrays(name, data_dir)
    return _u8(xtr), torch.from_numpy(ytr), _u8(xte), torch.from_numpy(yte), k, classes


def _folder(data_dir):
    xtr, ytr, xte, yte, classes = load_folder_arrays(data_dir)
    if xte is None:  # no train/ and test/ subfolders: fixed stratified 20% test split
        xtr, ytr, xte, yte = split_off_test(xtr, ytr, 0.2)
    for split, labels in (("training", ytr), ("test", yte)):
        empty = [c for i, c in enumerate(classes) if not (labels == i).any()]
        if empty:
            raise ValueError(f"folder dataset {data_dir}: class {', '.join(empty)} has no {split} image (a class "
                             "needs images in both splits; with no train/ and test/ subfolders 20% of each class "
                             "is the test split, so give each class at least 2 images)")
    return _u8(xtr), torch.from_numpy(ytr), _u8(xte), torch.from_numpy(yte), len(classes), classes


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    val_size: float | int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    label_noise: float = 0.0,
    noise_type: str | None = None,
    noise_map=None,
    noisy_labels=None,
    imbalance: float | None = None,
) -> DataSplits:
    """Load a named dataset into memory as float32 tensors.

    ``name`` is one of :func:`list_datasets`: ``digits`` (scikit-learn's 8x8
    digits, bundled; fixed stratified 25% test split), ``fashion-mnist`` and
    ``mnist`` (IDX files from ``data_dir``, ``$MAXUP_DATA`` or
    ``/usr/share/datasets/<name>/``), ``cifar10`` / ``cifar100`` (python pickle
    batches), ``folder`` (class-per-subfolder images under ``data_dir``).
    Pixels are scaled to [0, 1]; then ``train_size`` (stratified subset, the
    whole labelled budget), ``val_size`` (stratified, carved from the training
    data), ``test_size`` (first N) and ``normalize`` (training-split statistics
    per channel) apply, in that order. Subsets are deterministic in ``seed``;
    test sets never depend on it.

    Noisy labels and long tails (training split only; see :func:`maxup.data.core.finish_splits`
    for the order): ``label_noise=RATE`` with ``noise_type`` ``"symmetric"`` (default),
    ``"asymmetric"`` (``noise_map`` such as ``"9:1,2:0"``, or the dataset's preset in
    :data:`maxup.data.noise.NOISE_PRESETS`) or ``"pairflip"``; ``noisy_labels=FILE`` (one
    integer per line, or a .npy, one label per training sample as loaded); ``imbalance=RATIO``
    (exponential long-tailed profile, :mod:`maxup.data.longtail`). The training split then keeps
    its true labels as ``train.clean_y``.

    >>> d = load_dataset("digits", train_size=100, val_size=0.2)
    >>> len(d.train), len(d.val), d.input_shape
    (80, 20, (1, 8, 8))
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(_NAMES)}")
    check_noise_options(label_noise, noise_type, noise_map, noisy_labels)  # fail before reading the files
    if imbalance is not None:
        check_imbalance(imbalance, "imbalance (--imbalance)")
    if key == "digits":
        loaded = _digits()
    elif key in ("fashion-mnist", "mnist"):
        loaded = _idx(key, data_dir)
    elif key in ("cifar10", "cifar100"):
        loaded = _cifar(key, data_dir)
    else:
        loaded = _folder(data_dir)
    xtr, ytr, xte, yte, num_classes, classes = loaded
    return finish_splits(
        key,
        TensorData(xtr, ytr),
        TensorData(xte, yte),
        num_classes=num_classes,
        classes=classes,
        val_size=val_size,
        train_size=train_size,
        test_size=test_size,
        normalize=normalize,
        seed=seed,
        label_noise=label_noise,
        noise_type=noise_type,
        noise_map=noise_map,
        noisy_labels=noisy_labels,
        imbalance=imbalance,
    )
