"""``maxup methods``: every method term of the registry with its options at their defaults."""
from __future__ import annotations

from .. import methods as M

#: the sections of the listing: term kind -> title (a kind not named here gets its own section after them)
SECTIONS = {"objective": "objectives", "augment": "augmentations", "step": "steps", "wrapper": "step wrappers"}


def method_line(entry) -> str:
    """One line of ``maxup methods``: the term with every option at its default, what it does, and the ranges
    ``maxup tune`` searches (:attr:`maxup.registry.Traits.search_space`)."""
    opts = ", ".join(f"{k}={v!r}" for k, v in entry.options().items())
    call = f"{entry.name}({opts})" if opts else entry.name
    space = ", ".join(f"{k}={r}" for k, r in entry.search_space().items())
    return f"{call} -- {entry.summary}" + (f" [tune: {space}]" if space else "")


def methods(args) -> None:
    entries = M.list_methods()
    kinds = list(SECTIONS) + sorted({e.kind for e in entries} - set(SECTIONS))
    for kind in kinds:
        group = [e for e in entries if e.kind == kind]
        if group:
            print(f"{SECTIONS.get(kind, kind + 's')}:")
            for e in group:
                print(f"  {method_line(e)}")
    print("compose with '+', e.g. 'maxup(m=4)+cutout(size=8)'; one card per method (formula, reference, "
          "cost, results): docs/methods/<name>.md")


def add_parser(sub):
    p = sub.add_parser("methods", aliases=["list"], help="list every method term and its options")
    p.set_defaults(func=methods)
    return p
