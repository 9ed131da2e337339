"""A fast in-memory batch iterator with a resumable, shardable epoch order."""

from __future__ import annotations

import numbers

import torch

from .core import TensorData

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
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + int(epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around, like DistributedSampler
            order = torch.cat([order, order.repeat(-(-(total - n) // n))[: total - n]])
        return order[self.rank : total : self.world_size]

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
