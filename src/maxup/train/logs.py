"""The files a run writes next to its checkpoints: metrics.jsonl, metrics.csv, config.yaml, TensorBoard.

Only the main process (rank 0) creates a :class:`RunFiles`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from .checkpoint import atomic_write_text, naming

_TB_WARNED = False


def plain(obj):
    """``obj`` as plain YAML/JSON values: dicts, lists, str, int, float, bool, None (``repr`` otherwise)."""
    if obj is None:
        return None
    for kind in (bool, int, float, str):  # subclasses (torch.__version__, IntEnum) become the plain type
        if isinstance(obj, kind):
            return kind(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return plain(obj.item())
    if isinstance(obj, Enum):
        return plain(obj.value)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return repr(obj)


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def dump_yaml(data: dict) -> str:
    """YAML text of ``data``; JSON (which is valid YAML) when PyYAML is not installed."""
    data = plain(data)
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def csv_text(history: list[dict]) -> str:
    """The history as CSV: one row per epoch, the columns in the order they first appear."""
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in record.items()})
    return buf.getvalue()


def jsonl_line(record: dict) -> str:
    return json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n"


class RunFiles:
    """``metrics.jsonl`` (appended and flushed each epoch), ``metrics.csv`` (rewritten each epoch),
    ``config.yaml`` and, if asked and available, TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, out_dir, *, tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.csv = self.out_dir / "metrics.csv"
        self.config = self.out_dir / "config.yaml"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard not installed
                global _TB_WARNED
                if not _TB_WARNED:
                    warnings.warn(f"log_tensorboard=True but TensorBoard is not available ({err}); "
                                  "skipping TensorBoard logging (pip install tensorboard)", stacklevel=3)
                    _TB_WARNED = True
            else:
                self.writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config, dump_yaml(config))

    def reset(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl and metrics.csv to hold exactly ``history`` (used when a run starts or resumes)."""
        atomic_write_text(self.jsonl, "".join(jsonl_line(r) for r in history))
        if history:
            atomic_write_text(self.csv, csv_text(history))
        else:
            self.csv.unlink(missing_ok=True)

    def append(self, record: dict, history: list[dict]) -> None:
        """Add one epoch: a line to metrics.jsonl, a fresh metrics.csv, TensorBoard scalars."""
        try:
            with open(self.jsonl, "a", encoding="utf-8") as f:
                f.write(jsonl_line(record))
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise naming(err, self.jsonl) from err
        atomic_write_text(self.csv, csv_text(history))
        if self.writer is not None:
            epoch = int(record.get("epoch", len(history)))
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["RunFiles", "csv_text", "dump_yaml", "jsonl_line", "plain"]
