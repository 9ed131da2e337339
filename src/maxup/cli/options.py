"""The options of the ``maxup`` commands: argparse types, the option groups the commands share, and the
folder-name slug. Text is split outside parentheses by :func:`maxup.methods.split_outside`, the one
splitter of the code base.

Nothing here imports another module of :mod:`maxup.cli`.
"""
from __future__ import annotations

import argparse
import ast
import math

from ..data import NOISE_PRESETS, NOISE_TYPES, SAMPLERS, list_datasets
from ..methods import split_outside
from ..models import list_models


def slug(text: str, keep: str = "=.-@") -> str:
    """A folder or file name for ``text`` (a method spec, a run path): characters other than letters, digits and
    ``keep`` become ``_``, runs of ``_`` one; ``"maxup(m=4)+cutout"`` -> ``"maxup_m=4_cutout"``."""
    kept = "".join(c if c.isalnum() or c in keep else "_" for c in text)
    return "_".join(filter(None, kept.split("_"))) or "run"


# ------------------------------------------------------------------------------------------ argparse types


def int_option(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse names the option in its error)."""
    def parse(text) -> int:
        try:
            value = int(str(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value
    return parse


def float_option(low: float = 0.0, *, strict: bool = False):
    """An argparse type: a finite number >= ``low`` (> ``low`` when ``strict``)."""
    def parse(text) -> float:
        try:
            value = float(str(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>' if strict else '>='} {low:g}, got {text}")
        return value
    return parse


POSITIVE_INT, COUNT = int_option(1), int_option(0)
POSITIVE, NON_NEGATIVE = float_option(strict=True), float_option()
#: ``--imbalance``: a ratio >= 1
IMBALANCE = float_option(1.0)


def noise_rate(text) -> float:
    """``--label-noise``: a fraction of flipped labels in [0, 1)."""
    value = NON_NEGATIVE(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be a noise rate in [0, 1) (the fraction of training labels flipped), "
                                         f"got {text}")
    return value
#: the integer types: a suite entry of one of them must be a YAML integer (``seeds: 2``, not ``seeds: "2"``)
INTEGER_TYPES = (POSITIVE_INT, COUNT)


def methods_arg(text: str) -> list[str]:
    """``--methods``: ``a,b(x=1, y=2),c`` split on the commas outside parentheses."""
    out = [s.strip() for s in split_outside(text, ",")]
    out = [s for s in out if s]
    if not out:
        raise argparse.ArgumentTypeError("expected comma-separated method specs such as 'erm,mixup', got none")
    return out


_CONSTANTS = {"inf": math.inf, "true": True, "false": False, "none": None, "True": True, "False": False, "None": None}


def key_value(text: str) -> tuple[str, object]:
    """``--model-opt KEY=VALUE``: the value read as in a method spec (numbers, true/false, inf, quoted strings,
    tuples)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = value.strip()
    if value in _CONSTANTS:
        return key, _CONSTANTS[value]
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise argparse.ArgumentTypeError(f"cannot read the value {value!r} in {text!r}: use numbers, true/false, "
                                         "inf, quoted strings or tuples") from None


class KeyValues(argparse.Action):
    """A repeatable ``KEY=VALUE`` option collected into a dict; a key given twice is an error naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        key, value = values
        items = dict(getattr(namespace, self.dest, None) or {})
        if key in items:
            raise argparse.ArgumentError(self, f"the key {key!r} is given twice ({key}={items[key]!r}, "
                                               f"{key}={value!r}): give each key once")
        items[key] = value
        setattr(namespace, self.dest, items)


def fraction_or_count(text: str) -> float | int:
    """``--val-size``: ``0.1`` (a fraction of the training data) or ``300`` (a count)."""
    try:
        value = int(text)
    except ValueError:
        value = NON_NEGATIVE(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a count such as 300, got {text!r}")
    return value


class _TaskDefault:
    def __repr__(self) -> str:
        return "by task"


TASK_DEFAULT = _TaskDefault()  # an option left to the task's default (``maxup compare --task``)


def fill_task_defaults(args, defaults: dict) -> None:
    """Set the options ``compare`` left to the task (:data:`TASK_DEFAULT`) to ``defaults``."""
    for key, value in defaults.items():
        if getattr(args, key, TASK_DEFAULT) is TASK_DEFAULT:
            setattr(args, key, value)


# ------------------------------------------------------------------------------------------ option groups


def add_model_opt(g, help: str) -> None:
    g.add_argument("--model-opt", type=key_value, action=KeyValues, default={}, metavar="KEY=VALUE", help=help)


def add_image_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The options of image classification (``maxup train``, ``maxup compare``): data, model, optimisation
    (with ``defaults``), speed."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   help=f"one of {', '.join(list_datasets())} (default: digits, bundled)")
    g.add_argument("--data-dir", default=None, help="where the dataset files are (default: $MAXUP_DATA or the "
                                                     "standard location, e.g. /usr/share/datasets/fashion-mnist)")
    g.add_argument("--train-size", type=POSITIVE_INT, default=None,
                   help="stratified subset of N training images (low-data regime)")
    g.add_argument("--val-size", type=fraction_or_count, default=0,
                   help="validation split from the training data: a fraction or a count")
    g.add_argument("--test-size", type=POSITIVE_INT, default=None, help="use only the first N test images (quick runs)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not standardise the inputs")
    add_noise_options(p)
    g = p.add_argument_group("robust accuracy during training (PGD at every evaluation: robust overfitting)")
    g.add_argument("--robust-eps", type=POSITIVE, default=None, metavar="EPS",
                   help="also record val/test robust accuracy under PGD at this radius, in [0, 1] pixel units "
                        "(attacked through the normalisation), at every evaluation (default: none)")
    g.add_argument("--robust-steps", type=POSITIVE_INT, default=10, metavar="N",
                   help="PGD steps of --robust-eps (default: 10)")
    g.add_argument("--robust-limit", type=POSITIVE_INT, default=1000, metavar="N",
                   help="attack the first N examples of each split (default: 1000)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="cnn", help=f"one of {', '.join(list_models())} (default: cnn)")
    add_model_opt(g, "model option, repeatable, e.g. --model-opt depth=20 --model-opt width=16")
    add_optim_options(p, defaults)
    g = p.add_argument_group("speed (GPU)")
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor; e.g. --compile aot_eager to debug)")
    g.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on CUDA, keep fp32 matrix multiplies and convolutions in full IEEE precision (default: TF32)")


def add_noise_options(p: argparse.ArgumentParser) -> None:
    """Noisy labels, long tails and the sampler (image classification; the training split only). Recorded in a
    run's config.yaml only when set (:data:`maxup.cli.tasks.ImageTask.optional`)."""
    g = p.add_argument_group("noisy labels and long tails (training split only; validation and test stay clean)")
    g.add_argument("--label-noise", type=noise_rate, default=0.0, metavar="RATE",
                   help="flip exactly this fraction of the training labels, seeded by --seed (default: 0); the "
                        "metrics noisy_memorised and noisy_true_accuracy follow the flipped samples")
    g.add_argument("--noise-type", choices=NOISE_TYPES, default=None,
                   help="symmetric: to another class, uniformly (default); asymmetric: by --noise-map or the "
                        f"dataset's preset ({', '.join(NOISE_PRESETS)}); pairflip: class c to c+1 mod C")
    g.add_argument("--noise-map", default=None, metavar="MAP",
                   help="the flips of asymmetric noise, SOURCE:TARGET pairs such as '9:1,2:0,4:7,3:5,5:3', or a "
                        "preset name")
    g.add_argument("--noisy-labels", default=None, metavar="FILE",
                   help="your own noisy training labels: one integer per line, or a .npy; one per training sample, "
                        "in the order of the training data as loaded (a relative path is also looked up in "
                        "--data-dir)")
    g.add_argument("--imbalance", type=IMBALANCE, default=None, metavar="RATIO",
                   help="long-tailed training split, n_c = n_max * RATIO^(-c/(C-1)) (CIFAR-LT); adds per-class and "
                        "many/medium/few-shot test accuracy")
    g.add_argument("--class-sampler", choices=tuple(SAMPLERS), default="instance",
                   help="training order by class: instance (each sample once per epoch, default), class (each "
                        "class equally likely), sqrt, reversed (class probability inversely proportional to its size)")


def add_corpus_options(p: argparse.ArgumentParser) -> None:
    """The corpus of language modelling (``maxup lm``, ``maxup compare --task lm``)."""
    g = p.add_argument_group("corpus (language modelling)")
    g.add_argument("--corpus", default="kjv",
                   help="folder with train.txt, valid.txt and test.txt (one sentence per line, PTB / WikiText "
                        "layout), or 'kjv': the King James Bible, built on first use into $MAXUP_DATA/kjv or "
                        "~/.cache/maxup/kjv from the Debian packages bible-kjv and bible-kjv-text (default: kjv)")
    g.add_argument("--bptt", type=POSITIVE_INT, default=35,
                   help="tokens per segment (truncated back-propagation through time; default: 35)")
    g.add_argument("--train-tokens", type=POSITIVE_INT, default=None,
                   help="use only the first N training tokens (quick runs)")
    g.add_argument("--eval-tokens", type=POSITIVE_INT, default=None,
                   help="evaluate on only the first N tokens of the valid and of the test split (cheaper "
                        "evaluation on a CPU; default: the whole splits)")


def add_optim_options(p: argparse.ArgumentParser, defaults: dict) -> None:
    """The optimisation options of every task, with the task's ``defaults`` (epochs, batch size, optimizer, lr,
    weight decay, gradient clipping)."""
    g = p.add_argument_group("optimisation")
    d = defaults
    g.add_argument("--epochs", type=POSITIVE_INT, default=d["epochs"], help="training epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=d["batch_size"],
                   help="batch size per process (default: %(default)s)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=d["optimizer"],
                   help="SGD with Nesterov momentum, or AdamW (default: %(default)s)")
    g.add_argument("--lr", type=POSITIVE, default=d["lr"], help="peak learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=NON_NEGATIVE, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=NON_NEGATIVE, default=d["weight_decay"],
                   help="weight decay (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=NON_NEGATIVE, default=0.0,
                   help="linear learning-rate warm-up before the cosine decay")
    g.add_argument("--max-grad-norm", type=POSITIVE, default=d["max_grad_norm"],
                   help="clip the gradient norm to this value (default: %(default)s)")
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision (bf16 on CPU/GPU, fp16 on GPU)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--eval-every", type=POSITIVE_INT, default=1, metavar="K",
                   help="evaluate the validation and test sets every K epochs and after the last (default: 1); "
                        "on a CPU a large test set can cost more than a short epoch")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when attached to a terminal)")


def add_run_dir_options(p: argparse.ArgumentParser) -> None:
    """The options of one run (``maxup train``, ``maxup lm``): seed, run directory, resume, force."""
    p.add_argument("--seed", type=COUNT, default=0, help="random seed, >= 0 (default: 0)")
    p.add_argument("--out", default=None, help="run directory for metrics, config.yaml and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (with the "
                                                         "same settings; more --epochs may be given)")
    add_force_option(p)
    add_tensorboard_option(p)


def add_tensorboard_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars into each run directory's tensorboard/ (needs the tensorboard "
                        "package; without it, one warning)")


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that holds other files or an "
                                                        "earlier run, replacing that run's files (its checkpoints are "
                                                        "deleted)")


def add_evaluation_options(p: argparse.ArgumentParser, *, seed: str, out: str, done: str) -> None:
    """The options ``certify`` and ``robust`` share: the seed (``seed`` says of what), device, data folder,
    ``--out`` (default ``out``), ``--resume`` (keeping the ``done`` results), ``--force`` and the progress bar."""
    p.add_argument("--seed", type=COUNT, default=0, help=f"{seed} (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--data-dir", default=None, help="where the dataset files are, if not where the run read them")
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")
    p.add_argument("--resume", action="store_true",
                   help=f"keep the {done} already in --out with the same settings and continue")
    add_force_option(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
