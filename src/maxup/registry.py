"""The method registry: every spec term (``cutout``, ``maxup``, ``sam``, ...) registers itself here.

A term is a class (an augmentation, an objective, a step or a step wrapper) decorated
with :func:`register` next to its definition. The class describes itself: its ``kind``,
its traits (see :class:`Traits`) and the constructor arguments a spec may set (its
signature, minus the arguments a builder fills in) and, for ``maxup tune``, the ranges to search
some of them over (:attr:`Traits.search_space`). :mod:`maxup.methods` parses specs against this
table and builds them; nothing else keeps a list of names.

>>> from maxup.registry import REGISTRY
>>> REGISTRY["cutout"].kind, REGISTRY["cutout"].options()["size"]
('augment', None)
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DOMAINS", "KINDS", "REGISTRY", "Choice", "Entry", "Range", "Traits", "register", "search_range"]

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
    - ``search_space``: the options ``maxup tune`` searches when a spec leaves them free, and over what,
      declared next to the constructor: ``{"alpha": (0.1, 2.0, "log")}``. An entry is ``(low, high)``
      (uniform), ``(low, high, "log")`` (log-uniform), ``(low, high, "int")`` or ``(low, high, "int-log")``
      (whole numbers), or a list of the values to try, ``[0.0, 0.1, 0.5]`` (see :func:`search_range`).
      The ranges are where searching pays, not the valid values (the constructor checks those);
      :func:`register` may give a registered name ranges of its own (``asam``'s rho).
    """

    kind: str = ""
    domain: str = "tensor"
    random: bool = False
    mixes_rows: bool = False
    last: str | None = None
    context: str | None = None
    sharpness_aware: bool = False
    filled: tuple[str, ...] = ()
    search_space: dict[str, Any] = {}


@dataclass(frozen=True)
class Range:
    """A searched interval ``low..high`` of one option: log-uniform when ``log``, whole numbers when ``integer``.

    >>> str(Range(0.1, 2.0, log=True)), str(Range(2, 8, integer=True))
    ('0.1..2(log)', '2..8(int)')
    """

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self):
        for end in (self.low, self.high):
            if isinstance(end, bool) or not isinstance(end, (int, float)) or not math.isfinite(end):
                raise ValueError(f"a search range needs two finite numbers, got {self.low!r}..{self.high!r}")
            if self.integer and float(end) != int(end):
                raise ValueError(f"an integer range needs whole-number ends, got {self.low!r}..{self.high!r}")
        if self.low > self.high:
            raise ValueError(f"a search range runs from low to high, got {self.low:g}..{self.high:g}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low:g}..{self.high:g}: use a positive low "
                             "or drop (log)")

    @property
    def ends(self) -> tuple:
        return self.low, self.high

    def __str__(self) -> str:
        flags = ",".join(f for f, on in (("int", self.integer), ("log", self.log)) if on)
        return f"{self.low:g}..{self.high:g}" + (f"({flags})" if flags else "")


@dataclass(frozen=True)
class Choice:
    """The values of one option to try, in order.

    >>> str(Choice((0.0, 0.1, 0.5)))
    '0|0.1|0.5'
    """

    values: tuple

    def __post_init__(self):
        if not self.values or len(set(map(repr, self.values))) != len(self.values):
            raise ValueError(f"a list of values to try must be non-empty and name each value once, got "
                             f"{list(self.values)!r}")

    @property
    def ends(self) -> tuple:
        return self.values

    def __str__(self) -> str:
        return "|".join(f"{v:g}" if isinstance(v, float) else str(v) for v in self.values)


_SCALES = {"linear": {}, "log": {"log": True}, "int": {"integer": True}, "int-log": {"integer": True, "log": True}}


def search_range(declared) -> Range | Choice:
    """A :attr:`Traits.search_space` entry as a :class:`Range` or :class:`Choice`.

    >>> search_range((0.1, 2.0, "log")), search_range([2, 4])
    (Range(low=0.1, high=2.0, log=True, integer=False), Choice(values=(2, 4)))
    """
    if isinstance(declared, (Range, Choice)):
        return declared
    if isinstance(declared, list):
        return Choice(tuple(declared))
    if isinstance(declared, tuple) and len(declared) in (2, 3):
        scale = declared[2] if len(declared) == 3 else "linear"
        if scale not in _SCALES:
            raise ValueError(f"unknown scale {scale!r} in the search range {declared!r}; scales: {', '.join(_SCALES)}")
        return Range(declared[0], declared[1], **_SCALES[scale])
    raise ValueError(f"a search range is (low, high), (low, high, scale) or a list of values, got {declared!r}")


@dataclass(frozen=True)
class Entry:
    """One registered term: its class, the summary ``maxup methods`` prints, the spec's defaults."""

    name: str
    cls: type
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    hidden: tuple[str, ...] = ()
    search: dict[str, Any] = field(default_factory=dict)

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

    def search_space(self) -> dict[str, Range | Choice]:
        """The options ``maxup tune`` searches by default and their ranges: the class's
        :attr:`Traits.search_space`, with the ranges :func:`register` gave this name, among :meth:`options`."""
        options = self.options()
        declared = {**self.cls.search_space, **self.search}
        return {k: search_range(v) for k, v in declared.items() if k in options}


REGISTRY: dict[str, Entry] = {}


def register(name: str, summary: str, *, hidden: tuple[str, ...] = (), search_space: dict | None = None,
             **defaults) -> Callable[[type], type]:
    """Class decorator: register the class as the spec term ``name``.

    ``defaults`` override the constructor's defaults for the spec (``per_sample=True``: in a
    spec each copy draws its own lambda); ``hidden`` arguments are fixed by those defaults
    and not offered to the spec (``asam`` is SAM with ``adaptive=True``); ``search_space``
    overrides ranges of the class's :attr:`Traits.search_space` for this name (``asam``
    searches a larger rho than ``sam``).

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
        search = dict(search_space or {})
        options = set(known) - set(cls.filled) - set(hidden)
        for key, value in {**cls.search_space, **search}.items():
            if key not in options:
                raise ValueError(f"register({name!r}): {cls.__name__}.search_space names {key!r}, which is not an "
                                 f"option of the spec (options: {', '.join(sorted(options))})")
            try:
                search_range(value)
            except ValueError as err:
                raise ValueError(f"register({name!r}): {cls.__name__}.search_space[{key!r}]: {err}") from None
        previous = REGISTRY.get(name)
        if previous is not None and previous.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"the method name {name!r} is taken by {previous.cls.__name__}")
        REGISTRY[name] = Entry(name, cls, summary, dict(defaults), tuple(hidden), search)
        return cls

    return decorate
