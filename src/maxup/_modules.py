"""Seeing through the wrappers around a network: DistributedDataParallel, DataParallel, ``torch.compile``.

Anything that looks modules up by name (Manifold Mixup's hooks, GradAug's slicing,
checkpoints, ``model.pt``) works on :func:`unwrap`'s result; calls go to the wrapper.
"""
from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _compiled(model) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``), recognised without importing dynamo."""
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any number of DDP, DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _compiled(model):
            model = model._orig_mod
        else:
            return model


def uncompiled(model: nn.Module) -> nn.Module:
    """``model`` without its outer ``torch.compile`` wrappers (a DDP wrapper inside is kept): for forwards
    whose structure changes from step to step (hooks, sliced widths), which would recompile every time."""
    while _compiled(model):
        model = model._orig_mod
    return model


def local(model: nn.Module) -> nn.Module:
    """``model`` without its outer DDP / DataParallel wrappers (a compiled net inside stays compiled): for
    forwards that need no gradient synchronisation, such as MaxUp's selection pass (no buffer broadcast)."""
    while isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DistributedDataParallel wrapper in ``model``'s wrappers, or None."""
    while True:
        if isinstance(model, DistributedDataParallel):
            return model
        if isinstance(model, nn.DataParallel):
            model = model.module
        elif _compiled(model):
            model = model._orig_mod
        else:
            return None


def strip_compile_prefix(state: dict) -> dict:
    """A state dict saved from a compiled model (keys ``_orig_mod.*``) with plain keys; others unchanged."""
    prefix = "_orig_mod."
    if not state or not all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return state
    return type(state)((k[len(prefix):], v) for k, v in state.items())


__all__ = ["ddp", "local", "strip_compile_prefix", "uncompiled", "unwrap"]
