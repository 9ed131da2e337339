"""``maxup tune``: search method specs and their hyper-parameters on a validation split, with Optuna.

    maxup tune --dataset digits --train-size 600 --val-size 500 --epochs 60 --batch-size 32 --trials 20
    maxup tune --methods "mixup,cutmix,maxup(m=4)+cutout,sam" --space "cutout.size=1..4" --timeout 600
    maxup tune --out runs/tune --resume             # continue an interrupted search (same settings)

Each candidate of ``--methods`` keeps the arguments it writes; its other declared options are searched
over the ranges its class declares (:attr:`maxup.registry.Traits.search_space`; ``maxup methods``
lists them), or over ``--space``. The library part is :mod:`maxup.tune`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from pathlib import Path

from .. import tune as T
from ..train.distributed import resolve_device
from .files import check_out
from .options import COUNT, add_force_option, add_image_options, methods_arg
from .run import run
from .tasks import IMAGE

#: the budget when neither --trials nor --timeout is given
DEFAULT_TRIALS = 20
#: the options of a run's config that do not change what a trial measures (on the CPU): a resume may change them;
#: a resume with any other option changed is refused (and with other data: the settings hold the data's hash)
FREE_KEYS = ("data_dir", "device", "compile", "channels_last", "tf32", "test_size", "method")


def budget_option(kind):
    """An argparse type for --trials (``int``) and --timeout (``float``): a budget > 0."""
    def parse(text):
        try:
            value = kind(str(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if kind is int else ''}number, got {text!r}") \
                from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"a budget of {text} searches nothing: give a budget > 0")
        return value
    return parse


def holds_search(out: Path) -> bool:
    return (out / "study.db").is_file() or (out / "best.json").is_file()


def _prefixed(option: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise ValueError(f"{option}: {err}") from None


def tune(args) -> dict:
    """``maxup tune``: the search, then best.json, trials.md, history.png and importance.png in ``--out``."""
    optuna = T.require_optuna()  # a missing Optuna fails first
    task = IMAGE
    if args.trials is None and args.timeout is None:
        args.trials = DEFAULT_TRIALS
    if not args.val_size:
        raise ValueError("--val-size 0: maxup tune judges each trial on a validation split carved from the training "
                         "data (never the test set); give --val-size 0.2 (a fraction) or 500 (a count)")
    if args.min_epochs is not None and args.min_epochs > args.epochs:
        raise ValueError(f"--min-epochs {args.min_epochs} is more than --epochs {args.epochs}: the pruner would never "
                         "judge a trial; give --min-epochs <= --epochs")
    methods = list(args.methods or task.default_methods)
    _prefixed("--methods", T.candidates, methods, domain=task.domain)
    cands = _prefixed("--space", T.candidates, methods, args.space, domain=task.domain)
    check_out(args.out, resume=args.resume, force=args.force, what="a search", holds=holds_search)
    out = Path(args.out)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    config = task.config(args, "erm", args.seed)
    resolve_device(config["device"], name="--device")
    splits = task.load(config)
    if splits.val is None or len(splits.val) == 0:
        raise ValueError(f"--val-size {args.val_size} leaves no validation sample: give a larger --val-size")
    splits = dataclasses.replace(splits, test=None)  # the objective never reads the test set
    T.check_values(cands, T.step_probe(lambda: task.model(config, splits), splits.train, splits.num_classes))
    min_epochs = T.check_min_epochs(args.epochs, args.min_epochs)
    settings = {**{k: v for k, v in config.items() if k not in FREE_KEYS}, "pruner": args.pruner,
                "min_epochs": min_epochs,
                "data": {"train": len(splits.train), "val": len(splits.val), "num_classes": splits.num_classes,
                         "input_shape": list(splits.input_shape), "hash": T.data_fingerprint(splits.train, splits.val)},
                "candidates": [str(c) for c in cands], "space": {p.name: str(p.range) for c in cands for p in c.params}}
    out.mkdir(parents=True, exist_ok=True)
    with T.quiet():
        if args.force and args.study_name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=args.study_name, storage=storage)
        study = T.open_study(storage, args.study_name, settings=settings, resume=args.resume, sampler=args.sampler,
                             pruner=args.pruner, epochs=args.epochs, min_epochs=min_epochs, seed=args.seed)
        before = T.spent(study)
        if args.trials is not None and before >= args.trials:
            print(f"the study already holds {before} trials (--trials {args.trials}): nothing to run; give a larger "
                  "--trials to search more", file=sys.stderr)

        def train_fn(spec, on_epoch):
            return run(task, {**config, "method": str(spec)}, splits=splits, spec=spec, progress=False,
                       on_epoch=on_epoch)

        def on_trial(study, trial):
            print(describe(study, trial, args.trials), file=sys.stderr, flush=True)

        try:
            T.run_search(cands, train_fn, study=study, epochs=args.epochs, n_trials=args.trials, timeout=args.timeout,
                         defaults_first=args.defaults_first, on_trial=on_trial)
        finally:
            summary = T.write_report(study, out, top=args.top, storage=storage,
                                     title=f"maxup tune: {args.dataset}, {len(splits.train)} training and "
                                           f"{len(splits.val)} validation samples")
    if summary["spec"] is None:
        raise ValueError(f"no trial completed (trials: {summary['trials']}); see {out / 'trials.md'}")
    print(f"best: {summary['spec']}  (valid accuracy {100 * summary['value']:.2f}%, trial {summary['trial']}; "
          f"{sum(summary['trials'].values())} trials)")
    print(f"wrote {out / 'best.json'}, {out / 'trials.md'} and the plots; the study: {storage}")
    return summary


def describe(study, trial, trials: int | None) -> str:
    """The line printed after each trial."""
    state = trial.state.name.lower()
    spec = trial.user_attrs.get("spec", trial.params.get(T.METHOD))
    head = f"trial {trial.number}" + (f" ({T.spent(study)}/{trials})" if trials else "") + f" {spec}: "
    if "same_as" in trial.user_attrs:
        head += f"as trial {trial.user_attrs['same_as']}, "
    if state == "complete":
        best = T.best_trial(study)
        return head + f"valid accuracy {100 * trial.value:.2f}%" + (
            f" (best {100 * best.value:.2f}%, trial {best.number})" if best is not None else "")
    if state == "pruned":
        epochs = max(trial.intermediate_values, default=0)
        value = trial.intermediate_values.get(epochs)
        shown = f" (valid accuracy {100 * value:.2f}%)" if value is not None else ""
        return head + f"pruned after epoch {epochs}{shown}"
    return head + f"{state}: {trial.user_attrs.get('error', '')}".rstrip(": ")


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``tune`` command."""
    defaults = IMAGE.default_methods
    about = ("Search method specs and their hyper-parameters with Optuna (TPE; Hyperband stops weak trials after a "
             "few epochs), judged on a validation split carved from the training data (--val-size; the test set is "
             "never read). Each candidate of --methods keeps the arguments it writes; its other declared options are "
             "searched (`maxup methods` lists the ranges). Writes best.json, trials.md, history.png, importance.png "
             "and the study (study.db, SQLite) into --out; --resume continues.")
    p = sub.add_parser("tune", help="search method specs and their hyper-parameters on a validation split (Optuna)",
                       description=textwrap.fill(about, 100), epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_options(p, IMAGE.defaults)
    p.set_defaults(val_size=0.2)
    g = p.add_argument_group("search")
    g.add_argument("--methods", type=methods_arg, default=None,
                   help="candidate method specs, comma-separated: the arguments a spec writes stay fixed, its other "
                        "declared options are searched (default: the main job's " + ",".join(defaults) + ")")
    g.add_argument("--space", action="append", default=None, metavar="TERM.OPTION=RANGE",
                   help="search an option over a range of your own, repeatable or comma-separated: "
                        "mixup.alpha=0.1..2(log), cutout.size=1..4, maxup.m=2|4|8 (values to try), sam.rho=0.05 "
                        "(fixed); scales (log), (int), (linear); must lie within the method's valid values")
    g.add_argument("--trials", type=budget_option(int), default=None,
                   help=f"trials in the study, counting those of earlier sessions (default: {DEFAULT_TRIALS} when no "
                        "--timeout)")
    g.add_argument("--timeout", type=budget_option(float), default=None, metavar="SECONDS",
                   help="start no trial after SECONDS (the one running finishes)")
    g.add_argument("--sampler", choices=T.SAMPLERS, default="tpe", help="TPE (default) or random search")
    g.add_argument("--pruner", choices=T.PRUNERS, default="hyperband",
                   help="stop weak trials early on their validation accuracy per epoch: hyperband (default), halving "
                        "(successive halving), median, none")
    g.add_argument("--min-epochs", type=budget_option(int), default=None,
                   help="epochs a trial trains before the pruner may stop it (default: epochs / 5)")
    g.add_argument("--defaults-first", action=argparse.BooleanOptionalAction, default=True,
                   help="a new study first trains each candidate as written, its searched options at their defaults, "
                        "to the end (never pruned: the reference for the others; default: yes)")
    g.add_argument("--top", type=budget_option(int), default=10, help="trials listed in trials.md (default: 10)")
    p.add_argument("--seed", type=COUNT, default=0,
                   help="seed of the validation split, of every trial's training and of the sampler (default: 0)")
    p.add_argument("--out", default="runs/tune", help="output folder (default: runs/tune)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL (default: sqlite:///OUT/study.db, a file in --out, nothing to start)")
    p.add_argument("--study-name", default="maxup-tune", help="the study's name in the storage (default: maxup-tune)")
    p.add_argument("--resume", action="store_true",
                   help="continue the study in --out (same data and settings; a larger --trials searches more)")
    add_force_option(p)
    p.set_defaults(func=tune)
    return p
