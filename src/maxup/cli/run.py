"""One run of any task: ``maxup train`` (image classification) and ``maxup lm`` (language modelling) are this
command on two tasks, and every run of ``maxup compare`` goes through :func:`run`."""
from __future__ import annotations

import argparse
import os
import warnings

import torch

from .. import methods as M
from ..robust import RobustEval
from ..train import fit
from ..train.distributed import resolve_device
from .files import check_run_dir
from .options import add_image_options, add_run_dir_options
from .tasks import IMAGE, Task, get_task


def is_main() -> bool:
    """Whether this is the process that prints and writes reports (rank 0 under torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def tensorboard_wanted(args) -> bool:
    """``--tensorboard``: True when asked and TensorBoard is installed; asked without it, one warning and False
    (so that no run, in this process or a worker, warns again). It writes into the run directory: ``maxup train``
    and ``maxup lm`` need ``--out``."""
    if not getattr(args, "tensorboard", False):
        return False
    if getattr(args, "out", None) is None:
        raise ValueError("--tensorboard writes TensorBoard logs into the run directory: give --out RUN_DIR")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        warnings.warn(f"--tensorboard: TensorBoard is not available ({err}); training without TensorBoard logs "
                      "(pip install tensorboard)", stacklevel=2)
        return False
    return True


def run(task: Task, config: dict, *, out_dir=None, resume: bool = False, progress=None, splits=None,
        spec: M.Spec | None = None, tensorboard: bool = False, on_epoch=None) -> list[dict]:
    """Train one configuration of ``task`` (the task's config: its :attr:`~Task.keys`, ``method`` and ``seed``);
    returns the history. ``splits`` are the task's data and ``spec`` the parsed ``config["method"]`` when the
    caller has them already. ``tensorboard`` also writes TensorBoard scalars into ``out_dir/tensorboard`` (not a
    setting of the run: a resume may change it); ``on_epoch`` is called with each epoch's record
    (:class:`maxup.train.Trainer`).

    With ``resume`` a run in ``out_dir`` continues if its settings are the same (more epochs may be
    given); a changed setting is an error naming it."""
    if spec is None:
        spec = task.spec(config["method"])
    resolve_device(config["device"], name="--device")  # a wrong --device fails before the data is loaded
    if splits is None:
        splits = task.load(config)
    robust = None
    if config.get("robust_eps") is not None:  # PGD in [0, 1] pixels, through the normalisation
        robust = RobustEval(config["robust_eps"], steps=config.get("robust_steps", 10),
                            limit=config.get("robust_limit", 1000), mean=getattr(splits, "mean", None),
                            std=getattr(splits, "std", None))
    torch.manual_seed(config["seed"])
    model = task.model(config, splits)
    return fit(model, spec, train=splits.train, test=splits.test, val=splits.val, epochs=config["epochs"],
               batch_size=config["batch_size"], lr=config["lr"], optimizer=config["optimizer"],
               momentum=config["momentum"], weight_decay=config["weight_decay"],
               warmup_epochs=config["warmup_epochs"], seed=config["seed"], device=config["device"], out_dir=out_dir,
               amp=config["amp"], max_grad_norm=config["max_grad_norm"], num_classes=splits.num_classes,
               progress=progress, resume=resume, config=config, compile=config.get("compile", False),
               channels_last=config.get("channels_last", False), tf32=config.get("tf32", True),
               log_tensorboard=tensorboard, on_epoch=on_epoch, sampler=config.get("class_sampler", "instance"),
               class_metrics=config.get("imbalance") is not None, eval_every=config.get("eval_every", 1),
               robust_eval=robust)


def train(args) -> list[dict]:
    """``maxup train`` and ``maxup lm``: one method, one seed, on ``args.task``."""
    task = get_task(args.task)
    spec = task.spec(args.method)
    config = task.config(args, str(spec), args.seed)
    check_run_dir(args)
    history = run(task, config, out_dir=args.out, resume=args.resume, progress=args.progress, spec=spec,
                  tensorboard=tensorboard_wanted(args))
    if is_main() and history:
        task.print_run(config, history)
        if args.out:
            print(f"run directory: {args.out}")
    return history


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``train`` command."""
    p = sub.add_parser("train", help="train one method and write a run directory",
                       description="Train one method; writes metrics, config and checkpoints into --out.")
    add_image_options(p, IMAGE.defaults)
    p.add_argument("--method", default="erm", help="method spec, e.g. 'maxup(m=4)+cutout(size=8)' (default: erm)")
    add_run_dir_options(p)
    p.set_defaults(func=train, task=IMAGE.name)
    return p
