"""DistributedDataParallel helpers for the trainer (torchrun: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

Everything here is a no-op in a single process, so the trainer calls the helpers
unconditionally::

    torchrun --nproc_per_node 2 train.py      # Trainer(...) wraps the model in DDP itself
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def resolve_device(device=None, *, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``; by default ``cuda`` when available (``cuda:LOCAL_RANK`` under
    torchrun), else ``cpu``. A bare ``"cuda"`` under torchrun also becomes ``cuda:LOCAL_RANK``.
    A CUDA device on a machine without one (or a GPU index that does not exist) is a ValueError
    naming ``name`` (the CLI passes ``"--device"``)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch.device or a string such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {str(device)!r}: CUDA is not available on this machine (torch "
                         f"{torch.__version__}); use {name} cpu, or leave it unset")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        device = torch.device("cuda", env_local_rank())
    return device


@dataclass
class DistributedContext:
    """Where this process stands: its rank, the number of processes, and whether it created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistributedContext:
    """Join (or create) the process group when launched with ``WORLD_SIZE > 1``.

    The backend is NCCL on CUDA and Gloo on CPU; on CUDA the process's current device is
    set to ``device``. A group the caller already initialised is used as it is.
    """
    if device.type == "cuda" and (env_world_size() > 1 or is_distributed()):
        torch.cuda.set_device(device)
    if is_distributed():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), env_local_rank(), False)
    if env_world_size() <= 1:
        return DistributedContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistributedContext(dist.get_rank(), dist.get_world_size(), env_local_rank(), owns)


def cleanup(ctx: DistributedContext, *, synchronize: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it.

    With ``synchronize`` (a normal end) every rank first waits at a barrier, so no rank tears
    the group down while another still talks to it; after an error on one rank the
    others may never reach the barrier, so pass ``synchronize=False`` there.
    """
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False


def wrap_model(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group of more than one process, else ``model``.
    ``find_unused_parameters``: some steps leave parameters without a gradient (PADDLES after its phase stop)."""
    if not is_distributed() or isinstance(model, DistributedDataParallel):
        return model
    ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                   find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP, DataParallel and ``torch.compile`` wrappers."""
    from .._modules import unwrap
    return unwrap(model)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all processes (``tensor`` itself in one process)."""
    if not is_distributed():
        return tensor
    buf = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_gather_object(obj) -> list:
    """``[obj_rank0, obj_rank1, ...]`` (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True when ``flag`` is true on any process."""
    t = torch.as_tensor(flag).to(torch.float32).reshape(1)
    return bool(all_reduce_sum(t).item() > 0)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, so all ranks hold one model.

    DDP broadcasts buffers at the start of each forward, then every rank updates its own
    copy from its own batch; after the last step of an epoch they differ until this call.
    """
    if not is_distributed():
        return
    device = _comm_device()
    for b in module.buffers():
        buf = b.detach().to(device, copy=True)
        dist.broadcast(buf, src)
        with torch.no_grad():
            b.copy_(buf.to(b.device))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


__all__ = [
    "DistributedContext", "all_gather_object", "all_reduce_sum", "any_rank", "barrier", "broadcast_buffers", "cleanup",
    "env_local_rank",
    "env_world_size", "get_rank", "get_world_size", "is_distributed", "resolve_device", "setup", "unwrap_model",
    "wrap_model",
]
