"""Label noise for the training split: symmetric, asymmetric (class-dependent flips) and pair-flip, drawn
exactly and seeded, and a user's own noisy labels read from a file.

Every generator flips an *exact* number of labels. Of the classes that may flip (all of them for
``symmetric`` and ``pairflip``, the sources of the map for ``asymmetric``) class ``c`` flips ``floor`` or
``ceil`` of ``rate * n_c`` of its samples, chosen at random, and the flips add up to
``round(rate * n)`` (``n``: the samples of those classes; largest-remainder rounding, as
:func:`maxup.data.stratified_split`). So ``rate`` is the fraction of labels that are wrong -- the noise
rate of Han et al. (2018) and Patrini et al. (2017) -- not the probability of a label redrawn over *all*
classes (after which only ``rate * (C - 1) / C`` are wrong).

- ``symmetric``: every class may flip; a flipped label is uniform over the other ``C - 1`` classes.
- ``asymmetric``: the classes of a map ``{source: target}`` flip to their target (class-dependent noise,
  Patrini et al. 2017); :data:`NOISE_PRESETS` holds the usual maps of CIFAR-10 and MNIST and this
  project's map for Fashion-MNIST.
- ``pairflip``: class ``c`` flips to ``c + 1 mod C`` (Han et al. 2018, Co-teaching).

The functions take the labels and a ``torch.Generator`` and return new labels (never editing their
input); :func:`add_label_noise` returns a :class:`TensorData` that keeps the true labels as ``clean_y``.

>>> g = torch.Generator().manual_seed(0)
>>> labels = torch.arange(10).repeat(10)                 # 100 labels, 10 per class
>>> noisy = symmetric_noise(labels, 0.2, 10, generator=g)
>>> int((noisy != labels).sum())
20
>>> noisy = asymmetric_noise(labels, 0.3, 10, "cifar10", generator=g)    # truck -> automobile, ...
>>> sorted({(int(a), int(b)) for a, b in zip(labels, noisy) if a != b})
[(2, 0), (3, 5), (4, 7), (5, 3), (9, 1)]
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .core import TensorData, _quotas

__all__ = [
    "NOISE_PRESETS",
    "NOISE_TYPES",
    "add_label_noise",
    "asymmetric_noise",
    "check_noise_options",
    "check_rate",
    "pairflip_noise",
    "parse_noise_map",
    "read_label_file",
    "symmetric_noise",
    "transition_matrix",
    "with_noisy_labels",
]

NOISE_TYPES = ("symmetric", "asymmetric", "pairflip")

#: the asymmetric noise maps ``{source: target}`` by dataset name. CIFAR-10 and MNIST are the maps of
#: Patrini et al. (2017), used since by most papers: truck -> automobile, bird -> airplane, deer -> horse,
#: cat <-> dog; 7 -> 1, 2 -> 7, 5 <-> 6, 3 -> 8 (also for the bundled ``digits``). Fashion-MNIST has no
#: map every paper shares; this project's is three of its most confused pairs: T-shirt/top -> Shirt,
#: Pullover -> Coat, Sandal -> Sneaker. Give ``noise_map="9:1,2:0"`` for another.
NOISE_PRESETS: dict[str, dict[int, int]] = {
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
    "mnist": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
    "digits": {7: 1, 2: 7, 5: 6, 6: 5, 3: 8},
    "fashion-mnist": {0: 6, 2: 4, 5: 7},
}
_PRESET_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
                   "cifar_10": "cifar10"}


def check_rate(rate, name: str = "rate") -> float:
    """``rate`` as a float in [0, 1): the fraction of labels flipped."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"{name} must be a noise rate in [0, 1) (the fraction of training labels flipped), "
                         f"got {rate!r}")
    return float(rate)


def _check_classes(num_classes, minimum: int = 2) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < minimum:
        raise ValueError(f"num_classes must be an integer >= {minimum} for label noise (a label can only flip to "
                         f"another class), got {num_classes!r}")
    return int(num_classes)


def _labels(labels, num_classes: int, name: str = "labels") -> torch.Tensor:
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if t.ndim != 1 or t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be integer class labels of shape (N,), got {t.dtype} {tuple(t.shape)}")
    t = t.detach().to("cpu", torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
        raise ValueError(f"{name} hold class {bad}, out of range for num_classes={num_classes}")
    return t


def _rank_in_class(labels: torch.Tensor, num_classes: int, generator) -> torch.Tensor:
    """A random rank of every sample within its class (0 .. n_c - 1), without a loop over samples."""
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]  # by class, random within a class
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return rank


def _flip_mask(labels: torch.Tensor, rate: float, num_classes: int, sources, generator) -> torch.Tensor:
    """Which samples flip: ``round(rate * n)`` of the samples of ``sources``, floor or ceil of ``rate * n_c`` per
    class, at random within each class."""
    counts = torch.bincount(labels, minlength=num_classes).numpy()
    eligible = np.zeros(num_classes, dtype=bool)
    eligible[list(sources)] = True
    n = int(counts[eligible].sum())
    quota = np.zeros(num_classes, dtype=np.int64)
    if n:
        quota[eligible] = _quotas(counts[eligible], int(math.floor(rate * n + 0.5)))
    return _rank_in_class(labels, num_classes, generator) < torch.from_numpy(quota)[labels]


def symmetric_noise(labels, rate: float, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``labels`` with ``round(rate * N)`` of them (floor or ceil of ``rate * n_c`` in each class) replaced by a
    label drawn uniformly from the *other* ``num_classes - 1`` classes.

    >>> g = torch.Generator().manual_seed(0)
    >>> noisy = symmetric_noise(torch.zeros(10, dtype=torch.long), 0.5, 3, generator=g)
    >>> int((noisy != 0).sum())
    5
    """
    num_classes = _check_classes(num_classes)
    labels, rate = _labels(labels, num_classes), check_rate(rate)
    flip = _flip_mask(labels, rate, num_classes, range(num_classes), generator)
    offsets = torch.randint(1, num_classes, labels.shape, generator=generator)  # uniform over the others
    return torch.where(flip, (labels + offsets) % num_classes, labels)


def parse_noise_map(spec, num_classes: int, *, name: str = "mapping") -> dict[int, int]:
    """An asymmetric noise map ``{source: target}``: a mapping, a preset name of :data:`NOISE_PRESETS`, or text
    ``"9:1,2:0,4:7"``; checked: classes in ``0..num_classes-1``, no class mapped to itself, a source once.

    >>> parse_noise_map("9:1, 2:0", 10)
    {9: 1, 2: 0}
    """
    num_classes = _check_classes(num_classes)
    presets = ", ".join(NOISE_PRESETS)
    if isinstance(spec, str):
        key = spec.strip().lower()
        key = _PRESET_ALIASES.get(key, key)
        if key in NOISE_PRESETS:
            pairs = list(NOISE_PRESETS[key].items())
        else:
            pairs = []
            for item in filter(None, (p.strip() for p in spec.split(","))):
                source, sep, target = item.partition(":")
                try:
                    if not sep:
                        raise ValueError
                    pairs.append((int(source), int(target)))
                except ValueError:
                    raise ValueError(f"{name}: cannot read {item!r} in {spec!r}; write SOURCE:TARGET pairs such as "
                                     f"'9:1,2:0' or a preset name ({presets})") from None
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise ValueError(f"{name} must be a mapping {{source: target}}, a text such as '9:1,2:0' or a preset name "
                         f"({presets}), got {spec!r}")
    if not pairs:
        raise ValueError(f"{name} is empty: give SOURCE:TARGET pairs such as '9:1,2:0' or a preset ({presets})")
    out: dict[int, int] = {}
    for source, target in pairs:
        for value in (source, target):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name}: classes must be integers, got {value!r}")
            if not 0 <= value < num_classes:
                raise ValueError(f"{name} names class {value}, but there are {num_classes} classes "
                                 f"(0..{num_classes - 1}): give a map that fits the dataset")
        if source == target:
            raise ValueError(f"{name} maps class {source} to itself: a flip must change the label")
        if int(source) in out:
            raise ValueError(f"{name} gives class {source} twice ({source}:{out[int(source)]} and {source}:{target})")
        out[int(source)] = int(target)
    return out


def asymmetric_noise(labels, rate: float, num_classes: int, mapping,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``labels`` where, in each source class ``s`` of ``mapping``, floor or ceil of ``rate * n_s`` samples (in all
    ``round(rate * n)``, ``n`` the samples of the source classes) take the label ``mapping[s]``; other classes
    keep theirs. ``mapping``: see :func:`parse_noise_map` (a preset name such as ``"cifar10"`` works).

    >>> g = torch.Generator().manual_seed(0)
    >>> asymmetric_noise(torch.tensor([0, 0, 1, 1]), 0.5, 2, {0: 1}, generator=g).tolist().count(1)
    3
    """
    num_classes = _check_classes(num_classes)
    labels, rate = _labels(labels, num_classes), check_rate(rate)
    mapping = parse_noise_map(mapping, num_classes)
    flip = _flip_mask(labels, rate, num_classes, mapping, generator)
    target = torch.arange(num_classes)
    target[list(mapping)] = torch.tensor(list(mapping.values()))
    return torch.where(flip, target[labels], labels)


def pairflip_noise(labels, rate: float, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pair-flip noise: ``round(rate * N)`` labels (floor or ceil of ``rate * n_c`` per class) go from class ``c`` to
    ``c + 1 mod num_classes`` (Han et al. 2018).

    >>> g = torch.Generator().manual_seed(0)
    >>> pairflip_noise(torch.tensor([2, 2]), 0.5, 3, generator=g).sort().values.tolist()
    [0, 2]
    """
    num_classes = _check_classes(num_classes)
    return asymmetric_noise(labels, rate, num_classes, {c: (c + 1) % num_classes for c in range(num_classes)},
                            generator)


def transition_matrix(noise_type: str, rate: float, num_classes: int, mapping=None) -> torch.Tensor:
    """The (C, C) float64 matrix ``T[i, j] = P(noisy label j | true label i)`` of a noise type (up to the rounding
    of the exact draw), e.g. for loss correction (Patrini et al. 2017).

    >>> transition_matrix("pairflip", 0.2, 3)[0].tolist()
    [0.8, 0.2, 0.0]
    """
    num_classes, rate = _check_classes(num_classes), check_rate(rate)
    if noise_type == "symmetric":
        t = torch.full((num_classes, num_classes), rate / (num_classes - 1), dtype=torch.float64)
        t.fill_diagonal_(1.0 - rate)
        return t
    if noise_type == "pairflip":
        mapping = {c: (c + 1) % num_classes for c in range(num_classes)}
    elif noise_type == "asymmetric":
        if mapping is None:
            raise ValueError("transition_matrix: asymmetric noise needs its mapping")
        mapping = parse_noise_map(mapping, num_classes)
    else:
        raise ValueError(f"noise_type must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
    t = torch.eye(num_classes, dtype=torch.float64)
    for source, target in mapping.items():
        t[source, source], t[source, target] = 1.0 - rate, rate
    return t


def add_label_noise(data: TensorData, rate: float, *, num_classes: int, noise_type: str = "symmetric",
                    mapping=None, generator: torch.Generator | None = None) -> TensorData:
    """``data`` with noisy labels ``y`` and its true labels kept as ``clean_y`` (``data`` itself is not changed).

    ``noise_type`` is one of :data:`NOISE_TYPES`; ``asymmetric`` needs ``mapping`` (a dict, ``"9:1,2:0"`` or a
    preset name of :data:`NOISE_PRESETS`). A rate of 0 returns ``data`` unchanged.

    >>> data = TensorData(torch.randn(20, 3), torch.arange(20) % 4)
    >>> noisy = add_label_noise(data, 0.25, num_classes=4, generator=torch.Generator().manual_seed(0))
    >>> int(noisy.flipped.sum()), bool((noisy.clean_y == data.y).all())
    (5, True)
    """
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData, got {type(data).__name__}")
    if data.clean_y is not None:
        raise ValueError("data holds noisy labels already (it has clean_y): add noise to the clean split")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
    if mapping is not None and noise_type != "asymmetric":
        raise ValueError(f"a noise map is for noise_type='asymmetric', not {noise_type!r}")
    if check_rate(rate) == 0:
        return data
    if noise_type == "symmetric":
        noisy = symmetric_noise(data.y, rate, num_classes, generator)
    elif noise_type == "pairflip":
        noisy = pairflip_noise(data.y, rate, num_classes, generator)
    else:
        if mapping is None:
            raise ValueError("noise_type='asymmetric' needs a mapping: a dict {source: target}, text '9:1,2:0' or "
                             f"a preset name ({', '.join(NOISE_PRESETS)})")
        noisy = asymmetric_noise(data.y, rate, num_classes, mapping, generator)
    return TensorData(data.x, noisy.to(data.y.device), data.y)


def with_noisy_labels(data: TensorData, labels) -> TensorData:
    """``data`` with ``y`` replaced by ``labels`` (a user's noisy labels, e.g. from :func:`read_label_file`) and the
    original labels kept as ``clean_y``."""
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData, got {type(data).__name__}")
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.shape != data.y.shape:
        raise ValueError(f"the noisy labels have shape {tuple(labels.shape)}, the data's labels {tuple(data.y.shape)}")
    return TensorData(data.x, labels.to(data.y.device), data.y if data.clean_y is None else data.clean_y)


def read_label_file(path, *, num_samples: int, num_classes: int, name: str = "noisy_labels") -> torch.Tensor:
    """Labels from ``path``: a ``.npy`` array of shape (N,), or text with one integer per line (blank lines are
    skipped). Checked to hold ``num_samples`` labels, each a class in ``0..num_classes-1``; errors name ``name``,
    the file and the first bad entry."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{name}: no such file {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise ValueError(f"{name}: cannot read {path} as a .npy array ({err})") from None
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
            raise ValueError(f"{name}: {path} must hold a 1-D integer array, got {arr.dtype} {arr.shape}")
        values, where = arr.astype(np.int64), [f"entry {i}" for i in range(len(arr))]
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{name}: cannot read {path} as text ({err}); give one integer per line or a .npy") \
                from None
        vals, where = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                vals.append(int(line.strip()))
            except ValueError:
                raise ValueError(f"{name}: line {number} of {path} is {line.strip()!r}, not an integer class label "
                                 "(one integer per line)") from None
            where.append(f"line {number}")
        values = np.asarray(vals, dtype=np.int64)
    if len(values) != num_samples:
        raise ValueError(f"{name}: {path} holds {len(values)} labels but the training set has {num_samples} samples; "
                         "give one label per training sample, in the order of the training data as loaded (before "
                         "train_size, val_size and imbalance select from it)")
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name}: {where[i]} of {path} is class {int(values[i])}, but the dataset has {num_classes} "
                         f"classes (0..{num_classes - 1}); {len(bad)} label(s) out of range")
    return torch.from_numpy(values)


def check_noise_options(label_noise=0.0, noise_type=None, noise_map=None, noisy_labels=None) -> tuple[float, str]:
    """The label-noise options of :func:`maxup.data.load_dataset` checked together; returns ``(rate, noise_type)``
    with the type resolved (``asymmetric`` when only a map is given, else ``symmetric``). Errors name the
    argument and its command-line option."""
    rate = check_rate(label_noise, "label_noise (--label-noise)")
    if noise_type is not None and noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type (--noise-type) must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}")
    given = [n for n, v in (("noise_type (--noise-type)", noise_type), ("noise_map (--noise-map)", noise_map))
             if v is not None]
    if noisy_labels is not None and (rate > 0 or given):
        named = ["label_noise (--label-noise)"] * (rate > 0) + given
        raise ValueError(f"noisy_labels (--noisy-labels) reads the noisy labels from a file: do not combine it with "
                         f"{' and '.join(named)}, which draw{'s' * (len(named) == 1)} them")
    if rate == 0 and given:
        raise ValueError(f"{' and '.join(given)} need{'s' * (len(given) == 1)} a noise rate: give label_noise "
                         "(--label-noise RATE) in (0, 1)")
    if noise_map is not None and noise_type not in (None, "asymmetric"):
        raise ValueError(f"noise_map (--noise-map) is for noise_type='asymmetric', not {noise_type!r} "
                         "(pairflip flips c -> c+1, symmetric to any other class)")
    return rate, noise_type or ("asymmetric" if noise_map is not None else "symmetric")


def preset_map(dataset: str) -> dict[int, int]:
    """The asymmetric noise map of ``dataset`` (:data:`NOISE_PRESETS`); a clear error when there is none."""
    key = _PRESET_ALIASES.get(str(dataset).lower(), str(dataset).lower())
    if key not in NOISE_PRESETS:
        raise ValueError(f"noise_type='asymmetric' (--noise-type asymmetric) has no preset map for {dataset} (presets: "
                         f"{', '.join(NOISE_PRESETS)}); give the flips as noise_map (--noise-map '9:1,2:0,...')")
    return dict(NOISE_PRESETS[key])
