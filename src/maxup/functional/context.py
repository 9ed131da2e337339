"""Forward contexts: what an augmentation does inside the model's forward pass.

Some augmentations cannot be written into the inputs: Manifold Mixup mixes hidden
features, embedding noise perturbs the looked-up embeddings. Such an augmentation returns
its draw as a :class:`ForwardContext` beside the batch; every forward of those rows (the
training pass, SAM's second pass, GradAug's sub-networks, MaxUp's selection pass) runs
inside :func:`enter`, so the same draw applies to each of them. Objectives carry the
context in their result (:attr:`maxup.objectives.ObjectiveResult.context`); nothing else
needs to know which augmentation made it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ForwardContext", "enter", "forward_model"]


class ForwardContext:
    """Base class of a forward context for a batch of N rows.

    Subclasses implement :meth:`apply` (a context manager that changes the model's forward),
    :meth:`blank` and :meth:`stack`, and :meth:`rows` unless ``couples_rows`` (a row's
    forward then depends on other rows, e.g. its mixing partner, so rows cannot be taken
    apart: MaxUp must forward all copies together).
    """

    #: a row's forward depends on other rows of the batch
    couples_rows = False
    #: the hooks change from call to call: run the model without its ``torch.compile`` wrapper
    recompiles = True

    def apply(self, model: nn.Module):
        raise NotImplementedError

    def blank(self, n: int, device=None) -> ForwardContext:
        """A context of the same kind that changes nothing, for ``n`` rows (MaxUp's clean copy)."""
        raise NotImplementedError

    @classmethod
    def stack(cls, contexts: Sequence[ForwardContext]) -> ForwardContext:
        """The contexts of blocks of rows forwarded one after the other as one batch."""
        raise NotImplementedError

    def rows(self, index: torch.Tensor) -> ForwardContext:
        """The context of the rows ``index`` (a (K,) long tensor) forwarded on their own."""
        raise ValueError(f"{type(self).__name__} couples the rows of its batch: they cannot be forwarded apart")


def forward_model(model: nn.Module, context: ForwardContext | None) -> nn.Module:
    """The model to call under ``context``: without its ``torch.compile`` wrapper when the context hooks it
    (hooks that change every step would recompile every time)."""
    if context is None or not context.recompiles:
        return model
    from .._modules import uncompiled
    return uncompiled(model)


@contextlib.contextmanager
def enter(model: nn.Module, context: ForwardContext | None):
    """Forwards of ``model`` inside the block apply ``context`` (``None``: nothing)."""
    if context is None:
        yield
        return
    with context.apply(model):
        yield
