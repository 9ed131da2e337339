"""What ``maxup train`` and ``maxup compare`` run: build data, model, step and trainer from options."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .. import methods as M
from ..data import list_datasets, load_dataset
from ..models import create_model, list_models
from ..train import fit
from ..train.distributed import resolve_device

DEFAULT_METHODS = ["erm", "cutout", "maxup(m=4)+cutout", "mixup", "cutmix", "maxup(m=4)+cutmix"]
RUN_KEYS = ("dataset", "data_dir", "model", "model_opt", "epochs", "batch_size", "optimizer", "lr", "momentum",
            "weight_decay", "warmup_epochs", "train_size", "val_size", "test_size", "normalize", "amp",
            "max_grad_norm", "device", "compile", "channels_last", "tf32")


#: suite keys beside RUN_KEYS: the seeds, and the language-modelling task's (``maxup compare --task lm``)
SUITE_KEYS = ("seeds", "task", "corpus", "bptt", "train_tokens")
#: options whose default depends on the task (``maxup compare --task``): the image defaults
IMAGE_DEFAULTS = {"epochs": 15, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4,
                  "max_grad_norm": None}


#: the columns of the comparison table: (header, metric key, scale, decimals)
IMAGE_COLUMNS = (("test accuracy (%)", "test_accuracy", 100.0, 2), ("test loss", "test_loss", 1.0, 4),
                 ("ECE (%)", "test_ece", 100.0, 2))


class _TaskDefault:
    def __repr__(self) -> str:
        return "by task"


TASK_DEFAULT = _TaskDefault()  # an option left to the task's default (``maxup compare --task``)


def fill_task_defaults(args, defaults: dict) -> None:
    """Set the options ``compare`` left to the task (:data:`TASK_DEFAULT`) to ``defaults``."""
    for key, value in defaults.items():
        if getattr(args, key, TASK_DEFAULT) is TASK_DEFAULT:
            setattr(args, key, value)


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, M._value(__import__("ast").parse(value, mode="eval").body, text)


def add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(list_datasets())} (default: digits, bundled)")
    g.add_argument("--data-dir", default=None, help="where the dataset files are (default: $MAXUP_DATA or the "
                                                     "standard location, e.g. /usr/share/datasets/fashion-mnist)")
    g.add_argument("--train-size", type=int, default=None, help="stratified subset of N training images (low-data regime)")
    g.add_argument("--val-size", type=float, default=0, help="validation split from the training data: a fraction or a count")
    g.add_argument("--test-size", type=int, default=None, help="use only the first N test images (quick runs)")
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
    """The options of one run (``maxup train``, ``maxup lm``): seed, run directory, resume."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, help="run directory for metrics, config.yaml and checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def add_optim_options(p: argparse.ArgumentParser) -> None:
    """The optimisation options shared by image training and language modelling (``maxup lm``)."""
    g = p.add_argument_group("optimisation")
    d = IMAGE_DEFAULTS  # other tasks change them with p.set_defaults
    g.add_argument("--epochs", type=int, default=d["epochs"], help="training epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="batch size per process (default: %(default)s)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default=d["optimizer"],
                   help="SGD with Nesterov momentum, or AdamW (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="weight decay (default: %(default)s)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear learning-rate warm-up before the cosine decay")
    g.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"],
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
    """Train one configuration (the keys of :data:`RUN_KEYS` plus ``method`` and ``seed``); returns the history."""
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


def _refuse_overwrite(out, resume: bool, what: str) -> None:
    """Never train over a user's earlier results without --resume."""
    if out is None or resume:
        return
    out = Path(out)
    if (out / "results.json").exists() or any(out.glob("**/checkpoints/*.pt")):
        raise ValueError(f"--out {out} already holds {what}: pass --resume to continue (finished runs are reused), "
                         "or choose another --out")


def check_run_dir(args) -> None:
    """``--resume`` needs ``--out``; an existing run in ``--out`` needs ``--resume`` (``maxup train``, ``maxup lm``)."""
    if args.resume and not args.out:
        raise ValueError("--resume needs --out RUN_DIR (the run directory to continue)")
    _refuse_overwrite(args.out, args.resume, "a training run")


def comparison_specs(args, specs: list[str], normalise) -> list[str]:
    """The methods of ``maxup compare``, each through ``normalise`` (errors before any training), checked
    for repeats, with the seeds; refuses an ``--out`` that holds a comparison unless ``--resume``."""
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    specs = [normalise(s) for s in specs]
    if len(set(specs)) != len(specs):
        raise ValueError(f"--methods lists a method twice: {specs}")
    _refuse_overwrite(Path(args.out), args.resume, "a comparison")
    return specs


def report(results: dict[str, list[list[dict]]], out: Path, budget: str, start: float, *, title: str = "maxup compare",
           keys: tuple[str, ...] = ("test_accuracy", "test_loss", "test_ece"), columns=IMAGE_COLUMNS,
           **plot_options) -> list[dict]:
    """Summarise a comparison (baseline: erm when present, else the first method); on the main process print
    the table and write results.md, results.json and results.png into ``out``."""
    specs = list(results)
    baseline = "erm" if "erm" in specs else specs[0]
    rows = summarize(results, baseline, keys=keys)
    if not _is_main():
        return rows
    text = table(rows, baseline, columns)
    print(f"\n{budget}\n\n{text}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"# {title}\n\n{budget}\n\n{text}\n\nwall time {time.perf_counter() - start:.0f} s\n")
    (out / "results.json").write_text(json.dumps({"budget": budget, "summary": rows, "runs": results}, indent=1))
    plot(results, rows, out / "results.png", budget, **plot_options)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}")
    return rows


def train(args) -> list[dict]:
    config = _config(args, args.method, args.seed)
    check_run_dir(args)
    history = run(config, out_dir=args.out, resume=args.resume, progress=args.progress)
    if _is_main() and history:
        last = history[-1]
        print(f"{config['method']} on {config['dataset']}, epoch {last['epoch']}: {_fmt(last, 'test')}")
        if args.out:
            print(f"run directory: {args.out}")
    return history


# ------------------------------------------------------------------------------------------ compare


def _slug(spec: str) -> str:
    keep = "".join(c if c.isalnum() or c in "=.-" else "_" for c in spec)
    return "_".join(filter(None, keep.split("_")))


def _load_suite(args) -> None:
    import yaml

    try:
        suite = yaml.safe_load(Path(args.suite).read_text()) or {}
    except OSError as err:
        raise ValueError(f"cannot read --suite {args.suite}: {err.strerror}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("methods"), list):
        raise ValueError(f"--suite {args.suite} must be a YAML mapping with a list 'methods:' of method specs")
    for key, value in suite.items():
        key = key.replace("-", "_")
        if key == "methods":
            if args.methods is None:
                args.methods = [str(v) for v in value]
        elif key in RUN_KEYS or key in SUITE_KEYS:
            setattr(args, key, dict(value) if key == "model_opt" else value)
        else:
            raise ValueError(f"unknown key {key!r} in --suite {args.suite}; valid keys: methods, "
                             + ", ".join(SUITE_KEYS + RUN_KEYS))


def summarize(results: dict[str, list[list[dict]]], baseline: str | None,
              keys: tuple[str, ...] = ("test_accuracy", "test_loss", "test_ece")) -> list[dict]:
    """Mean and standard deviation over seeds of the final metrics ``keys``, and time per epoch relative to
    the baseline."""
    rows = []
    for method, runs in results.items():
        finals = [h[-1] for h in runs]
        row = {"method": method, "seeds": len(runs)}
        for key in keys:
            vals = torch.tensor([float(f[key]) for f in finals], dtype=torch.float64)
            row[key] = vals.mean().item()
            row[key + "_std"] = vals.std().item() if len(vals) > 1 else 0.0
        # median over epochs and seeds: robust to the odd slow epoch on a shared machine
        row["epoch_time"] = torch.tensor([e["train_time"] for h in runs for e in h]).median().item()
        rows.append(row)
    base = next((r for r in rows if r["method"] == baseline), rows[0])
    for r in rows:
        r["time_ratio"] = r["epoch_time"] / base["epoch_time"]
    return rows


def table(rows: list[dict], baseline: str, columns=IMAGE_COLUMNS) -> str:
    """A markdown table: mean ± sd over seeds of each column's metric, and the time per epoch over the baseline's."""
    lines = [f"| method | {' | '.join(c[0] for c in columns)} | time/epoch vs {baseline} |",
             "|---|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = " | ".join(f"{scale * r[key]:.{d}f} ± {scale * r[key + '_std']:.{d}f}" for _, key, scale, d in columns)
        lines.append(f"| {r['method']} | {cells} | {r['time_ratio']:.2f}x |")
    return "\n".join(lines)


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
    ax1.set_ylim(max(0.0, 0.95 * lo), None)
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
    ax2.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(args) -> list[dict]:
    if args.suite:
        _load_suite(args)
    if getattr(args, "task", "image") == "lm":
        from .lm import compare_lm

        return compare_lm(args)
    fill_task_defaults(args, IMAGE_DEFAULTS)
    specs = comparison_specs(args, args.methods or DEFAULT_METHODS, M.canonical)
    out = Path(args.out)
    results: dict[str, list[list[dict]]] = {s: [] for s in specs}
    runs = [(seed, spec) for seed in range(args.seeds) for spec in specs]  # seeds outer: drift hits every method alike
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = None
    if show and _is_main():
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="compare", unit="run", file=sys.stderr)
    start = time.perf_counter()
    for seed in range(args.seeds):
        splits = load_dataset(args.dataset, data_dir=args.data_dir, val_size=args.val_size, train_size=args.train_size,
                              test_size=args.test_size, normalize=args.normalize, seed=seed)
        for spec in specs:
            history = run(_config(args, spec, seed), out_dir=out / _slug(spec) / f"seed-{seed}", progress=False,
                          splits=splits, resume=args.resume)
            results[spec].append(history)
            msg = f"{spec} seed {seed}: test acc {100 * history[-1]['test_accuracy']:.2f}%"
            if bar is not None:
                bar.set_postfix_str(msg)
                bar.update()
            elif _is_main():
                print(msg, file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    budget = (f"{args.dataset}" + (f" (train subset {args.train_size})" if args.train_size else "")
              + f", model {args.model}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
              f"seeds 0..{args.seeds - 1}")
    return report(results, out, budget, start)
