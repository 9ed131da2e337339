"""CIFAR-10 / CIFAR-100 from the official "python version" pickle batches.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html, the ``*-python.tar.gz``
archives, extracted):

- ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta`` (key ``b"label_names"``); each batch a dict with ``b"data"``
  (N, 3072) uint8 (R, G, B planes of 32x32) and ``b"labels"``.
- ``cifar-100-python/``: ``train``, ``test``, ``meta`` (key
  ``b"fine_label_names"``); labels under ``b"fine_labels"``.

The pickles are read with a restricted unpickler that only builds numpy arrays,
lists, dicts and strings, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["load_cifar_arrays", "find_cifar_dir"]

_SPECS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "meta": ("batches.meta", b"label_names"),
        "num_classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "meta": ("meta", b"fine_label_names"),
        "num_classes": 100,
    },
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable CIFAR python batch ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _how_to_get(name: str) -> str:
    spec = _SPECS[name]
    return (
        f"download {spec['archive']} from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and pass "
        f"data_dir= (CLI: --data-dir) pointing at the '{spec['folder']}/' folder or its parent, "
        f"or set MAXUP_DATA to that parent"
    )


def find_cifar_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The batch folder: ``data_dir`` itself or ``data_dir/<folder>`` (else ``$MAXUP_DATA``)."""
    spec = _SPECS[name]
    if data_dir is not None:
        roots = [Path(data_dir)]
    else:
        roots = [Path(os.environ["MAXUP_DATA"])] if os.environ.get("MAXUP_DATA") else []
    candidates = [p for root in roots for p in (root, root / spec["folder"], root / name)]
    first = spec["train"][0]
    for folder in candidates:
        if (folder / first).is_file():
            return folder
    tried = ", ".join(str(p) for p in candidates) or "(nowhere: no data_dir and MAXUP_DATA is unset)"
    raise FileNotFoundError(f"{name}: no '{first}' batch found; looked in {tried}. "
                            f"To get the data, {_how_to_get(name)}.")


def _read_batches(name: str, folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    spec = _SPECS[name]
    xs, ys = [], []
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"{name}: missing batch {path} (expected {', '.join(spec['train'] + spec['test'])} "
                f"in {folder}). To get the data, {_how_to_get(name)}."
            )
        batch = _load_pickle(path)
        if b"data" not in batch or spec["label_key"] not in batch:
            raise ValueError(
                f"{path}: a {name} batch needs keys b'data' and {spec['label_key']!r}, found {sorted(batch)}"
            )
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[spec["label_key"]])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
        if labels.ndim != 1 or len(labels) != len(data):
            raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images; they must match")
        if len(labels) and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
            raise ValueError(f"{path}: labels must lie in 0..{spec['num_classes'] - 1}, "
                             f"got {labels.min()}..{labels.max()}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _class_names(name: str, folder: Path) -> list[str] | None:
    fname, key = _SPECS[name]["meta"]
    path = folder / fname
    if not path.is_file():
        return None
    names = _load_pickle(path).get(key)
    count = _SPECS[name]["num_classes"]
    if names is None:
        return None
    if (not isinstance(names, (list, tuple)) or len(names) != count
            or not all(isinstance(n, (bytes, str)) for n in names)):
        raise ValueError(f"{path}: {key!r} must be a list of {count} class names, got {type(names).__name__} "
                         f"{names!r:.100}; restore the file from the {name} archive (or delete it: names are optional)")
    try:
        return [n.decode() if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the class names are not UTF-8; restore the file from the {name} archive") from None


def load_cifar_arrays(name: str, data_dir: str | os.PathLike | None):
    """(x_train, y_train, x_test, y_test, num_classes, class_names): uint8 (N, 3, 32, 32), int64 labels."""
    spec = _SPECS[name]
    folder = find_cifar_dir(name, data_dir)
    xtr, ytr = _read_batches(name, folder, spec["train"])
    xte, yte = _read_batches(name, folder, spec["test"])
    return xtr, ytr, xte, yte, spec["num_classes"], _class_names(name, folder)
