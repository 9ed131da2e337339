"""Training: :class:`Trainer` (epochs, evaluation, metrics files, atomic checkpoints, exact resume, DDP)
and :func:`fit`, the one-call API.

>>> history = maxup.train.fit(model, "maxup(m=4)+cutmix", train=(x, y), test=(x_test, y_test), epochs=30,
...                           out_dir="runs/maxup")
>>> history = maxup.train.fit(model, "maxup(m=4)+cutmix", train=(x, y), test=(x_test, y_test), epochs=30,
...                           out_dir="runs/maxup", resume=True)     # after a crash: continues exactly
"""
from . import distributed
from .api import as_data, fit
from .checkpoint import (
    CheckpointError,
    atomic_write,
    capture_rng,
    last_good_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .metrics import evaluate, expected_calibration_error, perplexity
from .optimizers import make_optimizer, make_scheduler, parameter_groups
from .trainer import TIMING_KEYS, NonFiniteLossError, NonFiniteStateError, Trainer

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "NonFiniteStateError",
    "TIMING_KEYS",
    "Trainer",
    "as_data",
    "atomic_write",
    "capture_rng",
    "distributed",
    "evaluate",
    "expected_calibration_error",
    "fit",
    "last_good_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_optimizer",
    "make_scheduler",
    "parameter_groups",
    "perplexity",
    "restore_rng",
    "save_checkpoint",
]
