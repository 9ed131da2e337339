"""Method specs: short strings that compose into a training step.

A spec joins terms with ``+``; each term is ``name`` or ``name(key=value, ...)``::

    erm
    cutout(size=8)
    maxup(m=4)+cutmix
    maxup(m=4, temperature=0.5)+cropflip+mixup(alpha=0.2)
    maxup(m=4)+cropflip+manifold_mixup                         # hidden features mixed: last in a spec
    maxup(m=4)+word_dropout(p=0.1)+embed_noise(sigma=0.1)      # language models (maxup lm)

Augmentation terms apply in the order written; at most one objective term
(``erm``, ``maxup``) wraps them, and at most one step term (SAM, GradAug, ...) wraps
the objective; ``sam`` or ``asam`` may join a step term whose factory takes ``sam=``
(``sam(rho=0.05)+gradaug``: SAM on the GradAug loss). Later modules add terms with
:func:`register`.
"""
from __future__ import annotations

import ast
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import augment as A
from .objectives import ERM, MaxUp, hidden_mixer
from .steps import Standard
from .steps.gmix import make_bgmix, make_dgmix, make_sam_mixup
from .steps.gradaug import make_gradaug
from .steps.sam import make_asam, make_sam

KINDS = ("augment", "objective", "step")
SAM_TERMS = ("sam", "asam")  # step terms that may join a step whose factory takes ``sam=`` (the SAM step built)
DETERMINISTIC = ("smooth",)  # augment terms without randomness: MaxUp over them alone draws identical copies
MIXING_STEPS = ("sam_mixup", "bgmix", "dgmix")  # steps that mix the objective's rows themselves (Mixup after the spec)


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    factory: Callable
    summary: str
    hidden: tuple[str, ...] = ()  # constructor arguments the builder fills in

    def options(self) -> dict[str, Any]:
        """The user-settable keyword arguments and their defaults."""
        out = {}
        for p in list(inspect.signature(self.factory).parameters.values()):
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.name in self.hidden:
                continue
            out[p.name] = None if p.default is p.empty else p.default
        return out


REGISTRY: dict[str, Entry] = {}


def register(name: str, kind: str, factory: Callable, summary: str, *, hidden: tuple[str, ...] = ()) -> None:
    """Add a method term. ``kind`` is ``"augment"`` (factory(**kw, num_classes=C) -> Augmentation),
    ``"objective"`` (factory(augment, **kw) -> Objective) or ``"step"``
    (factory(objective, optimizer, **kw) -> Step, optionally taking ``model``)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    REGISTRY[name] = Entry(name, kind, factory, summary, hidden)


def list_methods() -> list[Entry]:
    return [REGISTRY[k] for k in sorted(REGISTRY)]


@dataclass
class Term:
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

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


def parse(spec: str) -> list[Term]:
    """Split a spec into terms, checking names and arguments against the registry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("method spec must be a non-empty string such as 'erm' or 'maxup(m=4)+cutout'")
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "+" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    terms = []
    for raw in (p.strip() for p in parts):
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
        terms.append(Term(name, kwargs))
    random = [t for t in terms if REGISTRY[t.name].kind == "augment" and t.name not in DETERMINISTIC
              or t.name in MIXING_STEPS]  # the terms that make MaxUp's copies differ
    if any(t.name == "maxup" for t in terms) and not random:
        raise ValueError(f"method spec {spec!r}: MaxUp needs a random augmentation to draw its m copies from, e.g. "
                         "'maxup(m=4)+cutout' ('maxup(m=4)+embed_noise(sigma=0.1)' for language models); without one "
                         f"the copies are identical ({', '.join(DETERMINISTIC)} only changes the targets)")
    for kind in ("objective", "step"):
        found = [t.name for t in terms if REGISTRY[t.name].kind == kind]
        if kind == "step" and len(found) == 2 and _sam_pair(found):
            continue
        if len(found) > 1:
            hint = " (only sam or asam can join a step such as gradaug)" if kind == "step" else ""
            raise ValueError(f"method spec {spec!r} has more than one {kind} term: {found}{hint}")
    return terms


def _sam_pair(names: list[str]) -> bool:
    """Two step terms that combine: one SAM term and one step whose factory takes ``sam=``."""
    a, b = names
    return any(x in SAM_TERMS and y not in SAM_TERMS and _accepts(REGISTRY[y].factory, "sam")
               for x, y in ((a, b), (b, a)))


def _accepts(factory: Callable, name: str) -> bool:
    return name in inspect.signature(factory).parameters


def build_augment(terms: list[Term], num_classes: int, model: torch.nn.Module | None = None) -> A.Augmentation | None:
    """The spec's augmentations, composed in order; ``model`` goes to factories that take it (``embed_noise``)."""
    augs = []
    for t in terms:
        entry = REGISTRY[t.name]
        if entry.kind == "augment":
            extra = {"model": model} if _accepts(entry.factory, "model") else {}
            augs.append(entry.factory(**t.kwargs, **extra, num_classes=num_classes))
    if not augs:
        return None
    return augs[0] if len(augs) == 1 else A.Compose(augs, num_classes=num_classes)


def build_objective(spec: str | list[Term], num_classes: int, model: torch.nn.Module | None = None):
    """The objective a spec describes (ERM when it names none)."""
    terms = parse(spec) if isinstance(spec, str) else spec
    augment = build_augment(terms, num_classes, model)
    obj = next((t for t in terms if REGISTRY[t.name].kind == "objective"), Term("erm"))
    entry = REGISTRY[obj.name]
    if augment is None and entry.name != "erm":
        augment = A.Identity(num_classes=num_classes)
    return entry.factory(augment, **obj.kwargs)


def build_step(spec: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_classes: int, **step_options):
    """The training step a spec describes, e.g. ``build_step("maxup(m=4)+cutout", model=..., optimizer=..., num_classes=10)``.

    ``step_options`` (``max_grad_norm``, ``amp``, ...) go to the step's constructor.
    """
    terms = parse(spec)
    objective = build_objective(terms, num_classes, model)
    steps = [t for t in terms if REGISTRY[t.name].kind == "step"]
    _check_composition(objective, steps)
    term = next((t for t in steps if len(steps) == 1 or t.name not in SAM_TERMS), Term("standard"))
    factory = REGISTRY[term.name].factory if term.name in REGISTRY else Standard
    extra = {k: v for k, v in (("model", model), ("num_classes", num_classes)) if _accepts(factory, k)}
    if len(steps) == 2:  # e.g. sam(rho=0.05)+gradaug: the step runs the SAM step's settings
        inner = next(t for t in steps if t is not term)
        extra["sam"] = REGISTRY[inner.name].factory(objective, optimizer, **inner.kwargs)
    return factory(objective, optimizer, **extra, **term.kwargs, **step_options)


def _check_composition(objective, steps: list[Term]) -> None:
    """Refuse the pairs of terms that cannot work together, with the reason. Manifold Mixup runs under
    SAM/ASAM and GradAug (their extra passes reuse each row's layer, lambda and partner), not under the
    G-Mix steps, which mix the trained rows again themselves."""
    augment = getattr(objective, "augment", None)
    reweights = isinstance(augment, torch.nn.Module) and any(getattr(m, "reweight", False) for m in augment.modules())
    if reweights and any(t.name == "sam_mixup" for t in steps):
        raise ValueError("soft_augment(reweight=true) does not compose with sam_mixup, which mixes after it: "
                         "drop reweight or use sam+mixup")
    other = [t.name for t in steps if t.name in MIXING_STEPS]
    if hidden_mixer(augment) is not None and other:
        raise ValueError(f"manifold_mixup does not compose with {other[0]}, which mixes the trained rows again "
                         "without the hidden mixing; use it alone, under sam/asam or with gradaug")


def canonical(spec: str) -> str:
    """A spec written back in a normal form (lower-case names, explicit arguments only)."""
    return "+".join(str(t) for t in parse(spec))


def _erm(augment=None):
    return ERM(augment)


def _maxup(augment, m: int = 4, temperature: float = 0.0, include_clean: bool = False, warmup_steps: int = 0,
           mode: str | None = None, score: str = "loss", select_amp: str | None = None):
    return MaxUp(augment, m, temperature=temperature, include_clean=include_clean, warmup_steps=warmup_steps, mode=mode,
                 score=score, select_amp=select_amp)


def _aug(cls, **defaults):
    """A factory with the registry's defaults (per-sample mixing by default: each copy its own lambda)."""
    sig = inspect.signature(cls)
    params = [p.replace(default=defaults.get(p.name, p.default), kind=p.KEYWORD_ONLY) for p in sig.parameters.values()]

    def factory(**kwargs):
        return cls(**{**defaults, **kwargs})

    factory.__signature__ = sig.replace(parameters=params)
    return factory


register("erm", "objective", _erm, "plain training on one (augmented) copy of each sample", hidden=("augment",))
register("maxup", "objective", _maxup, "MaxUp: the worst loss over m augmented copies per sample (temperature > 0: "
         "softmax weights over the copies, MMEL-style; score='kl': worst fit, not most ambiguous target)",
         hidden=("augment",))
for _name, _cls, _defaults, _summary in [
    ("gaussian", A.GaussianNoise, {"sigma": 0.1}, "Gaussian noise N(0, sigma^2) on the inputs"),
    ("cutout", A.Cutout, {}, "Cutout: a box of the image set to zero"),
    ("cropflip", A.RandomCropFlip, {}, "random crop after padding, and horizontal flip"),
    ("mixup", A.Mixup, {"per_sample": True}, "Mixup: convex blend of two samples and their labels"),
    ("cutmix", A.CutMix, {"per_sample": True}, "CutMix: a box pasted from another sample, label by area"),
    ("hmix", A.HMix, {"per_sample": True}, "HMix: a CutMix box inside a Mixup blend"),
    ("gmix", A.GMix, {"per_sample": True}, "GMix: another sample blended in through a Gaussian mask"),
    ("resizemix", A.ResizeMix, {"per_sample": True}, "ResizeMix: another sample, shrunk, pasted in"),
    ("smooth", A.LabelSmoothing, {}, "label smoothing: targets (1 - eps) t + eps / K"),
    ("soft_augment", A.SoftAugmentation, {}, "Soft Augmentation: an aggressive crop (or occlusion) whose target "
                                             "confidence falls with the visible fraction"),
    ("lumix", A.LUMix, {"per_sample": True}, "LUMix: Mixup or CutMix with the label ratio perturbed by U[-u, u] "
                                             "(this project's rule)"),
]:
    register(_name, "augment", _aug(_cls, **_defaults), _summary, hidden=("num_classes",))


def _manifold_mixup(alpha: float = 2.0, layers: tuple | None = None, per_sample: bool = True, p: float = 1.0, *,
                    model=None, num_classes=None):
    if model is None and layers is None:
        raise ValueError("manifold_mixup needs the model (its .stages are the default layers) or layers=(...)")
    return A.ManifoldMixup(alpha, layers=layers, model=model, per_sample=per_sample, num_classes=num_classes, p=p)


register("manifold_mixup", "augment", _manifold_mixup, "Manifold Mixup: hidden features mixed at a layer drawn from "
         "layers (default: the input and every stage); last in a spec", hidden=("num_classes", "model"))


def _embed_noise(sigma: float = 0.1, *, model=None, num_classes=None):
    embedding = getattr(model, "embedding", None)
    if not isinstance(embedding, torch.nn.Embedding):
        raise ValueError("embed_noise needs a model whose nn.Embedding is its .embedding attribute and that embeds "
                         "with maxup.functional.embed, such as maxup.models.LSTMLanguageModel (maxup lm)")
    return A.EmbeddingNoise(sigma, dim=embedding.embedding_dim, num_classes=num_classes)


# language modelling: token ids (B, T) in, each segment one sample (see maxup.augment.text)
register("embed_noise", "augment", _embed_noise, "Gaussian noise N(0, sigma^2) on the word embeddings (language "
         "models; last in a spec)", hidden=("num_classes", "model"))
register("word_dropout", "augment", _aug(A.WordDropout), "word dropout: each input token becomes <unk> with "
         "probability p (language models)", hidden=("num_classes",))
register("token_sub", "augment", _aug(A.TokenSubstitution), "each input token replaced by a random word with "
         "probability p (language models)", hidden=("num_classes",))

_STEP_HIDDEN = ("objective", "optimizer", "model", "num_classes", "max_grad_norm", "amp")
for _name, _factory, _summary in [
    ("sam", make_sam, "SAM: the gradient at w + rho g/||g||, applied at w (two passes per step)"),
    ("asam", make_asam, "ASAM: SAM in the scale-invariant ball T = |w| + eta (rho 0.5)"),
    ("sam_mixup", make_sam_mixup, "G-Mix: SAM on the Mixup loss (Mixup after the spec's augmentations)"),
    ("bgmix", make_bgmix, "BG-Mix: the gamma most sharpness-sensitive examples unmixed, the rest mixed, under SAM"),
    ("dgmix", make_dgmix, "DG-Mix: each example's loss blends mixed and unmixed by its sensitivity rank, under SAM"),
    ("gradaug", make_gradaug, "GradAug: random-width sub-networks on resized inputs, distilled towards the full "
                              "network (with sam/asam: SAM on that loss)"),
]:
    register(_name, "step", _factory, _summary, hidden=_STEP_HIDDEN + ("sam",))
