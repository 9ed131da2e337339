"""Class-per-subfolder image trees (``root/<class>/<image>``), read with Pillow.

If ``root`` has ``train/`` and ``test/`` subfolders, each is such a tree;
otherwise ``root`` itself is, and a fixed stratified 20% test set is split off.
Class names are the sorted subfolder names. All images must have the same size
(no silent resize). Images are 1-channel if every one is grayscale (mode "L"),
otherwise RGB.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["load_folder_arrays", "IMAGE_EXTENSIONS"]

#: Pillow modes with 8 bits per channel (others, such as 16-bit "I;16", would be clipped silently)
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}

_HOW = (
    "pass data_dir= (CLI: --data-dir) pointing at a folder with one subfolder of images per class "
    "(optionally inside train/ and test/ subfolders)"
)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan(root: Path) -> tuple[list[str], list[Path], list[int]]:
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory; {_HOW}")
    dirs = _class_dirs(root)
    if not dirs:
        raise ValueError(f"folder dataset: {root} has no class subfolders; {_HOW}")
    classes, files, labels = [], [], []
    for label, d in enumerate(dirs):
        imgs = _image_files(d)
        if not imgs:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"folder dataset: class folder {d} holds no images (looked for {exts})")
        classes.append(d.name)
        files.extend(imgs)
        labels.extend([label] * len(imgs))
    if len(dirs) < 2 and root.name != "test":
        raise ValueError(f"folder dataset: {root} has one class subfolder ({dirs[0].name}); a classifier needs at "
                         f"least 2 classes; {_HOW}")
    return classes, files, labels


def _read_images(files: list[Path], ref: tuple[Path, tuple[int, int]] | None) -> tuple[list, list[str], tuple]:
    from PIL import Image  # optional dependency (maxup[cli])

    images, modes = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                img = im.copy()
        except OSError as err:
            raise ValueError(f"folder dataset: cannot read image {path} ({err})") from err
        if img.mode not in EIGHT_BIT_MODES:
            raise ValueError(f"folder dataset: {path} has mode {img.mode} (more than 8 bits per channel, e.g. 16-bit "
                             f"or float); maxup reads 8-bit images ({', '.join(EIGHT_BIT_MODES)}): convert it first")
        if ref is None:
            ref = (path, img.size)
        elif img.size != ref[1]:
            w, h = img.size
            rw, rh = ref[1]
            raise ValueError(
                f"folder dataset: {path} is {w}x{h} but {ref[0]} is {rw}x{rh}; all images must have the same "
                "size (resize them beforehand; maxup does not resize silently)"
            )
        images.append(img)
        modes.append(img.mode)
    return images, modes, ref


def _to_array(images: list, gray: bool) -> np.ndarray:
    if gray:
        arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])[:, None]
    else:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr)


def load_folder_arrays(data_dir: str | os.PathLike | None):
    """(x_train, y_train, x_test, y_test, classes) with uint8 images (N, C, H, W); x_test None if no test/ folder."""
    if data_dir is None:
        raise ValueError(f"folder dataset needs a data_dir; {_HOW}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"folder dataset: {root} is not a directory; {_HOW}")
    has_split = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if has_split else root
    classes, files, labels = _scan(train_root)
    images, modes, ref = _read_images(files, None)
    test_images, test_modes, test_labels = [], [], []
    if has_split:
        test_classes, test_files, tlabels = _scan(root / "test")
        unknown = sorted(set(test_classes) - set(classes))
        if unknown:
            raise ValueError(
                f"folder dataset: {root / 'test'} has classes not in {train_root}: {', '.join(unknown)}"
            )
        remap = np.array([classes.index(c) for c in test_classes], dtype=np.int64)
        test_labels = remap[np.asarray(tlabels, dtype=np.int64)]
        test_images, test_modes, _ = _read_images(test_files, ref)
    gray = all(m == "L" for m in modes + test_modes)
    x_train = _to_array(images, gray)
    y_train = np.asarray(labels, dtype=np.int64)
    if not has_split:
        return x_train, y_train, None, None, classes
    return x_train, y_train, _to_array(test_images, gray), np.asarray(test_labels, dtype=np.int64), classes
