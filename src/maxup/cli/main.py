"""The ``maxup`` command: ``train``, ``compare``, ``tune``, ``certify``, ``robust``, ``lm``, ``lm-corpus`` and
``methods``.

    maxup compare                                   # the main job: six methods on digits, three seeds
    maxup tune --methods "mixup,maxup(m=4)+gaussian" --trials 20    # search specs on a validation split
    maxup train --dataset fashion-mnist --model resnet --method "maxup(m=4)+cutout" --epochs 10 --out runs/a
    maxup certify runs/a runs/b --limit 500         # certified accuracy by randomized smoothing
    maxup robust runs/a runs/b --eps 0.05,0.1       # robust accuracy under a PGD attack
    maxup lm --corpus kjv --method "maxup(m=4)+embed_noise(sigma=0.1)" --out runs/lm   # language modelling
    maxup compare --task lm --corpus kjv --methods "erm,maxup(m=4)+word_dropout(p=0.1)"
    maxup compare --storage postgresql://me@db/maxup --out /shared/c   # a grid for `maxup worker` on many machines
    maxup worker --storage postgresql://me@db/maxup                     # on each machine: train runs until none is left
    maxup methods                                   # every method term and its options
"""
# This module builds the parser and dispatches; each command lives in its own module, which adds its
# sub-command with ``set_defaults(func=...)``: run (train), comparison (compare), lm (lm, lm-corpus),
# certify, catalog (methods). What differs between image classification and language modelling is a
# task (tasks.py); options.py and files.py hold what the commands share.
from __future__ import annotations

import argparse
import sys
import warnings

from ..train import CheckpointError, NonFiniteLossError
from ..train.checkpoint import describe_os_error
from . import catalog, certify, comparison, grid, lm, robust, run, tune


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``maxup: error: ...`` (exit status 2)."""

    def error(self, message: str):
        command = self.prog.partition(" ")[2]
        print(f"maxup: error: {message} (see {'maxup ' + command if command else 'maxup'} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="maxup",
        description="Train networks with MaxUp, the Mixup family and friends; compare methods with seeds.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.set_defaults(func=lambda args: parser.print_help())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run.add_parser(sub)
    comparison.add_parser(sub)
    grid.add_parser(sub)
    tune.add_parser(sub)
    certify.add_parser(sub)
    robust.add_parser(sub)
    lm.add_parsers(sub)
    catalog.add_parser(sub)
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
            args.func(args)
            return 0
        except KeyboardInterrupt:
            print("maxup: interrupted; resume a run with --resume", file=sys.stderr)
            return 130
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            return _error(err, 2)
        except (CheckpointError, NonFiniteLossError, grid.RunsFailed) as err:
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
