"""The method registry: every spec term (``cutout``, ``maxup``, ``sam``, ...) registers itself here.

A term is a class (an augmentation, an objective, a step or a step wrapper) decorated
with :func:`register` next to its definition. The class describes itself: its ``kind``,
its traits (see :class:`Traits`) and the constructor arguments a spec may set (its
signature, minus the arguments a builder fills in). :mod:`maxup.methods` parses specs
against this table and builds them; nothing else keeps a list of names.

>>> from maxup.registry import REGISTRY
>>> REGISTRY["cutout"].kind, REGISTRY["cutout"].options()["size"]
('augment', None)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DOMAINS", "KINDS", "REGISTRY", "Entry", "Traits", "register"]

#: ``augment``: changes the batch; ``objective``: the loss over (copies of) the batch; ``step``: the passes
#: and the update; ``wrapper``: wraps any step (SAM, ASAM); ``average``: a weight average kept beside the model
KINDS = ("augment", "objective", "step", "wrapper", "average")
#: the inputs a term works on: ``any``; ``tensor`` (float inputs: images or features); ``image`` (B, C, H, W);
#: ``sequence`` (token ids (B, T), language modelling)
DOMAINS = ("any", "tensor", "image", "sequence")


class Traits:
    """The traits every term class declares (class attributes; the defaults are these).

    - ``kind``: one of :data:`KINDS` (set by the base classes).
    - ``domain``: one of :data:`DOMAINS`.
    - ``random``: it draws randomness per call (MaxUp needs one such term to draw different copies).
    - ``mixes_rows``: it mixes samples with each other (Mixup and its family).
    - ``last``: why it must come last among the augmentations (None: anywhere).
    - ``context``: it acts inside the model's forward and returns a forward context
      (:class:`maxup.functional.context.ForwardContext`): ``"rows"`` when each row's part can be
      taken alone, ``"batch"`` when it couples rows (a mixing partner); None otherwise.
    - ``sharpness_aware``: a step that already runs SAM's two passes (a ``sam`` term cannot join it).
    - ``filled``: constructor arguments a builder fills in (not options of the spec).
    """

    kind: str = ""
    domain: str = "tensor"
    random: bool = False
    mixes_rows: bool = False
    last: str | None = None
    context: str | None = None
    sharpness_aware: bool = False
    filled: tuple[str, ...] = ()


@dataclass(frozen=True)
class Entry:
    """One registered term: its class, the summary ``maxup methods`` prints, the spec's defaults."""

    name: str
    cls: type
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    hidden: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.cls.kind

    @property
    def factory(self) -> Callable:
        """The builder: ``cls.from_spec`` (same keyword arguments as the class), with the spec's defaults."""
        build = getattr(self.cls, "from_spec", self.cls)
        return lambda *args, **kwargs: build(*args, **{**self.defaults, **kwargs})

    def trait(self, name: str):
        return getattr(self.cls, name)

    def options(self) -> dict[str, Any]:
        """The keyword arguments a spec may set, with their defaults (None when required)."""
        out = {}
        skip = set(self.cls.filled) | set(self.hidden)
        for p in inspect.signature(self.cls).parameters.values():
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in skip or p.kind == p.POSITIONAL_ONLY:
                continue
            out[p.name] = self.defaults.get(p.name, None if p.default is p.empty else p.default)
        return out


REGISTRY: dict[str, Entry] = {}


def register(name: str, summary: str, *, hidden: tuple[str, ...] = (), **defaults) -> Callable[[type], type]:
    """Class decorator: register the class as the spec term ``name``.

    ``defaults`` override the constructor's defaults for the spec (``per_sample=True``: in a
    spec each copy draws its own lambda); ``hidden`` arguments are fixed by those defaults
    and not offered to the spec (``asam`` is SAM with ``adaptive=True``).

    >>> @register("double_noise", "two Gaussian draws")            # doctest: +SKIP
    ... class DoubleNoise(Augmentation): ...
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"a method name must be a lower-case identifier, got {name!r}")

    def decorate(cls: type) -> type:
        if getattr(cls, "kind", None) not in KINDS:
            raise ValueError(f"{cls.__name__} must derive from Augmentation, Objective or Step (kind in {KINDS})")
        if cls.domain not in DOMAINS:
            raise ValueError(f"{cls.__name__}.domain must be one of {DOMAINS}, got {cls.domain!r}")
        known = set(inspect.signature(cls).parameters)
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ValueError(f"register({name!r}): {cls.__name__} takes no argument {', '.join(unknown)}")
        previous = REGISTRY.get(name)
        if previous is not None and previous.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"the method name {name!r} is taken by {previous.cls.__name__}")
        REGISTRY[name] = Entry(name, cls, summary, dict(defaults), tuple(hidden))
        return cls

    return decorate
