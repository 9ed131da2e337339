"""Count the operations of a training step that read a tensor's value on the host.

On a GPU each of them stalls the host until the device catches up: ``.item()``,
``bool(t)``, ``int(t)``, ``float(t)``, ``.tolist()``, ``.numpy()``, ``nonzero``,
boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without an
output size, and copies between devices. :class:`HostSyncCounter` is a
``TorchDispatchMode`` that sees every ATen operation, so it counts these on any device,
a CPU included, where they cost nothing and are otherwise invisible::

    with HostSyncCounter() as counter:
        step(model, x, y, generator)
    counter.reads            # 0 for a step that never waits for the device
    counter.report()         # each read with the line of maxup code that made it

While counting, CPU tensors stand for device tensors: value checks that the library skips on
an accelerator (they would wait for it) are skipped here too, and reads of host data only
(host-side draws, checks of Python numbers) are not counted.

``made`` counts tensors built from Python data (``torch.tensor([...])``,
``torch.as_tensor(0.5)``); on a GPU they become blocking host-to-device copies when
built for the device. Host-to-device copies of tensors that are already on the CPU show
up only on a real GPU (``torch.cuda.set_sync_debug_mode("warn")``; see
``benchmarks/gpu_check.py``).
"""
from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..functional import _random as R
from ..functional._random import in_host_draw

__all__ = ["HostSyncCounter", "count_step_syncs"]

_ALWAYS = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_consecutive", "aten._unique",
    "aten._unique2", "aten.unique_dim", "aten.unique_dim_consecutive", "aten.equal", "aten.is_nonzero",
    "aten.masked_scatter", "aten.argwhere",
}
_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
_MADE = {"aten.lift_fresh", "aten.lift_fresh_copy"}


def _packet(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


def _mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _devices(args, kwargs) -> set:
    found = set()
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, torch.Tensor):
            found.add(a.device.type)
    return found


def _where() -> str:
    """The innermost line of maxup code (or of the caller) on the stack."""
    frames = traceback.extract_stack()[:-3]
    mine = [f for f in frames if "/maxup/" in f.filename.replace("\\", "/") and "/syncs.py" not in f.filename]
    f = (mine or frames)[-1]
    path = f.filename.replace("\\", "/")
    path = path[path.rfind("/maxup/") + 1:] if "/maxup/" in path else path.rsplit("/", 1)[-1]
    return f"{path}:{f.lineno} ({f.name})"


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode counting host reads (``reads``) and tensors made from host data (``made``).

    ``where`` maps ``"op @ file:line (function)"`` to its count, for :meth:`report`. ``.tolist()``,
    ``.numpy()`` and ``__array__`` do not pass through the dispatcher; they are counted by wrapping
    them while the mode is active.
    """

    def __init__(self, *, locate: bool = True):
        super().__init__()
        self.locate = locate
        self.reads = 0
        self.made = 0
        self.where: collections.Counter = collections.Counter()
        self._saved = {}

    def _hit(self, kind: str, name: str) -> None:
        if in_host_draw():  # values drawn on the CPU for a host-side choice: no device to wait for
            return
        if kind == "read":
            self.reads += 1
        else:
            self.made += 1
        if self.locate:
            self.where[f"{kind} {name} @ {_where()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _packet(func)
        if name in _ALWAYS:
            self._hit("read", name)
        elif name in _INDEXING and _mask_index(args):
            self._hit("read", name + "[mask]")
        elif name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None \
                and isinstance(args[0] if args else None, torch.Tensor) and len(args) >= 1 \
                and (len(args) == 1 or isinstance(args[1], torch.Tensor)):
            self._hit("read", name)
        elif name in ("aten._to_copy", "aten.copy_", "aten.to") and len(_devices(args, kwargs)) > 1:
            self._hit("read", name + " across devices")
        elif name in ("aten._to_copy",) and (kwargs or {}).get("device") is not None \
                and isinstance(args[0], torch.Tensor) and torch.device(kwargs["device"]).type != args[0].device.type:
            self._hit("read", name + " across devices")
        elif name in _MADE:
            self._hit("made", name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        counter = self
        for attr in ("tolist", "numpy", "__array__"):
            original = getattr(torch.Tensor, attr)
            self._saved[attr] = original

            def wrapped(t, *a, __original=original, __attr=attr, **k):
                counter._hit("read", f"Tensor.{__attr}")
                return __original(t, *a, **k)

            setattr(torch.Tensor, attr, wrapped)
        R._scope.as_device = getattr(R._scope, "as_device", 0) + 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for attr, original in self._saved.items():
                setattr(torch.Tensor, attr, original)
            self._saved = {}
            R._scope.as_device -= 1

    def report(self) -> str:
        return "\n".join(f"{n:4d}  {k}" for k, n in self.where.most_common())


def count_step_syncs(step, model, x, y, generator=None, *, steps: int = 2, warmup: int = 1) -> HostSyncCounter:
    """Run ``warmup`` steps, then count the host reads of ``steps`` more (divide by ``steps`` for a per-step figure)."""
    for _ in range(warmup):
        step(model, x, y, generator)
    counter = HostSyncCounter()
    with counter:
        for _ in range(steps):
            step(model, x, y, generator)
    return counter
