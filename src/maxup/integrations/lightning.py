"""PyTorch Lightning: train a LightningModule with any maxup step (MaxUp, SAM, GradAug, the mixing family).

Methods that need several passes per batch (MaxUp's selection, SAM's two passes, GradAug's
sub-networks) own their optimizer update, so the module runs under Lightning's *manual
optimization*: ``training_step`` calls the maxup step, which does ``zero_grad``, the passes,
clipping and one optimizer step. Everything else stays Lightning's: the data module, loggers,
callbacks, checkpoints, devices.

Three ways in, from most to least done for you:

- :class:`MaxUpModule`: a complete LightningModule around your network
  (``MaxUpModule(model, "sam+maxup(m=4)+cutmix", num_classes=10)``): optimizer and learning-rate
  schedule, training with the method, validation and test with cross-entropy and accuracy;
- :class:`MaxUpMixin`: for your own LightningModule: call :meth:`MaxUpMixin.init_maxup` in
  ``__init__`` and ``self.maxup_training_step(batch)`` in ``training_step``;
- :func:`maxup_training_step`: one call inside ``training_step`` with a step you built yourself.

What the module keeps and checkpoints (``checkpoint["maxup"]``, through ``on_save_checkpoint`` /
``on_load_checkpoint``): the step's state (SAM's counters, the fp16 scaler), the augmentation
generator (a :class:`~maxup.functional._random.DeviceGenerator` seeded from ``(seed, rank)`` as
in :class:`maxup.train.Trainer`), the global torch, Python and numpy RNG states (dropout and the
DataLoader's shuffling draw from them), and the weight average of the spec (``ema``, ``swa``).
``Trainer.fit(module, ckpt_path=...)`` from a checkpoint saved at the end of an epoch then
continues exactly: on CPU the final weights equal those of an uninterrupted run. A checkpoint
saved inside an epoch resumes as well, but unless the DataLoader is resumable (``state_dict`` /
``load_state_dict``) Lightning reads the rest of that epoch from a fresh pass over the loader (and
warns), so the batches, and the weights, differ from an uninterrupted run.

The Lightning optimizer: the step is handed ``self.optimizers()``, Lightning's wrapper of the
optimizer that ``configure_optimizers`` returned. It is an instance of the optimizer's class
and delegates ``param_groups`` and ``state`` to it; its ``step()`` steps the wrapped optimizer
exactly once and counts ``trainer.global_step`` (so ``max_steps`` works) and runs the
``on_before_optimizer_step`` hooks. Nothing else steps it.

Limits: one optimizer; one process (DDP: use :class:`maxup.train.Trainer` under ``torchrun``);
mixed precision through the step (``amp="bf16"`` or ``amp="fp16"``, which keeps its own
GradScaler) or Lightning's ``precision="bf16-mixed"``, not Lightning's ``"16-mixed"`` (its scaler
would unscale gradients the step never scaled); gradient clipping through ``max_grad_norm``
(Lightning refuses ``gradient_clip_val`` under manual optimization, as it refuses
``accumulate_grad_batches``; SAM's ``accumulation_steps`` splits a batch instead).

Needs ``pip install "maxup[lightning]"`` (``lightning>=2.1``).

>>> net = maxup.models.SmallCNN(in_channels=1, num_classes=10, channels=(8, 16, 32))
>>> module = MaxUpModule(net, "sam+maxup(m=2)+cutmix", num_classes=10, lr=0.05, scheduler="cosine")
>>> trainer = lightning.Trainer(max_steps=100, accelerator="cpu")       # doctest: +SKIP
>>> trainer.fit(module, train_loader, val_loader)                        # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import lightning
    from lightning.pytorch.core.optimizer import LightningOptimizer
except ImportError as err:  # an optional extra
    raise ImportError("maxup.integrations.lightning needs PyTorch Lightning: pip install \"maxup[lightning]\" "
                      "(or pip install \"lightning>=2.1\")") from err

from .._checks import check_int
from ..averaging import SWA, WeightAverage
from ..functional._random import DeviceGenerator
from ..methods import Spec, parse
from ..objectives import ObjectiveResult
from ..train.api import as_data
from ..train.checkpoint import capture_rng, restore_rng
from ..train.optimizers import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from ..train.trainer import epoch_end_hooks, epoch_hooks, generator_seed, host_generator_seed

__all__ = ["MaxUpMixin", "MaxUpModule", "maxup_training_step"]

#: the key of the maxup state in a Lightning checkpoint
CHECKPOINT_KEY = "maxup"


def _unpack(batch):
    """``(x, y)`` from a batch: a pair (or longer tuple/list whose first two items are inputs and labels) or a
    dict with ``"x"``/``"y"`` (or ``"input"``/``"target"``) keys."""
    if isinstance(batch, dict):
        for xk, yk in (("x", "y"), ("input", "target"), ("inputs", "targets")):
            if xk in batch and yk in batch:
                return batch[xk], batch[yk]
        raise ValueError(f"a dict batch needs the keys 'x' and 'y' (or 'input' and 'target'), got {sorted(batch)}")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(f"a batch must be (inputs, labels) or a dict with 'x' and 'y', got {type(batch).__name__}")


def _schedulers(module) -> list:
    found = module.lr_schedulers()
    if found is None:
        return []
    return list(found) if isinstance(found, (list, tuple)) else [found]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The share of rows whose argmax is the label (soft targets: their argmax), as a tensor (no host read)."""
    labels = targets.argmax(-1) if targets.is_floating_point() else targets
    return (logits.argmax(-1) == labels).float().mean()


def maxup_training_step(module: lightning.LightningModule, batch, step, generator: torch.Generator | None = None, *,
                        model: nn.Module | None = None, step_scheduler: bool = True, log: bool = True,
                        prefix: str = "train") -> ObjectiveResult:
    """One training step of a manually optimized LightningModule with a maxup step; call it in ``training_step``.

    ``step(model, x, y, generator)`` does ``zero_grad``, the method's passes, clipping and one
    optimizer step; build it on ``module.optimizers()`` (Lightning's optimizer wrapper: its
    ``step()`` counts ``trainer.global_step``), for example in ``on_train_start``. Then every
    scheduler of ``module.lr_schedulers()`` steps once (``step_scheduler``) and
    ``{prefix}_loss`` / ``{prefix}_accuracy`` are logged (accuracy on the augmented rows, against the
    argmax of soft targets). The step's state and ``generator`` are not checkpointed here: use
    :class:`MaxUpMixin` for that.

    Args:
        module: the LightningModule (``automatic_optimization = False``).
        batch: ``(x, y)`` (more items are ignored) or a dict with ``"x"`` and ``"y"``.
        step: a maxup step, e.g. ``maxup.methods.build_step(spec, model=..., optimizer=module.optimizers(), ...)``.
        generator: the augmentation randomness (a seeded ``torch.Generator`` on the module's device).
        model: the network to train (default: ``module`` itself, through its ``forward``).

    Returns the step's :class:`~maxup.objectives.ObjectiveResult` (``loss``, ``logits``, ``targets``, ...).
    """
    if module.automatic_optimization:
        raise ValueError("maxup steps own the optimizer update: set self.automatic_optimization = False in the "
                         "LightningModule's __init__")
    if not callable(step) or not isinstance(getattr(step, "optimizer", None), torch.optim.Optimizer):
        raise ValueError("step must be a maxup step, e.g. maxup.methods.build_step(spec, model=..., "
                         "optimizer=self.optimizers(), num_classes=...)")
    if not isinstance(step.optimizer, LightningOptimizer):
        raise ValueError("build the step on self.optimizers() (Lightning's optimizer wrapper), not on the optimizer "
                         "itself: Lightning counts trainer.global_step (and max_steps) in the wrapper's step()")
    x, y = _unpack(batch)
    result = step(module if model is None else model, x, y, generator)
    if step_scheduler:
        for scheduler in _schedulers(module):
            scheduler.step()
    if log:
        n = x.shape[0]
        module.log(f"{prefix}_loss", result.loss.detach().float(), prog_bar=True, batch_size=n)
        module.log(f"{prefix}_accuracy", accuracy(result.logits.detach(), result.targets), batch_size=n)
    return result


class MaxUpMixin:
    """Train your own LightningModule with a maxup method: the step, its generator and weight average, checkpointed.

    Put it before ``LightningModule`` in the bases, call :meth:`init_maxup` in ``__init__`` and
    :meth:`maxup_training_step` in ``training_step``; ``configure_optimizers`` stays yours (one
    optimizer, optionally schedulers, stepped after every optimizer step). The mixin builds the
    step on ``self.optimizers()`` in ``on_train_start``, seeds the generator, builds the spec's
    weight average, and saves and restores all of them (with the global RNG states) in Lightning
    checkpoints. Overriding one of its hooks (``on_fit_start``, ``on_train_start``,
    ``on_train_epoch_end``, ``on_save_checkpoint``, ``on_load_checkpoint``)? Call ``super()``.

    >>> class Net(MaxUpMixin, lightning.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = maxup.models.SmallCNN(in_channels=1, num_classes=10, channels=(8, 16, 32))
    ...         self.init_maxup("maxup(m=2)+cutmix", num_classes=10, model=self.net, seed=0)
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.05)
    ...     def training_step(self, batch, batch_idx):
    ...         return self.maxup_training_step(batch).loss.detach()
    >>> Net().automatic_optimization
    False
    """

    def init_maxup(self, method: str | Spec = "erm", *, num_classes: int, model: nn.Module | None = None,
                   seed: int = 0, max_grad_norm: float | None = None, amp: str | None = None,
                   step_scheduler: bool = True, log: bool = True, train=None, **step_options) -> None:
        """Set up maxup training (call in ``__init__``, after ``super().__init__()``); turns off automatic
        optimization.

        Args:
            method: a method spec (:mod:`maxup.methods`), e.g. ``"sam+maxup(m=4)+cutmix+ema"``.
            num_classes: the number of classes (the mixing augmentations build soft targets).
            model: the network the step trains (a submodule); default: the LightningModule itself.
            seed: seeds the augmentation generator (with the process's rank).
            max_grad_norm, amp, step_options: go to the step (:meth:`maxup.methods.Spec.build_step`).
            step_scheduler: step the module's schedulers after every optimizer step.
            log: log ``train_loss`` and ``train_accuracy`` every step.
            train: the training set, ``(x, y)`` or a :class:`maxup.data.TensorData`, for the terms that read it:
                the class counts of the long-tail losses, CMO's minority draws, bootstrap's fit on the training
                losses after every epoch. The terms that follow the epoch (CMO, class-distance mixing, PADDLES)
                read the Trainer's ``max_epochs``.
        """
        self.automatic_optimization = False
        spec = parse(method)
        # a plain dict: the model must not be registered a second time as a submodule of the LightningModule
        self._maxup = {
            "spec": spec,
            "num_classes": check_int("num_classes", num_classes),
            "model": model,
            "seed": check_int("seed", seed, minimum=0),
            "step_options": {"max_grad_norm": max_grad_norm, "amp": amp, **step_options},
            "train": as_data(train, "train"),
            "step_scheduler": bool(step_scheduler),
            "log": bool(log),
            "step": None,
            "generator": None,
            "average": None,
            "pending": None,
        }

    # ------------------------------------------------------------------ what it holds

    def _maxup_parts(self) -> dict:
        parts = self.__dict__.get("_maxup")
        if parts is None:
            raise RuntimeError(f"{type(self).__name__} uses MaxUpMixin but never called self.init_maxup(...) in "
                               "its __init__")
        return parts

    @property
    def maxup_spec(self) -> Spec:
        """The parsed method spec."""
        return self._maxup_parts()["spec"]

    @property
    def maxup_model(self) -> nn.Module:
        """The network the step trains."""
        model = self._maxup_parts()["model"]
        return self if model is None else model

    @property
    def maxup_step(self):
        """The maxup step (built in ``on_train_start``; None before)."""
        return self._maxup_parts()["step"]

    @property
    def maxup_generator(self) -> torch.Generator | None:
        """The augmentation generator (built in ``on_train_start``; None before)."""
        return self._maxup_parts()["generator"]

    @property
    def maxup_average(self) -> WeightAverage | None:
        """The spec's weight average (``ema``, ``swa``), or None."""
        return self._maxup_parts()["average"]

    def _maxup_optimizer(self):
        optimizers = self.optimizers()
        if isinstance(optimizers, (list, tuple)):
            if len(optimizers) != 1:
                raise ValueError(f"a maxup step trains with one optimizer; configure_optimizers returned "
                                 f"{len(optimizers)}")
            optimizers = optimizers[0]
        return optimizers

    def _maxup_build(self, *, step: bool) -> None:
        """Build the average and (with ``step``) the generator and the step where missing, then apply a pending
        checkpoint state to the parts that exist. The step is rebuilt when this fit's optimizer is new (a second
        ``Trainer.fit`` with the same module), keeping its state."""
        parts = self._maxup_parts()
        if parts["average"] is None:
            average = parts["spec"].build_average(self.maxup_model)
            parts["average"] = None if average is None else average.to(self.device)
        if not step:
            self._maxup_restore(restore_rng_states=False)
            return
        if parts["generator"] is None or parts["generator"].device != self.device:
            rank = self.global_rank
            parts["generator"] = DeviceGenerator(self.device, seed=generator_seed(parts["seed"], rank),
                                                 host_seed=host_generator_seed(parts["seed"], rank))
        optimizer = self._maxup_optimizer()
        old = parts["step"]
        if old is None or old.optimizer is not optimizer:
            data = {} if parts["train"] is None else {"train": parts["train"]}
            parts["step"] = parts["spec"].build_step(model=self.maxup_model, optimizer=optimizer,
                                                     num_classes=parts["num_classes"], **data, **parts["step_options"])
            if old is not None:
                parts["step"].load_state_dict(old.state_dict())
            parts["epoch_hooks"] = epoch_hooks(parts["step"])
            parts["epoch_end_hooks"] = epoch_end_hooks(parts["step"])
            needs = [h for h in parts["epoch_end_hooks"]
                     if inspect.signature(h).parameters["data"].default is inspect.Parameter.empty]
            if needs and parts["train"] is None:
                raise ValueError(f"{type(needs[0].__self__).__name__} reads the whole training set after every "
                                 "epoch: pass train=(x, y) (the training inputs and labels) to the module")
        self._maxup_restore(restore_rng_states=True)

    def _maxup_restore(self, *, restore_rng_states: bool) -> None:
        parts = self._maxup_parts()
        pending = parts["pending"]
        if pending is None:
            return
        average = parts["average"]
        if average is not None and pending.get("average") is not None:
            average.load_state_dict(pending["average"])
            pending["average"] = None
        if not restore_rng_states:
            return
        if parts["step"] is not None and pending.get("step") is not None:
            parts["step"].load_state_dict(pending["step"])
        if pending.get("rng") is not None:
            restore_rng(pending["rng"], parts["generator"])
        parts["pending"] = None

    # ------------------------------------------------------------------ training

    def maxup_training_step(self, batch) -> ObjectiveResult:
        """Train on ``batch`` with the maxup step (see :func:`maxup_training_step`); EMA updates after the step,
        and SWA's constant learning rate (``swa(lr=...)``) replaces the schedule from its start epoch."""
        parts = self._maxup_parts()
        if parts["step"] is None:  # a training_step called outside Trainer.fit's hooks
            self._maxup_build(step=True)
        average = parts["average"]
        fixed_lr = None if average is None else average.lr(self.current_epoch)
        if fixed_lr is not None:
            for group in parts["step"].optimizer.param_groups:
                group["lr"] = fixed_lr
        result = maxup_training_step(self, batch, parts["step"], parts["generator"], model=parts["model"],
                                     step_scheduler=parts["step_scheduler"] and fixed_lr is None, log=parts["log"])
        if average is not None:
            average.after_step(self.maxup_model)
        return result

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._maxup_parts()
        trainer = self.trainer
        if trainer.world_size > 1:
            raise ValueError(f"maxup's Lightning integration runs in one process (this run has {trainer.world_size}"
                             "); for DDP use maxup.train.Trainer under torchrun")
        precision = str(trainer.precision)
        if precision in ("16-mixed", "16"):
            raise ValueError(f"Trainer(precision={precision!r}) scales the loss with Lightning's GradScaler, which a "
                             "maxup step does not use: keep precision='32-true' and pass amp='fp16' to the "
                             "module (the step's own scaler), or use precision='bf16-mixed'")

    def on_train_start(self) -> None:
        super().on_train_start()
        self._maxup_build(step=True)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        parts = self._maxup_parts()
        if parts.get("epoch_hooks"):
            epochs = self.trainer.max_epochs
            if epochs is None or epochs < 1:
                names = ", ".join(sorted({type(h.__self__).__name__ for h in parts["epoch_hooks"]}))
                raise ValueError(f"{names} follow the epochs of the run: give the Trainer max_epochs")
            for hook in parts["epoch_hooks"]:
                hook(self.current_epoch, epochs, self.maxup_model)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        parts = self._maxup_parts()
        for hook in parts.get("epoch_end_hooks") or ():  # bootstrap's fit, PADDLES's schedule
            hook(self.maxup_model, parts["train"], epoch=self.current_epoch + 1)
        average = parts["average"]
        if average is not None:
            average.after_epoch(self.maxup_model, self.current_epoch + 1)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        parts = self._maxup_parts()
        pending = parts["pending"] or {}
        step, generator, average = parts["step"], parts["generator"], parts["average"]
        checkpoint[CHECKPOINT_KEY] = {
            "spec": str(parts["spec"]),
            "step": step.state_dict() if step is not None else pending.get("step"),
            "rng": capture_rng(generator) if generator is not None else pending.get("rng"),
            "average": average.state_dict() if average is not None else pending.get("average"),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        parts = self._maxup_parts()
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return
        if state.get("spec") != str(parts["spec"]):
            raise ValueError(f"the checkpoint was trained with the method {state.get('spec')!r}, this module with "
                             f"{str(parts['spec'])!r}: resume with the same method")
        # applied in on_train_start, once this fit's optimizer exists (the average also on validate/test)
        parts["pending"] = dict(state)
        if parts["average"] is not None and state.get("average") is not None:
            self._maxup_restore(restore_rng_states=False)

    def maxup_averaged(self) -> nn.Module | None:
        """The averaged network to evaluate (None without an average, or before SWA's first update); SWA's
        BatchNorm statistics are recomputed from the training loader when stale (outside the global RNG)."""
        parts = self._maxup_parts()
        if parts["average"] is None and parts["pending"] is not None:
            self._maxup_build(step=False)
        average = parts["average"]
        if average is None:
            return None
        if not isinstance(average, SWA):
            return average.averaged(None, device=self.device, batch_size=1)
        if average.updates == 0:
            return None
        if average._stale:
            loader = getattr(self.trainer, "train_dataloader", None)
            if loader is not None and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                          for m in average.model.modules()):
                with torch.random.fork_rng(devices=[]):
                    torch.optim.swa_utils.update_bn((_unpack(b)[0].to(self.device) for b in loader), average.model,
                                                    device=self.device)
            average._stale = False
        return average.model.module.eval()


def _make_optimizer(name_or_factory, model: nn.Module, *, lr, momentum, weight_decay) -> torch.optim.Optimizer:
    if isinstance(name_or_factory, str):
        return make_optimizer(model, name_or_factory, lr=lr, momentum=momentum, weight_decay=weight_decay)
    optimizer = name_or_factory(model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> torch.optim.Optimizer, got "
                         f"a callable returning {type(optimizer).__name__}")
    return optimizer


class MaxUpModule(MaxUpMixin, lightning.LightningModule):
    """A LightningModule that trains ``model`` with a maxup method and evaluates it with cross-entropy and accuracy.

    Training runs ``step(model, x, y, generator)`` under manual optimization (see the module
    notes) and logs ``train_loss`` and ``train_accuracy``; validation and test log ``val_loss``,
    ``val_accuracy`` (``test_*``) of the plain network, and with a weight average in the spec also
    ``ema_val_accuracy`` (``swa_*``, ...). The step, the generator, the average and the RNG states
    go into Lightning's checkpoints, so ``Trainer.fit(module, ckpt_path=...)`` resumes exactly.

    Args:
        model: the network: ``model(x)`` gives logits (B, num_classes). GradAug (``gradaug`` in the spec)
            needs a width-sliceable network such as :class:`maxup.models.SmallCNN`.
        method: a method spec, e.g. ``"maxup(m=4)+cutmix"``, ``"sam+gradaug"``, ``"cutmix+ema"``.
        num_classes: the number of classes.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``, built with ``lr``, ``momentum`` and
            ``weight_decay`` (no decay on biases and norm parameters; :func:`maxup.train.make_optimizer`),
            or a callable ``params -> torch.optim.Optimizer`` (then those three are not used).
        lr, momentum, weight_decay: for a named optimizer.
        scheduler: None (constant), ``"cosine"`` (to 0 over the run's ``trainer.estimated_stepping_batches``,
            after ``warmup_steps`` linear warm-up steps), ``"constant"`` (warm-up, then constant) or a callable
            ``optimizer -> scheduler``; stepped after every optimizer step.
        warmup_steps: linear warm-up steps of a named schedule.
        seed: seeds the augmentation generator (the network's initial weights are yours: seed before
            building it).
        max_grad_norm, amp, step_options: go to the step (``amp="bf16"`` or ``"fp16"``: mixed precision
            with the step's own GradScaler).
        train: the training set ``(x, y)`` for the terms that read it (see :meth:`MaxUpMixin.init_maxup`).

    >>> net = maxup.models.SmallCNN(in_channels=1, num_classes=10, channels=(8, 16, 32))
    >>> MaxUpModule(net, "maxup(m=2)+cutmix", num_classes=10).maxup_spec.of_kind("objective")[0].name
    'maxup'
    """

    def __init__(self, model: nn.Module, method: str | Spec = "erm", *, num_classes: int,
                 optimizer: str | Callable = "sgd", lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4,
                 scheduler: str | Callable | None = None, warmup_steps: int = 0, seed: int = 0,
                 max_grad_norm: float | None = None, amp: str | None = None, train=None, **step_options):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(optimizer, str):
            if optimizer.lower() not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> optimizer, "
                                 f"got {optimizer!r}")
        elif not callable(optimizer):
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable params -> optimizer, "
                             f"got {type(optimizer).__name__}")
        if isinstance(scheduler, str) and scheduler not in SCHEDULES:
            raise ValueError(f"scheduler must be None, one of {SCHEDULES} or a callable optimizer -> scheduler, "
                             f"got {scheduler!r}")
        if scheduler is not None and not isinstance(scheduler, str) and not callable(scheduler):
            raise ValueError(f"scheduler must be None, one of {SCHEDULES} or a callable optimizer -> scheduler, "
                             f"got {type(scheduler).__name__}")
        self.model = model
        self.optimizer_choice = optimizer
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.scheduler_choice = scheduler
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.init_maxup(method, num_classes=num_classes, model=model, seed=seed, max_grad_norm=max_grad_norm,
                        amp=amp, train=train, **step_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def configure_optimizers(self):
        optimizer = _make_optimizer(self.optimizer_choice, self.model, lr=self.lr, momentum=self.momentum,
                                    weight_decay=self.weight_decay)
        choice = self.scheduler_choice
        if choice is None:
            return optimizer
        if isinstance(choice, str):
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total < 1:
                raise ValueError(f"scheduler={choice!r} needs a finite run: give the Trainer max_steps or max_epochs")
            total = int(total)
            scheduler = make_scheduler(optimizer, epochs=1, steps_per_epoch=total,
                                       warmup_epochs=self.warmup_steps / total, schedule=choice)
        else:
            scheduler = choice(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        return self.maxup_training_step(batch).loss.detach()

    def _evaluate(self, batch, stage: str) -> None:
        x, y = _unpack(batch)
        models = [("", self.model)]
        averaged = self.maxup_averaged()
        if averaged is not None:
            models.append((f"{self.maxup_average.prefix}_", averaged))
        for prefix, model in models:
            logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            self.log(f"{prefix}{stage}_loss", loss, prog_bar=not prefix, batch_size=x.shape[0])
            self.log(f"{prefix}{stage}_accuracy", accuracy(logits, y), prog_bar=not prefix, batch_size=x.shape[0])

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x = _unpack(batch)[0] if isinstance(batch, (tuple, list, dict)) else batch
        return self.model(x)
