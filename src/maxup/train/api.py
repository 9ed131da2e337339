"""``maxup.fit``: train a model with a method spec in one call."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import methods
from ..data import DataSplits, TensorData
from . import distributed as D
from .label_metrics import noise_record
from .optimizers import make_optimizer, make_scheduler
from .trainer import Trainer


def as_data(data, name: str) -> TensorData | None:
    """``data`` as a :class:`TensorData`: a TensorData, or an ``(x, y)`` pair of tensors or numpy arrays.

    ``x`` (any sample shape: images, signals, feature vectors) becomes float32 as is
    (no rescaling); ``y`` must hold non-negative integer class labels.
    """
    if data is None or isinstance(data, TensorData):
        return data
    if isinstance(data, DataSplits):
        raise ValueError(f"{name} must be one split: pass splits.train / splits.val / splits.test, not the DataSplits")
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"{name} must be an (x, y) pair of tensors or numpy arrays, or a maxup.data.TensorData; "
                         f"got {type(data).__name__}")
    x, y = (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in data)
    if x.ndim < 2:
        raise ValueError(f"{name}: x must have shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name}: x must hold real numbers, got dtype {x.dtype}")
    if y.ndim != 1:
        raise ValueError(f"{name}: y must have shape (N,), got {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{name}: y must hold integer class labels, got dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: x has {x.shape[0]} samples but y has {y.shape[0]} labels")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{name}: labels must be 0..num_classes-1, found {int(y.min())}")
    return TensorData(x.detach().to(torch.float32).contiguous(), y.detach().to(torch.int64).contiguous())


def fit(model: nn.Module, method: str = "erm", *, train, test=None, val=None, epochs: int = 10, batch_size: int = 128,
        lr: float = 0.05, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
        warmup_epochs: float = 0.0, seed: int = 0, device=None, out_dir=None, amp: str | None = None,
        max_grad_norm: float | None = None, num_classes: int | None = None, progress: bool | None = None,
        resume: bool = False, config: dict | None = None, compile: bool | str = False, channels_last: bool = False,
        tf32: bool = True, log_tensorboard: bool = False, on_epoch=None, sampler="instance",
        class_metrics: bool = False, eval_every: int = 1, robust_eval=None) -> list[dict]:
    """Train ``model`` with a method spec and return the metrics history (one dict per epoch).

    Builds the optimizer (:func:`make_optimizer`), a per-step cosine schedule with linear
    warm-up (:func:`make_scheduler`), the step (:func:`maxup.methods.build_step`) and a
    :class:`Trainer`. ``train``, ``val`` and ``test`` are ``(x, y)`` pairs of tensors or
    numpy arrays of any sample shape (images (N, C, H, W), signals (N, C, L), features
    (N, D)) or :class:`maxup.data.TensorData`. ``num_classes`` defaults to the largest
    label + 1. ``config`` adds entries to the ``config.yaml`` of the run (the CLI records the
    dataset there). See :class:`Trainer` for ``out_dir``, ``resume``, the history keys, the speed
    settings ``compile`` (``torch.compile`` the model), ``channels_last`` and ``tf32`` (CUDA only),
    ``log_tensorboard`` (TensorBoard scalars in ``out_dir/tensorboard``) and ``on_epoch`` (a function
    called with each epoch's record, e.g. to report it to a hyper-parameter search).

    Noisy labels and long tails: pass a training split with noisy labels and its true ones
    (``maxup.data.load_dataset(..., label_noise=0.2).train``, or :func:`maxup.data.add_label_noise`)
    and the history holds the memorisation metrics ``noisy_memorised`` and ``noisy_true_accuracy``;
    ``class_metrics=True`` adds per-class and many/medium/few-shot accuracy; ``sampler`` sets the
    training order (``"instance"``, ``"class"``, ``"sqrt"``, ``"reversed"``; :mod:`maxup.data.sampling`).
    ``eval_every`` evaluates val and test every this many epochs and after the last (default: every epoch);
    ``robust_eval`` (a :class:`maxup.robust.RobustEval`) adds their PGD robust accuracy.
    The sampler and the number of flipped labels are recorded in ``config`` (a resume that changes
    them is refused).

    >>> history = maxup.fit(model, "maxup(m=4)+cutmix", train=(x, y), test=(x_test, y_test), epochs=30)
    >>> len(history)                                  # one record per epoch
    30
    >>> accuracy = history[-1]["test_accuracy"]
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    train_d, val_d, test_d = as_data(train, "train"), as_data(val, "val"), as_data(test, "test")
    if train_d is None or len(train_d) == 0:
        raise ValueError("train is required and must not be empty: an (x, y) pair or a maxup.data.TensorData")
    shapes = {name: tuple(d.x.shape[1:]) for name, d in (("val", val_d), ("test", test_d)) if d is not None}
    for name, shape in shapes.items():
        if shape != tuple(train_d.x.shape[1:]):
            raise ValueError(f"{name} samples have shape {shape} but train samples {tuple(train_d.x.shape[1:])}")
    largest = max(int(d.y.max()) for d in (train_d, val_d, test_d) if d is not None and len(d))
    if num_classes is None:
        num_classes = largest + 1
    device = D.resolve_device(device)
    module = D.unwrap_model(model).to(device)  # the plain network (a compiled model's _orig_mod)
    opt = make_optimizer(module, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    step_options = {k: v for k, v in (("amp", amp), ("max_grad_norm", max_grad_norm)) if v is not None}
    spec = methods.parse(method)
    step = spec.build_step(model=module, optimizer=opt, num_classes=num_classes, train=train_d, **step_options)
    config = {
        "method": str(spec),
        "model": type(module).__name__,
        "epochs": epochs,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "warmup_epochs": warmup_epochs,
        "schedule": "cosine",
        "seed": seed,
        "amp": amp,
        "max_grad_norm": max_grad_norm,
        "num_classes": num_classes,
        **({"sampler": sampler} if sampler != "instance" else {}),
        **({"noisy_train_labels": noise_record(train_d)} if train_d.clean_y is not None else {}),
        **(config or {}),
    }
    trainer = Trainer(model, step, train_d, test=test_d, val=val_d, epochs=epochs, batch_size=batch_size, seed=seed,
                      device=device, out_dir=out_dir, config=config, progress=progress, num_classes=num_classes,
                      compile=compile, channels_last=channels_last, tf32=tf32, average=spec.build_average(module),
                      log_tensorboard=log_tensorboard, on_epoch=on_epoch, sampler=sampler,
                      class_metrics=class_metrics, eval_every=eval_every, robust_eval=robust_eval)
    try:
        trainer.scheduler = make_scheduler(opt, epochs=epochs, steps_per_epoch=trainer.steps_per_epoch,
                                           warmup_epochs=warmup_epochs)
    except BaseException:
        D.cleanup(trainer.dist)
        raise
    return trainer.fit(resume=resume)


__all__ = ["as_data", "fit"]
