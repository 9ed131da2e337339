"""PADDLES (Huang, Kang, Liu, Salvado, Rakotoarivelo, Wang, Liu, ICCV 2023): phase-amplitude disentangled stopping.

"PADDLES: Phase-Amplitude Spectrum Disentangled Early Stopping for Learning with Noisy Labels". The
features at the output of chosen layers are split by a DFT into their amplitude and phase spectra and
recombined (:func:`maxup.functional.spectrum.spectral_detach`). Training runs as usual until epoch
``amplitude_stop``; from then on the amplitude is detached, so the layers before the split learn only
through the phase of their features; from epoch ``phase_stop`` on the phase is detached too and those
layers stop learning, while the layers after the split train on. The paper's finding: the phase carries
more of the semantics and is more robust to noisy labels than the amplitude, so the amplitude stops first.

The split runs through forward hooks on the chosen layers (default: the penultimate of the model's
``.stages``, as the authors' ResNet-18 splits after ``layer3`` of four), registered around every
training forward of the step (its objective's, and the replay under ``sam``) and removed after; no-grad
forwards (evaluation, MaxUp's selection pass) are not touched. Any objective works (``paddles+cutout``,
``paddles+maxup(m=4)+cutout``).

The step needs the epoch: the :class:`~maxup.train.Trainer` calls :meth:`PADDLES.on_epoch_end` after
every epoch; a loop of your own calls ``step.on_epoch_end(model, data, epoch=e)`` (``data`` is not read).

Cost: nothing before ``amplitude_stop``; then a forward and an inverse FFT of the split features and
their backward; after ``phase_stop`` no FFT, and a shorter backward (none into the layers before the split).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .._checks import check_int
from .._modules import uncompiled, unwrap
from ..functional.spectrum import SPECTRAL_DIMS, spectral_detach
from ..objectives import Objective, ObjectiveResult
from ..registry import register
from .base import Step

__all__ = ["PADDLES", "default_layers", "spectral_split"]


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The penultimate entry of ``model.stages`` (the last one when there is only one)."""
    stages = getattr(unwrap(model), "stages", None)
    if not stages:
        raise ValueError(f"{type(unwrap(model)).__name__} has no .stages: pass layers=['name', ...], the modules (as "
                         "in model.named_modules()) whose outputs are split into amplitude and phase")
    return (stages[-2] if len(stages) > 1 else stages[-1],)


def _check_layers(layers) -> tuple[str, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        if layers == "all":
            return ("all",)
        layers = (layers,)
    if not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(n, str) and n for n in layers):
        raise ValueError(f"layers must be a list of module names (as in model.named_modules()), 'all' (every "
                         f"entry of model.stages) or None (the penultimate stage), got {layers!r}")
    return tuple(layers)


def _resolve(layers: tuple[str, ...] | None, model: nn.Module) -> tuple[str, ...]:
    net = unwrap(model)
    if layers is None:
        return default_layers(net)
    if layers == ("all",):
        stages = getattr(net, "stages", None)
        if not stages:
            raise ValueError(f"layers='all' names every entry of model.stages, but {type(net).__name__} has none: "
                             "pass layers=['name', ...]")
        return tuple(stages)
    modules = dict(net.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise ValueError(f"layers names {missing}, not modules of {type(net).__name__}; its stages are "
                         f"{list(getattr(net, 'stages', []) or [])}")
    return layers


@contextlib.contextmanager
def spectral_split(model: nn.Module, layers, *, amplitude: bool, phase: bool, dims: str = "spatial"):
    """Within the block, the outputs of ``layers`` (module names of ``model``) in forwards that record gradients
    pass through :func:`~maxup.functional.spectrum.spectral_detach`; nothing is hooked when neither part stops.

    >>> with spectral_split(model, ["blocks.0"], amplitude=True, phase=False):
    ...     model(x).sum().backward()                 # blocks.0 learns through the phase only
    """
    if not amplitude and not phase:
        yield
        return
    net = unwrap(model)
    modules = dict(net.named_modules())

    def hook(module, inputs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return None
        return spectral_detach(output, amplitude=amplitude, phase=phase, dims=dims)

    handles = [modules[name].register_forward_hook(hook) for name in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@register("paddles", "PADDLES: features of chosen layers (default the penultimate stage) split by a DFT into "
          "amplitude and phase; the amplitude stops passing gradients at amplitude_stop, the phase at phase_stop")
class PADDLES(Step):
    """Phase-amplitude disentangled early stopping (Huang et al. 2023) around any objective.

    Args:
        objective: the loss (``maxup.ERM()``, ``maxup.ERM(augment)``, ``maxup.MaxUp(augment, m)``).
        optimizer: the optimizer.
        amplitude_stop: epochs (done) after which the amplitude spectrum is detached (the authors' 19 of 200 on
            CIFAR); 0 detaches it from the start.
        phase_stop: epochs after which the phase spectrum is detached too (the authors' 30): the layers before
            the split then get no gradient.
        layers: module names (as in ``model.named_modules()``) whose outputs are split; ``"all"`` splits every
            entry of ``model.stages`` (the authors' ``ResNet_New_ALLDetach``); None: the penultimate stage.
        dims: ``"spatial"``: the 2-D DFT of every feature map (the paper's); ``"all"``: one DFT over the whole
            (B, C, H, W) tensor, as ``torch.fft.fftn(out)`` in the authors' code (it couples the samples' gradients).
        model: checks ``layers`` at construction (otherwise on the first call).
        max_grad_norm, amp: see :class:`maxup.steps.Step`.

    >>> step = PADDLES(maxup.ERM(), opt, amplitude_stop=19, phase_stop=30, model=model)
    >>> step.layers
    ('blocks.1',)
    >>> step.on_epoch_end(model, None, epoch=19)          # from epoch 20 on, blocks.0-1 learn through the phase
    >>> step.stopped
    (True, False)
    """

    domain = "tensor"
    search_space = {"amplitude_stop": (5, 60, "int"), "phase_stop": (10, 90, "int")}
    #: from ``phase_stop`` on the layers before the split get no gradient: DDP must not wait for them
    unused_parameters = True

    def __init__(self, objective: Objective, optimizer: torch.optim.Optimizer, *, amplitude_stop: int = 19,
                 phase_stop: int = 30, layers=None, dims: str = "spatial", model: nn.Module | None = None,
                 max_grad_norm: float | None = None, amp: str | None = None):
        self.amplitude_stop = check_int("amplitude_stop", amplitude_stop, minimum=0)
        self.phase_stop = check_int("phase_stop", phase_stop, minimum=0)
        if dims not in SPECTRAL_DIMS:
            raise ValueError(f"dims must be one of {SPECTRAL_DIMS} ('spatial': the DFT of each feature map; 'all': "
                             f"one DFT over the whole tensor, as the authors' code), got {dims!r}")
        self.dims = dims
        self._layers = _check_layers(layers)
        self.layers: tuple[str, ...] | None = None if model is None else _resolve(self._layers, model)
        super().__init__(objective, optimizer, max_grad_norm=max_grad_norm, amp=amp)
        self.epoch = 0  # epochs done, set by on_epoch_end

    def __repr__(self) -> str:
        return (f"PADDLES({self.objective!r}, amplitude_stop={self.amplitude_stop}, phase_stop={self.phase_stop}, "
                f"layers={self.layers if self.layers is not None else self._layers}, dims={self.dims!r})")

    @property
    def stopped(self) -> tuple[bool, bool]:
        """``(amplitude, phase)``: which spectra are detached in this epoch."""
        return self.epoch >= self.amplitude_stop, self.epoch >= self.phase_stop

    def on_epoch_end(self, model, data=None, *, epoch: int) -> None:
        """After epoch ``epoch`` (the number of epochs done): the next epoch's stops follow from it."""
        self.epoch = check_int("epoch", epoch, minimum=0)

    def prepare(self, model) -> None:
        if self.layers is None:
            self.layers = _resolve(self._layers, model)

    def _split(self, model):
        amplitude, phase = self.stopped
        return spectral_split(model, self.layers, amplitude=amplitude, phase=phase, dims=self.dims)

    def evaluate(self, model, x, y, generator) -> ObjectiveResult:
        if self.layers is None:
            self.prepare(model)
        if not any(self.stopped):
            return self.objective(model, x, y, generator)
        with self._split(model):  # hooks that change with the epoch: run without the torch.compile wrapper
            return self.objective(uncompiled(model), x, y, generator)

    def reevaluate(self, model, result: ObjectiveResult) -> ObjectiveResult:
        if not any(self.stopped):
            return super().reevaluate(model, result)
        with self._split(model):
            return super().reevaluate(uncompiled(model), result)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])
