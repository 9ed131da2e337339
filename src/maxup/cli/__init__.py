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
import warnings

from .. import methods as M
from ..train import CheckpointError, NonFiniteLossError
from ..train.checkpoint import describe_os_error
from . import certify as C
from . import lm as L
from .run import (DEFAULT_METHODS, IMAGE_DEFAULTS, POSITIVE_INT, TASK_DEFAULT, add_force_option, add_run_dir_options,
                  add_run_options, compare, train)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``maxup: error: ...`` (exit status 2)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        print(f"maxup: error: {message} (see {'maxup ' + command if command else 'maxup'} --help)", file=sys.stderr)
        sys.exit(2)


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
    out = [s for s in out if s]
    if not out:
        raise argparse.ArgumentTypeError("expected comma-separated method specs such as 'erm,mixup', got none")
    return out


def method_line(entry: M.Entry) -> str:
    """One line of ``maxup methods``: the term with every option at its default, then what it does."""
    opts = ", ".join(f"{k}={v!r}" for k, v in entry.options().items())
    call = f"{entry.name}({opts})" if opts else entry.name
    return f"{call} -- {entry.summary}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    p.add_argument("--seeds", type=POSITIVE_INT, default=3, help="seeds per method: 0..N-1 (default: 3)")
    p.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs in --out and continue the unfinished ones (same settings; more "
                        "--epochs may be given)")
    add_force_option(p)
    p.add_argument("--report", action="store_true",
                   help="train nothing: summarise the runs in --out that have finished (a grid still running, or "
                        "one whose run directories were copied from another machine)")
    p.add_argument("--jobs", type=POSITIVE_INT, default=1,
                   help="runs trained side by side in worker processes (default: 1); e.g. several small runs on one "
                        "GPU, or one per core with one thread each")

    C.add_parser(sub)
    L.add_parsers(sub)
    sub.add_parser("methods", aliases=["list"], help="list every method term and its options")
    return parser


def _warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"maxup: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Run the ``maxup`` command. Every error is one line ``maxup: error: ...``: exit status 2 for
    usage errors (a bad option, file or setting), 1 for failures during a run (a corrupt checkpoint,
    a non-finite loss, a full disk)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        if exit_.code == 2:  # Parser.error printed the one line
            return 2
        raise  # --help
    with warnings.catch_warnings():
        warnings.showwarning = _warning
        try:
            return _run(parser, args)
        except KeyboardInterrupt:
            print("maxup: interrupted; resume a run with --resume", file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            return _error(err, 2)
        except (CheckpointError, NonFiniteLossError) as err:
            return _error(err, 1)
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            return _error(f"{describe_os_error(err)}{where}", 1)
        except Exception as err:  # a bug: still one line, with what to report
            return _error(f"unexpected {type(err).__name__}: {err} (this is a bug in maxup; please report it with "
                          "the command line)", 1)


def _error(err, status: int) -> int:
    message = " ".join(str(err).split()) if str(err).strip() else type(err).__name__
    print(f"maxup: error: {message}", file=sys.stderr)
    return status


def _run(parser: argparse.ArgumentParser, args) -> int:
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
    commands = {"train": train, "compare": compare, "certify": C.certify, "lm": L.lm, "lm-corpus": L.lm_corpus}
    if args.command in commands:
        commands[args.command](args)
        return 0
    parser.print_help()
    return 0
