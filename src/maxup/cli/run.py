"""What ``maxup train`` and ``maxup compare`` run: build data, model, step and trainer from options."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

from .. import methods as M
from ..data import list_datasets, load_dataset
from ..models import create_model, list_models
from .._checks import check_int
from ..train import fit, list_checkpoints
from ..train.distributed import resolve_device

#: the main job's methods: two augmentations that suit 8x8 digits (a one-pixel shift, pixel noise), MaxUp over
#: each, and Mixup
DEFAULT_METHODS = ["erm", "cropflip(padding=1, flip=0)", "maxup(m=4)+cropflip(padding=1, flip=0)",
                   "gaussian(sigma=0.5)", "maxup(m=4)+gaussian(sigma=0.5)", "mixup"]
RUN_KEYS = ("dataset", "data_dir", "model", "model_opt", "epochs", "batch_size", "optimizer", "lr", "momentum",
            "weight_decay", "warmup_epochs", "train_size", "val_size", "test_size", "normalize", "amp",
            "max_grad_norm", "device", "compile", "channels_last", "tf32")


#: suite keys beside RUN_KEYS: the seeds, and the language-modelling task's (``maxup compare --task lm``)
SUITE_KEYS = ("seeds", "task", "corpus", "bptt", "train_tokens")
#: options whose default depends on the task (``maxup compare --task``): the image defaults
IMAGE_DEFAULTS = {"epochs": 15, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
                  "max_grad_norm": None}

#: ``maxup compare`` on the bundled digits (the main job): 10 images per class and a schedule long enough that
#: plain training fits them (100% clean training accuracy) while the test accuracy leaves room
DIGITS_COMPARE_DEFAULTS = {"train_size": 100, "epochs": 60, "batch_size": 32}


#: the columns of the comparison table: (header, metric key, scale, decimals)
IMAGE_COLUMNS = (("test accuracy (%)", "test_accuracy", 100.0, 2), ("valid accuracy (%)", "val_accuracy", 100.0, 2),
                 ("clean train accuracy (%)", "clean_train_accuracy", 100.0, 2),
                 ("train-test gap (points)", "gap", 100.0, 2), ("test loss", "test_loss", 1.0, 4),
                 ("ECE (%)", "test_ece", 100.0, 2))
#: the final metrics summarised for images: test, and the clean training set (convergence)
IMAGE_KEYS = ("test_accuracy", "test_loss", "test_ece", "clean_train_accuracy", "clean_train_loss", "val_accuracy")
#: clean training accuracy the baseline must reach for a comparison to show what a regulariser buys
CONVERGED = 0.99
#: the settings a method of ``maxup compare`` may change for itself: ``cutout@epochs=40``
BUDGET_KEYS = ("epochs",)


class _TaskDefault:
    def __repr__(self) -> str:
        return "by task"


TASK_DEFAULT = _TaskDefault()  # an option left to the task's default (``maxup compare --task``)


def fill_task_defaults(args, defaults: dict) -> None:
    """Set the options ``compare`` left to the task (:data:`TASK_DEFAULT`) to ``defaults``."""
    for key, value in defaults.items():
        if getattr(args, key, TASK_DEFAULT) is TASK_DEFAULT:
            setattr(args, key, value)


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


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, M._value(__import__("ast").parse(value, mode="eval").body, text)


def _fraction_or_count(text: str) -> float | int:
    """``--val-size``: ``0.1`` (a fraction of the training data) or ``300`` (a count)."""
    try:
        value = int(text)
    except ValueError:
        value = NON_NEGATIVE(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a count such as 300, got {text!r}")
    return value


def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits, bundled)")
    g.add_argument("--data-dir", default=None, help="where the dataset files are (default: $MAXUP_DATA or the "
                                                     "standard location, e.g. /usr/share/datasets/fashion-mnist)")
    g.add_argument("--train-size", type=POSITIVE_INT, default=None,
                   help="stratified subset of N training images (low-data regime)")
    g.add_argument("--val-size", type=_fraction_or_count, default=0,
                   help="validation split from the training data: a fraction or a count")
    g.add_argument("--test-size", type=POSITIVE_INT, default=None, help="use only the first N test images (quick runs)")
    g.add_argument("--no-normalize", dest="normalize", action="store_false", help="do not standardise the inputs")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="cnn", help=f"one of {', '.join(list_models())} (default: cnn)")
    g.add_argument("--model-opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="model option, repeatable, e.g. --model-opt depth=20 --model-opt width=16")
    add_optim_options(p)
    g = p.add_argument_group("speed (GPU)")
    g.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor; e.g. --compile aot_eager to debug)")
    g.add_argument("--channels-last", action="store_true", help="model and images in channels-last memory format")
    g.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="on CUDA, keep fp32 matrix multiplies and convolutions in full IEEE precision (default: TF32)")


def add_run_dir_options(p: argparse.ArgumentParser) -> None:
    """The options of one run (``maxup train``, ``maxup lm``): seed, run directory, resume, force."""
    p.add_argument("--seed", type=COUNT, default=0, help="random seed, >= 0 (default: 0)")
    p.add_argument("--out", default=None, help="run directory for metrics, config.yaml and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (with the "
                                                         "same settings; more --epochs may be given)")
    add_force_option(p)


def add_force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that holds other files or an "
                                                        "earlier run, replacing that run's files (its checkpoints are "
                                                        "deleted)")


def add_optim_options(p: argparse.ArgumentParser) -> None:
    """The optimisation options shared by image training and language modelling (``maxup lm``)."""
    g = p.add_argument_group("optimisation")
    d = IMAGE_DEFAULTS  # other tasks change them with p.set_defaults
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
    g.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision (bf16 on CPU/GPU, fp16 on GPU)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when attached to a terminal)")


def _config(args, method: str, seed: int) -> dict:
    config = {k: getattr(args, k) for k in RUN_KEYS}
    config["model_opt"] = dict(config["model_opt"])
    config["method"] = M.canonical(method)
    config["seed"] = seed
    return config


def run(config: dict, *, out_dir=None, resume: bool = False, progress=None, splits=None) -> list[dict]:
    """Train one configuration (the keys of :data:`RUN_KEYS` plus ``method`` and ``seed``); returns the history.

    With ``resume`` a run in ``out_dir`` continues if its settings are the same (more epochs may be
    given); a changed setting is an error naming it."""
    seed = config["seed"]
    resolve_device(config["device"], name="--device")  # a wrong --device fails before the data is loaded
    if splits is None:
        splits = load_dataset(config["dataset"], data_dir=config["data_dir"], val_size=config["val_size"],
                              train_size=config["train_size"], test_size=config["test_size"],
                              normalize=config["normalize"], seed=seed)
    torch.manual_seed(seed)
    model = create_model(config["model"], input_shape=splits.input_shape, num_classes=splits.num_classes,
                         **config["model_opt"])
    return fit(model, config["method"], train=splits.train, test=splits.test, val=splits.val, epochs=config["epochs"],
               batch_size=config["batch_size"], lr=config["lr"], optimizer=config["optimizer"],
               momentum=config["momentum"], weight_decay=config["weight_decay"],
               warmup_epochs=config["warmup_epochs"], seed=seed, device=config["device"], out_dir=out_dir,
               amp=config["amp"], max_grad_norm=config["max_grad_norm"], num_classes=splits.num_classes,
               progress=progress, resume=resume, config=config, compile=config.get("compile", False),
               channels_last=config.get("channels_last", False), tf32=config.get("tf32", True))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _fmt(row: dict, prefix: str) -> str:
    keys = [k for k in ("accuracy", "loss", "ece") if f"{prefix}_{k}" in row]
    return "  ".join(f"{prefix} {k} {row[f'{prefix}_{k}']:.4f}" for k in keys)


def _holds_run(out: Path) -> bool:
    """Whether ``out`` holds a maxup training run: checkpoints, or a config.yaml that maxup wrote."""
    if list_checkpoints(out / "checkpoints"):
        return True
    try:
        import yaml

        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except Exception:  # missing, unreadable or not YAML: not a maxup run
        return False
    return isinstance(config, dict) and "method" in config and "trainer" in config


def _holds_comparison(out: Path) -> bool:
    return (out / "results.json").is_file() or any(p.is_dir() for p in out.glob("*/seed-*"))


def check_out(out, *, resume: bool, force: bool, what: str, holds=_holds_run) -> None:
    """Refuse an ``--out`` that cannot be written (a file, read-only), or that is not empty and not this
    run's: without ``--resume`` or ``--force`` a non-empty folder is never written into, and ``--resume``
    needs a folder that ``holds`` ``what``."""
    if out is None:
        return
    out = Path(out)
    if resume and force:
        raise ValueError("--resume and --force contradict each other: --resume continues the run in --out, "
                         "--force starts a new one over it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose a folder for {what}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write into {existing} (permission denied or not a folder); "
                         "choose a writable --out")
    if not out.is_dir() or not any(out.iterdir()) or force:
        return
    if resume:
        if not holds(out):
            raise ValueError(f"--out {out} holds files but no {what} to resume: choose another --out (or pass "
                             "--force to write into it anyway)")
        if what == "a training run" and (out / "model.pt").is_file() and not list_checkpoints(out / "checkpoints"):
            raise ValueError(f"--out {out} holds a finished run (model.pt) without checkpoints to resume from: "
                             "--resume would train it again over model.pt; choose another --out, or pass --force")
        return
    found = f"holds {what}" if holds(out) else "is not empty"
    raise ValueError(f"--out {out} {found}: pass --resume to continue it (finished runs are reused), --force to "
                     "write over it, or choose another --out")


def clear_checkpoints(run_dir) -> None:
    """Delete the checkpoints of an earlier run in ``run_dir`` (``--force``), so the new run starts afresh."""
    for path in list_checkpoints(Path(run_dir) / "checkpoints"):
        path.unlink()


def check_run_dir(args) -> None:
    """``--resume`` needs ``--out``; a non-empty ``--out`` needs ``--resume`` (a run there) or ``--force``
    (``maxup train``, ``maxup lm``)."""
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
    check_out(args.out, resume=args.resume, force=getattr(args, "force", False), what="a training run")
    if getattr(args, "force", False) and args.out:
        clear_checkpoints(args.out)


def comparison_specs(args, specs: list[str], normalise) -> list[str]:
    """The methods of ``maxup compare``, each through ``normalise`` (errors before any training), checked
    for repeats, with the seeds; refuses an ``--out`` that holds a comparison unless ``--resume``."""
    if isinstance(args.seeds, bool) or not isinstance(args.seeds, int) or args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds!r}")
    if not specs:
        raise ValueError("--methods is empty: list at least one method spec, e.g. --methods erm,mixup")
    specs = [normalise(s) for s in specs]
    if len(set(specs)) != len(specs):
        raise ValueError(f"--methods lists a method twice: {specs}")
    force = getattr(args, "force", False)
    check_out(args.out, resume=args.resume or getattr(args, "report", False), force=force, what="a comparison", holds=_holds_comparison)
    if force:
        for spec in specs:
            for seed in range(args.seeds):
                clear_checkpoints(Path(args.out) / _slug(spec) / f"seed-{seed}")
    return specs


def report(results: dict[str, list[list[dict]]], out: Path, budget: str, start: float, *, title: str = "maxup compare",
           keys: tuple[str, ...] = IMAGE_KEYS, columns=IMAGE_COLUMNS, missing=(), **plot_options) -> list[dict]:
    """Summarise a comparison (baseline: erm when present, else the first method); on the main process print
    the table and write results.md, results.json and results.png into ``out``. ``missing`` names the runs not
    finished (``compare --report`` summarises the finished ones)."""
    if not results:
        raise ValueError(f"no finished run in {out} to report: train them first (maxup compare without --report)")
    title_line = budget + (f"; {len(missing)} runs not finished" if missing else "")
    if missing:
        budget += f"; not finished, left out: {', '.join(missing)}"
    specs = list(results)
    baseline = "erm" if "erm" in specs else specs[0]
    rows = summarize(results, baseline, keys=keys)
    if not _is_main():
        return rows
    text = table(rows, baseline, columns) + convergence_note(rows, baseline)
    print(f"\n{budget}\n\n{text}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"# {title}\n\n{budget}\n\n{text}\n\nwall time {time.perf_counter() - start:.0f} s\n")
    seeds = {m: [s for s in range(len(hs) + sum(x.startswith(f"{m} seed ") for x in missing))
                 if f"{m} seed {s}" not in missing] for m, hs in results.items()}
    (out / "results.json").write_text(json.dumps({"budget": budget, "summary": rows, "runs": results,
                                                  "seeds": seeds, "missing": list(missing)}, indent=1))
    plot(results, rows, out / "results.png", title_line, **plot_options)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return rows


def train(args) -> list[dict]:
    config = _config(args, args.method, args.seed)
    check_run_dir(args)
    history = run(config, out_dir=args.out, resume=args.resume, progress=args.progress)
    if _is_main() and history:
        last = history[-1]
        print(f"{config['method']} on {config['dataset']}, epoch {last['epoch']}: {_fmt(last, 'test')}"
              + (f"  (clean train accuracy {last['clean_train_accuracy']:.4f})" if "clean_train_accuracy" in last else ""))
        if args.out:
            print(f"run directory: {args.out}")
    return history


# ------------------------------------------------------------------------------------------ compare


def _slug(spec: str) -> str:
    keep = "".join(c if c.isalnum() or c in "=.-@" else "_" for c in spec)
    return "_".join(filter(None, keep.split("_")))


#: the type of each suite entry that is not a string: an argparse type, or bool / dict
SUITE_TYPES = {"epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE, "momentum": NON_NEGATIVE,
               "weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "max_grad_norm": POSITIVE,
               "train_size": POSITIVE_INT, "val_size": NON_NEGATIVE, "test_size": POSITIVE_INT, "seeds": POSITIVE_INT,
               "bptt": POSITIVE_INT, "train_tokens": POSITIVE_INT, "normalize": bool, "model_opt": dict}
#: suite entries that may be null (their option's default is None)
SUITE_NULLABLE = ("data_dir", "train_size", "test_size", "max_grad_norm", "amp", "device", "train_tokens")


def read_yaml(path, what: str):
    """A YAML file read safely (no tags that build objects), as UTF-8, refusing repeated keys; every
    problem is a ValueError naming ``what`` (e.g. "--suite runs/s.yaml") and the fix."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"{what} repeats the key {', '.join(repeated)} (line {node.start_mark.line + 1}): "
                             "give each key once")
        return loader.construct_mapping(node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise ValueError(f"cannot read {what}: {err.strerror}") from None
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} is not valid YAML{line}: {problem}; maxup reads plain YAML (mappings, lists, "
                         "numbers, strings; no tags)") from None


def _suite_value(key: str, value, what: str):
    """A suite entry checked like its command-line option."""
    if value is None and key in SUITE_NULLABLE:
        return None
    kind = SUITE_TYPES.get(key, str)
    if kind is bool or kind is dict or kind is str:
        if not isinstance(value, kind):
            name = {bool: "true or false", dict: "a mapping of options", str: "a string"}[kind]
            raise ValueError(f"{key!r} in {what} must be {name}, got {value!r}")
        return dict(value) if kind is dict else value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key!r} in {what} must be a number, got {value!r}")
    try:
        return kind(value)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{key!r} in {what}: {err}") from None


def _load_suite(args) -> None:
    what = f"--suite {args.suite}"
    suite = read_yaml(args.suite, what)
    if not isinstance(suite, dict) or not isinstance(suite.get("methods"), list):
        raise ValueError(f"{what} must be a YAML mapping with a list 'methods:' of method specs")
    if not suite["methods"] or not all(isinstance(v, str) and v.strip() for v in suite["methods"]):
        raise ValueError(f"'methods' in {what} must be a non-empty list of method specs (strings such as "
                         f"'maxup(m=4)+cutout'), got {suite['methods']!r}")
    for key, value in suite.items():
        key = str(key).replace("-", "_")
        if key == "methods":
            if args.methods is None:
                args.methods = list(value)
        elif key in RUN_KEYS or key in SUITE_KEYS:
            setattr(args, key, _suite_value(key, value, what))
        else:
            raise ValueError(f"unknown key {key!r} in {what}; valid keys: methods, "
                             + ", ".join(SUITE_KEYS + RUN_KEYS))


def split_budget(label: str) -> tuple[str, dict]:
    """``"cutout@epochs=40"`` -> ``("cutout", {"epochs": 40})``: a method of ``maxup compare`` with a budget of its
    own (:data:`BUDGET_KEYS`), e.g. the base augmentation trained as long as MaxUp over it takes."""
    spec, at, rest = label.partition("@")
    budget = {}
    for item in filter(None, (p.strip() for p in rest.split("@"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in BUDGET_KEYS:
            raise ValueError(f"cannot read the budget {item!r} in {label!r}: write METHOD@epochs=N, e.g. "
                             f"'cutout@epochs=40' (budget keys: {', '.join(BUDGET_KEYS)})")
        try:
            budget[key] = int(value)
        except ValueError:
            raise ValueError(f"budget {item!r} in {label!r}: {key} must be a whole number") from None
        if budget[key] < 1:
            raise ValueError(f"budget {item!r} in {label!r}: {key} must be >= 1")
    if at and not budget:
        raise ValueError(f"empty budget in {label!r}: write METHOD@epochs=N, e.g. 'cutout@epochs=40'")
    return spec, budget


def with_budget(normalise):
    """``normalise`` applied to the spec part of ``METHOD@epochs=N``, the budget written back after it."""
    def checked(label: str) -> str:
        spec, budget = split_budget(label)
        return normalise(spec) + "".join(f"@{k}={v}" for k, v in budget.items())
    return checked


def summarize(results: dict[str, list[list[dict]]], baseline: str | None,
              keys: tuple[str, ...] = IMAGE_KEYS) -> list[dict]:
    """Mean and standard deviation over seeds of the final metrics ``keys`` (those every run recorded), the
    train-test gap (clean training accuracy minus test accuracy), time per epoch relative to the baseline, and
    total training time. With a validation perplexity: the epoch of the best one and the test perplexity there."""
    rows = []
    for method, runs in results.items():
        finals = [h[-1] for h in runs]
        row = {"method": method, "seeds": len(runs), "epochs": len(runs[0])}

        def stats(name, values):
            vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
            row[name] = vals.mean().item()
            row[name + "_std"] = vals.std().item() if len(vals) > 1 else 0.0

        for key in keys:
            if all(key in f for f in finals):
                stats(key, [f[key] for f in finals])
        if all("clean_train_accuracy" in f and "test_accuracy" in f for f in finals):
            stats("gap", [f["clean_train_accuracy"] - f["test_accuracy"] for f in finals])
        if all("val_perplexity" in e for h in runs for e in h):
            best = [min(h, key=lambda e: e["val_perplexity"]) for h in runs]
            stats("best_val_epoch", [e["epoch"] for e in best])
            stats("test_perplexity_at_best_val", [e["test_perplexity"] for e in best])
        # median over epochs and seeds: robust to the odd slow epoch on a shared machine
        row["epoch_time"] = torch.tensor([e["train_time"] for h in runs for e in h]).median().item()
        stats("train_time_total", [sum(e["train_time"] for e in h) for h in runs])
        rows.append(row)
    base = next((r for r in rows if r["method"] == baseline), rows[0])
    for r in rows:
        r["time_ratio"] = r["epoch_time"] / base["epoch_time"]
    return rows


def table(rows: list[dict], baseline: str, columns=IMAGE_COLUMNS) -> str:
    """A markdown table: mean ± sd over seeds of each column's metric ("-" where a run did not record it), the
    time per epoch over the baseline's, and the total training time per run."""
    columns = [c for c in columns if any(c[1] in r for r in rows)]  # e.g. no validation split: no such column
    lines = [f"| method | {' | '.join(c[0] for c in columns)} | time/epoch vs {baseline} | train time (s) |",
             "|---|" + "---|" * (len(columns) + 2)]
    for r in rows:
        cells = " | ".join(f"{scale * r[key]:.{d}f} ± {scale * r[key + '_std']:.{d}f}" if key in r else "-"
                           for _, key, scale, d in columns)
        lines.append(f"| {r['method']} | {cells} | {r['time_ratio']:.2f}x | {r['train_time_total']:.0f} |")
    return "\n".join(lines)


def convergence_note(rows: list[dict], baseline: str) -> str:
    """A line under the table when the baseline did not fit its training data (clean accuracy < 99%)."""
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is None or "clean_train_accuracy" not in base or base["clean_train_accuracy"] >= CONVERGED:
        return ""
    return (f"\n\nNote: {baseline} reached {100 * base['clean_train_accuracy']:.2f}% clean training accuracy "
            f"(< {100 * CONVERGED:.0f}%): not converged: regularisers can only cost here.")


def plot(results: dict[str, list[list[dict]]], rows: list[dict], path: Path, title: str, *,
         key: str = "test_accuracy", curve_key: str = "test_accuracy", scale: float = 100.0,
         label: str = "test accuracy (%)", curve_label: str = "test accuracy (%)") -> None:
    """Bars of the final ``key`` (mean ± sd over seeds, times ``scale``) and the per-epoch curves of ``curve_key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(rows) > 8  # a long legend goes beside the curves, and the figure grows to hold it
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16 if many else 12, 4.5 + (0.12 * len(rows) if many else 0)))
    ax1.bar(range(len(rows)), [scale * r[key] for r in rows], yerr=[scale * r[key + "_std"] for r in rows],
            capsize=4, color="tab:blue", alpha=0.8)
    ax1.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    lo = min(scale * (r[key] - 2 * r[key + "_std"]) for r in rows)
    hi = max(scale * (r[key] + 2 * r[key + "_std"]) for r in rows)
    top = min(scale, hi + 0.05 * (hi - lo) + 1e-9) if key.endswith("accuracy") else None  # never past 100%
    ax1.set_ylim(max(0.0, lo - 0.05 * (hi - lo) - 1e-9), top)
    ax1.set_ylabel(f"final {label}, mean ± sd over seeds")
    for method, runs in results.items():
        curves = torch.tensor([[scale * float(e[curve_key]) for e in h] for h in runs], dtype=torch.float64)
        mean = curves.mean(0)
        sd = curves.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        epochs = range(1, len(mean) + 1)
        ax2.plot(epochs, mean, label=method, marker="o" if len(mean) < 3 else None)  # one epoch: a point
        ax2.fill_between(epochs, mean - sd, mean + sd, alpha=0.15)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(curve_label)
    if curve_key.endswith("accuracy"):
        ax2.set_ylim(None, min(scale, ax2.get_ylim()[1]))
    ax2.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def run_comparison(args, specs: list[str], make_config, runner, load, describe, budget: str):
    """Every method of ``specs`` (``METHOD@epochs=N`` gives one its own budget) with every seed, each run in
    ``args.out/<method>/seed-N`` through ``runner(config, out_dir=..., ...)``: in this process, the data of a seed
    loaded once by ``load(seed)``, or in ``args.jobs`` worker processes (each loads its own). With ``--resume``
    finished runs are reused: from their checkpoints, from a run folder's metrics.jsonl, or from the
    ``results.json`` in ``args.out`` when it describes the same ``budget`` (a committed grid continues).
    Returns each method's histories in seed order and the runs not finished."""
    out = Path(args.out)
    jobs = check_int("--jobs", getattr(args, "jobs", 1))
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--jobs runs whole runs side by side; under torchrun each run already spans the processes: "
                         "use --jobs 1")
    runs = []  # seeds outer: drift on a shared machine hits every method alike
    for seed in range(args.seeds):
        for spec in specs:
            method, own = split_budget(spec)
            runs.append((spec, seed, {**make_config(method, seed), **own}, out / _slug(spec) / f"seed-{seed}"))
    results: dict[str, list] = {s: [None] * args.seeds for s in specs}
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = None
    if show and _is_main():
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="compare", unit="run", file=sys.stderr)

    def done(spec, seed, history):
        results[spec][seed] = history
        msg = describe(spec, seed, history[-1])
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update()
        elif _is_main():
            print(msg, file=sys.stderr, flush=True)

    report = getattr(args, "report", False)
    if args.resume or report:  # reuse finished runs; with --resume a run with checkpoints goes through its checks
        recorded = recorded_runs(out, budget)
        todo = []
        for spec, seed, config, run_dir in runs:
            history = None if args.resume and list_checkpoints(run_dir / "checkpoints") else \
                finished_history(run_dir, config["epochs"])
            history = history or recorded.get((spec, seed))
            if history is not None and len(history) == config["epochs"]:
                done(spec, seed, history)
            elif not report:
                todo.append((spec, seed, config, run_dir))
        runs = todo
    try:
        if jobs == 1:
            loaded: dict[int, object] = {}
            for spec, seed, config, run_dir in runs:
                if seed not in loaded:
                    loaded.clear()
                    loaded[seed] = load(seed)
                done(spec, seed, runner(config, out_dir=run_dir, progress=False, splits=loaded[seed],
                                        resume=args.resume))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            threads = max(1, (os.cpu_count() or 1) // jobs)
            pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(threads,))
            try:
                futures = {pool.submit(runner, config, out_dir=run_dir, progress=False, resume=args.resume):
                           (spec, seed) for spec, seed, config, run_dir in runs}
                for future in as_completed(futures):
                    done(*futures[future], future.result())
            except BaseException:  # an error or an interrupt: stop the runs in flight (they resume from checkpoints)
                workers = list(getattr(pool, "_processes", {}).values())
                pool.shutdown(wait=False, cancel_futures=True)
                for worker in workers:
                    worker.terminate()
                raise
            pool.shutdown()
    finally:
        if bar is not None:
            bar.close()
    missing = [f"{spec} seed {seed}" for spec, runs_ in results.items() for seed, h in enumerate(runs_) if h is None]
    return {spec: [h for h in hs if h is not None] for spec, hs in results.items() if any(hs)}, missing


def recorded_runs(out: Path, budget: str) -> dict[tuple[str, int], list[dict]]:
    """The histories in ``out/results.json`` by (method, seed), when it was written for the same ``budget``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if str(data.get("budget", "")).split("; not finished")[0] != budget:
            return {}
        seeds = data.get("seeds") or {m: list(range(len(h))) for m, h in data["runs"].items()}
        return {(m, int(s)): h for m, hs in data["runs"].items() for s, h in zip(seeds[m], hs)}
    except (ValueError, KeyError, TypeError, AttributeError):
        warnings.warn(f"{path} cannot be read as a comparison: its runs are not reused", stacklevel=2)
        return {}


def finished_history(run_dir: Path, epochs: int) -> list[dict] | None:
    """The history in ``run_dir/metrics.jsonl`` when the run finished its ``epochs``, else None."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return history if len(history) == epochs and history[-1].get("epoch") == epochs else None


def compare(args) -> list[dict]:
    if args.suite:
        _load_suite(args)
    if getattr(args, "task", "image") == "lm":
        from .lm import compare_lm

        return compare_lm(args)
    fill_task_defaults(args, {**IMAGE_DEFAULTS, "train_size": None,
                              **(DIGITS_COMPARE_DEFAULTS if str(args.dataset).lower() == "digits" else {})})
    specs = comparison_specs(args, args.methods or DEFAULT_METHODS, with_budget(M.canonical))
    out = Path(args.out)
    start = time.perf_counter()

    def load(seed):
        return load_dataset(args.dataset, data_dir=args.data_dir, val_size=args.val_size, train_size=args.train_size,
                            test_size=args.test_size, normalize=args.normalize, seed=seed)

    def describe(spec, seed, last):
        return (f"{spec} seed {seed}: test acc {100 * last['test_accuracy']:.2f}%, clean train acc "
                f"{100 * last.get('clean_train_accuracy', float('nan')):.2f}%")

    budget = (f"{args.dataset}" + (f" (train subset {args.train_size})" if args.train_size else "")
              + f", model {args.model}" + (f" {dict(args.model_opt)}" if args.model_opt else "")
              + f", {args.epochs} epochs (unless METHOD@epochs=N), batch {args.batch_size}, {args.optimizer} lr {args.lr} "
              f"weight decay {args.weight_decay}, "
              f"seeds 0..{args.seeds - 1}" + (f", validation split {args.val_size}" if args.val_size else ""))
    results, missing = run_comparison(args, specs, lambda spec, seed: _config(args, spec, seed), run, load, describe,
                                      budget)
    return report(results, out, budget, start, missing=missing)
