"""Method specs: short strings that compose into a training step.

A spec joins terms with ``+``; each term is ``name`` or ``name(key=value, ...)``::

    erm
    cutout(size=8)
    maxup(m=4)+cutmix
    maxup(m=4, temperature=0.5)+cropflip+mixup(alpha=0.2)
    maxup(m=4)+cropflip+manifold_mixup                         # hidden features mixed: last in a spec
    sam(rho=0.05)+gradaug                                      # SAM wraps any step
    maxup(m=4)+word_dropout(p=0.1)+embed_noise(sigma=0.1)      # language models (maxup lm)

Augmentation terms apply in the order written; at most one objective term (``erm``,
``maxup``) wraps them, at most one step term (GradAug, G-Mix, ...) trains the objective,
at most one wrapper (``sam``, ``asam``) wraps the step, and at most one weight average (``ema``,
``swa``) is kept beside the model (:mod:`maxup.averaging`). Every term is a class that
registered itself (:mod:`maxup.registry`) and declares its traits; :func:`parse` reads a
spec once into a :class:`Spec`, which every layer passes down and which builds the step.
"""
from __future__ import annotations

import ast
import importlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import augment as A
from .registry import REGISTRY, Entry, register

__all__ = ["Entry", "REGISTRY", "Spec", "Term", "build_augment", "build_average", "build_objective", "build_step",
           "canonical", "data_options",
           "list_methods", "parse", "register", "split_outside"]

# every term registers itself where it is defined: import the packages that hold them
for _package in ("augment", "objectives", "steps", "averaging"):
    importlib.import_module(f"{__package__}.{_package}")


def list_methods() -> list[Entry]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


@dataclass
class Term:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def entry(self) -> Entry:
        return REGISTRY[self.name]

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name


_CONSTANTS = {"inf": math.inf, "true": True, "false": False, "none": None, "True": True, "False": False, "None": None}


def _value(node: ast.expr, term: str):
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"cannot read the value {ast.unparse(node)!r} in method term {term!r}: "
                         "use numbers, true/false, inf, quoted strings or tuples") from None


def split_outside(text: str, sep: str) -> list[str]:
    """Split ``text`` on ``sep`` where it is outside parentheses: ``"a(x=1, y=2),b" -> ["a(x=1, y=2)", "b"]``."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _term(raw: str, spec: str) -> Term:
    try:
        node = ast.parse(raw if "(" in raw else raw + "()", mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args \
                or any(kw.arg is None for kw in node.keywords):
            raise SyntaxError
    except SyntaxError:
        raise ValueError(f"cannot parse method term {raw!r} in {spec!r}: write name or name(key=value, ...)") from None
    name = node.func.id.lower()
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r} in {spec!r}; valid methods: {', '.join(sorted(REGISTRY))}")
    keys = [kw.arg for kw in node.keywords]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"method term {raw!r} in {spec!r} gives {', '.join(repeated)} more than once: "
                         "give each argument once")
    kwargs = {kw.arg: _value(kw.value, raw) for kw in node.keywords}
    valid = REGISTRY[name].options()
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"unknown argument {key!r} for method {name!r}; valid arguments: "
                             + (", ".join(f"{k}={v!r}" for k, v in valid.items()) or "none"))
    return Term(name, kwargs)


#: which term domains each kind of input accepts
_ACCEPTS = {"image": ("any", "tensor", "image"), "tensor": ("any", "tensor"), "sequence": ("any", "sequence")}
_WHAT = {"any": "any input", "tensor": "images and features", "image": "images",
         "sequence": "token sequences (language models)"}


@dataclass(frozen=True)
class Spec:
    """A parsed, checked method spec: its terms in order. ``str(spec)`` is its canonical form."""

    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return "+".join(str(t) for t in self.terms)

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    def of_kind(self, kind: str) -> list[Term]:
        return [t for t in self.terms if t.entry.kind == kind]

    def trait(self, name: str) -> bool:
        """Whether any term has the trait ``name`` (``random``, ``mixes_rows``, ...)."""
        return any(t.entry.trait(name) for t in self.terms)

    def check_domain(self, domain: str) -> Spec:
        """Refuse terms that do not work on ``domain`` inputs: ``"image"`` (images and feature vectors),
        ``"tensor"`` (feature vectors only) or ``"sequence"`` (token ids, language modelling)."""
        if domain not in _ACCEPTS:
            raise ValueError(f"domain must be one of {', '.join(_ACCEPTS)}, got {domain!r}")
        wrong = [t for t in self.terms if t.entry.cls.domain not in _ACCEPTS[domain]]
        if wrong:
            t = wrong[0]
            target = "language models" if domain == "sequence" else "images and features"
            if t.entry.kind != "augment":
                raise ValueError(f"method {str(self)!r}: {t.name} is not available for {target}")
            fits = sorted(e.name for e in REGISTRY.values() if e.kind == "augment" and e.cls.domain in _ACCEPTS[domain])
            raise ValueError(f"method {str(self)!r}: {t.name} works on {_WHAT[t.entry.cls.domain]}; {target} take "
                             f"the augmentations {', '.join(fits)}")
        return self

    # ------------------------------------------------------------------ building

    def build_augment(self, num_classes: int, model: torch.nn.Module | None = None,
                      train=None) -> A.Augmentation | None:
        """The spec's augmentations, composed in order (None when it has none); ``train`` (the training set) goes
        to the terms that read it (see :func:`data_options`)."""
        augs = [t.entry.factory(**t.kwargs, **data_options(t.entry, train, num_classes), model=model,
                                num_classes=num_classes) for t in self.of_kind("augment")]
        if not augs:
            return None
        return augs[0] if len(augs) == 1 else A.Compose(augs, num_classes=num_classes)

    def build_objective(self, num_classes: int, model: torch.nn.Module | None = None, train=None):
        """The objective the spec describes (ERM when it names none)."""
        augment = self.build_augment(num_classes, model, train)
        term = next(iter(self.of_kind("objective")), Term("erm"))
        if augment is None and term.name != "erm":
            augment = A.Identity(num_classes=num_classes)
        return term.entry.factory(augment, **term.kwargs, **data_options(term.entry, train, num_classes))

    def build_step(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_classes: int, train=None,
                   **step_options):
        """The training step: the step term (or :class:`~maxup.steps.Standard`) around the objective, inside
        the wrapper term if there is one. ``step_options`` (``max_grad_norm``, ``amp``) go to the step; ``train``
        (the training set: a :class:`maxup.data.TensorData` or an ``(x, y)`` pair) to the terms that read it."""
        from .steps import Standard

        objective = self.build_objective(num_classes, model, train)
        term = next(iter(self.of_kind("step")), None)
        if term is None:
            step = Standard(objective, optimizer, **step_options)
        else:
            step = term.entry.factory(objective, optimizer, model=model, num_classes=num_classes, **term.kwargs,
                                      **data_options(term.entry, train, num_classes), **step_options)
        for wrapper in self.of_kind("wrapper"):
            step = wrapper.entry.factory(step, **wrapper.kwargs)
        return step

    def build_average(self, model: torch.nn.Module):
        """The weight average to keep beside ``model`` (:mod:`maxup.averaging`), or None."""
        term = next(iter(self.of_kind("average")), None)
        return None if term is None else term.entry.factory(model, **term.kwargs)


def build_average(spec: Spec | str, model: torch.nn.Module):
    """The weight average a spec asks for (``ema``, ``swa``), or None (see :meth:`Spec.build_average`)."""
    return parse(spec).build_average(model)


def parse(spec: str | Spec) -> Spec:
    """Read a spec into a :class:`Spec`, checking names, arguments and how the terms compose."""
    if isinstance(spec, Spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("method spec must be a non-empty string such as 'erm' or 'maxup(m=4)+cutout'")
    parsed = Spec(tuple(_term(raw.strip(), spec) for raw in split_outside(spec, "+")))
    _check(parsed, spec)
    return parsed


def _check(parsed: Spec, spec: str) -> None:
    """The rules of composition, read from the terms' traits."""
    for kind in ("objective", "step", "wrapper", "average"):
        found = [t.name for t in parsed.of_kind(kind)]
        if len(found) > 1:
            raise ValueError(f"method spec {spec!r} has more than one {kind} term: {found}")
    objective = parsed.of_kind("objective")
    if objective and objective[0].name != "erm" and not parsed.trait("random"):
        deterministic = sorted(t.name for t in parsed.of_kind("augment"))
        raise ValueError(f"method spec {spec!r}: MaxUp needs a random augmentation to draw its m copies from, e.g. "
                         "'maxup(m=4)+cutout' ('maxup(m=4)+embed_noise(sigma=0.1)' for language models); without one "
                         "the copies are identical" + (f" ({', '.join(deterministic)} draws nothing)"
                                                       if deterministic else ""))
    step = parsed.of_kind("step")
    if step and parsed.of_kind("wrapper") and step[0].entry.trait("sharpness_aware"):
        raise ValueError(f"method spec {spec!r}: {step[0].name} already trains under SAM; set its rho instead of "
                         f"adding {parsed.of_kind('wrapper')[0].name}")
    augments = [t.entry.cls for t in parsed.of_kind("augment")]
    early = next((c for c in augments[:-1] if c.last), None)
    if early is not None:
        raise ValueError(f"method spec {spec!r}: {early.__name__} must be the last augmentation: {early.last}")
    if step and step[0].entry.trait("mixes_rows") and any(c.context for c in augments):
        inside = next(t.name for t in parsed.of_kind("augment") if t.entry.cls.context)
        raise ValueError(f"{inside} does not compose with {step[0].name}, which mixes the trained rows again without "
                         f"{inside}'s forward context; use it alone, under sam/asam or with gradaug")


def build_augment(terms: Spec | str | list[Term], num_classes: int, model: torch.nn.Module | None = None, train=None):
    """The augmentations of a spec (see :meth:`Spec.build_augment`)."""
    return _as_spec(terms).build_augment(num_classes, model, train)


def build_objective(spec: Spec | str | list[Term], num_classes: int, model: torch.nn.Module | None = None,
                    train=None):
    """The objective a spec describes (see :meth:`Spec.build_objective`)."""
    return _as_spec(spec).build_objective(num_classes, model, train)


def data_options(entry: Entry, train, num_classes: int) -> dict[str, Any]:
    """The training-data arguments a builder fills in for ``entry``, as its ``filled`` names them: ``train`` (the
    training set as given) and ``class_counts`` (its samples per class, from the labels ``train.y`` or
    ``train[1]``); nothing without ``train``, so a term that needs them says so itself.

    >>> data_options(REGISTRY["balanced_softmax"], (torch.zeros(3, 2), torch.tensor([0, 0, 1])), 2)
    {'class_counts': tensor([2, 1])}
    """
    filled = entry.cls.filled
    if train is None or not {"train", "class_counts"} & set(filled):
        return {}
    out: dict[str, Any] = {"train": train} if "train" in filled else {}
    if "class_counts" in filled:
        from .data.longtail import class_counts

        labels = train.y if hasattr(train, "y") else train[1]
        out["class_counts"] = class_counts(labels, num_classes)
    return out


def build_step(spec: Spec | str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_classes: int,
               **step_options):
    """The training step a spec describes,
    e.g. ``build_step("maxup(m=4)+cutout", model=..., optimizer=..., num_classes=10)``.

    ``step_options`` (``max_grad_norm``, ``amp``, ...) go to the step's constructor; ``train=data`` (the
    training set) to the terms that read it (the long-tail terms: class counts, a re-weighted second batch).
    """
    return parse(spec).build_step(model=model, optimizer=optimizer, num_classes=num_classes, **step_options)


def _as_spec(spec) -> Spec:
    return Spec(tuple(spec)) if isinstance(spec, list) else parse(spec)


def canonical(spec: str | Spec) -> str:
    """A spec written back in a normal form (lower-case names, explicit arguments only)."""
    return str(parse(spec))
