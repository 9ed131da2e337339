"""SAM / ASAM (optimizer wrapper and step), G-Mix, BG-Mix, DG-Mix: formulas, pitfalls, bad input."""
import copy
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maxup import augment as A
from maxup import methods as M
from maxup.objectives import ERM, MaxUp
from maxup.optim import SAM as SAMOptimizer
from maxup.optim import sam_grad_norm, sam_perturbation
from maxup.steps import Standard
from maxup.steps.gmix import BGMix, DGMix, SAMMixup, bgmix, bgmix_partition, dgmix_weights, sharpness_sensitivity
from maxup.steps.sam import SharpnessAware as SAM

SRC = str(Path(__file__).resolve().parents[1] / "src")


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def batch(n=12, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, classes, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---------------------------------------------------------------------------- the functional core


def test_perturbation_matches_sam_and_asam_formulas():
    torch.manual_seed(0)
    w = [torch.randn(3, 2), torch.randn(4)]
    g = [torch.randn(3, 2), torch.randn(4)]
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    for e, gi in zip(sam_perturbation(w, g, rho=0.3), g):
        assert torch.allclose(e, 0.3 * gi / norm, atol=1e-7)
    eta = 0.05
    t = [wi.abs() + eta for wi in w]
    tnorm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
    eps = sam_perturbation(w, g, rho=0.3, adaptive=True, eta=eta)
    for e, ti, gi in zip(eps, t, g):
        assert torch.allclose(e, 0.3 * ti ** 2 * gi / tnorm, atol=1e-7)
    # ||T^-1 eps|| = rho: the ball is in ASAM's normalised coordinates
    assert torch.allclose(torch.sqrt(sum(((e / ti) ** 2).sum() for e, ti in zip(eps, t))), torch.tensor(0.3))
    assert torch.allclose(sam_grad_norm(w, g, adaptive=True, eta=eta), tnorm)
    # per-tensor flags: T = 1 on the second tensor (how ASAM's reference code treats biases)
    mixed_norm = torch.sqrt(((t[0] * g[0]) ** 2).sum() + (g[1] ** 2).sum())
    e0, e1 = sam_perturbation(w, g, rho=0.3, adaptive=[True, False], eta=eta)
    assert torch.allclose(e0, 0.3 * t[0] ** 2 * g[0] / mixed_norm, atol=1e-7)
    assert torch.allclose(e1, 0.3 * g[1] / mixed_norm, atol=1e-7)
    assert all(torch.equal(e, torch.zeros_like(e)) for e in sam_perturbation(w, [torch.zeros_like(x) for x in g], 0.3))


# ---------------------------------------------------------------------------- the optimizer wrapper


def quadratic():
    a = torch.tensor([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
    return a, torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("api", ["closure", "two_steps"])
def test_wrapper_on_a_quadratic_matches_the_formula(adaptive, api):
    a, w0 = quadratic()
    rho, lr, eta = 0.2, 0.1, 0.01
    g = a @ w0
    if adaptive:
        t = w0.abs() + eta
        eps = rho * t ** 2 * g / torch.linalg.vector_norm(t * g)
    else:
        eps = rho * g / torch.linalg.vector_norm(g)
    expected = w0 - lr * (a @ (w0 + eps))

    w = w0.clone().requires_grad_(True)
    opt = SAMOptimizer([w], torch.optim.SGD, rho=rho, adaptive=adaptive, eta=eta, lr=lr)

    def closure():
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    if api == "closure":
        loss = opt.step(closure)  # no gradient yet: the closure runs at w, then at w + eps
        assert torch.allclose(loss, 0.5 * w0 @ a @ w0)
    else:
        closure()
        opt.first_step(zero_grad=True)
        assert torch.allclose(w.detach(), w0 + eps)
        closure()
        opt.second_step(zero_grad=True)
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_wrapper_restores_the_saved_weights_exactly():
    w0 = torch.tensor([0.1, 1e8, -3.3333333])  # w + eps - eps would round
    w = w0.clone().requires_grad_(True)
    opt = SAMOptimizer([w], torch.optim.SGD, rho=0.7, lr=0.0)
    (w * torch.tensor([1.0, 1e-9, 2.0])).sum().backward()
    opt.first_step(zero_grad=True)
    assert not torch.equal(w.detach(), w0)
    (w ** 2).sum().backward()
    opt.second_step()
    assert torch.equal(w.detach(), w0)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
                                     (torch.optim.Adam, dict(lr=0.01))])
def test_rho_zero_wrapper_reproduces_the_base_optimizer(base, kw):
    x, y = batch()
    m1, m2 = mlp(), mlp()
    sam = SAMOptimizer(m1.parameters(), base, rho=0.0, **kw)
    plain = base(m2.parameters(), **kw)
    for _ in range(3):
        F.cross_entropy(m1(x), y).backward()
        sam.step(lambda: F.cross_entropy(m1(x), y).backward())
        sam.zero_grad()
        F.cross_entropy(m2(x), y).backward()
        plain.step()
        plain.zero_grad()
    assert torch.equal(flat(m1), flat(m2))


def test_wrapper_takes_an_instance_and_shares_groups_state_and_schedules():
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SAMOptimizer(model.parameters(), base, rho=0.05)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert len(base.state) == 4  # the momentum buffers live in the base optimizer


def test_wrapper_state_dict_round_trip():
    x, y = batch()
    model = mlp()
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def one(m, o):
        F.cross_entropy(m(x), y).backward()
        o.step(lambda: F.cross_entropy(m(x), y).backward())
        o.zero_grad()

    one(model, opt)
    twin = copy.deepcopy(model)
    twin_opt = SAMOptimizer(twin.parameters(), torch.optim.SGD, rho=0.5, lr=0.5, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as after torch.save / torch.load
    assert twin_opt.param_groups[0]["rho"] == 0.1 and twin_opt.param_groups[0]["lr"] == 0.1
    for _ in range(2):
        one(model, opt)
        one(twin, twin_opt)
    assert torch.equal(flat(model), flat(twin))
    # mid-step: the saved copy of w travels with the state
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    state = copy.deepcopy(opt.state_dict())
    twin2 = copy.deepcopy(model)
    opt2 = SAMOptimizer(twin2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt2.load_state_dict(state)
    for m, o in ((model, opt), (twin2, opt2)):
        F.cross_entropy(m(x), y).backward()
        o.second_step(zero_grad=True)
    assert torch.equal(flat(model), flat(twin2))


def test_asam_weights_only_scales_weights_not_biases():
    model = nn.Linear(3, 2)
    x, y = batch(6, classes=2)
    x = x[:, :3]
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, weights_only=True, lr=0.1)
    F.cross_entropy(model(x), y).backward()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = model.weight.grad.clone(), model.bias.grad.clone()
    opt.first_step()
    tw = w.abs() + 0.01
    norm = torch.sqrt(((tw * gw) ** 2).sum() + (gb ** 2).sum())
    assert torch.allclose(model.weight.detach(), w + 0.5 * tw ** 2 * gw / norm, atol=1e-6)
    assert torch.allclose(model.bias.detach(), b + 0.5 * gb / norm, atol=1e-6)
    with pytest.raises(ValueError, match="named_parameters"):
        SAMOptimizer(model.parameters(), torch.optim.SGD, adaptive=True, weights_only=True, lr=0.1)


# ---------------------------------------------------------------------------- the step


def softmax_regression_grads(w, b, x, t):
    """Gradient of the mean soft cross-entropy of softmax(x w^T + b), by hand."""
    d = (torch.softmax(x @ w.T + b, dim=1) - t) / x.shape[0]
    return d.T @ x, d.sum(0)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_step_on_a_tiny_network_matches_the_hand_computation(adaptive, clip):
    torch.manual_seed(3)
    model = nn.Linear(3, 4)
    x, y = torch.randn(5, 3), torch.tensor([0, 3, 1, 1, 2])
    t = F.one_hot(y, 4).float()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    rho, lr, eta = 0.3, 0.5, 0.01
    gw, gb = softmax_regression_grads(w, b, x, t)
    if adaptive:
        tw, tb = w.abs() + eta, b.abs() + eta
        norm = torch.sqrt(((tw * gw) ** 2).sum() + ((tb * gb) ** 2).sum())
        ew, eb = rho * tw ** 2 * gw / norm, rho * tb ** 2 * gb / norm
    else:
        norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = softmax_regression_grads(w + ew, b + eb, x, t)
    if clip is not None:  # the final gradient is the one clipped
        scale = min(1.0, clip / float(torch.sqrt((gw2 ** 2).sum() + (gb2 ** 2).sum())))
        gw2, gb2 = gw2 * scale, gb2 * scale
    step = SAM(ERM(), torch.optim.SGD(model.parameters(), lr=lr), rho=rho, adaptive=adaptive, eta=eta,
               max_grad_norm=clip)
    result = step(model, x, y)
    assert torch.allclose(result.loss, F.cross_entropy(x @ w.T + b, y))  # the loss at w
    assert torch.allclose(model.weight.detach(), w - lr * gw2, atol=1e-6)
    assert torch.allclose(model.bias.detach(), b - lr * gb2, atol=1e-6)


def test_step_and_wrapper_take_the_same_asam_weights_only_update():
    x, y = batch()
    m1, m2 = mlp(), mlp()
    step = SAM(ERM(), torch.optim.SGD(m1.parameters(), lr=0.3), rho=0.5, adaptive=True, weights_only=True)
    step(m1, x, y)
    opt = SAMOptimizer(m2.named_parameters(), torch.optim.SGD, rho=0.5, adaptive=True, weights_only=True, lr=0.3)
    F.cross_entropy(m2(x), y).backward()
    opt.step(lambda: F.cross_entropy(m2(x), y).backward())
    assert torch.allclose(flat(m1), flat(m2), atol=1e-6)
    m3 = mlp()
    SAM(ERM(), torch.optim.SGD(m3.parameters(), lr=0.3), rho=0.5, adaptive=True)(m3, x, y)
    assert not torch.allclose(flat(m1), flat(m3), atol=1e-6)  # biases scaled differently


def test_rho_zero_step_equals_the_standard_step():
    x, y = batch()
    m1, m2 = mlp(bn=True), mlp(bn=True)
    s1 = SAM(ERM(), torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9), rho=0.0)
    s2 = Standard(ERM(), torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9))
    for _ in range(3):
        s1(m1, x, y)
        s2(m2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


@pytest.mark.parametrize("objective", ["erm", "maxup"])
def test_batchnorm_statistics_come_from_the_first_pass_only(objective):
    x, y = batch(16)
    model = mlp(bn=True)
    first = copy.deepcopy(model)
    obj = ERM() if objective == "erm" else MaxUp(A.GaussianNoise(0.2, num_classes=3), m=3)
    gen = torch.Generator().manual_seed(5)
    before = flat(model)
    SAM(obj, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.5)(model, x, y, gen)
    assert not torch.equal(flat(model), before)
    with torch.no_grad():  # the first pass alone, on the same rows
        obj2 = ERM() if objective == "erm" else MaxUp(A.GaussianNoise(0.2, num_classes=3), m=3)
        obj2(first, x, y, torch.Generator().manual_seed(5))
    for a, b in zip(model.buffers(), first.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("adaptive", [False, True])
def test_accumulating_two_half_batches_equals_one_full_batch(adaptive):
    x, y = batch(12)
    m1, m2 = mlp(), mlp()
    s1 = SAM(ERM(), torch.optim.SGD(m1.parameters(), lr=0.2, momentum=0.9), rho=0.3, adaptive=adaptive)
    s2 = SAM(ERM(), torch.optim.SGD(m2.parameters(), lr=0.2, momentum=0.9), rho=0.3, adaptive=adaptive,
             accumulation_steps=2)
    for _ in range(2):
        r1, r2 = s1(m1, x, y), s2(m2, x, y)
        assert torch.allclose(r1.loss, r2.loss, atol=1e-6)
    assert torch.allclose(flat(m1), flat(m2), atol=1e-6)
    assert r2.logits.shape[0] == 12 and torch.allclose(r2.weights.sum(), torch.tensor(1.0))


class _Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_interval_alternates_and_resumes_its_cycle():
    x, y = batch()
    model = _Counting(mlp())
    step = SAM(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, interval=3)
    calls = []
    for _ in range(4):
        before = model.calls
        step(model, x, y)
        calls.append(model.calls - before)
    assert calls == [2, 1, 1, 2]
    resumed = SAM(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, interval=3)
    resumed.load_state_dict(step.state_dict())
    for expected in (1, 1, 2):
        before = model.calls
        resumed(model, x, y)
        assert model.calls - before == expected


def _inf_hook(calls, which):
    def hook(grad):
        calls[0] += 1
        return grad * float("inf") if calls[0] == which else grad
    return hook


@pytest.mark.parametrize("which", [1, 2])  # overflow in the first pass, or in the second
def test_fp16_overflow_skips_the_step(which):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = SAM(ERM(), opt, rho=0.1, amp="fp16")
    x, y = batch(8)
    calls = [0]
    handle = model.weight.register_hook(_inf_hook(calls, which))
    before, scale = flat(model), step.scaler.get_scale()
    result = step(model, x, y)
    handle.remove()
    assert torch.equal(flat(model), before) and len(opt.state) == 0  # no update, no momentum
    assert step.scaler.get_scale() == scale * 0.5
    assert step.skipped_steps == (1 if which == 1 else 0)
    assert calls[0] == (1 if which == 1 else 2)  # a first-pass overflow skips the second pass
    assert result.logits.dtype == torch.float16
    step(model, x, y)  # the next step goes through
    assert not torch.equal(flat(model), before) and step.scaler.get_scale() == scale * 0.5


def test_bf16_autocast_step_runs():
    model = mlp()
    x, y = batch()
    before = flat(model)
    result = SAM(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), amp="bf16")(model, x, y)
    assert result.logits.dtype == torch.bfloat16 and not torch.equal(flat(model), before)


DDP_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import maxup
from maxup.steps.sam import SharpnessAware as SAM

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
model = DistributedDataParallel(net)
g = torch.Generator().manual_seed(100 + rank)
x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
opt = torch.optim.SGD(model.parameters(), lr=0.5)
step = SAM(maxup.ERM(), opt, rho=0.3)
step(model, x, y)
first = [p.detach().clone() for p in net.parameters()]
for _ in range(2):
    step(model, x, y)
SAM(maxup.ERM(), opt, rho=0.3, sync_first=True, accumulation_steps=2)(model, x, y)
out = {"first": first, "final": [p.detach() for p in net.parameters()]}
torch.save(out, os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.barrier()  # no rank tears gloo down while the other still talks to it
dist.destroy_process_group()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_parameters(tmp_path):
    script = tmp_path / "ddp_sam.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for a, b in zip(r0["final"], r1["final"]):
        assert torch.equal(a, b)
    # the first step by hand: each rank ascends along its own gradient (no_sync), the second gradients are averaged
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    params = list(net.parameters())
    total = [torch.zeros_like(p) for p in params]
    for rank in (0, 1):
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
        local = copy.deepcopy(net)
        lp = list(local.parameters())
        grads = torch.autograd.grad(F.cross_entropy(local(x), y), lp)
        with torch.no_grad():
            for p, e in zip(lp, sam_perturbation(lp, grads, 0.3)):
                p.add_(e)
        for acc, gr in zip(total, torch.autograd.grad(F.cross_entropy(local(x), y), lp)):
            acc += gr / 2
    for p, gr, got in zip(params, total, r0["first"]):
        assert torch.allclose(p.detach() - 0.5 * gr, got, atol=1e-6)


# ---------------------------------------------------------------------------- G-Mix, BG-Mix, DG-Mix


def test_gmix_is_sam_on_the_mixup_loss_with_one_draw_for_both_passes():
    x, y = batch()
    m1, m2 = mlp(bn=True), mlp(bn=True)
    s1 = SAMMixup(ERM(), torch.optim.SGD(m1.parameters(), lr=0.1), alpha=0.4, num_classes=3, rho=0.2)
    s2 = SAM(ERM(A.Mixup(0.4, per_sample=True, num_classes=3)), torch.optim.SGD(m2.parameters(), lr=0.1), rho=0.2)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(2):
        r1, r2 = s1(m1, x, y, g1), s2(m2, x, y, g2)
        assert torch.equal(r1.inputs, r2.inputs)
    assert torch.equal(flat(m1), flat(m2))
    assert torch.equal(g1.get_state(), g2.get_state())  # one Mixup draw per step, not one per pass
    obj = ERM(A.Cutout(2, num_classes=3))
    SAMMixup(obj, torch.optim.SGD(m1.parameters(), lr=0.1), num_classes=3)
    assert isinstance(obj.augment, A.Cutout)  # the caller's objective is left alone


def test_sharpness_sensitivity_matches_its_definition():
    torch.manual_seed(2)
    model = nn.Linear(3, 4)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    t = F.one_hot(y, 4).float()
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = softmax_regression_grads(w, b, x, t)
    norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
    rho = 0.4
    rows = lambda w_, b_: F.cross_entropy(x @ w_.T + b_, y, reduction="none")  # noqa: E731
    expected = rows(w + rho * gw / norm, b + rho * gb / norm) - rows(w, b)
    assert torch.allclose(sharpness_sensitivity(model, x, t, rho=rho), expected, atol=1e-6)
    assert torch.equal(model.weight.detach(), w) and model.weight.grad is None
    step = BGMix(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), rho=rho)
    plain = ERM()(model, x, y)
    assert torch.allclose(step.step.sensitivity(model, plain), expected, atol=1e-6)


def test_bgmix_partition_on_crafted_sensitivities():
    s = torch.tensor([0.5, -1.0, 3.0, 0.2, 2.5, 0.0])
    assert bgmix_partition(s, 0.5).tolist() == [True, False, True, False, True, False]
    assert bgmix_partition(s, 1 / 3).tolist() == [False, False, True, False, True, False]
    assert not bgmix_partition(s, 0.0).any() and bgmix_partition(s, 1.0).all()
    assert bgmix_partition(torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.5).tolist() == [True, True, False, False]  # ties


def test_dgmix_weights_follow_the_ranks():
    s = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1])
    assert torch.allclose(dgmix_weights(s), torch.tensor([2, 0, 4, 3, 1]) / 4.0)
    assert torch.allclose(dgmix_weights(torch.tensor([1.0, 1.0, 0.0, 2.0])), torch.tensor([1.5, 1.5, 0.0, 3.0]) / 3)
    assert dgmix_weights(torch.tensor([4.0])).tolist() == [1.0]


def _crafted(step, s):
    step.step.sensitivity = lambda model, result: s.clone()  # the pass under the SAM wrapper
    return step


def test_bgmix_trains_the_crafted_sensitive_examples_unmixed():
    torch.manual_seed(0)
    x, y = torch.randn(10, 4), torch.arange(10)  # one class per example: targets show who was mixed with whom
    s = torch.tensor([0.0, 5.0, 1.0, 4.0, -2.0, 3.0, 0.5, 0.2, 6.0, -1.0])
    model = nn.Sequential(nn.Linear(4, 10))
    step = _crafted(BGMix(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.4, alpha=1.0, rho=0.1), s)
    result = step(model, x, y, torch.Generator().manual_seed(3))
    sensitive = torch.zeros(10, dtype=torch.bool)
    sensitive[[8, 1, 3, 5]] = True  # the top 4 of 10
    assert torch.equal(bgmix_partition(s, 0.4), sensitive)
    assert torch.equal(result.inputs[sensitive], x[sensitive])
    assert torch.equal(result.targets[sensitive], F.one_hot(y[sensitive], 10).float())
    rest = result.targets[~sensitive]
    assert torch.all(rest[:, sensitive] == 0)  # mixed only among the non-sensitive examples
    assert not torch.equal(result.inputs[~sensitive], x[~sensitive])
    assert torch.allclose(rest.sum(1), torch.ones(6))


def test_bgmix_functional_mixes_only_the_rest():
    x = torch.arange(4.0)[:, None]
    t = torch.eye(4)
    sensitive = torch.tensor([True, False, False, True])
    xm, tm = bgmix(x, t, sensitive, 0.25, torch.tensor([1, 0]))
    assert xm[:, 0].tolist() == [0.0, 0.25 * 1 + 0.75 * 2, 0.25 * 2 + 0.75 * 1, 3.0]
    assert tm[1].tolist() == [0.0, 0.25, 0.75, 0.0]


def test_dgmix_weights_the_rows_by_rank():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    s = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1])
    q = torch.tensor([2, 0, 4, 3, 1]) / 4.0
    model = mlp()
    step = _crafted(DGMix(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1), s)
    result = step(model, x, y, torch.Generator().manual_seed(1))
    weights = torch.cat([1 - q, q]) / 5
    keep = weights > 0
    assert torch.allclose(result.weights, weights[keep])
    mixed = int(keep[:5].sum())  # the most sensitive example has no mixed row (1 - q = 0)
    assert torch.equal(result.inputs[mixed:], x[q > 0])  # its original rows (q = 0 dropped)
    assert torch.allclose(result.loss, (result.weights * F.cross_entropy(
        mlp()(result.inputs), result.targets, reduction="none")).sum(), atol=1e-6)  # mlp() == the model at w


@pytest.mark.parametrize("cls", [BGMix, DGMix])
def test_split_steps_train_with_batchnorm_maxup_and_accumulation(cls):
    x, y = batch(12)
    model = mlp(bn=True)
    obj = MaxUp(A.GaussianNoise(0.1, num_classes=3), m=2)
    step = cls(obj, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1, accumulation_steps=2)
    before = flat(model)
    result = step(model, x, y, torch.Generator().manual_seed(0))
    assert torch.isfinite(result.loss) and not torch.equal(flat(model), before)
    with pytest.raises(ValueError, match="select mode"):
        cls(MaxUp(A.GaussianNoise(0.1), m=2, temperature=1.0), torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------------- registry specs


@pytest.mark.parametrize("spec,cls", [("sam(rho=0.05)+maxup(m=4)+cutout(size=2)", SAM), ("asam", SAM),
                                      ("sam_mixup(alpha=0.4)+maxup(m=2)+cutout(size=2)", SAMMixup),
                                      ("bgmix(gamma=0.25)+cutout(size=2)", BGMix), ("dgmix+maxup(m=2)", DGMix)])
def test_specs_build_and_train(spec, cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = M.build_step(spec, model=model, optimizer=opt, num_classes=3, max_grad_norm=5.0)
    assert isinstance(step, cls) and step.max_grad_norm == 5.0
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        assert torch.isfinite(step(model, x, y, gen).loss)
    assert step.state_dict()["num_steps"] == 2
    assert "rho" in M.REGISTRY[spec.split("(")[0].split("+")[0]].options()


# ---------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
    model = mlp()
    with pytest.raises(ValueError, match="rho"):
        SAMOptimizer(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="eta"):
        SAMOptimizer(model.parameters(), torch.optim.SGD, adaptive=True, eta=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        SAMOptimizer(model.parameters(), "sgd", lr=0.1)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        SAMOptimizer(model.parameters(), nn.Linear, lr=0.1)
    opt = SAMOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    F.cross_entropy(model(batch()[0]), batch()[1]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(ERM(), base, rho=-1)
    with pytest.raises(ValueError, match="eta"):
        SAM(ERM(), base, adaptive=True, eta=-0.5)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        SAM(ERM(), object())
    with pytest.raises(ValueError, match="base optimizer"):
        SAM(ERM(), opt)
    with pytest.raises(ValueError, match="interval"):
        SAM(ERM(), base, interval=0)
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            BGMix(ERM(), base, gamma=gamma)
        with pytest.raises(ValueError, match="gamma"):
            bgmix_partition(torch.zeros(4), gamma)
    with pytest.raises(ValueError, match="step is an objective"):
        SAM(ERM())
    with pytest.raises(ValueError, match="already runs SAM"):
        SAM(BGMix(ERM(), base), rho=0.1)
    with pytest.raises(ValueError, match="belong to the wrapped step"):
        SAM(Standard(ERM(), base), max_grad_norm=1.0)


def test_old_names_still_work_with_a_deprecation_warning():
    from maxup.steps import SAM as OldSAM
    from maxup.steps import GMix as OldGMix

    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(DeprecationWarning, match="SharpnessAware"):
        assert isinstance(OldSAM(ERM(), base, rho=0.1), SAM)
    with pytest.warns(DeprecationWarning, match="SAMMixup"):
        assert isinstance(OldGMix(ERM(), base, num_classes=3), SAMMixup)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="split"):
        OldGMix(ERM(), base, split="both")
    with pytest.warns(DeprecationWarning, match="optimizers"):
        import importlib

        import maxup.train.optim as old
        importlib.reload(old)
