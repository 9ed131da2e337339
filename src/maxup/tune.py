"""Search method specs and their hyper-parameters with Optuna, on a validation split (``maxup tune``).

The search space comes from the method registry: each term class declares the options worth
searching and their ranges next to its constructor (:attr:`maxup.registry.Traits.search_space`).
A search starts from candidate specs; the arguments a spec writes stay fixed, its other declared
options are searched, and a *space* narrows or widens any option::

    candidates("mixup,cutmix,maxup(m=4)+cutout,sam")     # mixup.alpha, cutmix.alpha, maxup.temperature,
                                                         # cutout.size, sam.rho searched; maxup.m fixed at 4
    candidates("mixup,sam", space="mixup.alpha=0.1..2(log), sam.rho=0.02|0.05|0.1")

A space entry is ``TERM.OPTION=LOW..HIGH`` with an optional scale ``(log)``, ``(int)``, ``(int,log)``
or ``(linear)`` (without one: the declared scale, else linear; whole numbers for an integer option),
``TERM.OPTION=A|B|C`` (values to try) or ``TERM.OPTION=VALUE`` (fixed). Its values must be valid for
the method: :func:`check_values` builds each candidate at the ends of each range and trains one step.

Each trial picks a candidate (the parameter ``method``) and its values (parameters ``TERM.OPTION``,
shared by the candidates that hold the term), trains on the training split, reports the validation
accuracy after every epoch to the pruner (successive halving / Hyperband stop weak trials early)
and returns the last epoch's validation accuracy (of the weight average for a spec with ``ema`` or
``swa``). The test set is never read. The study lives in an Optuna storage (SQLite by default in the
CLI), so an interrupted search resumes; its settings (data, budget) are stored with it and a resume
with other settings is refused.

>>> cands = candidates("mixup,maxup(m=4)+gaussian")
>>> [str(c) for c in cands], [name for c in cands for name in c.names]
(['mixup', 'maxup(m=4)+gaussian'], ['mixup.alpha', 'maxup.temperature', 'gaussian.sigma'])

Needs ``optuna`` (``pip install "maxup[tune]"``) for the search itself, not to build the space.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import methods as M
from .registry import REGISTRY, Choice, Range

__all__ = ["Candidate", "Choice", "Param", "Range", "best_spec", "best_trial", "candidates", "check_min_epochs",
           "check_values", "data_fingerprint", "open_study", "parse_space", "quiet", "require_optuna", "run_search",
           "score", "search", "spent", "step_probe", "trials_table", "write_report"]

#: the Optuna parameter that picks the candidate spec
METHOD = "method"
#: the samplers and pruners by name
SAMPLERS = ("tpe", "random")
PRUNERS = ("hyperband", "halving", "median", "none")


# ------------------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class Param:
    """One searched option of a candidate: the term's position in the spec, the option, the Optuna
    parameter name (``TERM.OPTION``) and the range."""

    index: int
    option: str
    name: str
    range: Range | Choice
    #: the range came from the user's space (not the registry's declaration)
    given: bool = False

    def suggest(self, trial):
        r = self.range
        if isinstance(r, Choice):
            return trial.suggest_categorical(self.name, list(r.values))
        if r.integer:
            return trial.suggest_int(self.name, int(r.low), int(r.high), log=r.log)
        return trial.suggest_float(self.name, float(r.low), float(r.high), log=r.log)


@dataclass(frozen=True)
class Candidate:
    """A candidate spec of a search: its terms as written (their arguments fixed) and the options searched."""

    spec: M.Spec
    params: tuple[Param, ...] = ()

    def __str__(self) -> str:
        return str(self.spec)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def build(self, values: dict) -> M.Spec:
        """The spec with ``values`` (by parameter name) filled in; floats kept to 3 significant digits, so that
        the spec's text is what trained. Options without a value keep their defaults."""
        kwargs = [dict(t.kwargs) for t in self.spec.terms]
        for p in self.params:
            if p.name in values:
                kwargs[p.index][p.option] = _tidy(values[p.name])
        terms = []
        for term, kw in zip(self.spec.terms, kwargs):
            order = list(term.entry.options())
            terms.append(M.Term(term.name, {k: kw[k] for k in sorted(kw, key=order.index)}))
        return M.parse(str(M.Spec(tuple(terms))))

    def defaults(self) -> dict:
        """The searched options at their defaults (those inside the searched range): the candidate as written."""
        out = {}
        for p in self.params:
            value = self.spec.terms[p.index].entry.options()[p.option]
            if _inside(value, p.range):
                out[p.name] = value
        return out

    def sample(self, trial) -> M.Spec:
        return self.build({p.name: p.suggest(trial) for p in self.params})


def _tidy(value):
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.3g}")
    return value


def _inside(value, r: Range | Choice) -> bool:
    if isinstance(r, Choice):
        return any(value == v if _number(value) and _number(v) else value == v and type(value) is type(v)
                   for v in r.values)
    if not _number(value) or not r.low <= value <= r.high:
        return False
    return not r.integer or float(value) == int(value)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Given:
    """A space entry as written: a range with its scale flags (None: not written), or the values to try."""

    text: str
    low: float | None = None
    high: float | None = None
    flags: tuple[str, ...] | None = None
    values: tuple | None = None


_ENTRY = re.compile(r"^([A-Za-z_]\w*)\.([A-Za-z_]\w*)\s*=\s*(.+)$")
_RANGE = re.compile(r"^(.+?)\.\.(.+?)(?:\(([^()]*)\))?$")
_FLAGS = ("log", "int", "linear")
_CONSTANTS = {"true": True, "false": False, "none": None}


def _literal(text: str, entry: str):
    text = text.strip()
    if text.lower() in _CONSTANTS:
        return _CONSTANTS[text.lower()]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"search space {entry!r}: cannot read the value {text!r}; use numbers, true/false or "
                         "quoted strings") from None
    if not isinstance(value, (int, float, str, bool)) or isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"search space {entry!r}: {text!r} is not a finite number, true/false or a string")
    return value


def parse_space(space: str | Iterable[str] | None) -> dict[tuple[str, str], _Given]:
    """Read space entries (a string of comma-separated entries, or several strings) by (term, option).

    >>> sorted(parse_space("mixup.alpha=0.1..2(log), maxup.m=2|4").items())[0][1].values
    (2, 4)
    """
    if space is None:
        return {}
    texts = [space] if isinstance(space, str) else list(space)
    out: dict[tuple[str, str], _Given] = {}
    for text in texts:
        for raw in M.split_outside(text, ","):
            entry = raw.strip()
            if not entry:
                continue
            match = _ENTRY.match(entry)
            if match is None:
                raise ValueError(f"cannot read the search space entry {entry!r}: write TERM.OPTION=LOW..HIGH(log), "
                                 "TERM.OPTION=A|B|C or TERM.OPTION=VALUE, e.g. mixup.alpha=0.1..2(log)")
            term, option, value = match.group(1).lower(), match.group(2), match.group(3).strip()
            if (term, option) in out:
                raise ValueError(f"the search space gives {term}.{option} twice ({out[term, option].text!r}, "
                                 f"{entry!r}): give each option once")
            ranged = _RANGE.match(value) if not value.startswith(("'", '"')) else None
            if ranged is not None:
                low, high = (_literal(v, entry) for v in ranged.group(1, 2))
                if not (_number(low) and _number(high)):
                    raise ValueError(f"search space {entry!r}: a range LOW..HIGH needs two numbers")
                flags = None
                if ranged.group(3) is not None:
                    flags = tuple(f.strip().lower() for f in ranged.group(3).split(",") if f.strip())
                    bad = [f for f in flags if f not in _FLAGS]
                    if bad:
                        raise ValueError(f"search space {entry!r}: unknown scale {bad[0]!r}; write (log), (int), "
                                         "(int,log) or (linear)")
                out[term, option] = _Given(entry, low, high, flags)
            else:
                values = tuple(_literal(v, entry) for v in M.split_outside(value, "|"))
                out[term, option] = _Given(entry, values=values)
    return out


def _resolve(given: _Given, declared: Range | Choice | None, default) -> Range | Choice:
    """A space entry as a range, taking the declared scale when it writes none."""
    try:
        if given.values is not None:
            return Choice(given.values)
        if given.flags is not None:
            return Range(given.low, given.high, log="log" in given.flags, integer="int" in given.flags)
        if isinstance(declared, Range):
            return Range(given.low, given.high, log=declared.log, integer=declared.integer)
        return Range(given.low, given.high, integer=_number(default) and isinstance(default, int))
    except ValueError as err:
        raise ValueError(f"search space {given.text!r}: {err}") from None


def candidates(methods: str | Iterable[str], space: str | Iterable[str] | None = None, *,
               domain: str | None = None) -> list[Candidate]:
    """The candidate specs of a search and the options each searches: the options each term declares
    (:attr:`maxup.registry.Traits.search_space`) that the spec leaves free, with the ranges of ``space``
    (see the module notes) in place of the declared ones. ``domain`` checks the specs' inputs
    (:meth:`maxup.methods.Spec.check_domain`).

    A space entry must concern some candidate: its term in a candidate where the option is free.
    """
    texts = [s.strip() for s in (M.split_outside(methods, ",") if isinstance(methods, str) else methods)]
    texts = [s for s in texts if s]
    if not texts:
        raise ValueError("no candidate method spec: list at least one, e.g. 'mixup,maxup(m=4)+cutout'")
    specs = []
    for text in texts:
        spec = M.parse(text)
        if domain is not None:
            spec.check_domain(domain)
        specs.append(spec)
    labels = [str(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a candidate is listed twice: {labels}")
    given = parse_space(space)
    used = set()
    out = []
    for spec in specs:
        counts: dict[str, int] = {}
        params = []
        for i, term in enumerate(spec.terms):
            counts[term.name] = counts.get(term.name, 0) + 1
            prefix = term.name if counts[term.name] == 1 else f"{term.name}#{counts[term.name]}"
            entry = term.entry
            declared = entry.search_space()
            options = entry.options()
            for option in options:
                if option in term.kwargs:
                    continue
                mine = (term.name, option) in given
                if mine:
                    used.add((term.name, option))
                    r = _resolve(given[term.name, option], declared.get(option), options[option])
                elif option in declared:
                    r = declared[option]
                else:
                    continue
                params.append(Param(i, option, f"{prefix}.{option}", r, mine))
        out.append(Candidate(spec, tuple(params)))
    for (term, option), g in given.items():
        if (term, option) in used:
            continue
        holding = [s for s in specs if any(t.name == term for t in s.terms)]
        if term not in REGISTRY:
            raise ValueError(f"search space {g.text!r}: unknown method {term!r}; methods: "
                             + ", ".join(sorted(REGISTRY)))
        if option not in REGISTRY[term].options():
            raise ValueError(f"search space {g.text!r}: {term} has no option {option!r}; options: "
                             + ", ".join(REGISTRY[term].options()))
        if not holding:
            raise ValueError(f"search space {g.text!r}: no candidate has the term {term} (candidates: "
                             f"{', '.join(labels)}); add one, or drop the entry")
        raise ValueError(f"search space {g.text!r}: {term}.{option} is fixed in every candidate that has {term} "
                         f"({', '.join(map(str, holding))}); write {term} without {option}=... to search it")
    return out


def check_values(cands: list[Candidate], probe: Callable[[M.Spec], None]) -> None:
    """Refuse a space outside a method's valid values: every candidate built with each searched option at
    each end of its range (every value of a list), the others at their defaults, through ``probe`` (e.g.
    :func:`step_probe`: build the step and train one step). For a declared range (not the user's) the
    message says how to narrow it."""
    seen = set()
    for cand in cands:
        for p in cand.params:
            for value in p.range.ends:
                key = (str(cand), p.name, repr(value))
                if key in seen:
                    continue
                seen.add(key)
                try:
                    spec = cand.build({p.name: value})
                    probe(spec)
                except ValueError as err:
                    reason = " ".join(str(err).split())
                    term = cand.spec.terms[p.index].name
                    if p.given:
                        raise ValueError(f"--space {p.name}={p.range} is outside the valid values of {term}: "
                                         f"{p.option}={value!r} in {str(cand)!r} fails ({reason}); choose values "
                                         "it accepts") from None
                    raise ValueError(f"the declared search range {p.name}={p.range} of {term} does not fit here: "
                                     f"{p.option}={value!r} in {str(cand)!r} fails ({reason}); narrow it with "
                                     f"--space {p.name}=LOW..HIGH, or fix {p.option} in the spec") from None


def step_probe(model_fn: Callable[[], torch.nn.Module], train, num_classes: int, rows: int = 8):
    """A probe for :func:`check_values`: build the spec's step and weight average on a fresh model from
    ``model_fn`` and train one step on the first ``rows`` training samples (on the CPU; the global random
    state is left as it was)."""
    from .functional._random import DeviceGenerator
    from .train import as_data

    data = as_data(train, "train")
    x, y = data.x[:rows], data.y[:rows]

    def probe(spec: M.Spec) -> None:
        with torch.random.fork_rng(devices=[]):
            model = model_fn().cpu()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            step = spec.build_step(model=model, optimizer=optimizer, num_classes=num_classes, train=data)
            spec.build_average(model)
            step(model, x, y, DeviceGenerator(torch.device("cpu"), seed=0, host_seed=0))

    return probe


def data_fingerprint(*splits) -> str:
    """A short hash of the samples and labels of ``splits`` (TensorData): a study refuses other data."""
    h = hashlib.sha256()
    for data in splits:
        if data is None:
            h.update(b"none")
            continue
        for t in (data.x, data.y):
            t = t.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the study


def require_optuna():
    """The ``optuna`` module, or a ValueError saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise ValueError("maxup tune needs Optuna: pip install 'maxup[tune]' (or pip install optuna)") from None
    return optuna


def _sampler(name: str, seed: int):
    optuna = require_optuna()
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # multivariate + group: the options of each candidate are modelled together (a conditional space)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler {name!r}; samplers: {', '.join(SAMPLERS)}")


def _pruner(name: str, epochs: int, min_epochs: int):
    optuna = require_optuna()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=epochs, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=min_epochs)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; pruners: {', '.join(PRUNERS)}")


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def open_study(storage: str | None, study_name: str, *, settings: dict, resume: bool = False,
               sampler: str = "tpe", pruner: str = "hyperband", epochs: int, min_epochs: int, seed: int = 0):
    """Create the study (``resume=False``: refused when ``storage`` holds one of that name) or load it
    (``resume=True``: refused when there is none, or when its ``settings`` differ, naming each difference).
    ``settings`` (JSON-able: the data, the budget, the candidates and their space) are stored as the study's
    user attribute ``settings``. The sampler is seeded with ``seed`` plus the trials already run."""
    optuna = require_optuna()
    settings = _plain(settings)
    exists = bool(storage) and study_name in optuna.get_all_study_names(storage)
    if resume and not exists:
        raise ValueError(f"no study {study_name!r} to resume in {storage}: start one without --resume")
    if not resume and exists:
        raise ValueError(f"{storage} already holds the study {study_name!r}: pass --resume to continue it, --force "
                         "to start over, or choose another --out")
    make = dict(storage=storage, study_name=study_name, direction="maximize",
                pruner=_pruner(pruner, epochs, min_epochs))
    if not exists:
        study = optuna.create_study(sampler=_sampler(sampler, seed), **make)
        study.set_user_attr("settings", settings)
        return study
    study = optuna.load_study(storage=storage, study_name=study_name)
    saved = study.user_attrs.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"the study {study_name!r} in {storage} was not made by maxup tune: choose another --out")
    missing = "(not set)"
    changed = [f"{k} {saved.get(k, missing)!r} -> {settings.get(k, missing)!r}"
               for k in sorted(set(saved) | set(settings)) if saved.get(k, missing) != settings.get(k, missing)]
    if changed:
        raise ValueError(f"cannot resume the study {study_name!r} in {storage} with other settings: "
                         f"{'; '.join(changed)}. Resume with the settings that created it (see best.json), or start "
                         "a new search in another --out")
    return optuna.load_study(storage=storage, study_name=study_name,
                             sampler=_sampler(sampler, seed + len(study.trials)), pruner=make["pruner"])


def _requeue_interrupted(study) -> int:
    """Trials a killed or interrupted session left running (or failed without a recorded error) are marked
    failed and queued again with the same values; returns how many."""
    optuna = require_optuna()
    state = optuna.trial.TrialState
    retried = set(study.user_attrs.get("requeued", []))
    again = [t for t in study.get_trials(deepcopy=False)
             if t.number not in retried and (t.state == state.RUNNING or
                                            t.state == state.FAIL and "error" not in t.user_attrs)]
    for t in again:
        if t.state == state.RUNNING:
            study.tell(t.number, state=state.FAIL, skip_if_finished=True)
        kept = {k: v for k, v in t.user_attrs.items() if k == "defaults"}
        study.enqueue_trial(t.params, user_attrs={**kept, "requeued_from": t.number})
    if again:
        study.set_user_attr("requeued", sorted(retried | {t.number for t in again}))
    return len(again)


def spent(study) -> int:
    """Trials that count against the budget: finished (complete, pruned) or failed with a recorded error
    (a diverged loss); not the interrupted ones, which run again."""
    state = require_optuna().trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (state.COMPLETE, state.PRUNED) or t.state == state.FAIL and "error" in t.user_attrs)


def score(record: dict, spec: M.Spec, metric: str = "val_accuracy") -> float | None:
    """The value a trial is judged by in an epoch's ``record``: ``metric``, of the weight average when the spec
    keeps one (``ema_val_accuracy``) and it was evaluated that epoch; None in an epoch without evaluation
    (``--eval-every``)."""
    average = spec.of_kind("average")
    if average:
        key = f"{average[0].entry.cls.prefix}_{metric}"
        if key in record:
            return float(record[key])
    return float(record[metric]) if metric in record else None


def _same_spec(trial, spec: str):
    """The earlier trial (complete or pruned) of the same spec, or None."""
    state = require_optuna().trial.TrialState
    done = trial.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))
    return next((t for t in done if t.number != trial.number and t.user_attrs.get("spec") == spec
                 and "same_as" not in t.user_attrs), None)


def run_search(cands: list[Candidate], train_fn: Callable, *, study, epochs: int, n_trials: int | None = None,
               timeout: float | None = None, defaults_first: bool = True, metric: str = "val_accuracy",
               on_trial: Callable | None = None):
    """Run trials of ``study`` until it holds ``n_trials`` that count (see :func:`spent`) or ``timeout`` seconds
    pass (no new trial starts after it; the running one finishes). Each trial picks a candidate and its values
    and calls ``train_fn(spec, on_epoch)``, which trains and returns the history; ``on_epoch(record)`` reports the
    epoch's ``metric`` (:func:`score`) and raises ``optuna.TrialPruned`` when the pruner stops the trial. A loss
    that diverges (:class:`maxup.train.NonFiniteLossError`) fails the trial and the search goes on. A spec that
    an earlier trial trained is not trained again (same seed, same numbers): the trial takes its result.
    ``defaults_first``: a new study first tries each candidate as written (its searched options at their defaults);
    those trials are never pruned: they train to the end, the reference the others are judged against.
    ``on_trial(study, trial)`` is called after each trial. Returns the study."""
    optuna = require_optuna()
    from .train import NonFiniteLossError

    state = optuna.trial.TrialState

    if n_trials is None and timeout is None:
        raise ValueError("give a budget: n_trials (--trials N) or timeout (--timeout SECONDS)")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"n_trials must be an integer >= 1, got {n_trials!r}: a budget of zero searches nothing")
    if timeout is not None and (not _number(timeout) or not timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}: a budget of zero searches nothing")
    by_label = {str(c): c for c in cands}
    labels = list(by_label)
    if not study.trials and defaults_first:
        for c in cands:
            study.enqueue_trial({METHOD: str(c), **c.defaults()}, user_attrs={"defaults": True})
    _requeue_interrupted(study)

    def objective(trial):
        cand = by_label[trial.suggest_categorical(METHOD, labels)]
        spec = cand.sample(trial)
        trial.set_user_attr("spec", str(spec))
        same = _same_spec(trial, str(spec))
        if same is not None:  # the same spec with the same seed trains to the same numbers: not again
            trial.set_user_attr("same_as", same.number)
            for key in ("epochs", "train_time", "val_loss", "train_loss", "clean_train_accuracy"):
                if key in same.user_attrs:
                    trial.set_user_attr(key, same.user_attrs[key])
            for step, value in sorted(same.intermediate_values.items()):
                trial.report(value, step)
            if same.state == state.PRUNED:
                raise optuna.TrialPruned(f"the same spec as trial {same.number}, pruned")
            return same.value
        reference = bool(trial.user_attrs.get("defaults"))  # a candidate as written: trained to the end

        def on_epoch(record: dict) -> None:
            value = score(record, spec, metric)
            if value is None:  # not evaluated this epoch
                return
            trial.report(value, int(record["epoch"]))
            if not reference and trial.should_prune():
                trial.set_user_attr("epochs", int(record["epoch"]))
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']} ({metric} {value:.4f})")

        try:
            history = train_fn(spec, on_epoch)
        except NonFiniteLossError as err:  # a diverged loss: this trial failed, the search goes on
            trial.set_user_attr("error", " ".join(str(err).split()))
            return float("nan")
        except optuna.TrialPruned:
            raise
        except Exception as err:  # stops the search; recorded so that a resume does not run it again
            trial.set_user_attr("error", f"{type(err).__name__}: {' '.join(str(err).split())}")
            raise
        last = history[-1]
        trial.set_user_attr("epochs", len(history))
        for key in ("val_loss", "train_loss", "clean_train_accuracy"):
            if isinstance(last.get(key), (int, float)):
                trial.set_user_attr(key, float(last[key]))
        trial.set_user_attr("train_time", float(sum(r.get("train_time", 0.0) for r in history)))
        return score(last, spec, metric)

    remaining = None if n_trials is None else n_trials - spent(study)
    if remaining is not None and remaining <= 0:
        return study
    callbacks = [on_trial] if on_trial is not None else None
    study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=callbacks)
    return study


def search(methods, *, model_fn: Callable[[], torch.nn.Module], train, val, epochs: int, space=None,
           n_trials: int | None = None, timeout: float | None = None, storage: str | None = None,
           study_name: str = "maxup-tune", resume: bool = False, seed: int = 0, sampler: str = "tpe",
           pruner: str = "hyperband", min_epochs: int | None = None, defaults_first: bool = True,
           settings: dict | None = None, **fit_options):
    """Search ``methods`` (candidate specs; see :func:`candidates`) with ``maxup.fit`` on ``train``, judged on
    ``val``: each trial builds ``model_fn()`` after ``torch.manual_seed(seed)`` and trains ``epochs`` epochs
    with ``fit_options`` (``batch_size``, ``lr``, ...; never a test set). ``storage`` is an Optuna storage URL
    (``"sqlite:///runs/tune/study.db"``; None: in memory). Returns the Optuna study; :func:`best_spec` reads it.

    >>> study = search("mixup,maxup(m=4)+gaussian", model_fn=lambda: maxup.models.SmallCNN(1, 10), # doctest: +SKIP
    ...                train=(x, y), val=(x_val, y_val), epochs=20, n_trials=20)
    >>> best_spec(study)                                                                       # doctest: +SKIP
    'maxup(m=4, temperature=0.1)+gaussian(sigma=0.31)'
    """
    from .train import as_data, fit

    if "test" in fit_options:
        raise ValueError("search never reads a test set: measure the best spec on it once, afterwards")
    train_d, val_d = as_data(train, "train"), as_data(val, "val")
    if val_d is None or len(val_d) == 0:
        raise ValueError("search needs a validation split (val=(x, y)), carved from the training data")
    num_classes = fit_options.pop("num_classes", None) or int(max(train_d.y.max(), val_d.y.max())) + 1
    cands = candidates(methods, space)
    check_values(cands, step_probe(model_fn, train_d, num_classes))
    min_epochs = check_min_epochs(epochs, min_epochs)
    settings = {**(settings or {}), "epochs": epochs, "seed": seed, "pruner": pruner, "min_epochs": min_epochs,
                "data": data_fingerprint(train_d, val_d), "candidates": [str(c) for c in cands],
                "space": {p.name: str(p.range) for c in cands for p in c.params},
                "fit": _plain({k: v for k, v in fit_options.items() if k not in ("device", "progress")})}
    study = open_study(storage, study_name, settings=settings, resume=resume, sampler=sampler, pruner=pruner,
                       epochs=epochs, min_epochs=min_epochs, seed=seed)

    def train_fn(spec, on_epoch):
        torch.manual_seed(seed)
        return fit(model_fn(), spec, train=train_d, val=val_d, epochs=epochs, seed=seed, num_classes=num_classes,
                   on_epoch=on_epoch, **{"progress": False, **fit_options})

    return run_search(cands, train_fn, study=study, epochs=epochs, n_trials=n_trials, timeout=timeout,
                      defaults_first=defaults_first)


def check_min_epochs(epochs: int, min_epochs: int | None) -> int:
    """The epochs a trial trains before the pruner may stop it: ``min_epochs``, or a fifth of ``epochs``."""
    if min_epochs is None:
        return max(1, epochs // 5)
    if isinstance(min_epochs, bool) or not isinstance(min_epochs, int) or not 1 <= min_epochs <= epochs:
        raise ValueError(f"min_epochs must be an integer in 1..epochs ({epochs}), got {min_epochs!r}")
    return min_epochs


# ------------------------------------------------------------------------------------------ the report


def _finished(study):
    state = require_optuna().trial.TrialState
    return [t for t in study.get_trials(deepcopy=False) if t.state == state.COMPLETE and t.value is not None
            and math.isfinite(t.value)]


def best_trial(study):
    """The completed trial of the highest value (the earliest among equals), or None."""
    done = _finished(study)
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def best_spec(study) -> str | None:
    """The canonical spec of the best completed trial."""
    best = best_trial(study)
    return None if best is None else best.user_attrs.get("spec")


def trials_table(study, top: int = 10, metric: str = "val_accuracy") -> str:
    """Markdown: the ``top`` completed specs by value (a spec that several trials drew: its first trial), then the
    best of each candidate (and its value as written, where that trial completed)."""
    done = sorted(_finished(study), key=lambda t: (-t.value, t.number))
    unique = [t for t in done if "same_as" not in t.user_attrs]  # a spec trained again is one row
    scale, unit = (100.0, " (%)") if metric.endswith("accuracy") else (1.0, "")
    name = metric.replace("_", " ").replace("val ", "valid ")
    lines = [f"| rank | trial | method spec | {name}{unit} | epochs | train time (s) |", "|---|---|---|---|---|---|"]
    for rank, t in enumerate(unique[:top], 1):
        lines.append(f"| {rank} | {t.number} | `{t.user_attrs.get('spec')}` | {scale * t.value:.2f} | "
                     f"{t.user_attrs.get('epochs', '-')} | {t.user_attrs.get('train_time', float('nan')):.0f} |")
    lines += ["", f"| candidate | trials | best {name}{unit} | as written{unit} | best spec |", "|---|---|---|---|---|"]
    for label in study.user_attrs.get("settings", {}).get("candidates", []):
        mine = [t for t in study.get_trials(deepcopy=False) if t.params.get(METHOD) == label]
        good = [t for t in done if t.params.get(METHOD) == label]
        written = [t for t in good if t.user_attrs.get("defaults")]
        best = f"{scale * good[0].value:.2f}" if good else "-"
        as_written = f"{scale * written[0].value:.2f}" if written else "-"
        spec = f"`{good[0].user_attrs.get('spec')}`" if good else "-"
        lines.append(f"| `{label}` | {len(mine)} | {best} | {as_written} | {spec} |")
    return "\n".join(lines)


def _counts(study) -> dict:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out


def write_report(study, out, *, top: int = 10, title: str = "maxup tune", storage: str | None = None,
                 metric: str = "val_accuracy") -> dict:
    """Write ``best.json`` (the best spec, its value, the trials, the settings), ``trials.md`` (the top trials
    and the best of each candidate), ``history.png`` (the optimization history) and ``importance.png`` (the
    parameters' importances; skipped with a note when Optuna cannot compute them, e.g. with fewer than two
    completed trials) into ``out``; returns best.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = best_trial(study)
    settings = study.user_attrs.get("settings", {})
    summary = {"spec": None if best is None else best.user_attrs.get("spec"),
               "value": None if best is None else best.value, "metric": metric,
               "trial": None if best is None else best.number, "params": None if best is None else best.params,
               "trials": _counts(study), "study_name": study.study_name, "storage": storage, "settings": settings}
    (out / "best.json").write_text(json.dumps(_plain(summary), indent=1) + "\n")
    label = metric.replace("_", " ").replace("val ", "valid ")
    notes = _plots(study, out, label)
    counts = ", ".join(f"{n} {k}" for k, n in summary["trials"].items())
    value = (f"{100 * best.value:.2f}%" if metric.endswith("accuracy") else f"{best.value:.4f}") if best else ""
    head = (f"best: `{summary['spec']}`, {label} {value} (trial {best.number})" if best is not None
            else "no trial completed yet")
    text = (f"# {title}\n\n{head}\n\ntrials: {counts}; {settings.get('epochs', '?')} epochs each, pruner "
            f"{settings.get('pruner', '?')} (from epoch {settings.get('min_epochs', '?')})\n\n"
            f"{trials_table(study, top, metric)}\n" + "".join(f"\nNote: {n}\n" for n in notes))
    (out / "trials.md").write_text(text)
    return summary


def _plots(study, out: Path, label: str) -> list[str]:
    """history.png and importance.png; returns notes on what could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = require_optuna()
    from optuna.visualization import matplotlib as vm

    notes = []
    for name, draw in (("history.png", vm.plot_optimization_history), ("importance.png", vm.plot_param_importances)):
        path = out / name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw(study, target_name=label)
                fig = ax.figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(path, dpi=110)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError, optuna.exceptions.OptunaError) as err:
            path.unlink(missing_ok=True)
            notes.append(f"{name} not drawn: {' '.join(str(err).split()) or type(err).__name__}")
        finally:
            plt.close("all")
    return notes


@contextlib.contextmanager
def quiet():
    """Optuna's per-trial log lines silenced (the CLI prints its own)."""
    optuna = require_optuna()
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
