"""In-memory datasets: containers, stratified splits, normalisation, ``from_tensors``.

Every dataset in ``maxup.data`` ends up as a :class:`DataSplits` of float32
tensors held in memory. The loaders in ``idx.py``, ``cifar.py`` and ``folder.py``
only read files into numpy arrays; the shared options (``train_size``,
``val_size``, ``test_size``, ``normalize``) are applied here, once, by
:func:`finish_splits`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TensorData", "DataSplits", "from_tensors", "stratified_split", "finish_splits"]

# Test sets carved out of data without an official test split (digits, image
# folders, ``from_tensors`` without test data) use this seed, never the run's
# ``seed``: the test set is then the same for every run and method.
TEST_SPLIT_SEED = 0


@dataclass(eq=False, repr=False)
class TensorData:
    """One split held in memory.

    ``x`` is float32 of shape (N, C, H, W) images, (N, C, L) signals or (N, D)
    features; ``y`` is int64 of shape (N,). For language modelling (:mod:`maxup.data.text`)
    ``x`` holds int64 token ids (N, T) and ``y`` the next-token ids (N, T).

    ``clean_y`` (optional, (N,) int64) holds the true labels of a split whose ``y`` carries label
    noise (:mod:`maxup.data.noise`): training reads ``y`` only; ``clean_y`` serves the
    memorisation metrics and :attr:`flipped`.
    """

    x: torch.Tensor
    y: torch.Tensor
    clean_y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("TensorData: x and y must be torch tensors (use maxup.data.from_tensors for numpy arrays)")
        if self.y.ndim != 1 and not (self.y.ndim == 2 and self.y.shape == self.x.shape):
            raise ValueError(f"TensorData: y must have shape (N,), or (N, T) like x for token sequences, "
                             f"got {tuple(self.y.shape)}")
        if self.x.ndim < 2:
            raise ValueError(f"TensorData: x must have shape (N, ...) with at least 2 dims, got {tuple(self.x.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"TensorData: x has {self.x.shape[0]} samples but y has {self.y.shape[0]} labels")
        if self.clean_y is not None:
            if not isinstance(self.clean_y, torch.Tensor) or self.clean_y.shape != self.y.shape or \
                    self.y.ndim != 1 or self.clean_y.dtype != self.y.dtype:
                raise ValueError("TensorData: clean_y (the true labels beside noisy y) must be a tensor of y's shape "
                                 f"(N,) and dtype {self.y.dtype}, got "
                                 f"{getattr(self.clean_y, 'shape', type(self.clean_y).__name__)}")

    @property
    def flipped(self) -> torch.Tensor | None:
        """Boolean mask (N,) of the samples whose label ``y`` differs from ``clean_y`` (None without ``clean_y``)."""
        return None if self.clean_y is None else self.y != self.clean_y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        noisy = "" if self.clean_y is None else f", clean_y ({int(self.flipped.sum())} labels flipped)"
        return f"TensorData(x={tuple(self.x.shape)} {self.x.dtype}, y={tuple(self.y.shape)} {self.y.dtype}{noisy})"


@dataclass(eq=False)
class DataSplits:
    """Train / optional validation / test splits plus what a model needs to know.

    ``mean`` and ``std`` are the per-channel (per-feature for (N, D) data)
    statistics of the training split used for normalisation, or ``None``.
    """

    train: TensorData
    val: TensorData | None
    test: TensorData
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    mean: torch.Tensor | None
    std: torch.Tensor | None
    classes: list[str] | None = None

    def __repr__(self) -> str:
        val = len(self.val) if self.val is not None else 0
        return (
            f"DataSplits(name={self.name!r}, train={len(self.train)}, val={val}, test={len(self.test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape}, normalized={self.mean is not None})"
        )


# --------------------------------------------------------------------------- splits


def _quotas(counts: np.ndarray, n_take: int) -> np.ndarray:
    """Per-class sample counts summing to ``n_take``, proportional to ``counts``.

    Largest-remainder rounding, so every class gets floor or ceil of its exact
    share ``n_take * count / total`` (within 1 of the expected count).
    """
    total = int(counts.sum())
    exact = counts * (n_take / total)
    quota = np.floor(exact).astype(np.int64)
    short = n_take - int(quota.sum())
    if short > 0:
        # Largest fractional part first; ties go to the larger class, then lower label.
        order = np.lexsort((np.arange(len(counts)), -counts, -(exact - quota)))
        quota[order[:short]] += 1
    return np.minimum(quota, counts)


def stratified_split(y: np.ndarray | torch.Tensor, n_take: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into ``(taken, rest)`` with ``len(taken) == n_take``.

    Each class contributes floor or ceil of its proportional share; which samples
    of a class are taken is random but a pure function of ``seed``. Both index
    arrays are sorted (original order kept).

    >>> taken, rest = stratified_split(np.array([0, 0, 1, 1]), 2, seed=0)
    >>> sorted(np.array([0, 0, 1, 1])[taken].tolist())
    [0, 1]
    """
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64, copy=False)
    n = len(y)
    if not 0 <= n_take <= n:
        raise ValueError(f"stratified_split: n_take must be in [0, {n}], got {n_take}")
    rng = np.random.default_rng(seed)
    labels, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = _quotas(counts, n_take)
    # Random rank of every sample within its class, without a loop over samples:
    # sort by (class, random key); position minus class start = rank in class.
    order = np.lexsort((rng.random(n), inverse))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, counts)
    mask = rank < quota[inverse]
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def _take(data: TensorData, idx: np.ndarray) -> TensorData:
    index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    return TensorData(data.x[index], data.y[index], None if data.clean_y is None else data.clean_y[index])


def _val_count(val_size: float | int, n: int) -> int:
    if isinstance(val_size, bool) or not isinstance(val_size, numbers.Real):
        raise ValueError(f"val_size must be a fraction in (0, 1) or a sample count, got {val_size!r}")
    if isinstance(val_size, numbers.Integral):
        count = int(val_size)
        if not 0 <= count < n:
            raise ValueError(f"val_size={count} must be a count in [0, {n}) (the training set has {n} samples)")
        return count
    frac = float(val_size)
    if frac == 0:
        return 0
    if not 0 < frac < 1:
        raise ValueError(f"val_size={val_size!r}: a float must be a fraction in (0, 1); pass an int for a count")
    count = max(1, int(round(frac * n)))
    if count >= n:
        raise ValueError(f"val_size={val_size!r} leaves no training samples out of {n}")
    return count


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and population std; per feature for (N, D)."""
    dims = [0] + list(range(2, x.ndim))
    x64 = x.double()
    mean = x64.mean(dim=dims)
    std = x64.std(dim=dims, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))  # constant channels stay centred, unscaled
    return mean.float(), std.float()


def _apply_norm(data: TensorData, mean: torch.Tensor, std: torch.Tensor) -> TensorData:
    shape = (1, -1) + (1,) * (data.x.ndim - 2)
    return TensorData((data.x - mean.view(shape)) / std.view(shape), data.y, data.clean_y)


def finish_splits(
    name: str,
    train: TensorData,
    test: TensorData,
    *,
    num_classes: int,
    classes: list[str] | None = None,
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
    """Apply the shared options, in this order, and build the :class:`DataSplits`.

    0. ``noisy_labels``: a file of the user's noisy labels for the whole training data
       (:func:`maxup.data.noise.read_label_file`); the true labels stay as ``clean_y``;
    1. ``train_size=N``: stratified subset of N samples of the training data
       (the whole labelled budget of a low-data run);
    2. ``val_size``: stratified validation split carved out of that training data
       (fraction in (0, 1) or integer count), so train + val = N; it keeps the true labels;
    3. ``imbalance=RATIO``: a long-tailed subset of the training split
       (:func:`maxup.data.longtail.long_tail_indices`; validation and test stay balanced);
    4. ``label_noise=RATE``: noisy labels for the training split only
       (:mod:`maxup.data.noise`: ``noise_type`` symmetric, asymmetric -- with ``noise_map`` or the
       dataset's preset -- or pairflip), the true labels kept as ``clean_y``;
    5. ``test_size``: keep the first N test samples;
    6. ``normalize``: standardise every split with the training split's
       per-channel statistics.
    Steps 1 to 4 are deterministic functions of ``seed``; the splits and subsets use the true labels,
    so a noisy run trains on the same samples as a clean one.
    """
    from .longtail import check_imbalance, long_tail_indices
    from .noise import (
        add_label_noise,
        check_noise_options,
        parse_noise_map,
        preset_map,
        read_label_file,
        with_noisy_labels,
    )

    rate, noise_kind = check_noise_options(label_noise, noise_type, noise_map, noisy_labels)
    mapping = None
    if rate > 0 and noise_kind == "asymmetric":
        mapping = preset_map(name) if noise_map is None else \
            parse_noise_map(noise_map, num_classes, name="noise_map (--noise-map)")
    if imbalance is not None:
        check_imbalance(imbalance, "imbalance (--imbalance)")
    n = len(train)
    if n == 0:
        raise ValueError(f"{name}: the training split is empty")
    if noisy_labels is not None:
        labels = read_label_file(noisy_labels, num_samples=n, num_classes=num_classes,
                                 name="noisy_labels (--noisy-labels)")
        train = with_noisy_labels(train, labels)
    if train_size is not None:
        if isinstance(train_size, bool) or not isinstance(train_size, numbers.Integral):
            raise ValueError(f"train_size must be an int or None, got {train_size!r}")
        train_size = int(train_size)
        if train_size > n:
            raise ValueError(f"train_size={train_size} is larger than the {name} training set ({n} samples)")
        if train_size < num_classes:
            raise ValueError(
                f"train_size={train_size} is smaller than the number of classes ({num_classes}) of {name}: "
                "a stratified subset needs at least one sample per class"
            )
        if train_size < n:
            taken, _ = stratified_split(_true_labels(train), train_size, seed)
            train = _take(train, taken)
    n_val = _val_count(val_size, len(train))
    val = None
    if n_val > 0:
        # A different stream from the train_size draw, still a function of seed.
        val_idx, train_idx = stratified_split(_true_labels(train), n_val, seed + 1_000_003)
        train, val = _take(train, train_idx), _take(train, val_idx)
        if val.clean_y is not None:  # the noise is the training split's only
            val = TensorData(val.x, val.clean_y)
    if imbalance is not None:
        keep = long_tail_indices(_true_labels(train), imbalance, num_classes, generator=_stream(seed, 1),
                                 name="imbalance (--imbalance)")
        train = _take(train, keep.numpy())
    if rate > 0:
        train = add_label_noise(train, rate, num_classes=num_classes, noise_type=noise_kind, mapping=mapping,
                                generator=_stream(seed, 2))
    if test_size is not None:
        if isinstance(test_size, bool) or not isinstance(test_size, numbers.Integral) or test_size < 1:
            raise ValueError(f"test_size must be a positive int or None, got {test_size!r}")
        if test_size < len(test):
            test = TensorData(test.x[:test_size], test.y[:test_size])
    mean = std = None
    if normalize:
        mean, std = _channel_stats(train.x)
        train, test = _apply_norm(train, mean, std), _apply_norm(test, mean, std)
        val = _apply_norm(val, mean, std) if val is not None else None
    return DataSplits(
        train=train,
        val=val,
        test=test,
        num_classes=int(num_classes),
        input_shape=tuple(int(s) for s in train.x.shape[1:]),
        name=name,
        mean=mean,
        std=std,
        classes=list(classes) if classes is not None else None,
    )


def _true_labels(data: TensorData) -> torch.Tensor:
    return data.y if data.clean_y is None else data.clean_y


def _stream(seed: int, stream: int) -> torch.Generator:
    """A torch generator for one of the data layer's random draws (1: imbalance, 2: label noise): a well-mixed
    function of ``(seed, stream)``, independent of the numpy streams of the splits."""
    state = np.random.SeedSequence([int(seed), 0xDA7A, int(stream)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def split_off_test(x: np.ndarray, y: np.ndarray,
                   fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed stratified test split (seed ``TEST_SPLIT_SEED``): (x_train, y_train, x_test, y_test)."""
    n_test = int(round(fraction * len(y)))
    if len(y) >= 2:
        n_test = min(max(n_test, 1), len(y) - 1)
    test_idx, train_idx = stratified_split(y, n_test, TEST_SPLIT_SEED)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# --------------------------------------------------------------------------- from_tensors


def _as_x(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim < 2:
        raise ValueError(f"from_tensors: {what} must have shape (N, ...) with at least 2 dims, got {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"from_tensors: {what} must be real-valued, got {t.dtype}")
    return t.to(torch.float32).contiguous()


def _as_y(y, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if t.ndim != 1:
        raise ValueError(f"from_tensors: {what} must have shape (N,), got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"from_tensors: {what} must hold integer class labels, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"from_tensors: {what} has a negative label ({int(t.min())}); labels must be 0..num_classes-1")
    return t


def from_tensors(
    x_train,
    y_train,
    x_test=None,
    y_test=None,
    *,
    num_classes: int | None = None,
    val_size: float | int = 0,
    train_size: int | None = None,
    normalize: bool = False,
    seed: int = 0,
    name: str = "tensors",
    label_noise: float = 0.0,
    noise_type: str | None = None,
    noise_map=None,
    noisy_labels=None,
    imbalance: float | None = None,
) -> DataSplits:
    """Wrap in-memory arrays (torch tensors or numpy arrays) as :class:`DataSplits`.

    ``x`` may have any sample shape: (N, C, H, W), (N, C, L) or (N, D); it is cast
    to float32 as is (no rescaling). Labels must be integers in
    ``0..num_classes-1``; ``num_classes`` defaults to the largest label + 1.
    Without ``x_test`` a fixed stratified 20% test split is carved out of the
    training data (the same for every ``seed``). ``label_noise``, ``noise_type``, ``noise_map``,
    ``noisy_labels`` and ``imbalance`` act on the training split as in :func:`finish_splits`.

    >>> import numpy as np
    >>> d = from_tensors(np.random.rand(50, 4), np.arange(50) % 2)
    >>> len(d.train), len(d.test), d.num_classes, d.input_shape
    (40, 10, 2, (4,))
    """
    if (x_test is None) != (y_test is None):
        raise ValueError("from_tensors: pass both x_test and y_test, or neither")
    xt, yt = _as_x(x_train, "x_train"), _as_y(y_train, "y_train")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"from_tensors: x_train has {xt.shape[0]} samples but y_train has {yt.shape[0]} labels")
    if x_test is None:
        a, b, c, d = split_off_test(xt.numpy(), yt.numpy(), 0.2)
        xt, yt = torch.from_numpy(a), torch.from_numpy(b)
        xs, ys = torch.from_numpy(c), torch.from_numpy(d)
    else:
        xs, ys = _as_x(x_test, "x_test"), _as_y(y_test, "y_test")
        if xs.shape[0] != ys.shape[0]:
            raise ValueError(f"from_tensors: x_test has {xs.shape[0]} samples but y_test has {ys.shape[0]} labels")
        if xs.shape[1:] != xt.shape[1:]:
            raise ValueError(
                f"from_tensors: x_test samples have shape {tuple(xs.shape[1:])}, x_train samples {tuple(xt.shape[1:])}"
            )
    max_label = max(int(yt.max()) if yt.numel() else -1, int(ys.max()) if ys.numel() else -1)
    if num_classes is None:
        num_classes = max_label + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"from_tensors: num_classes must be a positive int, got {num_classes!r}")
    elif max_label >= num_classes:
        raise ValueError(f"from_tensors: label {max_label} is out of range for num_classes={num_classes}")
    return finish_splits(
        name,
        TensorData(xt, yt),
        TensorData(xs, ys),
        num_classes=int(num_classes),
        val_size=val_size,
        train_size=train_size,
        normalize=normalize,
        seed=seed,
        label_noise=label_noise,
        noise_type=noise_type,
        noise_map=noise_map,
        noisy_labels=noisy_labels,
        imbalance=imbalance,
    )
