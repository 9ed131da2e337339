"""Speed settings for training on a GPU: TF32, cuDNN autotuning, channels-last, ``torch.compile``.

:class:`maxup.train.Trainer` (and ``maxup train --compile --channels-last --no-tf32``) applies them;
they are plain functions for a loop of one's own.

- **TF32** (Ampere or newer): fp32 matrix multiplies and convolutions on tensor cores with a
  10-bit mantissa; about the accuracy of bf16 autocast's accumulations, several times faster
  than IEEE fp32. :func:`configure_backends` turns it on for CUDA training unless ``tf32=False``.
  These are process-wide PyTorch settings.
- **cudnn.benchmark**: cuDNN times its algorithms once per input shape and keeps the fastest;
  training batches have one shape (plus the last, shorter batch), so this pays.
- **channels-last**: NHWC memory for 4-D inputs and the model; faster convolutions on tensor cores.
- **torch.compile** (:func:`compile_model`): the model's forward compiled once; the batch dimension is
  marked dynamic from the first call, so the last short batch of an epoch (and MaxUp's selection
  forwards of other sizes) reuse the graph instead of recompiling.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_model", "configure_backends", "set_tf32"]


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 in fp32 CUDA matrix multiplies and cuDNN convolutions (process-wide)."""
    precision = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = precision
        conv.fp32_precision = precision
    else:  # PyTorch before 2.9
        matmul.allow_tf32 = bool(enabled)
        torch.backends.cudnn.allow_tf32 = bool(enabled)


def configure_backends(device, *, tf32: bool = True, cudnn_benchmark: bool = True) -> dict:
    """TF32 and cuDNN autotuning for training on ``device``; nothing changes off CUDA. Returns what was set."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    set_tf32(bool(tf32))
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    return {"tf32": bool(tf32), "cudnn_benchmark": bool(cudnn_benchmark)}


def _dynamic_batch(module, args):
    """Forward pre-hook of a compiled model: its first input's batch dimension may vary (no recompile)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        torch._dynamo.maybe_mark_dynamic(args[0], 0)


def compile_model(model: nn.Module, *, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """``torch.compile(model)`` with a dynamic batch dimension. The result shares ``model``'s parameters;
    ``result._orig_mod`` is ``model`` (:func:`maxup._modules.unwrap` finds it for name lookups).

    >>> fast = compile_model(model)            # backend="eager" or "aot_eager" to debug without a compiler
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be a torch.compile backend name such as 'inductor', got {backend!r}")
    compiled = torch.compile(model, backend=backend, mode=mode)
    compiled.register_forward_pre_hook(_dynamic_batch)
    return compiled
