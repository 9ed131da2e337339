"""The ``maxup`` command: ``train``, ``compare``, ``certify``, ``lm``, ``lm-corpus`` and ``methods``.

    maxup compare                                   # the main job: six methods on digits, three seeds
    maxup train --dataset fashion-mnist --model resnet --method "maxup(m=4)+cutout" --epochs 10 --out runs/a
    maxup certify runs/a runs/b --limit 500         # certified accuracy by randomized smoothing
    maxup lm --corpus kjv --method "maxup(m=4)+embed_noise(sigma=0.1)" --out runs/lm   # language modelling
    maxup compare --task lm --corpus kjv --methods "erm,maxup(m=4)+word_dropout(p=0.1)"
    maxup methods                                   # every method term and its options
"""
from __future__ import annotations

import argparse
import sys

from .. import methods as M
from . import certify as C
from . import lm as L
from .run import DEFAULT_METHODS, IMAGE_DEFAULTS, TASK_DEFAULT, add_run_dir_options, add_run_options, compare, train


def _methods_arg(text: str) -> list[str]:
    """Split ``a,b(x=1, y=2),c`` on the commas outside parentheses."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [s for s in out if s]


def method_line(entry: M.Entry) -> str:
    """One line of ``maxup methods``: the term with every option at its default, then what it does."""
    opts = ", ".join(f"{k}={v!r}" for k, v in entry.options().items())
    call = f"{entry.name}({opts})" if opts else entry.name
    return f"{call} -- {entry.summary}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maxup", description="Train networks with MaxUp, the Mixup family and friends; compare methods with seeds.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one method and write a run directory",
                       description="Train one method; writes metrics, config and checkpoints into --out.")
    add_run_options(p)
    p.add_argument("--method", default="erm", help="method spec, e.g. 'maxup(m=4)+cutout(size=8)' (default: erm)")
    add_run_dir_options(p)

    p = sub.add_parser("compare", help="train several methods with several seeds under the same budget",
                       description="Train each method with each seed under the same budget; print a table and write "
                                   "results.json, results.md and results.png into --out. With no arguments: "
                                   f"{', '.join(DEFAULT_METHODS)} on digits (100 training images, 60 epochs, batch 32: "
                                   "plain training fits them, the test set leaves room), three seeds.")
    add_run_options(p)
    p.add_argument("--task", choices=("image", "lm"), default="image",
                   help="image: --dataset and --model (default); lm: word-level language modelling on --corpus "
                        "with the LSTM, perplexity as the metric, the optimisation defaults of `maxup lm`")
    L.add_corpus_options(p)
    p.set_defaults(**{k: TASK_DEFAULT for k in (*IMAGE_DEFAULTS, "train_size")})
    p.add_argument("--methods", type=_methods_arg, default=None,
                   help="comma-separated method specs (default: " + ",".join(DEFAULT_METHODS) + ")")
    p.add_argument("--suite", default=None, help="YAML file with a list 'methods:' (and optionally any other option)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method: 0..N-1 (default: 3)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs in --out and continue the unfinished ones")
    p.add_argument("--report", action="store_true",
                   help="train nothing: summarise the runs in --out that have finished (a grid still running, or "
                        "one whose run directories were copied from another machine)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained side by side in worker processes (default: 1); e.g. several small runs on one "
                        "GPU, or one per core with one thread each")

    C.add_parser(sub)
    L.add_parsers(sub)
    sub.add_parser("methods", aliases=["list"], help="list every method term and its options")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("methods", "list"):
            kinds = {"objective": "objectives", "augment": "augmentations", "step": "steps"}
            for kind, title in kinds.items():
                print(f"{title}:")
                for e in M.list_methods():
                    if e.kind == kind:
                        print(f"  {method_line(e)}")
            print("compose with '+', e.g. 'maxup(m=4)+cutout(size=8)'; one card per method (formula, reference, "
                  "cost, results): docs/methods/<name>.md")
            return 0
        if args.command == "train":
            train(args)
            return 0
        if args.command == "compare":
            compare(args)
            return 0
        if args.command == "certify":
            C.certify(args)
            return 0
        if args.command == "lm":
            L.lm(args)
            return 0
        if args.command == "lm-corpus":
            L.lm_corpus(args)
            return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"maxup: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maxup: interrupted; resume a run with --resume", file=sys.stderr)
        return 130
    parser.print_help()
    return 0
