"""Metrics of the noisy-label and long-tail settings: memorisation of flipped labels, per-class and
many/medium/few-shot accuracy. DDP-aware like :func:`maxup.train.metrics.evaluate`.

Memorisation (Arpit et al. 2017; Zhang et al. 2017): on the training samples whose label was flipped,
``noisy_memorised`` is the fraction the model predicts as their *noisy* label (it has fitted the noise)
and ``noisy_true_accuracy`` the fraction it predicts as their *true* label (it has resisted it). Plain
training first raises the second, then the first as it memorises.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .._checks import check_int
from ..data import TensorData
from ..data.longtail import shot_accuracy
from . import distributed as D

__all__ = ["class_metrics", "flipped_subset", "memorisation", "noise_record"]


def flipped_subset(data: TensorData) -> TensorData | None:
    """The samples of ``data`` whose ``y`` differs from ``clean_y`` (with both labels), or None when there are
    none or ``data`` has no ``clean_y``."""
    mask = data.flipped
    if mask is None or not bool(mask.any()):
        return None
    idx = torch.nonzero(mask).flatten()
    return TensorData(data.x[idx], data.y[idx], data.clean_y[idx])


@torch.no_grad()
def memorisation(model: nn.Module, data: TensorData, *, batch_size: int = 512, device=None,
                 index: torch.Tensor | None = None) -> dict[str, float]:
    """``{"noisy_memorised": ..., "noisy_true_accuracy": ...}`` of ``model`` (eval mode, restored after) on the
    flipped samples of ``data`` (those with ``y != clean_y``; ``index``: their indices, when the caller keeps
    them, so that nothing is copied); ``{}`` when none is flipped.

    >>> data = TensorData(torch.randn(6, 3, 32, 32), torch.tensor([1, 1, 2, 3, 4, 5]), torch.tensor([0] * 6))
    >>> sorted(memorisation(model, data))
    ['noisy_memorised', 'noisy_true_accuracy']
    """
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData, got {type(data).__name__}")
    batch_size = check_int("batch_size", batch_size)
    if data.clean_y is None:
        return {}
    if index is None:
        index = torch.nonzero(data.flipped).flatten()
    module = D.unwrap_model(model)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if D.is_distributed():
        index = index[D.get_rank()::D.get_world_size()]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # noisy-label hits, true-label hits, samples
    was_training = module.training
    module.eval()
    try:
        for start in range(0, index.shape[0], batch_size):
            idx = index[start:start + batch_size]
            pred = module(data.x[idx].to(device, non_blocking=True)).argmax(-1)
            sums[0] += (pred == data.y[idx].to(device)).sum()
            sums[1] += (pred == data.clean_y[idx].to(device)).sum()
            sums[2] += pred.shape[0]
    finally:
        module.train(was_training)
    hit_noisy, hit_true, n = D.all_reduce_sum(sums).tolist()
    if n == 0:
        return {}
    return {"noisy_memorised": hit_noisy / n, "noisy_true_accuracy": hit_true / n}


def noise_record(data: TensorData) -> dict:
    """What a run's config records of noisy training labels: how many are flipped and a digest of the labels, so
    that a resume with other noisy labels (another rate, seed or label file) is refused."""
    labels = data.y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return {"flipped": int(data.flipped.sum()), "labels_sha1": hashlib.sha1(labels).hexdigest()[:16]}


def class_metrics(metrics: dict, train_counts, thresholds: tuple[float, float]) -> dict:
    """``metrics`` of :func:`~maxup.train.metrics.evaluate` with ``per_class=True``, its ``class_correct`` and
    ``class_total`` replaced by ``class_accuracy`` (a list by class) and ``many_accuracy``, ``medium_accuracy``,
    ``few_accuracy`` (:func:`maxup.data.shot_accuracy`; a group without classes is left out)."""
    out = dict(metrics)
    correct, total = out.pop("class_correct", None), out.pop("class_total", None)
    if correct is not None and total is not None:
        out.update(shot_accuracy(correct, total, train_counts, thresholds))
    return out
