"""Package ``__init__`` files that only re-export: every module of the package, imported in order."""
from __future__ import annotations

import importlib
import pkgutil
import sys


def reexport(package: str, namespace: dict, *, first: tuple[str, ...] = ()) -> list[str]:
    """Import every module of ``package`` (``first`` ones first, then the rest by name) and copy each
    module's ``__all__`` into ``namespace``; returns the exported names, sorted."""
    path = sys.modules[package].__path__
    names = [m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_")]
    exported = []
    for name in list(first) + sorted(n for n in names if n not in first):
        module = importlib.import_module(f"{package}.{name}")
        for attr in getattr(module, "__all__", ()):
            namespace[attr] = getattr(module, attr)
            exported.append(attr)
    return sorted(set(exported))
