"""Manifold Mixup (Verma et al., ICML 2019): mix hidden features inside a model's forward pass.

The randomness is a :class:`HiddenMix` plan: for every row of the batch, the mixing point
(a module name, or ``"input"`` for the model's input), the weight ``lam`` and the partner
row ``perm``. :func:`mix_hidden` applies a plan through forward hooks, on any
``nn.Module``, and removes the hooks when the ``with`` block ends (also on an error)::

    h -> lam * h + (1 - lam) * h[perm]        at the output of the chosen module

A plan may hold several blocks of rows, each mixed at its own point (MaxUp's m copies
forwarded as one batch, see :meth:`HiddenMix.stack`): a row's partner is a row of the same
block, so every block is mixed exactly as if it were forwarded alone (up to the batch
statistics of BatchNorm, which see all rows, as they do for MaxUp's other copies).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .context import ForwardContext
from .mixing import _bcast, _mix_targets, _partner, _per_sample

__all__ = ["INPUT", "HiddenMix", "manifold_mixup", "mix_hidden"]

#: the name of the mixing point before the model's first module (the inputs themselves)
INPUT = "input"


@dataclass(frozen=True)
class HiddenMix(ForwardContext):
    """Where and how every row of a batch mixes its hidden features (a forward context: rows are coupled
    to their partners).

    Attributes:
        points: the mixing points, module names as in ``model.named_modules()`` or ``"input"``.
        layer: (N,) long, the index into ``points`` at which each row is mixed; -1 leaves a row as it is.
        lam: (N,) float, the weight of the row itself.
        perm: (N,) long, the partner row (a row mixed at the same point).
        used: the indices into ``points`` that ``layer`` holds, when the host knows them (the
            builders below and :class:`~maxup.augment.ManifoldMixup` fill it in); ``None``:
            unknown, so :func:`mix_hidden` hooks every point instead of reading ``layer``.
    """

    points: tuple[str, ...]
    layer: torch.Tensor
    lam: torch.Tensor
    perm: torch.Tensor
    used: tuple[int, ...] | None = None

    @classmethod
    def single(cls, points: Sequence[str], index: int, lam, perm: torch.Tensor) -> HiddenMix:
        """Every row mixed at ``points[index]`` (-1: none) with ``lam`` (float or (B,)) and partners ``perm``."""
        perm = torch.as_tensor(perm, dtype=torch.long)
        n = perm.shape[0]
        lam = _per_sample(lam, n, torch.empty(0, device=perm.device)).float()
        layer = torch.full((n,), int(index), dtype=torch.long, device=perm.device)
        return cls(tuple(points), layer, lam, perm, (int(index),) if int(index) >= 0 else ())

    @classmethod
    def identity(cls, points: Sequence[str], n: int, device=None) -> HiddenMix:
        """A plan that mixes none of ``n`` rows."""
        return cls.single(points, -1, 1.0, torch.arange(n, device=device))

    @classmethod
    def stack(cls, plans: Sequence[HiddenMix]) -> HiddenMix:
        """The plans of blocks forwarded one after the other as one batch (partners offset into their block)."""
        points = plans[0].points
        if any(p.points != points for p in plans):
            raise ValueError("plans to stack must name the same mixing points")
        offsets, start = [], 0
        for p in plans:
            offsets.append(p.perm + start)
            start += p.perm.shape[0]
        used = None if any(p.used is None for p in plans) else tuple(sorted({i for p in plans for i in p.used}))
        return cls(points, torch.cat([p.layer for p in plans]), torch.cat([p.lam for p in plans]), torch.cat(offsets),
                   used)

    def __len__(self) -> int:
        return self.perm.shape[0]

    couples_rows = True

    def apply(self, model: nn.Module):
        return mix_hidden(model, self)

    def blank(self, n: int, device=None) -> HiddenMix:
        return HiddenMix.identity(self.points, n, device)


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DDP / DataParallel / ``torch.compile`` wrappers (its modules carry the hooks)."""
    from .._modules import unwrap
    return unwrap(model)


def _mix_rows(h, plan: HiddenMix, index: int, name: str) -> torch.Tensor:
    if not isinstance(h, torch.Tensor):
        raise ValueError(f"manifold mixup at {name!r}: the module returns {type(h).__name__}, not a tensor; "
                         "choose modules that return one tensor (e.g. the model's stages)")
    if h.shape[0] != len(plan):
        raise ValueError(f"manifold mixup at {name!r}: the features hold {h.shape[0]} rows but the plan {len(plan)}; "
                         "the plan must come from the same batch")
    here = plan.layer.to(h.device) == index
    rows = torch.arange(h.shape[0], device=h.device)
    weight = torch.where(here, plan.lam.to(h.device), torch.ones_like(plan.lam, device=h.device)).to(h.dtype)
    perm = torch.where(here, plan.perm.to(h.device), rows)
    # lam * h + (1 - lam) * h[perm]; rows mixed elsewhere get weight 1 and themselves as partner: unchanged
    return torch.lerp(_partner(h, perm), h, _bcast(weight, h))


@contextlib.contextmanager
def mix_hidden(model: nn.Module, plan: HiddenMix | None):
    """Within the block, forwards of ``model`` mix hidden features as ``plan`` says.

    Hooks are registered on the modules the plan uses (a forward pre-hook on the model for
    ``"input"``) and removed on exit. ``plan=None`` does nothing. A module that runs more
    than once per forward would mix at every call: name modules that run once.

    >>> plan = HiddenMix.single(("input", "blocks.0"), 1, lam=0.7, perm=torch.randperm(8))
    >>> with mix_hidden(model, plan):
    ...     logits = model(x)
    """
    if plan is None:
        yield
        return
    net = _unwrap(model)
    modules = dict(net.named_modules())
    missing = [p for p in plan.points if p != INPUT and p not in modules]
    if missing:
        valid = [n for n in modules if n][:12]
        raise ValueError(f"manifold mixup: the model has no module named {missing[0]!r}; layers must be module names "
                         f"as in model.named_modules() (e.g. {', '.join(valid)}) or 'input'")
    # the host knows the points in use (plan.used); otherwise hook them all rather than read plan.layer
    used = sorted(plan.used) if plan.used is not None else range(len(plan.points))
    handles = []
    try:
        for index in used:
            name = plan.points[index]
            if name == INPUT:
                def pre_hook(module, args, index=index):
                    return (_mix_rows(args[0], plan, index, INPUT), *args[1:])
                handles.append(net.register_forward_pre_hook(pre_hook))
            else:
                def hook(module, args, output, index=index, name=name):
                    return _mix_rows(output, plan, index, name)
                handles.append(modules[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def manifold_mixup(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, layer: str, lam, perm: torch.Tensor):
    """Manifold Mixup (Verma et al. 2019) at one module: ``h -> lam * h + (1 - lam) * h[perm]`` where
    ``h`` is the output of ``layer`` (``"input"``: the inputs), targets mixed alike.

    ``lam`` is a float or a (B,) tensor. Returns ``(logits, t_mix)``; the hooks are gone afterwards.

    >>> logits, t = manifold_mixup(model, x, F.one_hot(y, 10).float(), "blocks.0", 0.6, torch.randperm(len(x)))
    """
    perm = torch.as_tensor(perm, dtype=torch.long, device=x.device)
    plan = HiddenMix.single((layer,), 0, lam, perm)
    with mix_hidden(model, plan):
        logits = model(x)
    return logits, _mix_targets(targets, perm, plan.lam.to(targets.device))
