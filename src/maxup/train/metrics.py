"""Evaluation: accuracy, cross-entropy, expected calibration error (ECE) and perplexity, DDP-aware.

>>> evaluate(model, splits.test, num_classes=10)      # doctest: +SKIP
{'accuracy': ..., 'loss': ..., 'ece': ...}
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int
from ..data import TensorData
from . import distributed as D

ECE_BINS = 15
#: most logits one evaluation forward of token sequences may produce (rows * T * vocabulary)
SEQUENCE_LOGITS = 2 ** 24


def calibration_counts(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> torch.Tensor:
    """(3, num_bins) float64 sums per confidence bin: samples, confidence, correct predictions.

    The confidence of a sample is its largest softmax probability; bin ``b`` holds
    confidences in ``(b / num_bins, (b + 1) / num_bins]`` (a confidence of 0 goes to bin 0).
    Sums, not means, so that batches and processes add up.
    """
    probs = torch.softmax(logits.detach().float(), dim=-1)
    conf, pred = probs.max(dim=-1)
    correct = (pred == labels).double()
    conf = conf.double()
    bins = (conf * num_bins).ceil().long().clamp(1, num_bins) - 1
    out = torch.zeros(3, num_bins, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, bins, torch.ones_like(conf))
    out[1].index_add_(0, bins, conf)
    out[2].index_add_(0, bins, correct)
    return out


def ece_from_counts(counts: torch.Tensor) -> float:
    """``sum_b (n_b / N) * |accuracy_b - confidence_b|`` from :func:`calibration_counts` sums."""
    n = counts[0].sum()
    if n <= 0:
        return float("nan")
    return float(((counts[2] - counts[1]).abs().sum() / n).item())


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE with ``num_bins`` equal-width confidence bins (Guo et al. 2017).

    >>> round(expected_calibration_error(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])), 4)
    0.4251
    """
    num_bins = check_int("num_bins", num_bins)
    return ece_from_counts(calibration_counts(logits, labels, num_bins))


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 512, device=None, num_classes: int,
             per_class: bool = False) -> dict:
    """Accuracy, mean cross-entropy and ECE (15 equal-width bins) of ``model`` on ``data``.

    For token sequences (``data.y`` of shape (N, T), logits (B, T, num_classes)) every token
    is one prediction: the metrics are per token, ``perplexity`` is ``exp`` of the mean token
    cross-entropy, and a forward takes at most ``batch_size`` segments and
    :data:`SEQUENCE_LOGITS` logits.

    Runs in eval mode without gradients (the model's mode is restored afterwards) and
    moves the data to ``device`` (default: the model's device) batch by batch. Inside a
    process group of more than one process every rank evaluates the samples
    ``rank, rank + W, ...`` and the sums are all-reduced, so every rank returns the
    metrics of the whole set.

    Returns ``{"accuracy": float, "loss": float, "ece": float}``, plus ``"perplexity"`` for sequences,
    and with ``per_class`` the lists ``"class_correct"`` and ``"class_total"`` (correct predictions and
    samples of each true class; :func:`maxup.data.shot_accuracy` turns them into per-class and
    many/medium/few-shot accuracy).
    """
    if not isinstance(data, TensorData):
        raise ValueError(f"data must be a maxup.data.TensorData, got {type(data).__name__}")
    batch_size = check_int("batch_size", batch_size)
    num_classes = check_int("num_classes", num_classes)
    module = D.unwrap_model(model)
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    device = torch.device(device)
    x, y = data.x, data.y
    sequence = y.dim() == 2
    if sequence:
        batch_size = max(1, min(batch_size, SEQUENCE_LOGITS // (y.shape[1] * num_classes)))
    if D.is_distributed():
        x, y = x[D.get_rank()::D.get_world_size()], y[D.get_rank()::D.get_world_size()]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    counts = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)
    by_class = torch.zeros(2, num_classes if per_class else 0, dtype=torch.float64, device=device)
    was_training = module.training
    module.eval()
    try:
        for start in range(0, y.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device, non_blocking=True)
            yb = y[start:start + batch_size].to(device, non_blocking=True)
            logits = module(xb)
            if sequence and logits.shape == (*yb.shape, num_classes):
                logits, yb = logits.flatten(0, 1), yb.flatten()
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                expected = "(batch, T, num_classes)" if sequence else "(batch, num_classes)"
                raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; "
                                 f"expected {expected} with num_classes={num_classes}")
            logits = logits.float()
            totals[0] += F.cross_entropy(logits, yb, reduction="sum").double()
            totals[1] += (logits.argmax(-1) == yb).sum()
            totals[2] += yb.shape[0]
            counts += calibration_counts(logits, yb)
            if per_class:
                by_class[0].index_add_(0, yb, (logits.argmax(-1) == yb).double())
                by_class[1].index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
    finally:
        module.train(was_training)
    reduced = D.all_reduce_sum(torch.cat([totals, counts.flatten(), by_class.flatten()]))
    loss_sum, correct, n = (float(v) for v in reduced[:3].tolist())
    counts = reduced[3:3 + 3 * ECE_BINS].view(3, ECE_BINS)
    if n == 0:
        out = {"accuracy": float("nan"), "loss": float("nan"), "ece": float("nan")}
    else:
        out = {"accuracy": correct / n, "loss": loss_sum / n, "ece": ece_from_counts(counts)}
    if sequence:
        out["perplexity"] = perplexity(out["loss"])
    if per_class:
        correct_c, total_c = reduced[3 + 3 * ECE_BINS:].view(2, num_classes).tolist()
        out["class_correct"], out["class_total"] = [int(v) for v in correct_c], [int(v) for v in total_c]
    return out


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean token cross-entropy in nats (inf past float range, NaN stays NaN).

    >>> round(perplexity(math.log(100.0)), 6)
    100.0
    """
    return math.exp(loss) if not loss > 700 else math.inf


__all__ = ["ECE_BINS", "SEQUENCE_LOGITS", "calibration_counts", "ece_from_counts", "evaluate",
           "expected_calibration_error", "perplexity"]
