"""The files of the command line: the ``--out`` folder a command may write into, and YAML read safely.

Nothing here imports another module of :mod:`maxup.cli`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..train import list_checkpoints


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a maxup training run: checkpoints, or a config.yaml that maxup wrote."""
    if list_checkpoints(out / "checkpoints"):
        return True
    try:
        import yaml

        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except Exception:  # missing, unreadable or not YAML: not a maxup run
        return False
    return isinstance(config, dict) and "method" in config and "trainer" in config


def holds_comparison(out: Path) -> bool:
    return (out / "results.json").is_file() or any(p.is_dir() for p in out.glob("*/seed-*"))


def check_writable(out: Path, what: str) -> None:
    """Refuse an ``--out`` that is a file, or below which nothing can be written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose a folder for {what}")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write into {existing} (permission denied or not a folder); "
                         "choose a writable --out")


def check_out(out, *, resume: bool, force: bool, what: str, holds=holds_run) -> None:
    """Refuse an ``--out`` that cannot be written (a file, read-only), or that is not empty and not this
    run's: without ``--resume`` or ``--force`` a non-empty folder is never written into, and ``--resume``
    needs a folder that ``holds`` ``what``."""
    if out is None:
        return
    out = Path(out)
    if resume and force:
        raise ValueError("--resume and --force contradict each other: --resume continues the run in --out, "
                         "--force starts a new one over it")
    check_writable(out, what)
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
