"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG state capture.

A checkpoint is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the final name with ``os.replace`` (and the directory
fsynced), so a crash or a failed write never leaves a half-written
``epoch-NNNN.pt`` and never replaces a good one. Everything inside is plain
Python (dict, list, tuple, int, float, str, bool, None) or tensors.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "global_step", "model", "optimizer", "step", "history", "rng")
_NAME = re.compile(r"^epoch-(\d+)\.pt$")
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")  # .<final name>.<pid>.tmp, as atomic_write names them


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or used; the message names the file and what to do."""


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{int(epoch):04d}.pt"


def list_checkpoints(directory) -> list[Path]:
    """The ``epoch-NNNN.pt`` files in ``directory``, oldest epoch first (empty if it does not exist)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory) -> Path | None:
    """The newest ``epoch-NNNN.pt`` in ``directory``, or ``None``."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, and rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(directory) -> list[Path]:
    """Delete temporary files left by a writer that was killed mid-write (only one run writes a directory)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if _TMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` atomically to ``path`` with ``torch.save``.

    Raises:
        CheckpointError: the write failed; ``path`` (and every other checkpoint) is unchanged.
    """
    path = Path(path)
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except Exception as err:
        others = [p.name for p in list_checkpoints(path.parent)]
        kept = f"the existing checkpoints ({', '.join(others)}) are intact" if others else "no checkpoint was written"
        raise CheckpointError(f"could not write checkpoint {path}: {type(err).__name__}: {err}. "
                              f"Nothing was replaced; {kept}. Free disk space or fix the error, "
                              "then resume with resume=True.") from err


def _advice(path: Path) -> str:
    """Which file to delete, and what the run then resumes from."""
    found = list_checkpoints(path.parent)
    m = _NAME.match(path.name)
    earlier = [p for p in found if m and int(_NAME.match(p.name).group(1)) < int(m.group(1))]
    if earlier:
        return (f"Delete {path} to resume from the previous checkpoint {earlier[-1].name} "
                f"(checkpoints in {path.parent}: {', '.join(p.name for p in found)}).")
    return f"Delete {path} to start the run from scratch (there is no earlier checkpoint in {path.parent})."


def load_checkpoint(path, *, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or lacks a required entry;
            the message names the file and tells which one to delete to resume from the
            previous checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete and cannot be loaded "
                              f"({type(err).__name__}: {reason[:300]}). {_advice(path)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a maxup training state "
                              f"(found a {type(state).__name__}). {_advice(path)}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}. {_advice(path)}")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}; this maxup reads format "
                              f"{FORMAT_VERSION}. Resume it with the maxup version that wrote it.")
    return state


def prune_checkpoints(directory, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints; returns the deleted paths."""
    found = list_checkpoints(directory)
    old = found[:-keep] if keep > 0 else found
    for p in old:
        p.unlink(missing_ok=True)
    return old


# --------------------------------------------------------------------------- RNG states


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """Every RNG state as plain values and tensors: torch CPU, CUDA (if available), ``generator`` (and the
    host generator of a :class:`maxup.functional._random.DeviceGenerator`), Python ``random`` and numpy's
    global ``RandomState``."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": int(version), "state": [int(v) for v in internal], "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    if generator is not None:
        state["generator"] = generator.get_state()
        state["generator_device"] = generator.device.type
        host = getattr(generator, "host", None)  # a DeviceGenerator's CPU generator for host-side choices
        if host is not None:
            state["host_generator"] = host.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    """Set every RNG from a :func:`capture_rng` state."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"the checkpoint holds {len(state['cuda'])} CUDA RNG states but this machine has "
                          f"{torch.cuda.device_count()} GPUs; CUDA RNG states not restored", stacklevel=3)
    if generator is not None and "generator" in state:
        saved = state.get("generator_device", "cpu")
        if saved != generator.device.type:
            warnings.warn(f"the checkpoint's augmentation generator ran on {saved}, this run's on "
                          f"{generator.device.type}: its state cannot carry over, the randomness starts afresh",
                          stacklevel=3)
        else:
            generator.set_state(state["generator"])
        host = getattr(generator, "host", None)
        if host is not None and "host_generator" in state:
            host.set_state(state["host_generator"])


__all__ = [
    "CheckpointError", "FORMAT_VERSION", "atomic_write", "atomic_write_text", "capture_rng", "checkpoint_name",
    "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints", "remove_stale_temporaries",
    "restore_rng", "save_checkpoint",
]
