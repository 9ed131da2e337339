"""Tests for maxup.data: real file formats built in tmp_path, splits, normalisation, Loader."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from maxup.data import (
    DataSplits,
    Loader,
    TensorData,
    from_tensors,
    list_datasets,
    load_dataset,
    read_idx,
    stratified_split,
)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray, magic: int | None = None) -> bytes:
    """Encode a uint8 array as IDX (big-endian magic and dims)."""
    if magic is None:
        magic = 0x0800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, gz: bool, n_train=12, n_test=5, rows=28, cols=28, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, rows, cols), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, rows, cols), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


def write_cifar10(folder: Path, per_batch=4, n_test=6, seed=0, meta=True):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
        xs.append(data)
        ys += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = list(range(n_test))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": test, b"labels": test_labels}, protocol=2))
    names = [f"c{i}".encode() for i in range(10)]
    if meta:
        (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return np.concatenate(xs), np.array(ys), test, np.array(test_labels)


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "fm", gz=gz)
    d = load_dataset("fashion-mnist", data_dir=tmp_path / "fm", normalize=False)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.name == "fashion-mnist"
    assert d.train.x.dtype == torch.float32 and d.train.y.dtype == torch.int64
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"].astype(np.float32) / 255)[:, None]
    assert torch.equal(d.train.x, expected)
    assert d.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(d.test.x[:, 0] * 255, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]).float())
    assert d.test.y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.mean is None and d.std is None and d.val is None
    assert d.classes[0] == "T-shirt/top"


def test_idx_subfolder_env_and_mnist(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path / "mnist", gz=True, rows=7, cols=5)
    monkeypatch.setenv("MAXUP_DATA", str(tmp_path))
    d = load_dataset("mnist", normalize=False)  # found via $MAXUP_DATA/mnist/
    assert d.input_shape == (1, 7, 5)
    assert d.train.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    d2 = load_dataset("mnist", data_dir=tmp_path, normalize=False)  # parent of mnist/
    assert torch.equal(d.train.x, d2.train.x)


def test_read_idx_generic(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(arr))
    assert np.array_equal(read_idx(tmp_path / "a"), arr)


def test_idx_wrong_magic(tmp_path):
    write_idx_set(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    labels = np.zeros(12, np.uint8)
    bad.write_bytes(idx_bytes(labels))  # a labels file (0x801) where images (0x803) are expected
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*magic.*0x00000801.*0x00000803"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    write_idx_set(tmp_path, gz=gz)
    stem = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / stem
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = raw[:-10]
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(11, np.uint8)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds 11 labels.*12 images"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(info.value) and "MAXUP_DATA" in str(info.value)
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    d = load_dataset("fashion-mnist", data_dir=FASHION_DIR, normalize=False)
    assert len(d.train) == 60000 and len(d.test) == 10000
    assert d.input_shape == (1, 28, 28)
    assert torch.bincount(d.train.y).tolist() == [6000] * 10
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_standard_location_is_default(monkeypatch, tmp_path):
    from maxup.data.idx import find_idx_dir

    monkeypatch.delenv("MAXUP_DATA", raising=False)
    assert find_idx_dir("fashion-mnist", None) == FASHION_DIR
    monkeypatch.setenv("MAXUP_DATA", str(tmp_path))  # empty: falls back to the standard location
    assert find_idx_dir("fashion-mnist", None) == FASHION_DIR


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("point_at", ["batch_folder", "parent"])
def test_cifar10_round_trip(tmp_path, point_at):
    x, y, xt, yt = write_cifar10(tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path / "cifar-10-batches-py" if point_at == "batch_folder" else tmp_path
    d = load_dataset("cifar10", data_dir=data_dir, normalize=False)
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and len(d.train) == 20 and len(d.test) == 6
    assert torch.equal(d.train.x * 255, torch.from_numpy(x.reshape(-1, 3, 32, 32)).float())
    # channel planes: first 1024 bytes of a row are the red channel
    assert torch.equal(d.train.x[0, 0].flatten() * 255, torch.from_numpy(x[0, :1024]).float())
    assert d.train.y.tolist() == y.tolist() and d.test.y.tolist() == yt.tolist()
    assert d.classes == [f"c{i}" for i in range(10)]


def test_cifar100_round_trip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    x, xt = rng.integers(0, 256, (7, 3072), dtype=np.uint8), rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    y, yt = [0, 99, 5, 50, 7, 8, 98], [1, 2, 99]
    (folder / "train").write_bytes(pickle.dumps({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * 7}))
    (folder / "test").write_bytes(pickle.dumps({b"data": xt, b"fine_labels": yt}))
    names = [f"n{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}))
    d = load_dataset("cifar100", data_dir=tmp_path, normalize=False)
    assert d.num_classes == 100 and d.input_shape == (3, 32, 32)
    assert torch.equal(d.test.x.reshape(3, -1) * 255, torch.from_numpy(xt).float())
    assert d.train.y.tolist() == y and d.test.y.tolist() == yt
    assert d.classes[99] == "n99"


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*kriz/cifar"):
        load_dataset("cifar10", data_dir=tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder, meta=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3"):
        load_dataset("cifar10", data_dir=tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match=r"data_batch_3.*1 labels for 4 images"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_refuses_code_in_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing"):
        load_dataset("cifar10", data_dir=folder)


# --------------------------------------------------------------------------- folder


def test_folder_round_trip_rgb_split(tmp_path):
    rng = np.random.default_rng(0)
    pix = {}
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("cat", "ant"):
            for i in range(n):
                arr = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)  # H=4, W=6
                save_png(tmp_path / split / cls / f"{i}.png", arr)
                pix[(split, cls, i)] = arr
    d = load_dataset("folder", data_dir=tmp_path, normalize=False)
    assert d.classes == ["ant", "cat"] and d.num_classes == 2
    assert d.input_shape == (3, 4, 6) and len(d.train) == 6 and len(d.test) == 2
    # sorted classes, sorted files: train[0] is ant/0.png, train[3] is cat/0.png
    assert torch.equal(d.train.x[0] * 255, torch.from_numpy(pix[("train", "ant", 0)]).permute(2, 0, 1).float())
    assert torch.equal(d.train.x[3] * 255, torch.from_numpy(pix[("train", "cat", 0)]).permute(2, 0, 1).float())
    assert d.train.y.tolist() == [0, 0, 0, 1, 1, 1] and d.test.y.tolist() == [0, 1]


def test_folder_grayscale_and_auto_test_split(tmp_path):
    for cls in ("a", "b"):
        for i in range(5):
            save_png(tmp_path / cls / f"{i}.png", np.full((3, 3), 10 * i + (cls == "b"), np.uint8))
    d = load_dataset("folder", data_dir=tmp_path, normalize=False)
    assert d.input_shape == (1, 3, 3)
    assert len(d.train) == 8 and len(d.test) == 2
    assert torch.bincount(d.test.y, minlength=2).tolist() == [1, 1]  # stratified
    # values survive exactly: each image is constant 10*i + label
    vals = d.train.x[:, 0, 0, 0] * 255
    assert torch.all((vals.round() - d.train.y) % 10 == 0)
    # test split fixed, independent of seed
    d2 = load_dataset("folder", data_dir=tmp_path, normalize=False, seed=5)
    assert torch.equal(d.test.x, d2.test.x)


def test_folder_mixed_gray_rgb_gives_rgb(tmp_path):
    for i in range(5):  # 5 per class: the 20% test split holds one of each
        save_png(tmp_path / "a" / f"{i}.png", np.full((2, 2), 7, np.uint8))
        save_png(tmp_path / "b" / f"{i}.png", np.full((2, 2, 3), 9, np.uint8))
    d = load_dataset("folder", data_dir=tmp_path, normalize=False)
    assert d.input_shape == (3, 2, 2)
    allx = torch.cat([d.train.x, d.test.x]) * 255
    ally = torch.cat([d.train.y, d.test.y])
    assert torch.all(allx[ally == 0].round() == 7) and torch.all(allx[ally == 1].round() == 9)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no class subfolders"):
        load_dataset("folder", data_dir=tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"empty_class holds no images"):
        load_dataset("folder", data_dir=tmp_path)
    (tmp_path / "empty_class").rmdir()
    save_png(tmp_path / "a" / "0.png", np.zeros((4, 4), np.uint8))
    save_png(tmp_path / "b" / "odd.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"odd\.png is 4x5 but .*0\.png is 4x4"):
        load_dataset("folder", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"data_dir"):
        load_dataset("folder")
    with pytest.raises(FileNotFoundError, match=r"nope"):
        load_dataset("folder", data_dir=tmp_path / "nope")


# --------------------------------------------------------------------------- digits, options


def test_list_and_unknown():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "fashion-mnist", "folder", "mnist"]
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*cifar10.*digits.*mnist"):
        load_dataset("imagenet")


def test_digits_shapes_and_fixed_test():
    a = load_dataset("digits", seed=0, normalize=False)
    b = load_dataset("digits", seed=7, train_size=100, val_size=0.2)
    assert isinstance(a, DataSplits) and a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 449
    assert float(a.train.x.min()) == 0.0 and float(a.train.x.max()) == 1.0
    assert a.train.x.dtype == torch.float32 and a.train.y.dtype == torch.int64
    # test split identical across seeds (compare un-normalised pixels)
    b_raw = b.test.x * b.std.view(1, -1, 1, 1) + b.mean.view(1, -1, 1, 1)
    assert torch.equal(a.test.y, b.test.y) and torch.allclose(a.test.x, b_raw, atol=1e-5)
    # stratified test: each class within 1 of 25%
    counts = torch.bincount(a.test.y, minlength=10)
    full = torch.bincount(torch.cat([a.train.y, a.test.y]), minlength=10)
    assert torch.all((counts.double() - full.double() * 449 / 1797).abs() <= 1)
    assert len(b.train) == 80 and len(b.val) == 20


def test_train_size_stratified_and_deterministic():
    full = load_dataset("digits", normalize=False)
    full_counts = torch.bincount(full.train.y, minlength=10).double()
    for n in (10, 57, 300):
        d = load_dataset("digits", train_size=n, seed=3, normalize=False)
        assert len(d.train) == n
        counts = torch.bincount(d.train.y, minlength=10).double()
        assert torch.all((counts - full_counts * n / len(full.train)).abs() <= 1), (n, counts)
    a = load_dataset("digits", train_size=57, seed=3, normalize=False)
    b = load_dataset("digits", train_size=57, seed=3, normalize=False)
    c = load_dataset("digits", train_size=57, seed=4, normalize=False)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_stratified_split_quota():
    y = np.repeat(np.arange(3), [50, 30, 20])
    taken, rest = stratified_split(y, 33, seed=0)
    assert len(taken) == 33 and len(np.intersect1d(taken, rest)) == 0 and len(taken) + len(rest) == 100
    assert np.all(np.abs(np.bincount(y[taken]) - np.array([16.5, 9.9, 6.6])) <= 1)


def test_val_size_options_and_errors():
    d = load_dataset("digits", val_size=100, normalize=False)
    assert len(d.val) == 100 and len(d.train) == 1348 - 100
    counts = torch.bincount(d.val.y, minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    # val and train disjoint: together they are the full training split
    full = load_dataset("digits", normalize=False)
    key = lambda t: sorted(map(tuple, t.x.flatten(1).tolist()))  # noqa: E731
    assert key(TensorData(torch.cat([d.train.x, d.val.x]), torch.cat([d.train.y, d.val.y]))) == key(full.train)
    for bad in (1.0, -0.1, 1.5, 5000, -1, "0.1", True):
        with pytest.raises(ValueError, match="val_size"):
            load_dataset("digits", val_size=bad)
    with pytest.raises(ValueError, match=r"train_size=5000 is larger"):
        load_dataset("digits", train_size=5000)
    with pytest.raises(ValueError, match=r"train_size=5 is smaller than the number of classes"):
        load_dataset("digits", train_size=5)
    assert len(load_dataset("digits", test_size=30).test) == 30
    assert torch.equal(load_dataset("digits", test_size=30, normalize=False).test.y, full.test.y[:30])


def test_normalize_uses_train_stats_only(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.normal(3.0, 2.0, (200, 2, 5, 5)).astype(np.float32)
    x_train[:, 1] = x_train[:, 1] * 4 - 7
    x_test = rng.normal(100.0, 1.0, (20, 2, 5, 5)).astype(np.float32)
    d = from_tensors(x_train, np.arange(200) % 4, x_test, np.arange(20) % 4, normalize=True)
    per_channel = d.train.x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(per_channel.std(1, unbiased=False), torch.ones(2), atol=1e-5)
    mean = torch.from_numpy(x_train).double().transpose(0, 1).flatten(1).mean(1).float()
    assert torch.allclose(d.mean, mean, atol=1e-5)
    expected_test = (torch.from_numpy(x_test) - d.mean.view(1, 2, 1, 1)) / d.std.view(1, 2, 1, 1)
    assert torch.allclose(d.test.x, expected_test)  # test standardised with *train* stats
    assert float(d.test.x.mean()) > 5  # not re-centred with its own stats
    # also for a real dataset with a validation split
    dd = load_dataset("digits", val_size=0.2)
    assert abs(float(dd.train.x.mean())) < 1e-5 and abs(float(dd.train.x.std(unbiased=False)) - 1) < 1e-4
    assert abs(float(dd.val.x.mean())) > 1e-4  # val normalised with train stats, not its own


def test_normalize_features_per_feature():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (100, 3)) * np.array([1.0, 10.0, 0.1]) + np.array([5.0, -2.0, 0.0])
    x[:, 2] = 4.0  # constant feature: centred, not divided by 0
    d = from_tensors(x, np.arange(100) % 2, normalize=True)
    assert d.mean.shape == (3,) and d.input_shape == (3,)
    assert torch.allclose(d.train.x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(d.train.x[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.isfinite(d.test.x).all() and float(d.std[2]) == 1.0


# --------------------------------------------------------------------------- from_tensors


def test_from_tensors_numpy_and_features():
    x = np.arange(60, dtype=np.float64).reshape(30, 2)
    y = np.arange(30) % 3
    d = from_tensors(x, y, x[:6], y[:6])
    assert d.num_classes == 3 and d.input_shape == (2,) and d.train.x.dtype == torch.float32
    assert torch.equal(d.train.x, torch.from_numpy(x).float()) and d.train.y.tolist() == y.tolist()
    assert d.mean is None  # normalize=False by default
    d2 = from_tensors(torch.randn(40, 1, 16), torch.arange(40) % 4, num_classes=6, val_size=0.25)
    assert d2.num_classes == 6 and d2.input_shape == (1, 16)
    assert len(d2.test) == 8 and len(d2.val) == 8 and len(d2.train) == 24


def test_from_tensors_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x_train has 10 samples but y_train has 9"):
        from_tensors(np.zeros((10, 3)), np.zeros(9, int))
    with pytest.raises(ValueError, match=r"x_test has 4 samples but y_test has 5"):
        from_tensors(np.zeros((10, 3)), np.zeros(10, int), np.zeros((4, 3)), np.zeros(5, int))
    with pytest.raises(ValueError, match="integer class labels"):
        from_tensors(np.zeros((10, 3)), np.zeros(10))
    with pytest.raises(ValueError, match="out of range"):
        from_tensors(np.zeros((10, 3)), np.arange(10), num_classes=5)
    with pytest.raises(ValueError, match="sample shape|samples have shape"):
        from_tensors(np.zeros((10, 3)), np.zeros(10, int), np.zeros((4, 2)), np.zeros(4, int))


def test_from_tensors_does_not_edit_caller():
    x = torch.randn(20, 3)
    before = x.clone()
    from_tensors(x, torch.arange(20) % 2, normalize=True)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------- Loader


def _data(n=23):
    return TensorData(torch.arange(n, dtype=torch.float32)[:, None] * 10, torch.arange(n))


def test_loader_covers_epoch_once():
    data = _data()
    loader = Loader(data, batch_size=5, seed=1)
    assert len(loader) == 5
    batches = list(loader)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(23))
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(xs[:, 0], ys.float() * 10)  # x and y stay paired
    assert ys.tolist() != list(range(23))  # shuffled
    drop = Loader(data, batch_size=5, drop_last=True)
    assert len(drop) == 4 and [len(y) for _, y in drop] == [5] * 4
    plain = Loader(data, batch_size=10, shuffle=False)
    assert torch.cat([y for _, y in plain]).tolist() == list(range(23))


def test_loader_epochs_pure_function_of_seed_and_epoch():
    data = _data()
    order = lambda ld: torch.cat([y for _, y in ld]).tolist()  # noqa: E731
    a = Loader(data, batch_size=4, seed=3)
    a.set_epoch(0)
    e0 = order(a)
    a.set_epoch(1)
    e1 = order(a)
    assert e0 != e1 and sorted(e1) == list(range(23))
    b = Loader(data, batch_size=4, seed=3)
    b.set_epoch(1)
    assert order(b) == e1  # resume at epoch 1 reproduces it
    b.set_epoch(0)
    assert order(b) == e0
    assert order(Loader(data, batch_size=4, seed=4)) != e0
    c = Loader(data, batch_size=4, seed=3)  # without set_epoch: epochs advance by themselves
    assert order(c) == e0 and order(c) == e1


@pytest.mark.parametrize("n", [23, 24, 1])
def test_loader_distributed_shards(n):
    data = _data(n)
    shards = []
    for rank in range(2):
        ld = Loader(data, batch_size=3, seed=5, rank=rank, world_size=2)
        ld.set_epoch(2)
        shards.append(torch.cat([y for _, y in ld]).tolist())
        assert len(ld) == -(-((n + 1) // 2) // 3)   # ceil(ceil(n / 2) / 3)
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])  # disjoint
    else:
        assert len(set(shards[0]) & set(shards[1])) <= 1  # only the wrapped pad sample repeats
        assert len(shards[0]) + len(shards[1]) == n + 1
    # the two shards interleave the single-process permutation of the same (seed, epoch)
    full = Loader(data, batch_size=n, seed=5)
    full.set_epoch(2)
    perm = next(iter(full))[1].tolist()
    assert shards[0][: len(perm[0::2])] == perm[0::2]


def test_loader_device_and_errors():
    ld = Loader(_data(), batch_size=8, device="cpu")
    x, y = next(iter(ld))
    assert x.device.type == "cpu" and y.dtype == torch.int64
    bad = ({"batch_size": 0}, {"batch_size": 2, "rank": 2, "world_size": 2}, {"batch_size": 2, "world_size": 0})
    for kwargs in bad:
        with pytest.raises(ValueError):
            Loader(_data(), **kwargs)


def test_loader_through_real_splits():
    d = load_dataset("digits", train_size=200)
    ld = Loader(d.train, batch_size=64, seed=0)
    seen = sum(len(y) for _, y in ld)
    assert seen == 200 and len(ld) == 4


# --------------------------------------------------------------------------- issue 20: data a classifier cannot use


def test_folder_with_one_class_or_a_class_without_test_images_is_refused(tmp_path):
    for i in range(5):
        save_png(tmp_path / "one" / "a" / f"{i}.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"one class subfolder \(a\).*at least 2 classes"):
        load_dataset("folder", data_dir=tmp_path / "one")
    for i in range(5):
        save_png(tmp_path / "split" / "train" / "a" / f"{i}.png", np.zeros((4, 4), np.uint8))
        save_png(tmp_path / "split" / "train" / "b" / f"{i}.png", np.ones((4, 4), np.uint8))
    save_png(tmp_path / "split" / "test" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"class b has no test image"):
        load_dataset("folder", data_dir=tmp_path / "split")


def test_folder_refuses_images_deeper_than_8_bits(tmp_path):
    from PIL import Image

    for i in range(5):
        save_png(tmp_path / "a" / f"{i}.png", np.zeros((4, 4), np.uint8))
        save_png(tmp_path / "b" / f"{i}.png", np.ones((4, 4), np.uint8))
    Image.fromarray(np.full((4, 4), 60000, np.uint16)).save(tmp_path / "b" / "deep.png")
    with pytest.raises(ValueError, match=r"deep\.png has mode I;16"):
        load_dataset("folder", data_dir=tmp_path)


@pytest.mark.parametrize("names", [7, [b"a"] * 3, [1] * 10])
def test_malformed_cifar_metadata_is_a_clear_error(tmp_path, names):
    write_cifar10(tmp_path / "c", meta=False)
    (tmp_path / "c" / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    with pytest.raises(ValueError, match=r"batches\.meta: b'label_names' must be a list of 10 class names"):
        load_dataset("cifar10", data_dir=tmp_path / "c")


def test_corpus_that_is_not_utf8_names_the_file(tmp_path):
    from maxup.data.text import read_corpus

    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("a b c\n")
    (tmp_path / "valid.txt").write_bytes(b"a \xff b\n")
    with pytest.raises(ValueError, match=r"valid\.txt is not UTF-8"):
        read_corpus(tmp_path)
