"""``maxup compare``: every method with every seed under the same budget, on any task, and one report.

    maxup compare                                                       # the main job (digits)
    maxup compare --methods "erm,cutout@epochs=40,maxup(m=4)+cutout" --dataset fashion-mnist --out runs/c
    maxup compare --task lm --corpus kjv --methods "erm,maxup(m=4)+word_dropout(p=0.1)"
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .._checks import check_int
from ..methods import split_outside
from ..train import list_checkpoints
from ..train.logs import plain
from .files import check_out, clear_checkpoints, holds_comparison, read_yaml
from .options import (
    IMBALANCE,
    INTEGER_TYPES,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    TASK_DEFAULT,
    add_corpus_options,
    add_force_option,
    add_image_options,
    add_tensorboard_option,
    fill_task_defaults,
    methods_arg,
    noise_rate,
    slug,
)
from .report import report
from .run import is_main, run, tensorboard_wanted
from .tasks import IMAGE, TASKS, Task, get_task, task_option_keys

#: the settings a method of ``maxup compare`` may change for itself: ``cutout@epochs=40``
BUDGET_KEYS = ("epochs",)


def split_budget(label: str) -> tuple[str, dict]:
    """``"cutout@epochs=40"`` -> ``("cutout", {"epochs": 40})``: a method of ``maxup compare`` with a budget of its
    own (:data:`BUDGET_KEYS`), e.g. the base augmentation trained as long as MaxUp over it takes."""
    spec, *rest = split_outside(label, "@")
    budget = {}
    for item in filter(None, (p.strip() for p in rest)):
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
    if rest and not budget:
        raise ValueError(f"empty budget in {label!r}: write METHOD@epochs=N, e.g. 'cutout@epochs=40'")
    return spec, budget


def with_budget(normalise):
    """``normalise`` applied to the spec part of ``METHOD@epochs=N``, the budget written back after it."""
    def checked(label: str) -> str:
        spec, budget = split_budget(label)
        return normalise(spec) + "".join(f"@{k}={v}" for k, v in budget.items())
    return checked


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
    check_out(args.out, resume=args.resume or getattr(args, "report", False) or bool(getattr(args, "storage", None)),
              force=force, what="a comparison", holds=holds_comparison)
    if force:
        for spec in specs:
            for seed in range(args.seeds):
                clear_checkpoints(Path(args.out) / slug(spec) / f"seed-{seed}")
    return specs


# ------------------------------------------------------------------------------------------ suites

#: the keys of a suite besides ``methods`` and the options of the tasks
SUITE_KEYS = ("seeds", "task")
#: the type of each suite entry that is not a string: an argparse type, or bool / dict
SUITE_TYPES = {"epochs": POSITIVE_INT, "batch_size": POSITIVE_INT, "lr": POSITIVE, "momentum": NON_NEGATIVE,
               "weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "max_grad_norm": POSITIVE,
               "train_size": POSITIVE_INT, "val_size": NON_NEGATIVE, "test_size": POSITIVE_INT, "seeds": POSITIVE_INT,
               "bptt": POSITIVE_INT, "train_tokens": POSITIVE_INT, "eval_tokens": POSITIVE_INT, "normalize": bool,
               "model_opt": dict, "label_noise": noise_rate, "imbalance": IMBALANCE}
#: suite entries that may be null (their option's default is None)
SUITE_NULLABLE = ("data_dir", "train_size", "test_size", "max_grad_norm", "amp", "device", "train_tokens",
                  "eval_tokens", "noise_type", "noise_map", "noisy_labels", "imbalance")


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
    if kind in INTEGER_TYPES and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key!r} in {what} must be an integer, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{key!r} in {what} must be a number, got {value!r}")
    try:
        return kind(value)
    except argparse.ArgumentTypeError as err:
        raise ValueError(f"{key!r} in {what}: {err}") from None


def load_suite(args) -> None:
    """``--suite FILE``: its ``methods`` (unless ``--methods`` was given) and its other options into ``args``."""
    what = f"--suite {args.suite}"
    suite = read_yaml(args.suite, what)
    if not isinstance(suite, dict) or not isinstance(suite.get("methods"), list):
        raise ValueError(f"{what} must be a YAML mapping with a list 'methods:' of method specs")
    if not suite["methods"] or not all(isinstance(v, str) and v.strip() for v in suite["methods"]):
        raise ValueError(f"'methods' in {what} must be a non-empty list of method specs (strings such as "
                         f"'maxup(m=4)+cutout'), got {suite['methods']!r}")
    valid = SUITE_KEYS + task_option_keys()
    for key, value in suite.items():
        key = str(key).replace("-", "_")
        if key == "methods":
            if args.methods is None:
                args.methods = list(value)
        elif key in valid:
            value = _suite_value(key, value, what)
            if key == "task" and value not in TASKS:
                raise ValueError(f"'task' in {what} must be one of {', '.join(TASKS)}, got {value!r}")
            setattr(args, key, value)
        else:
            raise ValueError(f"unknown key {key!r} in {what}; valid keys: methods, " + ", ".join(valid))


# ------------------------------------------------------------------------------------------ the loop


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_comparison(task: Task, args, specs: list[str], budget: str, data=None):
    """Every method of ``specs`` (``METHOD@epochs=N`` gives one its own budget) with every seed, each run in
    ``args.out/<method>/seed-N`` through :func:`maxup.cli.run.run`: in this process, the data of a seed loaded
    once (``data`` when the task's data is the same for every seed), or in ``args.jobs`` worker processes (each
    loads its own). With ``--resume`` finished runs are reused: from their checkpoints, from a run folder's
    metrics.jsonl, or from the ``results.json`` in ``args.out`` when it describes the same ``budget`` (a
    committed grid continues). Returns each method's histories in seed order and the runs not finished."""
    out = Path(args.out)
    jobs = check_int("--jobs", getattr(args, "jobs", 1))
    if jobs > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--jobs runs whole runs side by side; under torchrun each run already spans the processes: "
                         "use --jobs 1")
    runs = []  # seeds outer: drift on a shared machine hits every method alike
    for seed in range(args.seeds):
        for spec in specs:
            method, own = split_budget(spec)
            runs.append((spec, seed, {**task.config(args, method, seed), **own}, out / slug(spec) / f"seed-{seed}"))
    results: dict[str, list] = {s: [None] * args.seeds for s in specs}
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = None
    if show and is_main():
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc="compare", unit="run", file=sys.stderr)

    def done(spec, seed, history):
        results[spec][seed] = history
        msg = task.describe(spec, seed, history[-1])
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update()
        elif is_main():
            print(msg, file=sys.stderr, flush=True)

    report_only = getattr(args, "report", False)
    if args.resume or report_only:  # reuse finished runs; with --resume a run with checkpoints goes through its checks
        recorded = recorded_runs(out, budget)
        todo = []
        for spec, seed, config, run_dir in runs:
            history = None if args.resume and list_checkpoints(run_dir / "checkpoints") else \
                finished_history(run_dir, config)
            history = history or recorded.get((spec, seed))
            if history is not None and len(history) == config["epochs"]:
                done(spec, seed, history)
            elif not report_only:
                todo.append((spec, seed, config, run_dir))
        runs = todo
    runner = functools.partial(run, task, tensorboard=tensorboard_wanted(args))
    try:
        if jobs == 1:
            loaded: dict[int, object] = {}
            for spec, seed, config, run_dir in runs:
                if seed not in loaded:
                    loaded.clear()
                    loaded[seed] = data if data is not None else task.load(config)
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


#: settings that change no result: a finished run trained with other values is still reused, and a second
#: ``compare --storage`` may give other values for runs already enqueued (:mod:`maxup.cli.grid`)
FREE_KEYS = ("data_dir", "device", "eval_every", "compile", "channels_last", "tf32")


def finished_history(run_dir: Path, config: dict) -> list[dict] | None:
    """The history in ``run_dir/metrics.jsonl`` when the run finished its ``config["epochs"]``, else None. A run
    whose ``config.yaml`` records other settings than ``config`` (besides :data:`FREE_KEYS`) is an error naming
    them: its numbers would be reported as this comparison's."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not (len(history) == config["epochs"] and history[-1].get("epoch") == config["epochs"]):
        return None
    saved_path = Path(run_dir) / "config.yaml"
    saved = read_yaml(saved_path, f"the settings of {run_dir}") if saved_path.is_file() else None
    if isinstance(saved, dict):
        now, missing = plain(config), "(not set)"
        changed = [f"{k} {saved.get(k, missing)!r} -> {now[k]!r}" for k in now
                   if k not in FREE_KEYS and saved.get(k, missing) != now[k]]
        if changed:
            raise ValueError(f"{run_dir} holds a finished run with other settings: {', '.join(changed)}. Give the "
                             "options it was trained with, or another --out")
    return history


# ------------------------------------------------------------------------------------------ the command


def compare(args) -> list[dict]:
    """``maxup compare``: the methods of ``--methods`` (or the task's defaults) with ``--seeds`` seeds on
    ``--task``; prints the table and writes results.md, results.json and results.png into ``--out``."""
    from . import grid

    if args.suite:
        load_suite(args)
    grid.check_compare_args(args)
    task = get_task(args.task)
    fill_task_defaults(args, task.compare_defaults(args))
    specs = comparison_specs(args, list(args.methods or task.default_methods), with_budget(task.method))
    data = task.shared_data(args)
    start = time.perf_counter()
    budget = task.budget(args, data)
    if getattr(args, "storage", None):  # the grid goes into a shared database; `maxup worker` trains it
        return grid.compare_on_storage(task, args, specs, budget, start)
    results, missing = run_comparison(task, args, specs, budget, data)
    return report(task, results, Path(args.out), budget, start, missing=missing)


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``compare`` command."""
    defaults = IMAGE.default_methods
    p = sub.add_parser("compare", help="train several methods with several seeds under the same budget",
                       description="Train each method with each seed under the same budget; print a table and write "
                                   "results.json, results.md and results.png into --out. With no arguments: "
                                   f"{', '.join(defaults)} on digits (100 training images, 60 epochs, batch 32: "
                                   "plain training fits them, the test set leaves room), three seeds.")
    add_image_options(p, IMAGE.defaults)
    p.add_argument("--task", choices=tuple(TASKS), default=IMAGE.name,
                   help="image: --dataset and --model (default); lm: word-level language modelling on --corpus "
                        "with the LSTM, perplexity as the metric, the optimisation defaults of `maxup lm`")
    add_corpus_options(p)
    by_task = dict.fromkeys(k for t in TASKS.values() for k in (*t.defaults, "train_size"))
    p.set_defaults(**{k: TASK_DEFAULT for k in by_task})
    p.add_argument("--methods", type=methods_arg, default=None,
                   help="comma-separated method specs (default: " + ",".join(defaults) + ")")
    p.add_argument("--suite", default=None, help="YAML file with a list 'methods:' (and optionally any other option)")
    p.add_argument("--seeds", type=POSITIVE_INT, default=3, help="seeds per method: 0..N-1 (default: 3)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs in --out and continue the unfinished ones (same settings; more "
                        "--epochs may be given)")
    add_force_option(p)
    p.add_argument("--report", action="store_true",
                   help="train nothing: summarise the runs in --out that have finished (a grid still running, or "
                        "one whose run directories were copied from another machine)")
    p.add_argument("--jobs", "--workers", dest="jobs", type=POSITIVE_INT, default=1,
                   help="runs trained side by side in worker processes (default: 1); e.g. several small runs on one "
                        "GPU, or one per core with one thread each; the same runs, seed for seed, as one process")
    add_tensorboard_option(p)
    from .grid import add_compare_options

    add_compare_options(p)
    p.set_defaults(func=compare)
    return p
