"""Atomic checkpoints that load with ``torch.load(weights_only=True)``, and RNG state capture.

A checkpoint is written to a temporary file in the same directory, flushed and
fsynced, then renamed over the final name with ``os.replace`` (and the directory
fsynced), so a crash or a failed write never leaves a half-written
``epoch-NNNN.pt`` and never replaces a good one. Everything inside is plain
Python (dict, list, tuple, int, float, str, bool, None) or tensors.

Every checkpoint carries a SHA-256 checksum of its content (every tensor's bytes, dtype
and shape, and every plain value), verified on load: a flipped byte inside a tensor is
an error naming the file, not a silently different model. A checkpoint is *good* when
it loads, matches its checksum, and every tensor and metric in it is finite
(:func:`nonfinite_entries`); :func:`load_latest_good` finds the newest good one.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import random
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "epoch", "global_step", "model", "optimizer", "step", "history", "rng")
_NAME = re.compile(r"^epoch-(\d+)\.pt$")
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.\d+\.tmp$")  # .<final name>.<pid>.tmp, as atomic_write names them


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, read, or used; the message names the file and what to do.
    ``reason`` says what is wrong with the file, without the advice (empty when not about one file)."""

    reason = ""


def _bad(path: Path, reason: str) -> CheckpointError:
    """The error for a checkpoint ``path`` that ``reason`` (e.g. "is corrupt: ...") makes unusable."""
    err = CheckpointError(f"checkpoint {path} {reason}. {_advice(path)}")
    err.reason = reason
    return err


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
    except BaseException as err:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(err, OSError):
            raise naming(err, path) from err
        raise
    _fsync_dir(path.parent)
    return path


def naming(err: OSError, path) -> OSError:
    """``err`` naming ``path`` (a failed write raises without a file name, or with the temporary one)."""
    if err.errno is None or (err.filename is not None and not str(err.filename).endswith(_TMP_SUFFIX)):
        return err
    return type(err)(err.errno, err.strerror or os.strerror(err.errno), str(path))


def describe_os_error(err: OSError) -> str:
    """A one-line reason: "no space left on device" for a full disk, else the system's words."""
    if err.errno == errno.ENOSPC:
        return "no space left on device"
    return (err.strerror or str(err)).strip()


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
    state = {**state, "checksum": checksum(state)}
    try:
        return atomic_write(path, lambda f: torch.save(state, f))
    except Exception as err:
        others = [p.name for p in list_checkpoints(path.parent)]
        kept = f"the existing checkpoints ({', '.join(others)}) are intact" if others else "no checkpoint was written"
        reason = (describe_os_error(err) if isinstance(err, OSError) and err.errno is not None
                  else f"{type(err).__name__}: {err}")
        raise CheckpointError(f"could not write checkpoint {path}: {reason}. "
                              f"Nothing was replaced; {kept}. Free disk space or fix the error, "
                              "then resume with resume=True.") from err


def checksum(state: dict) -> str:
    """SHA-256 of a checkpoint's content (its ``"checksum"`` entry left out): every tensor's dtype, shape
    and bytes, every plain value's type and ``repr``, in a fixed order."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return "sha256:" + h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _feed(h, v)
    else:
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text};".encode())


def nonfinite_entries(state: dict, *, skip: tuple[str, ...] = ()) -> list[str]:
    """The names of the non-finite entries of a training state: floating tensors anywhere in ``model``,
    ``optimizer``, ``scheduler`` and ``step`` (e.g. ``model.bn.running_var``), and metrics of its
    ``history`` (e.g. ``history[epoch 3].test_loss``; keys in ``skip`` and perplexities, which overflow
    for finite losses, are not checked). Empty for a good state."""
    tensors: list[tuple[str, torch.Tensor]] = []

    def walk(name: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex():
                tensors.append((name, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{name}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{name}.{i}", v)

    for key in ("model", "optimizer", "scheduler", "step"):
        walk(key, state.get(key))
    bad = []
    if tensors:  # one host synchronisation for all of them
        finite = torch.stack([torch.isfinite(t).all().to("cpu") for _, t in tensors]).tolist()
        bad = [name for (name, _), ok in zip(tensors, finite) if not ok]
    for record in state.get("history") or []:
        for key, value in record.items():
            if (key not in skip and not key.endswith("perplexity") and isinstance(value, float)
                    and not math.isfinite(value)):
                bad.append(f"history[epoch {record.get('epoch', '?')}].{key}")
    return bad


def _advice(path: Path) -> str:
    """Which file to delete, and what the run then resumes from."""
    found = list_checkpoints(path.parent)
    m = _NAME.match(path.name)
    earlier = [p for p in found if m and int(_NAME.match(p.name).group(1)) < int(m.group(1))]
    if earlier:
        return (f"The previous checkpoint is {earlier[-1].name}: resume=True (maxup --resume) falls back to it "
                f"when it is good; or delete {path} yourself (checkpoints in {path.parent}: "
                f"{', '.join(p.name for p in found)}).")
    return f"Delete {path} to start the run from scratch (there is no earlier checkpoint in {path.parent})."


#: the type each entry of a checkpoint must have
_FIELD_TYPES = {"epoch": int, "global_step": int, "model": dict, "optimizer": dict, "step": dict, "history": list,
                "rng": list}


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
        reason = " ".join(str(err).split())  # torch's whole message, on one line
        raise _bad(path, f"is corrupt or incomplete and cannot be loaded ({type(err).__name__}: {reason})") from err
    if not isinstance(state, dict):
        raise _bad(path, f"does not hold a maxup training state (found a {type(state).__name__})")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise _bad(path, f"is incomplete: it lacks {', '.join(missing)}")
    if state["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state['format']!r}; this maxup reads format "
                              f"{FORMAT_VERSION}. Resume it with the maxup version that wrote it.")
    for key, kind in _FIELD_TYPES.items():
        value = state[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise _bad(path, f"is corrupt: its entry {key!r} must be "
                             f"{'an int >= 0' if kind is int else 'a ' + kind.__name__}, found "
                             f"{type(value).__name__} {value!r:.80}")
    if not all(isinstance(r, dict) for r in state["history"]) or not all(isinstance(r, dict) for r in state["rng"]):
        raise _bad(path, "is corrupt: its 'history' and 'rng' entries must be lists of dicts")
    if "checksum" in state:  # checkpoints of maxup versions before checksums have none
        if state["checksum"] != checksum(state):
            raise _bad(path, "is corrupt: its content does not match its checksum (bytes changed after it was "
                             "written)")
    return state


def load_latest_good(directory, *, skip: tuple[str, ...] = (), map_location="cpu"):
    """``(state, path, skipped)``: the newest checkpoint in ``directory`` that loads, matches its checksum
    and is finite (see :func:`nonfinite_entries`), and one line per newer checkpoint passed over and why.
    ``(None, None, [])`` when there is no checkpoint.

    Raises:
        CheckpointError: no checkpoint is good; the message is the newest one's problem.
    """
    found = list_checkpoints(directory)
    skipped: list[str] = []
    first_error: CheckpointError | None = None
    for path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            first_error = first_error or err
            skipped.append(f"checkpoint {path} {err.reason}" if err.reason else str(err))
            continue
        bad = nonfinite_entries(state, skip=skip)
        if bad:
            err = _bad(path, f"holds non-finite values ({_names(bad)})")
            first_error = first_error or err
            skipped.append(f"checkpoint {path} {err.reason}")
            continue
        return state, path, skipped
    if first_error is not None:
        raise first_error
    return None, None, []


def last_good_checkpoint(directory, *, skip: tuple[str, ...] = ()) -> Path | None:
    """The newest good checkpoint in ``directory`` (see :func:`load_latest_good`), or None."""
    try:
        return load_latest_good(directory, skip=skip)[1]
    except CheckpointError:
        return None


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


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
    "checksum", "describe_os_error", "last_good_checkpoint", "latest_checkpoint", "list_checkpoints",
    "load_checkpoint", "load_latest_good", "naming", "nonfinite_entries", "prune_checkpoints",
    "remove_stale_temporaries", "restore_rng", "save_checkpoint",
]
