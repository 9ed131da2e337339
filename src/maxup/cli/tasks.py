"""The tasks of the command line: what differs between image classification and language modelling.

A :class:`Task` supplies its option defaults, the options a run records (its config keys), its data,
its model, the check of a method spec (through the method layer: :meth:`maxup.methods.Spec.check_domain`),
the metrics a comparison summarises and the columns of its table, the budget line of a comparison and the
lines printed for one run. Everything else -- the run (:func:`maxup.cli.run.run`), the comparison loop
(:func:`maxup.cli.comparison.run_comparison`) and the report (:func:`maxup.cli.report.report`) -- is
shared: ``train`` and ``lm`` are one command on two tasks, and so are ``compare`` and ``compare --task lm``.

Nothing here imports another module of :mod:`maxup.cli`.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import methods as M
from ..data import load_dataset
from ..data.text import kjv_corpus, load_corpus
from ..models import LSTMLanguageModel, create_model


class Task:
    """One kind of training the command line runs. Subclasses set the class attributes and the methods
    :meth:`load`, :meth:`model`, :meth:`budget`, :meth:`describe` and :meth:`print_run`."""

    #: the value of ``--task``
    name: str = ""
    #: the kind of input the method terms must work on (:meth:`maxup.methods.Spec.check_domain`)
    domain: str = ""
    #: the optimisation defaults of the task's options
    defaults: dict = {}
    #: the options a run records in its config (besides ``method`` and ``seed``)
    keys: tuple[str, ...] = ()
    #: options recorded only when they differ from their default here, so that the config of a run without
    #: them (and the resume check of runs written before they existed) stays as it was
    optional: dict = {"eval_every": 1}
    #: the methods of ``maxup compare`` without ``--methods``
    default_methods: tuple[str, ...] = ()
    #: the final metrics a comparison summarises (mean and sd over seeds)
    summary_keys: tuple[str, ...] = ()
    #: the columns of the comparison table: (header, metric key, scale, decimals)
    columns: tuple[tuple[str, str, float, int], ...] = ()
    #: the heading of results.md
    title: str = "maxup compare"
    #: how results.png shows the comparison (see :func:`maxup.cli.report.plot`)
    plot: dict = {}
    #: whether each seed has data of its own (a subset, a validation split drawn with the seed); else one load
    #: serves every run of a comparison
    data_per_seed: bool = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __reduce__(self):  # worker processes get the task by name
        return get_task, (self.name,)

    def spec(self, text: str) -> M.Spec:
        """The method spec ``text`` parsed and checked to work on the task's inputs (a ValueError naming the term
        that does not)."""
        return M.parse(text).check_domain(self.domain)

    def method(self, text: str) -> str:
        """``text`` in canonical form, checked as by :meth:`spec`."""
        return str(self.spec(text))

    def compare_defaults(self, args) -> dict:
        """The values of the options ``maxup compare`` leaves to the task."""
        return {**self.defaults, "train_size": None}

    def config(self, args, method: str, seed: int) -> dict:
        """What one run records and trains with: the options of :attr:`keys`, the ``method`` (already checked by
        :meth:`method`) and the ``seed``."""
        config = {k: getattr(args, k) for k in self.keys}
        config["model_opt"] = dict(config["model_opt"] or {})
        config.update({k: getattr(args, k) for k, default in self.optional.items()
                       if getattr(args, k, default) != default})
        config["method"] = method
        config["seed"] = seed
        return config

    def refuse(self, args, options: Mapping, owner: str, task: str) -> None:
        """A ValueError naming the first of ``options`` (name -> default) that ``args`` sets, when it belongs to the
        task ``owner`` / ``--task task`` and not to this one (the options every task has are skipped)."""
        given = [k for k, default in options.items()
                 if k not in Task.optional and getattr(args, k, default) != default]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an option of {owner}, not of --task {self.name}: "
                             f"give --task {task}, or leave it out")

    def load(self, config: Mapping):
        """The data splits of a run (``train``, ``val``, ``test``, ``num_classes``, ...)."""
        raise NotImplementedError

    def shared_data(self, args):
        """The data every run of a comparison trains on, when it does not depend on the seed; else None."""
        return None if self.data_per_seed else self.load(vars(args))

    def model(self, config: Mapping, splits) -> torch.nn.Module:
        raise NotImplementedError

    def budget(self, args, data) -> str:
        """The line that describes a comparison's shared settings (results.json compares it on ``--resume``);
        ``data`` is :meth:`shared_data`."""
        raise NotImplementedError

    def describe(self, label: str, seed: int, last: dict) -> str:
        """The line printed when a run of a comparison finishes (``last``: its final metrics)."""
        raise NotImplementedError

    def print_run(self, config: dict, history: list[dict]) -> None:
        """What ``maxup train`` / ``maxup lm`` prints after a run."""
        raise NotImplementedError


def _took(last: dict) -> str:
    """`` (last epoch 3 s)``: how long a finished run's last epoch took (with its evaluation), to plan a grid."""
    return f" (last epoch {last['time']:.0f} s)" if "time" in last else ""


def _fmt(row: dict, prefix: str) -> str:
    keys = [k for k in ("accuracy", "loss", "ece") if f"{prefix}_{k}" in row]
    return "  ".join(f"{prefix} {k} {row[f'{prefix}_{k}']:.4f}" for k in keys)


class ImageTask(Task):
    """Image classification (also feature vectors): ``--dataset`` and ``--model``, accuracy as the metric."""

    name = "image"
    domain = "image"
    defaults = {"epochs": 15, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
                "max_grad_norm": None}
    #: ``maxup compare`` on the bundled digits (the main job): 10 images per class and a schedule long enough
    #: that plain training fits them (100% clean training accuracy) while the test accuracy leaves room
    digits_compare_defaults = {"train_size": 100, "epochs": 60, "batch_size": 32}
    keys = ("dataset", "data_dir", "model", "model_opt", "epochs", "batch_size", "optimizer", "lr", "momentum",
            "weight_decay", "warmup_epochs", "train_size", "val_size", "test_size", "normalize", "amp",
            "max_grad_norm", "device", "compile", "channels_last", "tf32")
    #: noisy labels, long tails and the sampler (:func:`maxup.cli.options.add_noise_options`)
    optional = {**Task.optional, "label_noise": 0.0, "noise_type": None, "noise_map": None, "noisy_labels": None,
                "imbalance": None, "class_sampler": "instance", "robust_eps": None, "robust_steps": 10,
                "robust_limit": 1000}
    #: the main job's methods: two augmentations that suit 8x8 digits (a one-pixel shift, pixel noise), MaxUp
    #: over each, and Mixup
    default_methods = ("erm", "cropflip(padding=1, flip=0)", "maxup(m=4)+cropflip(padding=1, flip=0)",
                       "gaussian(sigma=0.5)", "maxup(m=4)+gaussian(sigma=0.5)", "mixup")
    #: test, and the clean training set (convergence)
    summary_keys = ("test_accuracy", "test_loss", "test_ece", "clean_train_accuracy", "clean_train_loss",
                    "val_accuracy", "ema_test_accuracy", "ema_val_accuracy", "swa_test_accuracy", "swa_val_accuracy",
                    "noisy_memorised", "noisy_true_accuracy", "test_many_accuracy", "test_medium_accuracy",
                    "test_few_accuracy", "test_robust_accuracy", "ema_test_robust_accuracy",
                    "swa_test_robust_accuracy")
    columns = (("test accuracy (%)", "test_accuracy", 100.0, 2), ("valid accuracy (%)", "val_accuracy", 100.0, 2),
               ("EMA test accuracy (%)", "ema_test_accuracy", 100.0, 2),
               ("SWA test accuracy (%)", "swa_test_accuracy", 100.0, 2),
               ("clean train accuracy (%)", "clean_train_accuracy", 100.0, 2),
               ("train-test gap (points)", "gap", 100.0, 2), ("test loss", "test_loss", 1.0, 4),
               ("ECE (%)", "test_ece", 100.0, 2),
               ("noisy labels memorised (%)", "noisy_memorised", 100.0, 2),
               ("noisy samples, true label (%)", "noisy_true_accuracy", 100.0, 2),
               ("many-shot test (%)", "test_many_accuracy", 100.0, 2),
               ("medium-shot test (%)", "test_medium_accuracy", 100.0, 2),
               ("few-shot test (%)", "test_few_accuracy", 100.0, 2),
               ("robust test (%)", "test_robust_accuracy", 100.0, 2),
               ("best robust test (%)", "best_test_robust_accuracy", 100.0, 2),
               ("best robust epoch", "best_robust_epoch", 1.0, 1),
               ("EMA robust test (%)", "ema_test_robust_accuracy", 100.0, 2))
    title = "maxup compare"
    plot = {}  # the defaults: test accuracy

    def config(self, args, method: str, seed: int) -> dict:
        if getattr(args, "robust_eps", None) is None:
            unused = [f"--robust-{k}" for k in ("steps", "limit")
                      if getattr(args, f"robust_{k}", self.optional[f"robust_{k}"]) != self.optional[f"robust_{k}"]]
            if unused:
                raise ValueError(f"{unused[0]} sets the attack of --robust-eps: give --robust-eps EPS too")
        self.refuse(args, {"train_tokens": None, **LMTask.optional}, "language modelling", "lm")
        return super().config(args, method, seed)

    def compare_defaults(self, args) -> dict:
        digits = str(args.dataset).lower() == "digits"
        return {**super().compare_defaults(args), **(self.digits_compare_defaults if digits else {})}

    def load(self, config: Mapping):
        return load_dataset(config["dataset"], data_dir=config["data_dir"], val_size=config["val_size"],
                            train_size=config["train_size"], test_size=config["test_size"],
                            normalize=config["normalize"], seed=config["seed"],
                            label_noise=config.get("label_noise", 0.0), noise_type=config.get("noise_type"),
                            noise_map=config.get("noise_map"), imbalance=config.get("imbalance"),
                            noisy_labels=label_file(config.get("noisy_labels"), config["data_dir"]))

    def model(self, config: Mapping, splits) -> torch.nn.Module:
        return create_model(config["model"], input_shape=splits.input_shape, num_classes=splits.num_classes,
                            **config["model_opt"])

    def budget(self, args, data) -> str:
        return (f"{args.dataset}" + (f" (train subset {args.train_size})" if args.train_size else "")
                + f", model {args.model}" + (f" {dict(args.model_opt)}" if args.model_opt else "")
                + f", {args.epochs} epochs (unless METHOD@epochs=N), batch {args.batch_size}, {args.optimizer} "
                f"lr {args.lr} weight decay {args.weight_decay}, "
                f"seeds 0..{args.seeds - 1}" + (f", validation split {args.val_size}" if args.val_size else "")
                + noise_budget(args))

    def describe(self, label: str, seed: int, last: dict) -> str:
        return (f"{label} seed {seed}: test acc {100 * last['test_accuracy']:.2f}%, clean train acc "
                f"{100 * last.get('clean_train_accuracy', float('nan')):.2f}%{_took(last)}")

    def print_run(self, config: dict, history: list[dict]) -> None:
        last = history[-1]
        print(f"{config['method']} on {config['dataset']}, epoch {last['epoch']}: {_fmt(last, 'test')}"
              + (f"  (clean train accuracy {last['clean_train_accuracy']:.4f})" if "clean_train_accuracy" in last
                 else ""))


def label_file(path, data_dir) -> str | None:
    """``--noisy-labels``: the path as given, or beside the data (in ``--data-dir``) when a relative path is not
    found from the working directory."""
    if path is None or Path(path).is_absolute() or Path(path).exists() or data_dir is None:
        return path
    beside = Path(data_dir) / path
    return str(beside) if beside.exists() else path


def noise_budget(args) -> str:
    """The noisy-label and long-tail settings in a comparison's budget line ("" when none is set, so that the
    budget of a comparison without them is the one it always was)."""
    parts = []
    rate = getattr(args, "label_noise", 0.0)
    if rate:
        kind = args.noise_type or ("asymmetric" if args.noise_map else "symmetric")
        parts.append(f"label noise {rate:g} {kind}" + (f" map {args.noise_map}" if args.noise_map else ""))
    if getattr(args, "noisy_labels", None):
        parts.append(f"noisy labels from {args.noisy_labels}")
    if getattr(args, "imbalance", None) is not None:
        parts.append(f"long tail ratio {args.imbalance:g}")
    if getattr(args, "class_sampler", "instance") != "instance":
        parts.append(f"{args.class_sampler} sampler")
    return "".join(f", {p}" for p in parts)


def corpus_folder(corpus: str) -> Path:
    """The folder of ``--corpus``: a path, or ``kjv`` (built on first use) when no such folder exists."""
    path = Path(corpus)
    if str(corpus) == "kjv" and not path.is_dir():
        return kjv_corpus()
    return path


def lm_model(vocab_size: int, options: dict) -> torch.nn.Module:
    """The LSTM language model with ``--model-opt`` options, checked by name."""
    valid = [k for k in inspect.signature(LSTMLanguageModel).parameters if k != "vocab_size"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(map(repr, unknown))} for the LSTM language model; "
                         f"valid options: {', '.join(valid)}")
    return LSTMLanguageModel(vocab_size, **options)


class LMTask(Task):
    """Word-level language modelling: ``--corpus`` and the LSTM, perplexity as the metric."""

    name = "lm"
    domain = "sequence"
    defaults = {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 5e-3, "weight_decay": 0.01,
                "max_grad_norm": 0.5}
    keys = ("corpus", "bptt", "train_tokens", "model_opt", "epochs", "batch_size", "optimizer", "lr",
            "momentum", "weight_decay", "warmup_epochs", "amp", "max_grad_norm", "device")
    optional = {**Task.optional, "eval_tokens": None}
    default_methods = ("erm", "embed_noise(sigma=0.1)", "maxup(m=4)+embed_noise(sigma=0.1)", "word_dropout(p=0.1)",
                       "maxup(m=4)+word_dropout(p=0.1)")
    summary_keys = ("test_perplexity", "val_perplexity", "test_loss", "test_accuracy", "clean_train_perplexity")
    columns = (("test perplexity", "test_perplexity", 1.0, 2), ("valid perplexity", "val_perplexity", 1.0, 2),
               ("best valid epoch", "best_val_epoch", 1.0, 1),
               ("test perplexity at best valid", "test_perplexity_at_best_val", 1.0, 2),
               ("clean train perplexity", "clean_train_perplexity", 1.0, 2),
               ("test accuracy (%)", "test_accuracy", 100.0, 2))
    title = "maxup compare --task lm"
    plot = {"key": "test_perplexity", "curve_key": "val_perplexity", "scale": 1.0, "label": "test perplexity",
            "curve_label": "valid perplexity"}
    data_per_seed = False

    def config(self, args, method: str, seed: int) -> dict:
        self.refuse(args, ImageTask.optional, "image classification", "image")
        return {"task": self.name, **super().config(args, method, seed)}

    def load(self, config: Mapping):
        return load_corpus(corpus_folder(config["corpus"]), bptt=config["bptt"], train_tokens=config["train_tokens"],
                           eval_tokens=config.get("eval_tokens"))

    def model(self, config: Mapping, splits) -> torch.nn.Module:
        return lm_model(splits.num_classes, config["model_opt"])

    def budget(self, args, data) -> str:
        evaluated = f", valid and test cut to {args.eval_tokens} tokens" if args.eval_tokens else ""
        return (f"{data.name} (vocabulary {data.num_classes}, {len(data.train)} training segments of {args.bptt} "
                f"tokens{evaluated}), LSTM {dict(args.model_opt) or 'defaults'}, {args.epochs} epochs, "
                f"batch {args.batch_size}, {args.optimizer} lr {args.lr}, seeds 0..{args.seeds - 1}")

    def describe(self, label: str, seed: int, last: dict) -> str:
        return f"{label} seed {seed}: test perplexity {last['test_perplexity']:.2f}{_took(last)}"

    def print_run(self, config: dict, history: list[dict]) -> None:
        for r in history:  # an epoch without evaluation (--eval-every) shows its training loss only
            shown = "".join(f"  {name} perplexity {r[key]:.2f}" for name, key in
                            (("valid", "val_perplexity"), ("test", "test_perplexity")) if key in r)
            print(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}{shown}  ({r['train_time']:.0f} s)")
        last = history[-1]
        print(f"{config['method']} on {config['corpus']}, epoch {last['epoch']}: valid perplexity "
              f"{last['val_perplexity']:.2f}, test perplexity {last['test_perplexity']:.2f}")


IMAGE, LM = ImageTask(), LMTask()
#: the tasks by ``--task`` name
TASKS: dict[str, Task] = {t.name: t for t in (IMAGE, LM)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


def task_option_keys() -> tuple[str, ...]:
    """Every option some task records, in task order (the keys a suite may set beside ``methods`` and ``seeds``)."""
    return tuple(dict.fromkeys(k for t in TASKS.values() for k in (*t.keys, *t.optional)))
