"""A fast in-memory batch iterator with a resumable, shardable epoch order."""

from __future__ import annotations

import copy
import numbers

import numpy as np
import torch

from .core import TensorData
from .sampling import sample_probabilities, sampler_exponent

__all__ = ["Loader"]


class Loader:
    """Iterate over ``(x, y)`` batches of a :class:`TensorData` held in memory.

    No ``torch.utils.data.DataLoader`` and no per-sample Python work: each batch
    is one indexing operation. The order of an epoch is a pure function of
    ``(seed, epoch)`` (like ``DistributedSampler``), so a run resumed at epoch
    ``e`` with ``set_epoch(e)`` sees the same batches. Each ``iter()`` uses the
    current epoch and then advances it by one, so forgetting ``set_epoch`` still
    gives a fresh order every epoch; calling it every epoch is equivalent.

    With ``world_size > 1`` the epoch's permutation is padded by wrapping to a
    multiple of ``world_size`` and rank ``r`` takes positions ``r, r + W, ...``:
    disjoint, equal-size shards, so all ranks run the same number of steps.

    If ``device`` is given the whole split is moved there once, and batches are
    gathered on the device. ``memory_format`` (e.g. ``torch.channels_last``) lays out
    4-D batches that way.

    ``sampler`` (:mod:`maxup.data.sampling`): ``"instance"`` (the default: a permutation,
    every sample once per epoch), ``"class"`` (each class equally likely), ``"sqrt"``,
    ``"reversed"`` (class probability inversely proportional to the class size) or an
    exponent ``q`` (class probability proportional to ``n_c ** q``). The weighted samplers
    draw ``len(data)`` samples per epoch with replacement, seeded by ``(seed, epoch)`` and
    sharded across ranks exactly as the shuffle. :meth:`paired` iterates a second,
    differently sampled batch beside each batch (CMO, bilateral mixup).

    >>> import torch
    >>> data = TensorData(torch.randn(10, 3), torch.arange(10) % 2)
    >>> loader = Loader(data, batch_size=4, seed=0)
    >>> [len(y) for x, y in loader]
    [4, 4, 2]
    """

    def __init__(
        self,
        data: TensorData,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        memory_format: torch.memory_format | None = None,
        sampler: str | float = "instance",
    ) -> None:
        for arg, value, low in (("batch_size", batch_size, 1), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"Loader: {arg} must be an int >= {low}, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < world_size:
            raise ValueError(f"Loader: rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if len(data) == 0:
            raise ValueError("Loader: the dataset is empty")
        self.x = data.x if device is None else data.x.to(device)
        if memory_format is not None and self.x.dim() == 4:  # e.g. torch.channels_last, kept by every batch
            self.x = self.x.contiguous(memory_format=memory_format)
        self.memory_format = memory_format if self.x.dim() == 4 else None
        self.y = data.y if device is None else data.y.to(device)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self._set_sampler(sampler)

    def _set_sampler(self, sampler) -> None:
        sampler_exponent(sampler, "Loader: sampler")  # a clear error for a bad name
        self.sampler = sampler
        self._probs = None
        if sampler == "instance":
            return
        if not self.shuffle:
            raise ValueError(f"Loader: sampler={sampler!r} draws samples at random; shuffle=False (the data order) "
                             "goes with sampler='instance' only")
        if self.y.ndim != 1:
            raise ValueError(f"Loader: sampler={sampler!r} needs class labels y of shape (N,), not token sequences "
                             f"{tuple(self.y.shape)}")
        self._probs = sample_probabilities(self.y.cpu(), sampler)  # drawn on the CPU: the same on every device

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (after wrap-padding)."""
        n = int(self.y.shape[0])
        return -(-n // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch used by the next ``iter()`` (the order depends only on seed and epoch)."""
        self.epoch = int(epoch)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in iteration order (before batching)."""
        n = int(self.y.shape[0])
        if self._probs is not None:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            order = torch.multinomial(self._probs, n, replacement=True, generator=g)
        elif self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around, like DistributedSampler
            order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
        return order[self.rank : total : self.world_size]

    def resampled(self, sampler, *, seed: int | None = None) -> Loader:
        """A loader over the same tensors (no copy) with another ``sampler``, in step with this one: the same batch
        size, length, rank, world size and epoch, and its own random stream (``seed``; by default a function
        of this loader's seed, so a run's second batches are reproducible)."""
        other = copy.copy(self)
        other.shuffle = True
        other.seed = int(np.random.SeedSequence([self.seed, 0x5A3]).generate_state(1)[0]) if seed is None \
            else int(seed)
        other._set_sampler(sampler)
        return other

    def paired(self, sampler="reversed", *, seed: int | None = None):
        """Iterate this epoch's batches each beside a batch of the same size drawn by ``sampler``:
        ``for (x, y), (x2, y2) in loader.paired("reversed"): ...``. Advances the epoch like ``iter()``; under
        DDP each rank takes its shard of both orders. See :meth:`resampled`.

        >>> data = TensorData(torch.randn(100, 3), torch.tensor([0] * 90 + [1] * 10))
        >>> (x, y), (x2, y2) = next(iter(Loader(data, batch_size=32, seed=0).paired("reversed")))
        >>> tuple(x2.shape), int((y2 == 1).sum()) > int((y == 1).sum())
        ((32, 3), True)
        """
        other = self.resampled(sampler, seed=seed)
        other.epoch = self.epoch
        return zip(iter(self), iter(other))

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def __iter__(self):
        idx = self.indices(self.epoch).to(self.y.device)
        self.epoch += 1
        return self._batches(idx)

    def _batches(self, idx: torch.Tensor):
        bs, stop = self.batch_size, len(self) * self.batch_size
        for start in range(0, min(stop, len(idx)), bs):
            b = idx[start : start + bs]
            x = self.x[b]
            yield (x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)), self.y[b]
