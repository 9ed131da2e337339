"""IDX files (MNIST, Fashion-MNIST), gzipped or raw.

Format: a 4-byte big-endian magic ``0x00 0x00 <dtype> <ndim>``, then ``ndim``
big-endian uint32 dimensions, then the data in C order. Images are
``0x00000803`` (uint8, 3 dims: N, rows, cols), labels ``0x00000801`` (uint8, N).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "find_idx_dir", "load_idx_arrays", "IDX_FILES"]

# dtype code (third magic byte) -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Where Debian-style packages put them (``apt-get install dataset-fashion-mnist``).
STANDARD_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}


def _how_to_get(name: str) -> str:
    tip = "pass data_dir= (CLI: --data-dir) or set MAXUP_DATA to a folder holding the four IDX files " \
          f"(or a '{name}/' subfolder with them)"
    if name == "fashion-mnist":
        tip = "install them with `apt-get install dataset-fashion-mnist` (files under " \
              f"{STANDARD_DIRS[name]}/), or " + tip
    return tip


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # corrupt or truncated gzip stream
        raise ValueError(f"{path}: cannot read IDX file ({err}); the file looks corrupt or truncated") from err


def read_idx(path: str | os.PathLike, *, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array with its stored shape.

    ``expect_magic`` (e.g. ``0x00000803`` for uint8 images) is checked when given.
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the
    path for a bad magic number, a truncated file or trailing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(buf)} bytes, expected a 4-byte magic number)")
    magic = int.from_bytes(buf[:4], "big")
    if expect_magic is not None and magic != expect_magic:
        raise ValueError(f"{path}: wrong IDX magic number 0x{magic:08X}, expected 0x{expect_magic:08X}")
    zero, code, ndim = buf[:2], buf[2], buf[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{magic:08X})")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, expected at least {header})")
    dims = tuple(int(d) for d in np.frombuffer(buf, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) < expected:
        raise ValueError(
            f"{path}: truncated IDX file: {len(buf)} bytes, expected {expected} for dims {dims} of {dtype.name}"
        )
    if len(buf) > expected:
        raise ValueError(f"{path}: {len(buf) - expected} unexpected trailing bytes after IDX data of dims {dims}")
    data = np.frombuffer(buf, dtype=dtype, offset=header).reshape(dims)
    return np.array(data, dtype=dtype.newbyteorder("="))  # native byte order, writable copy


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_idx_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The folder holding ``name``'s IDX files.

    Looks in ``data_dir`` (or its ``name/`` subfolder) when given; otherwise in
    ``$MAXUP_DATA`` (or its ``name/`` subfolder), then the standard location.
    """
    if data_dir is not None:
        roots = [Path(data_dir)]
    else:
        roots = [Path(os.environ["MAXUP_DATA"])] if os.environ.get("MAXUP_DATA") else []
    candidates = [p for root in roots for p in (root, root / name)]
    if data_dir is None and name in STANDARD_DIRS:
        candidates.append(STANDARD_DIRS[name])
    stem = IDX_FILES["train_images"]
    for folder in candidates:
        if _find_file(folder, stem) is not None:
            return folder
    tried = ", ".join(str(p) for p in candidates) or "(nowhere: no data_dir and MAXUP_DATA is unset)"
    raise FileNotFoundError(
        f"{name}: no {stem}[.gz] found; looked in {tried}. To get the data, {_how_to_get(name)}."
    )


def load_idx_arrays(name: str, data_dir: str | os.PathLike | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) as uint8 arrays: images (N, 28, 28), labels (N,)."""
    folder = find_idx_dir(name, data_dir)
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find_file(folder, stem)
        if path is None:
            raise FileNotFoundError(
                f"{name}: missing {folder / stem}[.gz] (expected all of {', '.join(IDX_FILES.values())}). "
                f"To get the data, {_how_to_get(name)}."
            )
        is_images = key.endswith("images")
        arr = read_idx(path, expect_magic=0x00000803 if is_images else 0x00000801)
        arrays[key] = (arr, path)
    for split in ("train", "test"):
        (images, ipath), (labels, lpath) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {lpath} holds {len(labels)} labels but {ipath} holds {len(images)} images; "
                "they must match"
            )
    (xtr, _), (ytr, _), (xte, tpath), (yte, _) = (arrays[k] for k in IDX_FILES)
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{name}: {tpath} images are {xte.shape[1:]}, training images {xtr.shape[1:]}")
    return xtr, ytr, xte, yte
