"""TokenMix (Liu, Liu, Zhou, Li, Liu, ECCV 2022): mix two images token by token through separated blocks.

The mask is drawn on the patch grid as the authors' block generator draws it (see
:mod:`maxup.functional.tokenmix`) with a mask ratio drawn per mask; the labels follow a teacher's
class activation maps when a teacher is given (a module, or a ``maxup train`` run directory),
else the share of tokens each image keeps.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .._checks import check_range
from .._modules import unwrap
from ..functional import _random as R
from ..functional.tokenmix import activation_maps, content_maps, token_block_masks, token_grid, tokenmix
from ..registry import register
from .base import Augmentation

__all__ = ["DEFAULT_PATCH", "TokenMix", "load_teacher"]

#: the token side, in pixels, for models without a patch size of their own (CNNs, ResNets)
DEFAULT_PATCH = 4


def load_teacher(path) -> nn.Module:
    """The trained model of a ``maxup train`` run: ``path`` is its directory or its ``model.pt``.

    It is rebuilt from the run's ``config.yaml`` (model, options, input shape, classes) and loaded
    from ``model.pt``, on the CPU, in eval mode, its parameters frozen.
    """
    path = Path(path)
    run = path.parent if path.suffix == ".pt" else path
    weights = path if path.suffix == ".pt" else run / "model.pt"
    config_path = run / "config.yaml"
    if not weights.is_file() or not config_path.is_file():
        raise ValueError(f"teacher={str(path)!r} is not a finished maxup train run: it needs {config_path} and "
                         f"{weights} (train one with maxup train --out RUN_DIR, or pass a module in Python)")
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml comes with the cli extra
        raise ValueError("teacher=<run directory> reads the run's config.yaml: install pyyaml "
                         "(pip install 'maxup[cli]')") from None
    from ..models import create_model

    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    config = config if isinstance(config, dict) else {}
    state = torch.load(weights, map_location="cpu", weights_only=True)
    shape = (config.get("trainer") or {}).get("input_shape")
    classes = config.get("num_classes") or (state["classifier.weight"].shape[0] if "classifier.weight" in state
                                            else None)
    if "model" not in config or not shape or not classes:
        raise ValueError(f"{config_path} does not say which model the run trained (model, num_classes, "
                         "trainer.input_shape): give a run directory written by maxup train")
    teacher = create_model(config["model"], input_shape=tuple(shape), num_classes=int(classes),
                           **dict(config.get("model_opt") or {}))
    try:
        teacher.load_state_dict(state)
    except Exception as err:
        raise ValueError(f"{weights} does not load into the {config['model']} model its config.yaml describes "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return teacher.eval().requires_grad_(False)


def _teacher_classes(teacher: nn.Module) -> int | None:
    classifier = getattr(unwrap(teacher), "classifier", None)
    return classifier.out_features if isinstance(classifier, nn.Linear) else None


@contextlib.contextmanager
def _eval(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@register("tokenmix", "TokenMix: another sample pasted token by token through separated blocks of the patch grid; "
          "labels from a teacher's activation maps (teacher=RUN_DIR) or by token share; last in a spec",
          per_sample=True)
class TokenMix(Augmentation):
    """TokenMix (Liu et al., "TokenMix: Rethinking Image Mixing for Data Augmentation in Vision Transformers",
    ECCV 2022): the partner's tokens pasted through a mask of separated blocks of the patch grid.

    Per mask: a ratio ``r ~ U(ratio)`` (or ``r = ratio``), ``int(r N)`` of the N tokens to mask,
    blocks drawn as in the authors' ``generate_mask`` (BEiT's block-wise masking, aspect ratios
    in ``[min_aspect, 1 / min_aspect]``); the masked tokens take the partner ``x[perm]``. Labels:
    with ``teacher``, each image keeps the share of its own class activation map (the teacher's,
    on the unmixed images) on its kept tokens against the partner's on the pasted ones
    (:func:`maxup.functional.tokenmix.tokenmix_weight`); without one, the share of tokens it keeps.

    Args:
        ratio: the mask ratio, a number in (0, 1] or a range ``(low, high)`` drawn uniformly per mask.
        patch_size: token side in pixels (an int or ``(ph, pw)``); default: the model's own
            ``patch_size`` (a :class:`maxup.models.ViT`), else :data:`DEFAULT_PATCH`. It must divide
            the images.
        teacher: a trained model of this package giving content-based activation maps: a module,
            or the path of a ``maxup train`` run directory (or its ``model.pt``), with the same
            classes. The paper notes the teacher need not be strong. None: labels by token share.
        min_aspect: the blocks' smallest aspect ratio (the authors': 0.3).
        model: the model being trained, read for its ``patch_size`` only.
        per_sample: one mask per sample instead of one per batch (the authors': per batch).
        num_classes: for integer labels.
        p: probability that a sample (or the batch) is mixed.

    >>> aug = TokenMix(patch_size=4, num_classes=10, per_sample=True)
    >>> x_mix, t_mix = aug(torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.Generator().manual_seed(0))
    >>> x_mix.shape, t_mix.shape
    (torch.Size([8, 1, 28, 28]), torch.Size([8, 10]))
    """

    domain = "image"
    mixes_rows = True
    last = ("its token mask and teacher labels are laid on the final inputs' patch grid: write e.g. "
            "'maxup(m=4)+cropflip+tokenmix'")

    def __init__(self, ratio=(0.3, 0.7), *, patch_size=None, teacher=None, min_aspect: float = 0.3,
                 model: nn.Module | None = None, per_sample: bool = False, num_classes: int | None = None,
                 p: float = 1.0):
        super().__init__(num_classes=num_classes, p=p)
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            ratio = (ratio, ratio)
        self.ratio = check_range("ratio", ratio, low=0.0, high=1.0)
        if self.ratio[1] <= 0.0:
            raise ValueError(f"ratio must be above 0 (the share of tokens to paste), got {ratio!r}")
        if isinstance(min_aspect, bool) or not isinstance(min_aspect, (int, float)) or not 0.0 < min_aspect <= 1.0:
            raise ValueError(f"min_aspect must be a number in (0, 1] (blocks have aspect ratios in [min_aspect, "
                             f"1 / min_aspect]; the authors' 0.3), got {min_aspect!r}")
        self.min_aspect = float(min_aspect)
        self.per_sample = bool(per_sample)
        self.patch_size = self._check_patch(patch_size, model)
        self.teacher_source = teacher if teacher is None or isinstance(teacher, (str, Path)) else type(teacher).__name__
        if isinstance(teacher, (str, Path)):
            teacher = load_teacher(teacher)
        elif teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"teacher must be None, a torch.nn.Module or the path of a maxup train run directory, "
                             f"got {type(teacher).__name__}")
        if teacher is not None and self.num_classes is not None:
            classes = _teacher_classes(teacher)
            if classes is not None and classes != self.num_classes:
                raise ValueError(f"the teacher predicts {classes} classes but the data has {self.num_classes}: give a "
                                 "teacher trained on the same classes")
        object.__setattr__(self, "_teacher", teacher)  # not a submodule: never trained, saved or put in train mode

    @staticmethod
    def _check_patch(patch_size, model) -> tuple[int, int]:
        if patch_size is None:
            own = getattr(unwrap(model), "patch_size", None) if model is not None else None
            patch_size = own if own is not None else DEFAULT_PATCH
        pair = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
        if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
            raise ValueError(f"patch_size must be a positive int or a pair (ph, pw) of them (the token side in "
                             f"pixels), got {patch_size!r}")
        return pair

    def apply(self, x, t, generator):
        n, (h, w) = x.shape[0], x.shape[-2:]
        grid = token_grid((h, w), self.patch_size)
        tokens = grid[0] * grid[1]
        k = n if self.per_sample else 1
        lo, hi = self.ratio
        u = R.rand((2, k), generator=R.host(generator), device="cpu", dtype=torch.float64)
        counts = ((lo + (hi - lo) * u[0]) * tokens).long().clamp(0, tokens)
        if self.p < 1.0:
            counts = torch.where(u[1] < self.p, counts, 0)
        mask = token_block_masks(counts, grid, min_aspect=self.min_aspect, generator=generator)
        perm = R.randperm(n, generator=generator, device=x.device)
        content = None
        if self._teacher is not None:
            content = content_maps(self._activation_maps(x, t), t, grid)
        out, targets, _ = tokenmix(x, t, mask, perm, self.patch_size, content)
        return out, targets

    def _activation_maps(self, x, t) -> torch.Tensor:
        teacher = self._teacher
        first = next(teacher.parameters(), None)
        if first is not None and first.device != x.device:
            teacher.to(x.device)
        with _eval(teacher):
            maps = activation_maps(unwrap(teacher), x)
        if maps.shape[1] != t.shape[1]:
            raise ValueError(f"the teacher predicts {maps.shape[1]} classes but the targets have {t.shape[1]}: give a "
                             "teacher trained on the same classes")
        return maps

    def _options(self):
        return {"ratio": self.ratio, "patch_size": self.patch_size, "teacher": self.teacher_source,
                "min_aspect": self.min_aspect, "per_sample": self.per_sample, **super()._options()}
