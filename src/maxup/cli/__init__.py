"""The ``maxup`` command line (see :mod:`maxup.cli.main`; this package only re-exports)."""
from .catalog import method_line
from .main import build_parser, main
from .options import methods_arg as _methods_arg  # noqa: F401  (the --methods splitter: tests and cards)

__all__ = ["build_parser", "main", "method_line"]
