"""Sharpness-aware minimization as a drop-in optimizer wrapper: :class:`SAM` (and ASAM).

SAM (Foret et al. 2021) minimizes ``max_{||eps|| <= rho} L(w + eps)``. One step:

1. the gradient ``g`` at ``w`` (the caller's forward and backward);
2. ascend: ``eps = rho * g / ||g||`` -- or, for ASAM (Kwon et al. 2021),
   ``eps = rho * T^2 g / ||T g||`` with ``T = |w| + eta`` elementwise;
3. the gradient at ``w + eps``;
4. restore ``w`` exactly (from a saved copy, not ``w + eps - eps``) and let the base
   optimizer apply the gradient of step 3 at ``w``.

:func:`sam_perturbation` is the one functional core: this wrapper and the training
step :class:`maxup.steps.SharpnessAware` both call it.

>>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
>>> loss_fn(model(x), y).backward()          # gradient at w
>>> opt.first_step(zero_grad=True)           # w -> w + eps
>>> loss_fn(model(x), y).backward()          # gradient at w + eps
>>> opt.second_step(zero_grad=True)          # restore w, base optimizer update

The training step :class:`maxup.steps.SharpnessAware` (around any objective or step,
e.g. MaxUp or GradAug) adds what a bare wrapper cannot see: BatchNorm statistics from
the first pass only, ``no_sync`` under DDP, gradient accumulation, fp16 loss scaling,
clipping of the final gradient.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from numbers import Real

import torch

__all__ = ["SAM", "sam_perturbation", "sam_grad_norm", "is_weight_name"]

_TINY = 1e-12  # added to the gradient norm: a zero gradient gives a zero perturbation


def is_weight_name(name: str) -> bool:
    """ASAM's reference code scales a tensor adaptively when ``"weight"`` is in its name."""
    return "weight" in name


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, Real) or math.isnan(rho) or math.isinf(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0 (the radius of the perturbation), got {rho!r}")
    return float(rho)


def _check_eta(eta) -> float:
    if isinstance(eta, bool) or not isinstance(eta, Real) or math.isnan(eta) or math.isinf(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (ASAM's T = |w| + eta), got {eta!r}")
    return float(eta)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _per_tensor(name: str, value, n: int, check) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} holds {len(value)} values for {n} tensors")
        return [check(v) for v in value]
    return [check(value)] * n


def _groups(indices: Iterable[int], tensors: Sequence[torch.Tensor], *keys: Sequence) -> dict:
    """Indices grouped by (device, dtype, *per-tensor keys), for the foreach kernels."""
    out: dict = defaultdict(list)
    for i in indices:
        out[(tensors[i].device, tensors[i].dtype, *(k[i] for k in keys))].append(i)
    return out


@torch.no_grad()
def _scaled_grads(params, grads, adaptive, etas):
    """``T g`` per tensor (``g`` itself where not adaptive) and ``T`` (None where not adaptive)."""
    n = len(params)
    tg: list = list(grads)
    ts: list = [None] * n
    adaptive_idx = [i for i in range(n) if adaptive[i]]
    for (_, _, eta), idx in _groups(adaptive_idx, params, etas).items():
        t = torch._foreach_abs([params[i].detach() for i in idx])
        torch._foreach_add_(t, eta)
        scaled = torch._foreach_mul(t, [grads[i] for i in idx])
        for j, i in enumerate(idx):
            ts[i], tg[i] = t[j], scaled[j]
    return tg, ts


@torch.no_grad()
def _norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together (float32 or wider), on the first tensor's device."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    parts = []
    for _, idx in _groups(range(len(tensors)), tensors).items():
        norms = torch._foreach_norm([tensors[i] for i in idx])
        parts.append(torch.linalg.vector_norm(torch.stack([v.float() for v in norms])).to(device))
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def sam_grad_norm(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], *, adaptive=False,
                  eta=0.01) -> torch.Tensor:
    """``||g||`` for SAM, ``||T g||`` for ASAM (``T = |w| + eta``): the norm the ascent divides by."""
    params, grads = list(params), list(grads)
    n = len(params)
    tg, _ = _scaled_grads(params, grads, _per_tensor("adaptive", adaptive, n, lambda v: _check_flag("adaptive", v)),
                          _per_tensor("eta", eta, n, _check_eta))
    return _norm(tg)


@torch.no_grad()
def sam_perturbation(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho=0.05, *, adaptive=False,
                     eta=0.01, return_norm: bool = False):
    """The SAM / ASAM ascent ``eps`` for every tensor (new tensors; nothing is edited).

    SAM: ``eps = rho * g / ||g||``. ASAM: ``eps = rho * T^2 g / ||T g||`` with
    ``T = |w| + eta`` elementwise. The norm runs over all tensors together.

    Args:
        params: the weights ``w`` (needed by ASAM).
        grads: the gradients ``g`` at ``w``, one per tensor of ``params``.
        rho: radius (>= 0); a float, or one value per tensor.
        adaptive: ASAM scaling; a bool, or one bool per tensor (``T = 1`` where False,
            which is how ASAM's reference code treats biases).
        eta: ASAM's offset in ``T = |w| + eta`` (>= 0); a float or one per tensor.
        return_norm: also return the norm (a 0-d tensor; not finite on overflow).

    >>> w, g = [torch.tensor([3.0, 0.0])], [torch.tensor([0.0, 2.0])]
    >>> sam_perturbation(w, g, rho=0.1)
    [tensor([0.0000, 0.1000])]
    """
    params, grads = list(params), list(grads)
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"params holds {n} tensors but grads holds {len(grads)}")
    rhos = _per_tensor("rho", rho, n, _check_rho)
    flags = _per_tensor("adaptive", adaptive, n, lambda v: _check_flag("adaptive", v))
    etas = _per_tensor("eta", eta, n, _check_eta)
    if n == 0:
        return ([], torch.zeros(())) if return_norm else []
    tg, ts = _scaled_grads(params, grads, flags, etas)
    norm = _norm(tg)
    inv = 1.0 / (norm + _TINY)
    eps: list = [None] * n
    for (device, _, rho_i, adapt), idx in _groups(range(n), params, rhos, flags).items():
        scale = (inv * rho_i).to(device)
        if adapt:  # T^2 g = T (T g)
            out = torch._foreach_mul([tg[i] for i in idx], [ts[i] for i in idx])
            torch._foreach_mul_(out, scale)
        else:
            out = torch._foreach_mul([grads[i] for i in idx], scale)
        for j, i in enumerate(idx):
            eps[i] = out[j].to(params[i].dtype)
    return (eps, norm) if return_norm else eps


def _is_optimizer_class(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any torch optimizer (SAM, or ASAM with ``adaptive=True``).

    Args:
        params: the parameters (or parameter groups) to optimize, as for any optimizer;
            may be ``None`` when ``base_optimizer`` is an instance.
        base_optimizer: a :class:`torch.optim.Optimizer` class (built here as
            ``base_optimizer(params, **kwargs)``) or an instance (then ``kwargs`` must be empty).
        rho: radius of the ascent (>= 0); ``rho=0`` reproduces the base optimizer exactly.
        adaptive: ASAM (Kwon et al. 2021): ``eps = rho T^2 g / ||T g||``, ``T = |w| + eta``.
        eta: ASAM's offset (>= 0).
        weights_only: with ``adaptive``, scale only weight tensors (names containing
            ``"weight"``) adaptively, as ASAM's reference code does; the other tensors
            (biases) are still perturbed, with ``T = 1``. Needs parameter names: build
            the optimizer from ``model.named_parameters()``.
        **kwargs: the base optimizer's own arguments (``lr``, ``momentum``, ...).

    ``param_groups`` and ``state`` *are* the base optimizer's, so a learning-rate
    scheduler works on either object, and ``rho``/``adaptive``/``eta`` may be set per group.

    Use :meth:`first_step` / :meth:`second_step` around the second forward-backward, or
    :meth:`step` with a closure. The training step :class:`maxup.steps.SharpnessAware` wraps
    the same core with BatchNorm, DDP, accumulation and fp16 handled.

    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    >>> def closure():
    ...     loss = loss_fn(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = closure()               # gradient at w
    >>> loss = opt.step(closure)       # ascend, closure at w + eps, restore, update
    >>> opt.zero_grad()

    References: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021. Kwon et al., "ASAM: Adaptive Sharpness-Aware
    Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021.
    """

    def __init__(self, params=None, base_optimizer=None, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
                 *, weights_only: bool = False, **kwargs):
        rho = _check_rho(rho)
        eta = _check_eta(eta)
        adaptive = _check_flag("adaptive", adaptive)
        weights_only = _check_flag("weights_only", weights_only)
        if weights_only and not adaptive:
            raise ValueError("weights_only=True only changes ASAM's scaling: it needs adaptive=True")
        if isinstance(base_optimizer, SAM):
            raise ValueError("base_optimizer is already a maxup.optim.SAM; wrap the plain optimizer once")
        if _is_optimizer_class(base_optimizer):
            if params is None:
                raise ValueError("params is required when base_optimizer is a class (e.g. model.parameters())")
            base = base_optimizer(params, **kwargs)
        elif isinstance(base_optimizer, torch.optim.Optimizer):
            if kwargs:
                raise ValueError(f"base_optimizer is already built; its options cannot be set here: {sorted(kwargs)}")
            if params is not None:
                given = {id(p) for p in _flat_params(params)}
                held = {id(p) for g in base_optimizer.param_groups for p in g["params"]}
                if given != held:
                    raise ValueError("params differ from the parameters of the base_optimizer instance; "
                                     "pass params=None to use the instance's")
            base = base_optimizer
        else:
            raise ValueError("base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD) or "
                             f"instance, got {type(base_optimizer).__name__ if base_optimizer is not None else None}")
        self.base_optimizer = base
        # torch.optim.Optimizer.__init__ would build its own groups; __setstate__ sets up the hooks only.
        torch.optim.Optimizer.__setstate__(self, {
            "defaults": {**base.defaults, "rho": rho, "adaptive": adaptive, "eta": eta, "weights_only": weights_only},
        })
        self._warned_capturable_if_run_uncaptured = True
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._setup_groups()

    # --------------------------------------------------------------- the base optimizer's groups and state

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.base_optimizer.param_groups = groups

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.base_optimizer.state = state

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        torch.optim.Optimizer.__setstate__(self, state)

    def __repr__(self) -> str:
        d = self.defaults
        return (f"SAM({self.base_optimizer!r}, rho={d['rho']}, adaptive={d['adaptive']}, eta={d['eta']}, "
                f"weights_only={d['weights_only']})")

    def _setup_groups(self) -> None:
        for group in self.param_groups:
            for key in ("rho", "adaptive", "eta", "weights_only"):
                group.setdefault(key, self.defaults[key])
            _check_rho(group["rho"])
            _check_eta(group["eta"])
            _check_flag("adaptive", group["adaptive"])
            _check_flag("weights_only", group["weights_only"])
            if group["weights_only"] and group["adaptive"] and "param_names" not in group:
                raise ValueError("weights_only=True needs parameter names to tell weights from biases: build the "
                                 "optimizer from model.named_parameters()")

    def add_param_group(self, param_group: dict) -> None:
        self.base_optimizer.add_param_group(param_group)
        self._setup_groups()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # --------------------------------------------------------------- the two half-steps

    def _with_grads(self):
        """(params, grads, rhos, adaptive flags, etas) of every parameter that has a gradient."""
        params, grads, rhos, flags, etas = [], [], [], [], []
        for group in self.param_groups:
            names = group.get("param_names")
            for k, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                adaptive = group["adaptive"]
                if adaptive and group["weights_only"]:
                    adaptive = is_weight_name(names[k])
                params.append(p)
                grads.append(p.grad)
                rhos.append(group["rho"])
                flags.append(adaptive)
                etas.append(group["eta"])
        return params, grads, rhos, flags, etas

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save ``w`` and move to ``w + eps`` using the current gradients (those at ``w``)."""
        if self._saved is not None:
            raise RuntimeError("first_step() was called twice without second_step(): the weights are already "
                               "perturbed; call second_step() to restore them and update")
        params, grads, rhos, flags, etas = self._with_grads()
        eps = sam_perturbation(params, grads, rhos, adaptive=flags, eta=etas)
        self._saved = [(p, p.detach().clone()) for p in params]
        if params:
            torch._foreach_add_(params, eps)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved ``w`` exactly and take the base optimizer's step with the current gradients."""
        if self._saved is None:
            raise RuntimeError("second_step() called before first_step(): compute the gradient at w, call "
                               "first_step(), compute the gradient at w + eps, then call second_step()")
        for p, saved in self._saved:
            p.copy_(saved)
        self._saved = None
        self.base_optimizer.step()
        self._opt_called = True  # a learning-rate scheduler on this wrapper checks this after step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One SAM step; ``closure`` computes the loss and calls ``backward()`` (gradients are zeroed before).

        The gradient at ``w`` is the one already in ``.grad`` (the usual pattern: backward,
        then ``step(closure)``); when no parameter has a gradient the closure is run first to
        get it. The closure then runs once at ``w + eps``. Returns the loss at ``w`` when this
        call computed it, else the loss at ``w + eps``.
        """
        if closure is None:
            raise ValueError("SAM.step() needs a closure that recomputes the loss and calls backward(); or call "
                             "first_step() and second_step() around your own second forward-backward")
        closure = torch.enable_grad()(closure)
        first = None
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            first = closure()
        self.first_step(zero_grad=True)
        second = closure()
        self.second_step()
        return first if first is not None else second

    # --------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        """The base optimizer's state dict (groups include ``rho``, ``adaptive``, ``eta``) plus ``"sam"``."""
        state = self.base_optimizer.state_dict()
        saved = None
        if self._saved is not None:
            index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            saved = {index[id(p)]: s.clone() for p, s in self._saved}
        state["sam"] = {"saved": saved}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        sam = state.pop("sam", None) or {}
        self.base_optimizer.load_state_dict(state)
        self._setup_groups()
        saved = sam.get("saved")
        if saved is None:
            self._saved = None
        else:
            params = [p for g in self.param_groups for p in g["params"]]
            self._saved = [(params[int(i)], s.to(params[int(i)].device, params[int(i)].dtype).clone())
                           for i, s in saved.items()]


def _flat_params(params) -> list[torch.Tensor]:
    out = []
    for item in params:
        if isinstance(item, dict):
            out.extend(_flat_params(item["params"]))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item[1])
        else:
            out.append(item)
    return out
