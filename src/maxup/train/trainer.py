"""The training loop: epochs of steps, evaluation, metrics files, atomic checkpoints, exact resume, DDP.

>>> step = maxup.methods.build_step("maxup(m=4)+cutout", model=model, optimizer=opt, num_classes=10)
>>> trainer = Trainer(model, step, splits.train, test=splits.test, epochs=30, num_classes=10, out_dir="runs/a")
>>> history = trainer.fit()                 # later, after a crash: trainer.fit(resume=True)
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._checks import check_int
from .._modules import _compiled, strip_compile_prefix
from ..averaging import WeightAverage
from ..data import Loader, TensorData
from ..data.longtail import class_counts, shot_thresholds
from ..data.sampling import sampler_exponent
from ..functional._random import DeviceGenerator
from . import distributed as D
from .checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    atomic_write,
    capture_rng,
    checkpoint_name,
    last_good_checkpoint,
    list_checkpoints,
    load_latest_good,
    nonfinite_entries,
    prune_checkpoints,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
)
from .label_metrics import class_metrics, memorisation
from .logs import RunFiles, plain
from .metrics import evaluate
from .speed import compile_model, configure_backends

#: history keys that measure time: they differ between runs, everything else is reproducible
TIMING_KEYS = ("time", "train_time", "samples_per_s")
#: ``config`` entries a resume may change: more epochs (recorded under ``resumed`` in config.yaml), and
#: where the data lives and which device trains (they do not change the run's numbers on CPU)
RESUMABLE = ("epochs", "data_dir", "device", "eval_every")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; ``epoch`` and ``step`` (1-based) say where."""

    def __init__(self, message: str, *, epoch: int, step: int, global_step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step
        self.global_step = global_step


class NonFiniteStateError(NonFiniteLossError):
    """The state after an epoch (weights, BatchNorm statistics, optimizer state or metrics) holds NaN or
    inf, so it is not saved as a checkpoint; ``names`` lists the non-finite entries."""

    def __init__(self, message: str, *, names: list[str], epoch: int, step: int, global_step: int):
        super().__init__(message, epoch=epoch, step=step, global_step=global_step)
        self.names = names


def generator_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s augmentation generator: a well-mixed function of ``(seed, rank)``."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0])


def host_generator_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s host generator (host-side choices), independent of :func:`generator_seed`."""
    return int(np.random.SeedSequence([int(seed), int(rank), 1]).generate_state(1, dtype=np.uint64)[0])


def epoch_hooks(step) -> list:
    """The ``on_epoch_start(epoch, epochs, model)`` methods of the terms in ``step``: the step, the steps it wraps,
    their objective and its augmentation modules, each once. The Trainer calls them at the start of every epoch
    (0-based ``epoch`` of ``epochs``; ``model`` the plain network, not the DDP or compiled wrapper), resumed
    epochs included, before the epoch's first step: terms that follow the epoch (CMO's schedule) or read the
    model once an epoch (class-distance mixing). A hook draws no randomness, so a resumed run stays exact."""
    found, seen, objects = [], set(), []
    while step is not None and id(step) not in seen:
        seen.add(id(step))
        objects.append(step)
        objective = getattr(step, "objective", None)
        if objective is not None:
            objects.append(objective)
            augment = getattr(objective, "augment", None)
            objects.extend(augment.modules() if isinstance(augment, nn.Module) else [augment])
        step = getattr(step, "step", None)
    hooked = set()
    for obj in objects:
        hook = getattr(obj, "on_epoch_start", None)
        if callable(hook) and id(obj) not in hooked:
            hooked.add(id(obj))
            found.append(hook)
    return found


def epoch_end_hooks(step) -> list:
    """The ``on_epoch_end(model, data, *, epoch)`` hooks of ``step`` and of the steps it wraps (``sam+bootstrap``):
    steps that act between epochs, such as a fit on the training losses or an epoch schedule."""
    hooks, seen = [], set()
    while step is not None and id(step) not in seen:
        seen.add(id(step))
        hook = getattr(step, "on_epoch_end", None)
        if callable(hook):
            hooks.append(hook)
        step = getattr(step, "step", None) if getattr(step, "kind", None) == "wrapper" else None
    return hooks


def _check_data(name: str, data, *, required: bool = False):
    if data is None and not required:
        return None
    if not isinstance(data, TensorData):
        raise ValueError(f"{name} must be a maxup.data.TensorData (see maxup.data.from_tensors), "
                         f"got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    return data


class Trainer:
    """Train ``model`` with a maxup step for ``epochs`` epochs, evaluating on ``val`` and ``test``.

    Each epoch the loader's order is set from ``(seed, epoch)``, every batch goes through
    ``step(model, x, y, generator)`` with one generator on the training device (a
    :class:`maxup.functional._random.DeviceGenerator` seeded from ``(seed, rank)``) supplying
    the augmentation randomness, drawn where the data is, and its CPU generator
    (``generator.host``) the choices the host must know (GradAug's widths, Manifold Mixup's
    layer); ``scheduler.step()`` follows each optimizer step. Both generators are checkpointed.
    On CPU a run is bit-identical to itself, resumed or not; a GPU run draws from CUDA's
    Philox generator, so its augmentations differ from a CPU run with the same seed (the
    host choices and the data order do not).

    The step makes no host read (see ``benchmarks/host_syncs.py``); the trainer checks the
    loss for NaN or infinity on the device and reads the verdict every ``check_every`` steps
    and at the end of each epoch, so an error names the first bad step and the steps since.
    One history record per epoch holds ``epoch``, ``step``
    (global optimizer steps), ``lr`` (of the epoch's last step), ``train_loss``,
    ``train_accuracy`` (on the augmented batches), ``val_*``/``test_*`` (``accuracy``, ``loss``,
    ``ece``, and ``perplexity`` for token sequences; see :func:`evaluate`), on the last epoch
    ``clean_train_*`` (the same metrics on the training set in eval mode without augmentation:
    whether the model fits its data) and the timings
    ``train_time``, ``time`` and ``samples_per_s``.

    Noisy labels and long tails: when ``train`` carries its true labels (``train.clean_y``, see
    :mod:`maxup.data.noise`) every record holds ``noisy_memorised`` and ``noisy_true_accuracy``
    (:func:`maxup.train.label_metrics.memorisation`, on the flipped training samples). With
    ``class_metrics`` the val/test records add ``*_class_accuracy`` (a list by class) and
    ``*_many_accuracy``, ``*_medium_accuracy``, ``*_few_accuracy`` (thresholds
    :func:`maxup.data.shot_thresholds` of the largest training class, by the true labels), and the
    last record ``train_class_counts``. ``sampler`` is the :class:`~maxup.data.Loader`'s. Terms of the step
    with an ``on_epoch_start`` method (CMO, class-distance mixing) are called at the start of every epoch
    (:func:`epoch_hooks`). A step (or a step a wrapper holds) with an ``on_epoch_end(model, data, *, epoch)``
    method is called after every epoch's last step, before the evaluation and the checkpoint, with the plain
    network, the training inputs and their (noisy) labels only -- never ``clean_y`` -- and the number of epochs
    done (``bootstrap`` fits its loss mixture there, ``paddles`` follows its schedule).

    With ``out_dir`` the main process writes ``metrics.jsonl``, ``metrics.csv``,
    ``config.yaml``, ``checkpoints/epoch-NNNN.pt`` (the last ``keep_checkpoints``, every
    ``checkpoint_every`` epochs and after the last one, written atomically) and
    ``model.pt`` (final ``state_dict``; with a weight average also ``ema_model.pt`` or
    ``swa_model.pt``). ``fit(resume=True)`` continues from the newest checkpoint; on CPU the
    result equals an uninterrupted run bit for bit.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the trainer joins or creates the process
    group (Gloo on CPU, NCCL on CUDA), wraps the model in ``DistributedDataParallel``,
    shards the data, and reduces the metrics across ranks; a group it created is
    destroyed when :meth:`fit` returns.

    Args:
        model: the network; moved to ``device``.
        step: a :class:`maxup.steps.Step` (holding the objective and the optimizer).
        train, val, test: :class:`maxup.data.TensorData` splits.
        scheduler: a per-step learning-rate scheduler (see :func:`make_scheduler`), or None.
        device: default ``"cuda"`` if available, else ``"cpu"`` (``cuda:LOCAL_RANK`` under torchrun).
        progress: a tqdm bar on stderr; ``None`` shows one when stderr is a terminal.
        config: the run's resolved configuration, saved in ``config.yaml`` with the trainer settings.
        log_tensorboard: also write TensorBoard scalars (skipped, with one warning, without tensorboard).
        check_every: read the non-finite-loss flag (and the progress bar's loss) every this many steps.
        compile: ``torch.compile`` the model (:func:`maxup.train.speed.compile_model`); a string names the
            backend (``"inductor"`` for True, ``"eager"``/``"aot_eager"`` to debug). Checkpoints and
            ``model.pt`` hold the plain model's state either way.
        channels_last: the model and 4-D inputs in channels-last memory format.
        tf32: on CUDA, allow TF32 in fp32 matrix multiplies and convolutions (and set cudnn.benchmark).
        average: a weight average (:class:`maxup.averaging.EMA` or :class:`~maxup.averaging.SWA`) kept beside
            the model, evaluated every epoch (``ema_test_accuracy``, ...) and saved in the checkpoints.
        sampler: the training order: ``"instance"`` (default), ``"class"``, ``"sqrt"``, ``"reversed"`` or an
            exponent (:mod:`maxup.data.sampling`).
        class_metrics: per-class and many/medium/few-shot accuracy on val and test (long-tailed training data).
        eval_every: evaluate val and test (and the weight average, and the memorisation of noisy labels) every
            this many epochs and after the last; the other epochs' records hold the training metrics only. On a
            CPU, evaluating 10,000 test images can take longer than an epoch over a small training set.
        robust_eval: a :class:`maxup.robust.RobustEval`: at every evaluation also ``val_robust_accuracy`` and
            ``test_robust_accuracy`` (PGD at one radius; of the weight average too), so robust overfitting and the
            epoch of best robust accuracy show in the history.
        on_epoch: called on every process with each epoch's history record, after it is logged and
            checkpointed. It observes; an exception it raises stops :meth:`fit` (the files are closed and the
            checkpoints kept): ``maxup tune`` raises ``optuna.TrialPruned`` there to stop a weak trial early.

    Raises (from :meth:`fit`):
        NonFiniteLossError: a NaN or infinite loss; the last good checkpoint is kept.
        CheckpointError: a checkpoint that cannot be read or written.
    """

    def __init__(self, model: nn.Module, step, train: TensorData, *, test: TensorData | None = None,
                 val: TensorData | None = None, epochs: int = 10, batch_size: int = 128, scheduler=None, seed: int = 0,
                 device=None, out_dir=None, keep_checkpoints: int = 2, checkpoint_every: int = 1,
                 config: dict | None = None, progress: bool | None = None, num_classes: int,
                 log_tensorboard: bool = False, check_every: int = 50, compile: bool | str = False,
                 channels_last: bool = False, tf32: bool = True, average=None, on_epoch=None, sampler="instance",
                 class_metrics: bool = False, eval_every: int = 1, robust_eval=None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = getattr(step, "optimizer", None)
        if not callable(step) or not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("step must be a maxup step holding an optimizer, e.g. maxup.steps.Standard(objective, "
                             "optimizer) or maxup.methods.build_step(spec, model=..., optimizer=..., num_classes=...)")
        self.train_data = _check_data("train", train, required=True)
        self.val_data = _check_data("val", val)
        self.test_data = _check_data("test", test)
        self.epochs = check_int("epochs", epochs)
        self.batch_size = check_int("batch_size", batch_size)
        self.seed = check_int("seed", seed, minimum=0)
        self.keep_checkpoints = check_int("keep_checkpoints", keep_checkpoints)
        self.checkpoint_every = check_int("checkpoint_every", checkpoint_every)
        self.num_classes = check_int("num_classes", num_classes)
        self.check_every = check_int("check_every", check_every)
        self.eval_every = check_int("eval_every", eval_every)
        if robust_eval is not None and not callable(robust_eval):
            raise ValueError(f"robust_eval must be a maxup.robust.RobustEval (or None), got {robust_eval!r}")
        if robust_eval is not None and train.y.ndim != 1:
            raise ValueError("robust_eval needs class labels (N,), not token sequences")
        self.robust_eval = robust_eval
        for name, flag in (("channels_last", channels_last), ("tf32", tf32)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(compile, (bool, str)) or compile == "":
            raise ValueError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
        self.compile = "inductor" if compile is True else (compile or None)
        self.channels_last = channels_last
        self.tf32 = tf32
        for name, data in (("train", train), ("val", val), ("test", test)):
            if data is not None and int(data.y.max()) >= self.num_classes:
                raise ValueError(f"{name} holds label {int(data.y.max())}, out of range for num_classes={num_classes}")
        if train.clean_y is not None and int(train.clean_y.max()) >= self.num_classes:
            raise ValueError(f"train.clean_y holds label {int(train.clean_y.max())}, out of range for "
                             f"num_classes={num_classes}")
        sampler_exponent(sampler)
        if not isinstance(class_metrics, bool):
            raise ValueError(f"class_metrics must be True or False, got {class_metrics!r}")
        if class_metrics and train.y.ndim != 1:
            raise ValueError("class_metrics=True needs class labels (N,), not token sequences")
        self.sampler = sampler
        self.class_metrics = class_metrics
        # the flipped samples (indices into train), for the memorisation metrics; None without label noise
        self.noisy_index = None if train.clean_y is None or not bool(train.flipped.any()) else \
            torch.nonzero(train.flipped).flatten()
        self.train_class_counts = None if not class_metrics else \
            class_counts(train.y if train.clean_y is None else train.clean_y, self.num_classes)
        self.shot_thresholds = None if not class_metrics else shot_thresholds(int(self.train_class_counts.max()))
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"config must be a dict or None, got {type(config).__name__}")
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"progress must be True, False or None, got {progress!r}")
        if average is not None and not isinstance(average, WeightAverage):
            raise ValueError(f"average must be a maxup.averaging.EMA or SWA (or None), got {type(average).__name__}")
        if on_epoch is not None and not callable(on_epoch):
            raise ValueError(f"on_epoch must be a function of the epoch's record (or None), got {on_epoch!r}")
        if scheduler is not None and not hasattr(scheduler, "step"):
            raise ValueError(f"scheduler must be a torch learning-rate scheduler or None, "
                             f"got {type(scheduler).__name__}")
        self.step = step
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.config = dict(config or {})
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.log_tensorboard = bool(log_tensorboard)
        self.on_epoch = on_epoch

        self.device = D.resolve_device(device)
        self.dist = D.setup(self.device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.backends = configure_backends(self.device, tf32=tf32,
                                           cudnn_benchmark=getattr(step, "fixed_shapes", True))
        self.module = D.unwrap_model(model).to(self.device)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.average = None if average is None else average.to(self.device)
        net = self.module
        if self.compile:  # DDP around the compiled net: MaxUp's selection forwards it without DDP's broadcasts
            net = compile_model(net, backend=self.compile)
        elif _compiled(model) and not self.dist.enabled:
            net = model  # compiled by the caller
        self.model = D.wrap_model(net, self.device, find_unused_parameters=getattr(step, "unused_parameters", False)) \
            if self.dist.enabled else net
        self.epoch_hooks = epoch_hooks(step)
        self.loader = Loader(self.train_data, self.batch_size, shuffle=True, seed=self.seed, rank=self.rank,
                             world_size=self.world_size, device=self.device,
                             memory_format=torch.channels_last if channels_last else None, sampler=sampler)
        self.epoch_end_hooks = epoch_end_hooks(step)
        self.generator = DeviceGenerator(self.device, seed=generator_seed(self.seed, self.rank),
                                         host_seed=host_generator_seed(self.seed, self.rank))
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.resumes: list[dict] = []  # the settings each resume changed (config.yaml's "resumed")
        self._files: RunFiles | None = None

    # ------------------------------------------------------------------ properties

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on each rank (what a scheduler needs)."""
        return len(self.loader)

    @property
    def checkpoint_dir(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ fit

    def fit(self, resume: bool = False) -> list[dict]:
        """Train to ``epochs`` and return the history (one dict per epoch, including resumed ones).

        ``resume=True`` continues from the newest checkpoint in ``out_dir/checkpoints``
        (training from scratch, with a warning, when there is none). Without ``resume``
        an ``out_dir`` that already holds checkpoints is refused.
        """
        finished = False
        try:
            history = self._fit(bool(resume))
            finished = True
            return history
        finally:
            if self._files is not None:
                self._files.close()
                self._files = None
            D.cleanup(self.dist, synchronize=finished)

    def _fit(self, resume: bool) -> list[dict]:
        ckdir = self.checkpoint_dir
        if resume:
            if ckdir is None:
                raise ValueError("resume=True needs out_dir: the checkpoints to resume from are in "
                                 "out_dir/checkpoints")
            state, path, skipped = load_latest_good(ckdir, skip=TIMING_KEYS)
            if path is None:
                warnings.warn(f"resume=True but there is no checkpoint in {ckdir}: training from scratch", stacklevel=3)
            else:
                if skipped:
                    warnings.warn("; ".join(skipped) + f". Resuming from the previous good checkpoint {path.name} "
                                  "instead (the epochs after it are trained again).", stacklevel=3)
                self._restore(state, path)
        elif ckdir is not None and list_checkpoints(ckdir):
            names = ", ".join(p.name for p in list_checkpoints(ckdir))
            raise ValueError(f"{ckdir} already holds checkpoints of an earlier run ({names}): pass resume=True to "
                             "continue it, or choose another out_dir (or delete that one)")
        if self.is_main and self.out_dir is not None:
            ckdir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(ckdir)
            remove_stale_temporaries(self.out_dir)
            self._files = RunFiles(self.out_dir, tensorboard=self.log_tensorboard)
            self._files.write_config(self.resolved_config())
            self._files.reset(self.history)  # drops lines a killed run appended after its last checkpoint
        for epoch in range(self.epoch, self.epochs):
            record = self._train_epoch(epoch)
            self.history.append(record)
            self.epoch = epoch + 1
            if self._files is not None:
                self._files.append(record, self.history)
            if self.progress and self.is_main:
                self._write(self._summary(record))
            if ckdir is not None and (self.epoch % self.checkpoint_every == 0 or self.epoch == self.epochs):
                self.save_checkpoint()
            if self.on_epoch is not None:
                self.on_epoch(dict(record))
        if self.is_main and self.out_dir is not None:
            state = self.module.state_dict()
            atomic_write(self.out_dir / "model.pt", lambda f: torch.save(state, f))
            averaged = None if self.average is None else self.average.averaged(
                self.train_data, device=self.device, batch_size=max(512, self.batch_size))
            if averaged is not None:  # ema_model.pt / swa_model.pt: the average, for maxup robust --weights
                average = averaged.state_dict()
                atomic_write(self.out_dir / f"{self.average.prefix}_model.pt", lambda f: torch.save(average, f))
        return self.history

    # ------------------------------------------------------------------ one epoch

    def _train_epoch(self, epoch: int) -> dict:
        start = time.perf_counter()
        self.loader.set_epoch(epoch)
        for hook in self.epoch_hooks:  # terms that follow the epoch or read the model once an epoch
            hook(epoch, self.epochs, self.module)
        self.model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss * n, n, correct rows, rows
        n_steps = len(self.loader)
        bar = self._bar(epoch, n_steps)
        lr = self.optimizer.param_groups[0]["lr"]
        # non-finite losses are noted on the device (the first bad step and its loss) and read every
        # check_every steps and at the epoch's end: no host read per step
        first_bad = torch.zeros((), dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), dtype=torch.float32, device=self.device)
        since, lrs = 1, {}
        shown = time.perf_counter()
        fixed_lr = None if self.average is None else self.average.lr(epoch)  # SWA's constant learning rate
        try:
            for i, (x, y) in enumerate(self.loader, 1):
                if fixed_lr is not None:
                    for group in self.optimizer.param_groups:
                        group["lr"] = fixed_lr
                lr = self.optimizer.param_groups[0]["lr"]
                lrs[i] = lr
                result = self.step(self.model, x, y, self.generator)
                loss = result.loss.detach().float()
                new = (first_bad == 0) & ~torch.isfinite(loss)
                first_bad = torch.where(new, i, first_bad)
                bad_loss = torch.where(new, loss, bad_loss)
                if i % self.check_every == 0 or i == n_steps:
                    bad = first_bad > 0
                    if D.any_rank(bad) if self.dist.enabled else bool(bad):
                        at = int(first_bad) or i  # 0: another rank's loss
                        raise self._nonfinite(epoch, at, n_steps, bad_loss, lrs.get(at, lr), checked=(since, i))
                    since, lrs = i + 1, {}
                self.global_step += 1
                if self.average is not None:
                    self.average.after_step(self.module)
                if self.scheduler is not None and fixed_lr is None:
                    self.scheduler.step()
                logits, targets = result.logits.detach(), result.targets
                labels = targets.argmax(-1) if targets.is_floating_point() else targets  # (B,) or (B, T) tokens
                n = x.shape[0]
                sums[0] += loss.double() * n
                sums[1] += n
                sums[2] += (logits.argmax(-1) == labels).sum()
                sums[3] += labels.numel()
                if bar is not None:
                    bar.update(1)
                    if time.perf_counter() - shown >= 1.0 or i == n_steps:  # one host read a second at most
                        shown = time.perf_counter()
                        value, acc = torch.stack([loss.double(), sums[2] / sums[3]]).tolist()
                        bar.set_postfix(loss=f"{value:.4f}", acc=f"{acc:.3f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - start
        D.broadcast_buffers(self.module)  # every rank evaluates and saves the same model
        if self.epoch_end_hooks:  # the step's work after an epoch (training time): inputs and noisy labels only
            data = TensorData(self.loader.x, self.loader.y)
            for hook in self.epoch_end_hooks:
                hook(self.module, data, epoch=epoch + 1)
            train_time = time.perf_counter() - start
        loss_sum, count, correct, rows = D.all_reduce_sum(sums).tolist()
        record = {
            "epoch": epoch + 1,
            "step": self.global_step,
            "lr": float(lr),
            "train_loss": loss_sum / count,
            "train_accuracy": correct / rows,
        }
        last = epoch + 1 == self.epochs
        evaluating = last or (epoch + 1) % self.eval_every == 0
        # batches of 128 evaluate faster than larger ones on a CPU (docs/BENCHMARKS.md)
        eval_batch = max(512 if self.device.type == "cuda" else 128, self.batch_size)
        models = [("", self.module)] if evaluating else []
        if self.average is not None:
            self.average.after_epoch(self.module, epoch + 1)
            averaged = None if not evaluating else \
                self.average.averaged(self.train_data, device=self.device, batch_size=max(512, self.batch_size))
            if averaged is not None:
                models.append((f"{self.average.prefix}_", averaged))
        for prefix, model in models:
            for name, data in (("val", self.val_data), ("test", self.test_data)):
                if data is not None:
                    metrics = evaluate(model, data, batch_size=eval_batch, device=self.device,
                                       num_classes=self.num_classes, per_class=self.class_metrics)
                    if self.class_metrics:
                        metrics = class_metrics(metrics, self.train_class_counts, self.shot_thresholds)
                    if self.robust_eval is not None:
                        metrics["robust_accuracy"] = self.robust_eval(model, data)
                    record.update({f"{prefix}{name}_{k}": v for k, v in metrics.items()})
        if self.noisy_index is not None and evaluating:  # memorisation of the flipped labels
            record.update(memorisation(self.module, self.train_data, batch_size=eval_batch, device=self.device,
                                       index=self.noisy_index))
        if last:  # convergence: the clean training set, eval mode, no augmentation
            metrics = evaluate(self.module, self.train_data, batch_size=eval_batch, device=self.device,
                               num_classes=self.num_classes)
            record.update({f"clean_train_{k}": v for k, v in metrics.items()})
            if self.class_metrics:
                record["train_class_counts"] = self.train_class_counts.tolist()
        record["train_time"] = train_time
        record["samples_per_s"] = count / train_time if train_time > 0 else float("nan")
        record["time"] = time.perf_counter() - start
        return record

    def _nonfinite(self, epoch: int, i: int, n_steps: int, loss: torch.Tensor, lr: float,
                   checked: tuple[int, int] | None = None) -> NonFiniteLossError:
        kept = self._kept_note()
        value = loss.item() if bool(~torch.isfinite(loss)) else "non-finite on another rank"
        clip = (f"max_grad_norm (now {self.step.max_grad_norm})" if getattr(self.step, "max_grad_norm", None)
                else "max_grad_norm=1.0 (gradient clipping)")
        lag = 0 if checked is None else checked[1] - i  # steps run after the bad one, before the check read it
        where = "" if checked is None else f", found by the check of steps {checked[0]}-{checked[1]}"
        return NonFiniteLossError(
            f"training loss is {value} at epoch {epoch + 1}, step {i} of {n_steps} (global step "
            f"{self.global_step + 1 - lag}{where}); stopped without saving this state{kept}. Try a lower learning "
            f"rate (now {lr:.4g}) or set {clip}.",
            epoch=epoch + 1, step=i, global_step=self.global_step + 1 - lag)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly (this rank's RNG states only; see :meth:`save_checkpoint`)."""
        return {
            "format": FORMAT_VERSION,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": self.step.state_dict(),
            "average": None if self.average is None else self.average.state_dict(),
            "history": [dict(r) for r in self.history],
            "rng": [capture_rng(self.generator)],
            "meta": {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                     "epochs": self.epochs, "num_classes": self.num_classes, "config": plain(self.config),
                     "resumes": [dict(r) for r in self.resumes]},
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/epoch-NNNN.pt`` (main process; every rank must call it) and prune old ones.

        Raises:
            NonFiniteStateError: a tensor of the state (BatchNorm statistics included) or a metric is NaN or
                inf; nothing is written, and the message names the last good checkpoint.
        """
        rngs = D.all_gather_object(capture_rng(self.generator))
        state = self.state_dict()
        bad = nonfinite_entries(state, skip=TIMING_KEYS)  # the same on every rank (buffers and metrics are shared)
        if bad:
            raise self._nonfinite_state(bad)
        if not self.is_main or self.checkpoint_dir is None:
            return None
        state["rng"] = rngs
        path = save_checkpoint(state, self.checkpoint_dir / checkpoint_name(self.epoch))
        prune_checkpoints(self.checkpoint_dir, self.keep_checkpoints)
        return path

    def _kept_note(self) -> str:
        """The non-finite errors' clause naming the last good checkpoint (empty when there is none)."""
        last = last_good_checkpoint(self.checkpoint_dir, skip=TIMING_KEYS) if self.checkpoint_dir is not None else None
        return f"; the last good checkpoint {last} is kept" if last is not None else ""

    def _nonfinite_state(self, names: list[str]) -> NonFiniteStateError:
        kept = self._kept_note()
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return NonFiniteStateError(
            f"the state after epoch {self.epoch} holds non-finite values ({shown}); stopped without saving it"
            f"{kept}. Try a lower learning rate or set max_grad_norm (gradient clipping).",
            names=names, epoch=self.epoch, step=self.steps_per_epoch, global_step=self.global_step)

    def _check_settings(self, state: dict, path: Path) -> None:
        """Refuse a resume whose settings differ from the checkpoint's (naming each, old and new), except
        :data:`RESUMABLE` ones; record a changed number of epochs in :attr:`resumes`."""
        meta = state.get("meta") or {}
        saved = meta.get("config")
        if not isinstance(saved, dict):
            saved = self._saved_config()
        now = plain(self.config)
        missing = "(not set)"
        changed = {}
        if saved is not None:
            for key in sorted(set(saved) | set(now)):
                if key not in RESUMABLE and key not in ("trainer", "resumed") and \
                        saved.get(key, missing) != now.get(key, missing):
                    changed[key] = (saved.get(key, missing), now.get(key, missing))
        for key, value in (("seed", self.seed), ("batch_size", self.batch_size)):
            if key in meta and meta[key] != value:
                changed[key] = (meta[key], value)
        done = int(state["epoch"])
        if self.epochs < done:
            changed["epochs"] = (f"{done} trained", self.epochs)
        if changed:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"cannot resume {path} with other settings: {listed}. Resume with the settings that "
                             "wrote it (see config.yaml in the run directory; only more epochs, the data "
                             "location and the device may change), or start a new run in another directory.")
        self.resumes = [dict(r) for r in meta.get("resumes") or [] if isinstance(r, dict)]
        if "epochs" in meta and meta["epochs"] != self.epochs:
            self.resumes.append({"after_epoch": done, "epochs": [meta["epochs"], self.epochs]})
        if "world_size" in meta and meta["world_size"] != self.world_size:
            warnings.warn(f"resuming {path} with world_size {meta['world_size']!r} -> {self.world_size!r}: the "
                          "run continues but will not match an uninterrupted one", stacklevel=5)

    def _saved_config(self) -> dict | None:
        """The run's config.yaml (checkpoints of maxup versions before settings were saved in them)."""
        path = None if self.out_dir is None else self.out_dir / "config.yaml"
        if path is None or not path.is_file():
            return None
        try:
            import yaml

            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except Exception:  # an unreadable config.yaml gives nothing to compare
            return None
        return config if isinstance(config, dict) else None

    def _restore(self, state: dict, path: Path) -> None:
        self._check_settings(state, path)
        try:
            self.module.load_state_dict(strip_compile_prefix(state["model"]))
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                if state.get("scheduler") is None:
                    warnings.warn(f"{path} holds no scheduler state; the scheduler starts afresh", stacklevel=4)
                else:
                    self.scheduler.load_state_dict(state["scheduler"])
            self.step.load_state_dict(state["step"])
            if self.average is not None:
                if state.get("average") is None:
                    raise KeyError("the checkpoint holds no weight average")
                self.average.load_state_dict(state["average"])
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {path} does not fit this model, optimizer or method "
                                  f"({type(err).__name__}: {' '.join(str(err).split())}). Resume "
                                  "with the configuration that wrote it, or use another out_dir.") from err
        rngs = state["rng"]
        if len(rngs) == self.world_size:
            try:
                restore_rng(rngs[self.rank], self.generator)
            except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as err:
                raise CheckpointError(f"checkpoint {path} holds unreadable RNG states ({type(err).__name__}: "
                                      f"{err}); delete it to resume from the previous checkpoint") from err
        else:
            warnings.warn(f"{path} holds RNG states of {len(rngs)} processes, this run has {self.world_size}: "
                          "augmentation randomness starts afresh", stacklevel=4)
        self.history = [dict(r) for r in state["history"]]
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if self.is_main and self.progress:
            self._write(f"resumed from {path} (epoch {self.epoch} of {self.epochs} done)")

    # ------------------------------------------------------------------ configuration and display

    def resolved_config(self) -> dict:
        """``config`` plus the trainer's settings under ``"trainer"`` (as written to config.yaml)."""
        opt = self.optimizer
        objective = getattr(self.step, "objective", None)
        settings = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "device": str(self.device),
            "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "num_classes": self.num_classes,
            "input_shape": list(self.train_data.x.shape[1:]),
            "train_size": len(self.train_data),
            "val_size": 0 if self.val_data is None else len(self.val_data),
            "test_size": 0 if self.test_data is None else len(self.test_data),
            "model": type(self.module).__name__,
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "step": type(self.step).__name__,
            "objective": repr(objective),
            "average": None if self.average is None else repr(self.average),
            "amp": getattr(self.step, "amp", None),
            "max_grad_norm": getattr(self.step, "max_grad_norm", None),
            "optimizer": type(opt).__name__,
            "param_groups": [{"params": sum(p.numel() for p in g["params"]), "lr": g.get("initial_lr", g["lr"]),
                              **{k: g[k] for k in ("weight_decay", "momentum", "nesterov", "betas") if k in g}}
                             for g in opt.param_groups],
            "scheduler": None if self.scheduler is None else type(self.scheduler).__name__,
            "keep_checkpoints": self.keep_checkpoints,
            "checkpoint_every": self.checkpoint_every,
            **({"eval_every": self.eval_every} if self.eval_every != 1 else {}),
            **({"robust_eval": repr(self.robust_eval)} if self.robust_eval is not None else {}),
            "torch": torch.__version__,
            "compile": self.compile,
            "channels_last": self.channels_last,
            **({"tf32": self.tf32} if self.device.type == "cuda" else {}),
            **({"sampler": self.sampler} if self.sampler != "instance" else {}),
            **({"noisy_train_labels": len(self.noisy_index)} if self.noisy_index is not None else {}),
            **({"train_class_counts": self.train_class_counts.tolist(), "shot_thresholds": list(self.shot_thresholds)}
               if self.class_metrics else {}),
        }
        config = dict(self.config)
        config["trainer"] = {**settings, **dict(config.get("trainer") or {})}
        if self.resumes:
            config["resumed"] = [dict(r) for r in self.resumes]
        return config

    def _bar(self, epoch: int, total: int):
        if not (self.progress and self.is_main):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.epochs}", file=sys.stderr, leave=False,
                    dynamic_ncols=True, unit="step")

    @staticmethod
    def _write(line: str) -> None:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(line, file=sys.stderr)
        else:
            tqdm.write(line, file=sys.stderr)

    @staticmethod
    def _summary(record: dict) -> str:
        parts = [f"epoch {record['epoch']}"]
        for key in ("train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "test_ece", "val_perplexity",
                    "test_perplexity"):
            if key in record and isinstance(record[key], float) and math.isfinite(record[key]):
                parts.append(f"{key} {record[key]:.4f}")
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
        return "  ".join(parts)


__all__ = ["NonFiniteLossError", "NonFiniteStateError", "RESUMABLE", "TIMING_KEYS", "Trainer", "epoch_hooks",
           "generator_seed",
           "host_generator_seed"]
