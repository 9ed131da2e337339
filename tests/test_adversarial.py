"""PGD (maxup.functional.attacks), the adversarial training step ``adv`` (PGD-AT, TRADES), robust accuracy
(maxup.robust) and ``maxup robust``: the invariants of the attack, FGSM by hand, the authors' update rules
transcribed and run on the same injected start, the step's composition with MaxUp, CutMix, SAM and EMA,
bad input, and "PGD-AT is more robust than ERM" on the digits."""
import argparse
import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import methods as M
from maxup.data import TensorData, load_dataset
from maxup.functional import _random as R
from maxup.functional import soft_targets
from maxup.functional.attacks import pgd, project, sample_ball
from maxup.models import SmallCNN, create_model
from maxup.objectives import ERM, MaxUp, frozen_buffers
from maxup.robust import RobustEval, Standardized, robust_accuracy, to_pixels
from maxup.steps import SharpnessAware
from maxup.steps.adversarial import Adversarial, trades_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    """The bundled digits in [0, 1] pixels (not standardised: the attack's bounds are (0, 1))."""
    return load_dataset("digits", normalize=False)


def mlp(seed=0, hidden=(128,)):
    torch.manual_seed(seed)
    return create_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=hidden)


@pytest.fixture(scope="module")
def trained(digits):
    """An MLP trained with ERM for 10 epochs on the digits (95% test accuracy), in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = mlp()
        maxup.fit(model, "erm", train=digits.train, epochs=10, batch_size=128, lr=0.05, seed=0, progress=False,
                  device="cpu")
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def bn_cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))


def batch(n=16, seed=1, size=8):
    g = gen(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def mean_loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# ---------------------------------------------------------------------------- the attack's invariants


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("linf", 0.3), ("l2", 0.5), ("l2", 2.0)])
@pytest.mark.parametrize("random_start", [True, False])
def test_the_attack_never_leaves_the_ball_or_the_bounds(trained, digits, norm, eps, random_start):
    x, y = digits.test.x[:64], digits.test.y[:64]  # many pixels sit on the bounds 0 and 1
    for step_size in (None, eps / 2, eps if random_start else None):
        x_adv = pgd(trained, x, y, eps=eps, norm=norm, steps=5, step_size=step_size, random_start=random_start,
                    generator=gen(0))
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= eps * (1 + 1e-5) + 1e-6).all())
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert x_adv.shape == x.shape and not x_adv.requires_grad
    # unbounded: only the ball
    z = torch.randn(8, 5) * 3
    z_adv = pgd(nn.Linear(5, 3), z, torch.zeros(8, dtype=torch.long), eps=eps, norm=norm, bounds=None,
                generator=gen(0))
    size = (z_adv - z).abs().amax(1) if norm == "linf" else (z_adv - z).norm(dim=1)
    assert bool((size <= eps * (1 + 1e-5) + 1e-6).all()) and float(z_adv.min()) < 0


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 0.5)])
def test_the_attack_raises_the_loss_over_the_clean_input(trained, digits, norm, eps):
    x, y = digits.test.x, digits.test.y
    clean = mean_loss(trained, x, y)
    x_adv = pgd(trained, x, y, eps=eps, norm=norm, steps=10, generator=gen(0))
    assert mean_loss(trained, x_adv, y) > clean + 0.2
    with torch.no_grad():
        rows = F.cross_entropy(trained(x_adv), y, reduction="none") - F.cross_entropy(trained(x), y, reduction="none")
    assert float((rows > 0).float().mean()) > 0.95  # nearly every row's own loss went up


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 1.0)])
def test_more_steps_are_never_weaker(trained, digits, norm, eps):
    """On a fixed model and generator, 20 steps find at least the loss and at most the robust accuracy of 3 steps
    (on the ERM MLP: l-inf 0.2, 4.2% -> 3.6% robust; l2 1.0, 11.8% -> 7.6%)."""
    x, y = digits.test.x, digits.test.y
    few, many = (pgd(trained, x, y, eps=eps, norm=norm, steps=k, generator=gen(0)) for k in (3, 20))
    assert mean_loss(trained, many, y) >= mean_loss(trained, few, y)
    acc = [robust_accuracy(trained, digits.test, eps_list=[eps], norm=norm, steps=k, batch_size=500)[0]
           for k in (3, 20)]
    assert acc[1]["robust_accuracy"] <= acc[0]["robust_accuracy"]
    if norm == "l2":
        assert acc[1]["robust_accuracy"] <= acc[0]["robust_accuracy"] - 0.02


def test_robust_accuracy_is_at_most_clean_accuracy_and_eps_zero_is_clean(trained, digits):
    rows = robust_accuracy(trained, digits.test, eps_list=[0.0, 0.02, 0.05, 0.1, 0.2], steps=5, batch_size=200)
    with torch.no_grad():
        clean = int((trained(digits.test.x).argmax(1) == digits.test.y).sum())
    assert rows[0]["robust"] == clean and rows[0]["robust_accuracy"] == rows[0]["clean_accuracy"]
    counts = [r["robust"] for r in rows]
    assert all(k <= clean for k in counts) and counts == sorted(counts, reverse=True) and counts[-1] < clean / 2
    assert all(r["n"] == len(digits.test) and r["robust"] == round(r["robust_accuracy"] * r["n"]) for r in rows)
    assert trained.training is False


def test_robust_accuracy_is_reproducible_per_radius_and_restores_the_modes(digits):
    model = bn_cnn()
    data = TensorData(digits.test.x[:60], digits.test.y[:60])
    before = copy.deepcopy(model.state_dict())
    a = robust_accuracy(model, data, eps_list=[0.05, 0.1], steps=2, batch_size=25, seed=3)
    b = robust_accuracy(model, data, eps_list=[0.1], steps=2, batch_size=25, seed=3)  # a radius alone: the same
    assert a[1] == b[0]
    assert model.training is True
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_parameters_get_no_gradient_and_the_buffers_are_untouched():
    model = bn_cnn().train()  # BatchNorm in training mode: its forward would update the running statistics
    x, y = batch()
    before = copy.deepcopy(model.state_dict())
    x_copy = x.clone()
    pgd(model, x, y, eps=0.1, steps=3, generator=gen(0))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(x, x_copy) and model.training
    with torch.no_grad():  # the attack takes its gradient even when called under no_grad
        assert not torch.equal(pgd(model, x, y, eps=0.1, steps=3, random_start=False), x)


def test_l2_random_start_is_uniform_in_the_ball():
    x = torch.rand(4000, 1, 4, 4)
    d = x[0].numel()
    delta = sample_ball(x, 0.5, "l2", generator=gen(0))
    r = delta.flatten(1).norm(dim=1)
    assert float(r.max()) <= 0.5 * (1 + 1e-6)
    u = (r / 0.5) ** d  # uniform in the volume: (r / eps)^d ~ U(0, 1)
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float((u < 0.25).float().mean()) - 0.25) < 0.03
    directions = delta.flatten(1) / r[:, None]
    assert float(directions.mean(0).abs().max()) < 0.05  # no preferred direction
    linf = sample_ball(x, 0.1, "linf", generator=gen(0))
    assert float(linf.abs().max()) <= 0.1 and abs(float(linf.mean())) < 0.005 and float(linf.abs().max()) > 0.099


def test_seeded_attacks_are_deterministic(trained, digits):
    x, y = digits.test.x[:32], digits.test.y[:32]
    for norm in ("linf", "l2"):
        a = pgd(trained, x, y, eps=0.1, norm=norm, steps=3, generator=gen(5))
        b = pgd(trained, x, y, eps=0.1, norm=norm, steps=3, generator=gen(5))
        c = pgd(trained, x, y, eps=0.1, norm=norm, steps=3, generator=gen(6))
        assert torch.equal(a, b) and not torch.equal(a, c)
    # the random start is the generator's draw, injectable as init
    start = sample_ball(x, 0.1, "linf", generator=gen(5))
    assert torch.equal(pgd(trained, x, y, eps=0.1, steps=3, init=start), a_linf := pgd(
        trained, x, y, eps=0.1, steps=3, generator=gen(5)))
    assert a_linf.shape == x.shape


def test_rows_are_attacked_independently(trained, digits):
    """The gradient of the rows' summed loss moves each row by its own loss: a batch equals its rows one by one."""
    x, y = digits.test.x[:6], digits.test.y[:6]
    start = sample_ball(x, 0.1, "l2", generator=gen(0))
    whole = pgd(trained, x, y, eps=0.1, norm="l2", steps=4, init=start)
    alone = torch.cat([pgd(trained, x[i:i + 1], y[i:i + 1], eps=0.1, norm="l2", steps=4, init=start[i:i + 1])
                       for i in range(6)])
    torch.testing.assert_close(whole, alone, rtol=0, atol=1e-6)


def test_one_step_of_size_eps_from_x_is_fgsm_by_hand():
    """A linear model: grad_x CE = W^T (softmax(Wx + b) - onehot(y)); one l-inf step of size eps without random
    start is x + eps * sign(grad), clamped to the bounds."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 4)
    x = torch.rand(10, 12)
    x[0, :3] = torch.tensor([0.0, 1.0, 0.99])  # on and near the bounds
    y = torch.randint(0, 4, (10,))
    with torch.no_grad():
        p = torch.softmax(lin(x), 1)
        grad = (p - F.one_hot(y, 4).float()) @ lin.weight
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    ours = pgd(lin, x, y, eps=0.05, steps=1, step_size=0.05, random_start=False)
    assert torch.equal(ours, expected)
    # the same step with soft targets t: grad = W^T (p - t)
    t = soft_targets(y, 4, smoothing=0.3)
    with torch.no_grad():
        grad_t = (p - t) @ lin.weight
    assert torch.equal(pgd(lin, x, t, eps=0.05, steps=1, step_size=0.05, random_start=False),
                       (x + 0.05 * grad_t.sign()).clamp(0, 1))


def test_projection_by_hand():
    x = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    far = torch.tensor([[0.9, 0.2], [-0.5, 1.0]])
    assert torch.allclose(project(far, x, 0.1, "linf"), torch.tensor([[0.6, 0.4], [0.0, 1.0]]))
    assert torch.allclose(project(far, x, 0.5, "l2"), torch.tensor([[0.9, 0.2], [0.0, 1.0]]))
    # l2: delta (0.4, -0.3) has norm 0.5, scaled to 0.25 -> (0.2, -0.15)
    assert torch.allclose(project(far, x, 0.25, "l2", bounds=None)[0], torch.tensor([0.7, 0.35]))


# ---------------------------------------------------------------------------- the authors' update rules
#
# Transcribed from the authors' repositories; only the random start is injected (an argument instead of a draw)
# and .cuda() is dropped. They run on the same model, inputs and start as ours.


def ref_robustness(model, x, target, eps, step_size, iterations, constraint, start):
    """MadryLab/robustness @ 0e24524d, robustness/attacker.py ``Attacker.forward`` (``get_adv_examples`` with
    random_start=True, use_best=False) and robustness/attack_steps.py ``LinfStep`` / ``L2Step``; ``start`` is the
    random_perturb noise."""
    orig_input = x.detach()
    criterion = nn.CrossEntropyLoss(reduction="none")

    def project_(x):
        diff = x - orig_input
        if constraint == "inf":
            diff = torch.clamp(diff, -eps, eps)
        else:
            diff = diff.renorm(p=2, dim=0, maxnorm=eps)
        return torch.clamp(diff + orig_input, 0, 1)

    def step_(x, g):
        if constraint == "inf":
            return x + torch.sign(g) * step_size
        l = len(x.shape) - 1  # noqa: E741 (their name)
        g_norm = torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, *([1] * l))
        return x + g / (g_norm + 1e-10) * step_size

    x = torch.clamp(x + start, 0, 1)  # random_perturb
    for _ in range(iterations):
        x = x.clone().detach().requires_grad_(True)
        losses = criterion(model(x), target)
        loss = torch.mean(losses)
        grad, = torch.autograd.grad(loss, [x])
        with torch.no_grad():
            x = step_(x, grad)
            x = project_(x)
    return x.clone().detach()


def ref_rice(model, X, y, epsilon, alpha, attack_iters, norm, delta):
    """locuslab/robust_overfitting @ 263b826, train_cifar.py ``attack_pgd`` (one restart, no early stop, no
    normalisation: inputs in [0, 1]); ``delta`` is the random init (their uniform_ / normal_ draws)."""
    lower_limit, upper_limit = 0, 1

    def clamp(X, lower_limit, upper_limit):
        return torch.max(torch.min(X, upper_limit), lower_limit)

    delta = clamp(delta.clone(), lower_limit - X, upper_limit - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = model(X + delta)
        loss = F.cross_entropy(output, y)
        loss.backward()
        grad = delta.grad.detach()
        d, g, x = delta[:, :], grad[:, :], X[:, :]
        if norm == "l_inf":
            d = torch.clamp(d + alpha * torch.sign(g), min=-epsilon, max=epsilon)
        else:
            g_norm = torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, *([1] * (g.dim() - 1)))
            scaled_g = g / (g_norm + 1e-10)
            d = (d + scaled_g * alpha).view(d.size(0), -1).renorm(p=2, dim=0, maxnorm=epsilon).view_as(d)
        d = clamp(d, lower_limit - x, upper_limit - x)
        delta.data[:, :] = d
        delta.grad.zero_()
    model.zero_grad()
    return X + delta.detach()


def ref_trades_perturb(model, x_natural, step_size, epsilon, perturb_steps, noise):
    """yaodongyu/TRADES @ 9d308f1, trades.py ``trades_loss`` (the l_inf attack); ``noise`` is their
    torch.randn draw (scaled by 0.001 there)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False
    x_adv = x_natural.detach() + 0.001 * noise.detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def ref_trades_loss(model, x_natural, x_adv, y, beta):
    """yaodongyu/TRADES @ 9d308f1, trades.py ``trades_loss``: the training loss on the attacked x_adv."""
    criterion_kl = nn.KLDivLoss(reduction="sum")
    batch_size = len(x_natural)
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1),
                                                    F.softmax(model(x_natural), dim=1))
    return loss_natural + beta * loss_robust


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_equals_the_robustness_library_on_the_same_start(trained, digits, norm):
    x, y = digits.test.x[:100], digits.test.y[:100]
    eps = 0.1 if norm == "linf" else 0.75
    if norm == "linf":
        start = 2 * (torch.rand(x.shape, generator=gen(1)) - 0.5) * eps  # LinfStep.random_perturb
    else:
        start = (torch.rand(x.shape, generator=gen(1)) - 0.5).renorm(p=2, dim=0, maxnorm=eps)  # L2Step's
    ref = ref_robustness(trained, x, y, eps, 2.5 * eps / 7, 7, "inf" if norm == "linf" else "2", start)
    ours = pgd(trained, x, y, eps=eps, norm=norm, steps=7, init=torch.clamp(x + start, 0, 1) - x)
    diff = float((ours - ref).abs().max())
    assert diff <= 1e-6, diff  # measured: 3.7e-9 (l-inf), float rounding of x + (x_start - x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_equals_rice_et_al_attack_pgd_on_the_same_start(trained, digits, norm):
    x, y = digits.test.x[:100], digits.test.y[:100]
    model = copy.deepcopy(trained)  # their loss.backward() writes .grad into the model's parameters
    eps = 0.1 if norm == "linf" else 0.75
    start = sample_ball(x, eps, norm, generator=gen(2))
    ref = ref_rice(model, x, y, eps, eps / 4, 10, "l_inf" if norm == "linf" else "l_2", start)
    ours = pgd(trained, x, y, eps=eps, norm=norm, steps=10, step_size=eps / 4, init=start)
    assert float((ours - ref).abs().max()) <= 1e-6


def test_trades_attack_and_loss_equal_the_authors_on_the_same_start(trained, digits):
    # inputs inside (0, 1): TRADES evaluates its first gradient at the unclamped start x + 0.001 n, ours clamps it
    x, y = 0.05 + 0.9 * digits.test.x[:100], digits.test.y[:100]
    noise = torch.randn(x.shape, generator=gen(3))
    ref = ref_trades_perturb(trained, x, 0.01, 0.1, 10, noise)
    step = Adversarial(ERM(), torch.optim.SGD(trained.parameters(), lr=0.0), eps=0.1, steps=10, step_size=0.01,
                       loss="trades")
    with torch.no_grad():
        p = torch.softmax(trained(x), 1)
    ours = pgd(trained, x, p, eps=0.1, steps=10, step_size=0.01, init=0.001 * noise)
    assert torch.equal(ours, ref)
    # the training loss and its gradient: CE + beta KL(p(x) || p(x_adv)), through both predictions
    model = copy.deepcopy(trained)
    ref_loss = ref_trades_loss(model, x, ref, y, 6.0)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    mine = step._trades(model, x, ref, y, torch.full((100,), 0.01))
    grads = torch.autograd.grad(mine.loss, list(model.parameters()))
    torch.testing.assert_close(mine.loss, ref_loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(mine.inputs, ref) and torch.equal(mine.clean, x)


def test_trades_start_differs_only_by_the_clamp_into_the_bounds(trained, digits):
    """The deliberate difference: TRADES takes its first gradient at x + 0.001 n even where that leaves [0, 1]
    (digit pixels at 0 and 1); we clamp the start into the bounds first. From the clamped start the two agree."""
    x = digits.test.x[:100]
    noise = torch.randn(x.shape, generator=gen(3))
    with torch.no_grad():
        p = torch.softmax(trained(x), 1)
    ours = pgd(trained, x, p, eps=0.1, steps=10, step_size=0.01, init=0.001 * noise)
    assert not torch.allclose(ours, ref_trades_perturb(trained, x, 0.01, 0.1, 10, noise), atol=0.05)
    clamped = (torch.clamp(x + 0.001 * noise, 0, 1) - x) / 0.001
    assert torch.equal(ours, ref_trades_perturb(trained, x, 0.01, 0.1, 10, clamped))


def test_trades_rows_by_hand():
    logits, adv = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    p, q = torch.softmax(logits, 1)[0], torch.softmax(adv, 1)[0]
    kl = float((p * (p.log() - q.log())).sum())
    t = torch.tensor([[1.0, 0.0]])
    assert float(trades_rows(logits, adv, t, 2.0)) == pytest.approx(-math.log(p[0]) + 2.0 * kl, rel=1e-6)


# ---------------------------------------------------------------------------- the step


def step_for(spec, model, **options):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return M.build_step(spec, model=model, optimizer=opt, num_classes=10, **options)


def test_the_step_attacks_in_eval_mode_and_trains_in_train_mode():
    model = bn_cnn().train()
    x, y = batch()
    step = step_for("adv(eps=0.1, steps=3)", model)
    before = copy.deepcopy(model.state_dict())
    # the attack alone: eval mode (running statistics), buffers untouched, the train mode restored
    attacked = step.attack(model, x, y, gen(0))
    expected = pgd(copy.deepcopy(model).eval(), x, y, eps=0.1, steps=3, generator=gen(0))
    assert torch.equal(attacked, expected) and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a training step: one update from the attacked rows; BatchNorm statistics from the training forward only
    result = step(model, x, y, gen(0))
    assert torch.equal(result.inputs, expected)
    assert int(model.blocks[0][1].num_batches_tracked) == 1


def test_maxup_first_picks_the_worst_copy_then_the_attack_runs_on_it():
    model = bn_cnn()
    x, y = batch()
    step = step_for("adv(eps=0.1, steps=2)+maxup(m=3)+cutout(size=4)", model)
    assert isinstance(step.objective, MaxUp)
    inputs, targets = step.rows(model, x, y, gen(0))
    with torch.no_grad(), frozen_buffers(model):
        chosen = copy.deepcopy(step.objective)(model, x, y, gen(0))
    assert torch.equal(inputs, chosen.inputs) and torch.equal(targets, chosen.targets)
    # the step trains on those rows attacked (the same draws: MaxUp's, then the random start)
    g = gen(0)
    rows = step.rows(model, x, y, g)[0]
    attacked = step.attack(model, rows, targets, g)
    fresh = bn_cnn()
    again = step_for("adv(eps=0.1, steps=2)+maxup(m=3)+cutout(size=4)", fresh)
    result = again(fresh, x, y, gen(0))
    assert torch.equal(result.inputs, attacked)
    assert bool(((result.inputs - rows).abs().amax((1, 2, 3)) <= 0.1 + 1e-6).all())


def test_soft_targets_of_cutmix_are_attacked_with_the_soft_cross_entropy():
    model = bn_cnn()
    x, y = batch()
    step = step_for("adv(eps=0.1, steps=2)+cutmix", model)
    inputs, targets = step.rows(model, x, y, gen(0))
    assert targets.is_floating_point() and targets.shape == (16, 10)
    result = step(model, x, y, gen(0))
    assert torch.equal(result.targets, targets)
    # the attack against soft targets is the attack on their cross-entropy
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    t = targets.detach()
    by_loss = pgd(lin, inputs, t, eps=0.1, steps=2, generator=gen(1),
                  loss=lambda logits, t: -(t * F.log_softmax(logits, 1)).sum(1))
    assert torch.equal(pgd(lin, inputs, t, eps=0.1, steps=2, generator=gen(1)), by_loss)


@pytest.mark.parametrize("spec", ["sam+adv(eps=0.1, steps=2)", "sam+adv(eps=0.1, steps=2, loss='trades', beta=3.0)"])
def test_sam_replays_the_same_attacked_rows_without_a_new_attack(spec, monkeypatch):
    model = bn_cnn()
    x, y = batch()
    step = step_for(spec, model)
    assert isinstance(step, SharpnessAware) and isinstance(step.step, Adversarial)
    attacks, seen = [], []
    inner = step.step
    attack, reevaluate = inner.attack, inner.reevaluate
    monkeypatch.setattr(inner, "attack", lambda *a, **k: attacks.append(1) or attack(*a, **k))
    monkeypatch.setattr(inner, "reevaluate", lambda m, r: seen.append(r.inputs) or reevaluate(m, r))
    result = step(model, x, y, gen(0))
    assert len(attacks) == 1 and len(seen) == 1 and torch.equal(seen[0], result.inputs)


@pytest.mark.parametrize("spec", ["adv+cutmix", "adv(steps=3)+maxup(m=2)+cutout", "sam+adv(steps=2)",
                                  "adv(steps=2)+ema", "adv(loss='trades', steps=2)+mixup", "adv(norm='l2', eps=0.5)",
                                  "asam+adv(steps=2, loss='trades')+maxup(m=2)+cutmix"])
def test_specs_build_and_train_on_tiny_data(spec, digits, tmp_path):
    data = TensorData(digits.train.x[:32], digits.train.y[:32])
    torch.manual_seed(0)
    model = bn_cnn()
    start = copy.deepcopy(model.state_dict())
    history = maxup.fit(model, spec, train=data, epochs=2, batch_size=16, lr=0.05, seed=0, num_classes=10,
                        out_dir=tmp_path / "run", progress=False, device="cpu")
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    assert (tmp_path / "run" / "model.pt").is_file()


def test_two_seeded_runs_agree_and_the_step_makes_no_host_read():
    from maxup.train.syncs import count_step_syncs

    x, y = batch()
    results = []
    for _ in range(2):
        model = bn_cnn()
        step = step_for("adv(steps=2)+maxup(m=2)+cutmix", model)
        results.append((step(model, x, y, gen(4)).loss.detach(), model.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(v, results[1][1][k]) for k, v in results[0][1].items())
    model = bn_cnn()
    for spec in ("adv(steps=2)+cutmix", "adv(steps=2, loss='trades')+cutmix"):
        counter = count_step_syncs(step_for(spec, model), model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2))
        assert counter.reads == 0, counter.report()


def test_the_registry_entry():
    entry = M.REGISTRY["adv"]
    assert entry.kind == "step" and entry.cls is Adversarial and entry.cls.domain == "tensor"
    assert not entry.cls.random and not entry.cls.mixes_rows and not entry.cls.sharpness_aware
    assert entry.options() == {"eps": 0.1, "norm": "linf", "steps": 10, "step_size": None, "random_start": True,
                               "bounds": (0.0, 1.0), "loss": "pgd", "beta": 6.0}
    assert str(M.parse("adv(eps=0.03, bounds=none)+maxup(m=4)+cutmix")) == \
        "adv(eps=0.03, bounds=None)+maxup(m=4)+cutmix"
    step = step_for("adv(eps=0.2, steps=4)", bn_cnn())
    assert step.step_size == pytest.approx(0.125) and "eps=0.2" in repr(step)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"eps": -0.1}, "eps must be a finite number >= 0"),
    ({"eps": float("nan")}, "eps must be a finite number >= 0"),
    ({"eps": float("inf")}, "eps must be a finite number >= 0"),
    ({"eps": True}, "eps must be"),
    ({"eps": 0.1, "norm": "l1"}, "norm must be one of"),
    ({"eps": 0.1, "steps": 0}, "steps must be an integer >= 1"),
    ({"eps": 0.1, "steps": 2.0}, "steps must be an integer >= 1"),
    ({"eps": 0.1, "step_size": 0}, "step_size must be a finite number > 0"),
    ({"eps": 0.1, "step_size": -1.0}, "step_size must be a finite number > 0"),
    ({"eps": 0.1, "step_size": 0.2, "random_start": False}, "larger than eps=0.1 without a random start"),
    ({"eps": 0.1, "random_start": "yes"}, "random_start must be true or false"),
    ({"eps": 0.1, "bounds": (1.0, 0.0)}, "bounds must satisfy low < high"),
    ({"eps": 0.1, "bounds": (0.0, float("inf"))}, "bounds must hold two finite numbers"),
    ({"eps": 0.1, "bounds": 1.0}, "bounds must be the valid input range"),
])
def test_bad_attack_options_are_clear_errors(kwargs, message):
    x, y = batch(4)
    with pytest.raises(ValueError, match=message):
        pgd(bn_cnn(), x, y, **kwargs)
    with pytest.raises(ValueError, match=message):
        Adversarial(ERM(), torch.optim.SGD(bn_cnn().parameters(), lr=0.1), **kwargs)


def test_bad_inputs_are_clear_errors():
    model = bn_cnn()
    x, y = batch(4)
    with pytest.raises(ValueError, match=r"outside bounds=\(0.0, 1.0\).*bounds=None"):
        pgd(model, x * 3 - 1, y, eps=0.1)
    with pytest.raises(ValueError, match="x must be a non-empty floating-point batch"):
        pgd(model, (x * 255).long(), y, eps=0.1)
    with pytest.raises(ValueError, match="y must hold one label or target row per row of x"):
        pgd(model, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="init must be a starting perturbation of x's shape"):
        pgd(model, x, y, eps=0.1, init=torch.zeros(4, 64))
    with pytest.raises(ValueError, match="loss must return one value per row"):
        pgd(model, x, y, eps=0.1, loss=lambda logits, t: F.cross_entropy(logits, t))
    with pytest.raises(ValueError, match="loss must be a callable"):
        pgd(model, x, y, eps=0.1, loss="ce")
    assert torch.equal(pgd(model, x, y, eps=0.0), x)  # a zero radius: the inputs as they are
    # the step on standardised inputs names the fix
    step = step_for("adv", model)
    with pytest.raises(ValueError, match="outside bounds"):
        step(model, x * 3 - 1, y, gen(0))
    step_for("adv(bounds=None)", model)(model, x * 3 - 1, y, gen(0))


@pytest.mark.parametrize("spec, message", [
    ("adv(steps=0)", "steps must be an integer >= 1"),
    ("adv(eps=-1)", "eps must be a finite number >= 0"),
    ("adv(norm='l1')", "norm must be one of"),
    ("adv(loss='mart')", "loss must be one of"),
    ("adv(loss='trades', random_start=false)", "loss='trades' needs random_start=True"),
    ("adv(beta=-1)", "beta must be >= 0"),
    ("adv(step_size=0.5, random_start=false)", "larger than eps"),
    ("adv+maxup(m=2, temperature=0.5)+cutout", "use MaxUp in select mode"),
    ("adv+manifold_mixup", "acts inside the model's forward"),
    ("adv+maxup(m=2)+manifold_mixup", "acts inside the model's forward"),
    ("adv+gradaug", "more than one step term"),
    ("adv(gamma=1)", "unknown argument 'gamma' for method 'adv'"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        step_for(spec, bn_cnn())


# ---------------------------------------------------------------------------- PGD-AT against ERM


def test_a_model_trained_with_pgd_at_is_more_robust_than_erm(digits):
    """Same MLP, data, schedule and seed; ten epochs on the digits (1,347 images in [0, 1]); PGD-10 at the training
    radius on the 449 test images. Measured: ERM 59.2%, PGD-AT 71.3% robust accuracy (clean 94.9% and 93.8%)."""
    robust = {}
    for method in ("erm", "adv(eps=0.1, steps=5)"):
        model = mlp()
        maxup.fit(model, method, train=digits.train, epochs=10, batch_size=128, lr=0.05, seed=0, progress=False,
                  device="cpu")
        robust[method] = robust_accuracy(model, digits.test, eps_list=[0.1], steps=10, batch_size=500)[0]
    erm, adv = robust["erm"], robust["adv(eps=0.1, steps=5)"]
    assert adv["robust_accuracy"] > erm["robust_accuracy"] + 0.05
    assert adv["clean_accuracy"] > 0.85


# ---------------------------------------------------------------------------- robust accuracy through a normalisation


def test_standardized_attacks_in_pixel_units(trained, digits):
    mean, std = torch.tensor([0.3]), torch.tensor([0.4])
    # a model of standardised inputs that is ``trained`` of the pixels: behind Standardized, ``trained`` again
    net = Standardized(_Shift(copy.deepcopy(trained), mean, std), mean, std)
    data = TensorData((digits.test.x[:50] - 0.3) / 0.4, digits.test.y[:50])
    pixels = to_pixels(data, mean, std)
    torch.testing.assert_close(pixels.x, digits.test.x[:50], rtol=0, atol=1e-6)
    assert float(pixels.x.min()) >= 0 and float(pixels.x.max()) <= 1
    a = robust_accuracy(net, pixels, eps_list=[0.1], steps=3, batch_size=50)
    b = robust_accuracy(trained, TensorData(pixels.x, pixels.y), eps_list=[0.1], steps=3, batch_size=50)
    assert a[0]["robust"] == b[0]["robust"]


def test_robust_eval_is_robust_accuracy_on_the_first_examples_through_the_normalisation(trained, digits):
    pixels = TensorData(digits.test.x[:80], digits.test.y[:80])
    expected = robust_accuracy(trained, TensorData(pixels.x[:60], pixels.y[:60]), eps_list=[0.1], steps=3,
                               batch_size=500)[0]["robust_accuracy"]
    assert RobustEval(0.1, steps=3, limit=60)(trained, pixels) == expected
    mean, std = torch.tensor([0.3]), torch.tensor([0.4])  # a model of standardised inputs, attacked in pixels
    standardised = TensorData((pixels.x - 0.3) / 0.4, pixels.y)
    check = RobustEval(0.1, steps=3, limit=60, mean=mean, std=std)
    assert check(_Shift(copy.deepcopy(trained), mean, std), standardised) == pytest.approx(expected, abs=1 / 60)
    for kwargs, message in [({"eps": 0}, "eps must be a radius > 0"), ({"eps": 0.1, "mean": mean}, "both mean"),
                            ({"eps": 0.1, "norm": "l3"}, "norm"), ({"eps": 0.1, "limit": 0}, "limit")]:
        with pytest.raises(ValueError, match=message):
            RobustEval(**kwargs)


def test_the_trainer_records_robust_accuracy_at_every_evaluation(digits):
    splits = load_dataset("digits", train_size=200, normalize=False, seed=0)
    check = RobustEval(0.1, steps=2, limit=50)
    model = mlp(hidden=(32,))
    history = maxup.fit(model, "adv(eps=0.1, steps=2)+ema(decay=0.9)", train=splits.train, test=splits.test,
                        epochs=3, batch_size=64, seed=0, progress=False, device="cpu", eval_every=2,
                        robust_eval=check)
    assert [sorted(k for k in r if "robust" in k) for r in history] == \
        [[], ["ema_test_robust_accuracy", "test_robust_accuracy"], ["ema_test_robust_accuracy", "test_robust_accuracy"]]
    assert history[-1]["test_robust_accuracy"] == check(model, splits.test)  # the final weights, the same draws
    assert history[-1]["test_robust_accuracy"] <= history[-1]["test_accuracy"]
    from maxup.cli.report import summarize

    h = [dict(r) for r in history]
    h[1]["test_robust_accuracy"], h[2]["test_robust_accuracy"] = 0.6, 0.4  # robust overfitting: best at epoch 2
    row = summarize({"adv": [h]}, "adv")[0]
    assert (row["best_robust_epoch"], row["best_test_robust_accuracy"], row["test_robust_accuracy"]) == (2, 0.6, 0.4)


class _Shift(nn.Module):
    """A model of standardised inputs that undoes the standardisation (so it is ``inner`` of the pixels)."""

    def __init__(self, inner, mean, std):
        super().__init__()
        self.inner, self.mean, self.std = inner, mean, std

    def forward(self, z):
        return self.inner(z * self.std + self.mean)


# ---------------------------------------------------------------------------- maxup robust


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits):
    """Two finished runs on the digits: ERM on standardised inputs and PGD-AT on pixels."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, method, normalize in (("erm", "erm", True), ("adv", "adv(eps=0.1, steps=2)", False)):
            splits = load_dataset("digits", train_size=300, normalize=normalize, seed=0)
            model = mlp(hidden=(32,))
            maxup.fit(model, method, train=splits.train, epochs=3, batch_size=64, seed=0, progress=False, device="cpu",
                      out_dir=root / name, config={"dataset": "digits", "model": "mlp", "model_opt": {"hidden": [32]},
                                                   "normalize": normalize, "train_size": 300})
    finally:
        torch.set_num_threads(threads)
    return root


def parse(argv):
    from maxup.cli.robust import add_parser

    parser = argparse.ArgumentParser(prog="maxup")
    add_parser(parser.add_subparsers())
    return parser.parse_args(["robust", *argv])


def test_robust_command_writes_the_table_json_and_plot_and_resumes(runs, tmp_path, capsys, monkeypatch):
    from maxup.cli import robust as cli

    out = tmp_path / "robust"
    argv = [str(runs / "erm"), str(runs / "adv"), "--eps", "0.1,0.05", "--steps", "3", "--limit", "60",
            "--batch-size", "25", "--out", str(out), "--no-progress"]
    rows = cli.robust(parse(argv))
    printed = capsys.readouterr().out
    assert "| run | method | clean | eps=0.05 | eps=0.1 | s/example |" in printed
    for name in ("robust.md", "robust.json", "robust.png"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "robust.json").read_text())
    assert result["settings"]["eps"] == [0.05, 0.1] and [r["method"] for r in result["runs"]] == \
        ["erm", "adv(eps=0.1, steps=2)"]
    for row in rows:
        assert row["points"] == 60 and len(row["robust_accuracy"]) == 2
        assert all(a <= row["clean_accuracy"] for a in row["robust_accuracy"])
    assert "normalisation" in rows[0]["input_space"] and "normalisation" not in rows[1]["input_space"]
    # the standardised run is attacked in pixel units: the same as the library on its model behind Standardized
    from maxup.cli.certify import load_run, read_run

    splits, model = load_run(runs / "erm", read_run(runs / "erm"), device="cpu")
    test = TensorData(splits.test.x[:60], splits.test.y[:60])
    direct = robust_accuracy(Standardized(model, splits.mean, splits.std), to_pixels(test, splits.mean, splits.std),
                             eps_list=[0.1], steps=3, batch_size=25)[0]
    assert direct["robust_accuracy"] == rows[0]["robust_accuracy"][1]

    # never over earlier results without --resume
    with pytest.raises(ValueError, match="--resume"):
        cli.robust(parse(argv))
    # an interrupted evaluation: the adv run's log keeps its first radius and half a line
    logs = sorted((out / "points").glob("*.jsonl"))
    assert len(logs) == 2
    adv_log = next(p for p in logs if "adv" in p.name)
    lines = adv_log.read_text().splitlines()
    adv_log.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    calls = []
    real = cli.robust_accuracy
    monkeypatch.setattr(cli, "robust_accuracy", lambda *a, **k: calls.append(k["eps_list"]) or real(*a, **k))
    again = cli.robust(parse(argv + ["--resume", "--progress", "--eps", "0.05,0.1,0.2"]))
    assert sorted(calls) == [[0.1], [0.2], [0.2]]  # adv: the lost radius and the new one; erm: the new one
    for before, after in zip(rows, again):
        assert after["robust_accuracy"][:2] == before["robust_accuracy"]
        assert after["robust_accuracy"][2] <= after["robust_accuracy"][1]
    # --resume with other settings names them
    with pytest.raises(ValueError, match="steps 3 -> 4"):
        cli.robust(parse(argv + ["--resume", "--steps", "4"]))


@pytest.mark.parametrize("argv, message", [
    (["--eps", "-0.1"], "radii must be finite numbers >= 0"),
    (["--eps", "a,b"], "expected comma-separated radii"),
    (["--steps", "0"], "must be an integer >= 1"),
    (["--norm", "l1"], "invalid choice"),
    (["--step-size", "0"], "must be a finite number > 0"),
])
def test_robust_command_bad_options(runs, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        parse([str(runs / "erm"), "--out", str(tmp_path / "x"), *argv])
    assert message in capsys.readouterr().err


def test_robust_command_bad_runs_and_attacks(runs, tmp_path):
    from maxup.cli.robust import robust

    with pytest.raises(ValueError, match="does not exist"):
        robust(parse([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="listed twice"):
        robust(parse([str(runs / "erm"), str(runs / "erm"), "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="larger than eps"):
        robust(parse([str(runs / "erm"), "--no-random-start", "--step-size", "0.5", "--out", str(tmp_path / "x")]))
    assert not (tmp_path / "x").exists()
